"""What the experiment CLIs share: loading a model and its tokenizer, and the method options.

* `load_model(path, dtype)` -> ``(family, config, params)`` from a converted directory
  (``converted.json``, written by ``python -m converters``) or a Hugging Face directory
  (``config.json`` + weights, converted in memory on the fly).
* `load_tokenizer_from(path)`: the tokenizer stored in that directory; `add_tokenizer_arg` /
  `open_tokenizer`: ``--tokenizer DIR``, another directory's.
* `add_mesh_args(parser, default)` / `sharding_plan(args, default)`: ``--mesh`` / ``--fsdp``, the
  `lminf_jax.sharding.ShardingPlan` a model and its params are spread over devices by.
* The method options, the same in every command that chooses a method::

      --method M  (one method: generate, stream_nll)  |  --methods M [M ...]  (a comparison)
      -G/--global-branch  -L/--local-branch  -D/--limit-distance  --group-size  --leak
      --top-k-middle K  --top-k-insert-at N  --top-k-from-layer H  --top-k-to-layer H

  A method is written ``MASK[@cover][+FREQ[@FACTOR]]`` (`MethodChoice`). `add_attention_args` /
  `spec_from_args` + `frequencies_from_args` register and read one method; `add_methods_arg` a
  comparison, whose commands build each method with `method_spec`. The parameters are the methods' own
  (`lminf_jax.spec.METHODS`, each class's ``OPTIONS``, with their defaults in its ``from_options``):
  ``lm_infinite`` by default, L from the model's pretraining length (`pretraining_length`); top-k
  middle tokens (`add_top_k_args`, `top_k_from_args`) off unless asked for, inserted at distance L/2
  (the paper's) from `TopK`'s first layer. An option the chosen method does not take is an error.

Nothing here imports jax before it is used: a command parses its arguments (and shows ``--help``)
without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lminf_jax.converters.json_object import read_json_object
from lminf_jax.experiments.options import input_path, int_option, parse_checked
from lminf_jax.rope import FREQUENCY_METHODS, RopeScaling, frequency_method
from lminf_jax.spec import KINDS, METHODS, PARAMETERS, AttentionSpec, TopK

#: ``--dtype`` names (as in ``python -m converters``) and the dtypes they stand for.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

CONVERTED_FILE = "converted.json"
HF_CONFIG_FILE = "config.json"


#: The paper's short flags; every other method parameter is ``--its-name``.
_SHORT_FLAGS = {"global_branch": "-G", "local_branch": "-L", "limit_distance": "-D"}
#: The top-k middle-token options (``--top-k-middle`` and the like) and the smallest value of each.
TOP_K_OPTIONS = {"top_k_middle": 1, "top_k_insert_at": 0, "top_k_from_layer": 0, "top_k_to_layer": 1}
#: The tokenizer files a model directory (or ``--tokenizer DIR``) holds, one of them.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def _flags(parameter: str) -> list[str]:
    long = "--" + parameter.replace("_", "-")
    return [_SHORT_FLAGS[parameter], long] if parameter in _SHORT_FLAGS else [long]


# ----- models -----------------------------------------------------------------------------------


def resolve_dtype(dtype: Any):
    """None, a ``--dtype`` name (bf16 / fp16 / fp32) or anything `jnp.dtype` accepts, as a `jnp.dtype`."""
    import jax.numpy as jnp

    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return jnp.dtype(DTYPES[dtype])
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a floating dtype, got {dtype!r}") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {resolved.name}")
    return resolved


def model_kind(path: str | os.PathLike) -> str:
    """``"converted"`` or ``"hf"``; a ValueError naming `path` when it is neither."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model directory not found: {root}")
    if (root / CONVERTED_FILE).is_file():
        return "converted"
    if (root / HF_CONFIG_FILE).is_file():
        return "hf"
    raise ValueError(f"{root} is neither a converted checkpoint ({CONVERTED_FILE}, from `python -m converters`) "
                     f"nor a Hugging Face checkpoint ({HF_CONFIG_FILE} + weights)")


def hf_config(path: str | os.PathLike) -> dict:
    """The Hugging Face config dict of a converted or Hugging Face directory (reads no weights)."""
    root = Path(path)
    if model_kind(root) == "converted":
        meta = read_json_object(root / CONVERTED_FILE)
        config = meta.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"{root / CONVERTED_FILE} holds no config")
        return config
    return read_json_object(root / HF_CONFIG_FILE)


def load_config(path: str | os.PathLike):
    """``(family, config)`` of a model directory, the config checked against the names and shapes of its
    weights (converted.json's params manifest, or the Hugging Face checkpoint's headers) without reading
    them (fast: use it to validate options before `load_model`)."""
    from lminf_jax.converters.convert import plan_params
    from lminf_jax.converters.families import check_manifest, layout_for
    from lminf_jax.converters.reader import CheckpointReader
    from lminf_jax.converters.store import read_manifest
    from lminf_jax.models.registry import FAMILIES, family_for_config

    root = Path(path)
    config = hf_config(root)
    if model_kind(root) == "converted":
        meta = read_json_object(root / CONVERTED_FILE)
        name = meta.get("family")
        if name not in FAMILIES:
            raise ValueError(f"{root / CONVERTED_FILE}: unknown family {name!r}; known: {sorted(FAMILIES)}")
        family = FAMILIES[name]
        parsed = family.config_from_hf(config)
        held = {name: spec.shape for name, spec in read_manifest(root).items()}
        check_manifest(family, parsed, held, root / CONVERTED_FILE)
    else:
        family = family_for_config(config)
        parsed = family.config_from_hf(config)
        plan_params(CheckpointReader(root), layout_for(family, parsed))
    return family, parsed


def load_model(path: str | os.PathLike, dtype: Any = None, *, progress: bool = False, plan=None):
    """``(family, config, params)`` from a converted directory or a Hugging Face directory.

    ``dtype`` (None: keep the stored dtypes; a ``--dtype`` name or a dtype) casts every
    floating-point parameter. A Hugging Face checkpoint is converted in memory (nothing is
    written); ``progress`` shows that conversion's progress line. ``plan`` (a
    `lminf_jax.sharding.ShardingPlan`) places every parameter straight into its shards.
    """
    from lminf_jax.converters.convert import load_params
    from lminf_jax.converters.families import layout_for
    from lminf_jax.converters.store import load_converted

    root = Path(path)
    target = resolve_dtype(dtype)
    family, config = load_config(root)
    shardings = None if plan is None else family.param_shardings(config, plan)
    if model_kind(root) == "converted":
        params = load_converted(root, shardings=shardings, dtype=target)[0]
    else:
        params = load_params(root, layout_for(family, config), dtype=target, progress=progress, shardings=shardings)
    return family, config, params


def add_mesh_args(parser: argparse.ArgumentParser, default: str) -> None:
    """Register ``--mesh`` and ``--fsdp`` (how the model is spread over several devices)."""
    group = parser.add_argument_group("devices (used when more than one is present or --mesh is given)")
    group.add_argument("--mesh", metavar="AXES",
                       help="device mesh as AXIS=SIZE pairs over data (batch), seq (context parallel) and model "
                            f"(tensor parallel); -1 takes the devices left over (default: {default})")
    group.add_argument("--fsdp", action="store_true", help="also split every weight's hidden dimension over data")


def sharding_plan(args: argparse.Namespace, default: str):
    """The `ShardingPlan` of ``--mesh`` (``default`` without it), or None on one device with no
    ``--mesh`` and no ``--fsdp``; prints the mesh."""
    import jax

    from lminf_jax.sharding import ShardingPlan, parse_mesh

    if args.mesh is None and not args.fsdp and jax.device_count() == 1:
        return None
    plan = ShardingPlan(parse_mesh(args.mesh or default), fsdp=args.fsdp)
    print(f"devices: {plan.describe()}", file=sys.stderr)
    return plan


def nonfinite_params(params) -> dict[str, int]:
    """``{flat parameter name: count}`` of the floating parameters holding NaN or infinite values."""
    import jax.numpy as jnp
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params, sep=".") if isinstance(params, dict) else {"params": params}
    counts = {name: int(jnp.size(x) - jnp.isfinite(x).sum()) for name, x in flat.items()
              if jnp.issubdtype(x.dtype, jnp.floating)}
    return {name: n for name, n in counts.items() if n}


def params_dtype(params):
    """The floating dtype (a `jnp.dtype`) holding most parameters (float32 when there are none)."""
    import jax
    import jax.numpy as jnp

    counts: dict = {}
    for leaf in jax.tree.leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            counts[jnp.dtype(leaf.dtype)] = counts.get(jnp.dtype(leaf.dtype), 0) + leaf.size
    return max(counts, key=counts.get) if counts else jnp.dtype(jnp.float32)


# ----- tokenizers -------------------------------------------------------------------------------


def load_tokenizer_from(path: str | os.PathLike):
    """The tokenizer stored in model directory `path` (``tokenizer.model`` or ``tokenizer.json``).

    For a ``tokenizer.json`` whose BOS/EOS are not named in ``tokenizer_config.json``, the
    config's ``bos_token_id``/``eos_token_id`` are used (as for a Hugging Face directory;
    a converted directory keeps its config in ``converted.json``).
    """
    from lminf_jax.converters.tokenizer import HFTokenizer, load_tokenizer

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model directory not found: {root}")
    try:
        tokenizer = load_tokenizer(root)
    except FileNotFoundError:
        raise NoTokenizer(f"{root} has no tokenizer files ({' / '.join(TOKENIZER_FILES)})") from None
    if isinstance(tokenizer, HFTokenizer) and (root / CONVERTED_FILE).is_file():
        config = hf_config(root)
        for kind in ("bos", "eos"):
            token_id = config.get(f"{kind}_token_id")
            usable = isinstance(token_id, int) and not isinstance(token_id, bool)
            if getattr(tokenizer, f"{kind}_id") is None and usable:
                setattr(tokenizer, f"{kind}_id", token_id)
    return tokenizer


class NoTokenizer(ValueError):
    """A directory that holds none of the `TOKENIZER_FILES`."""


def add_tokenizer_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Register ``--tokenizer DIR``: the tokenizer of another directory than the model's."""
    parser.add_argument("--tokenizer", type=input_path, metavar="DIR",
                        help=f"read the tokenizer ({' or '.join(TOKENIZER_FILES)}) from DIR (default: the model "
                             "directory)")


def open_tokenizer(model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                   option: str = "--tokenizer DIR", alternative: str | None = None):
    """The tokenizer of `tokenizer_dir`, else of `model_dir`. When the model directory holds none, the
    ValueError says so and what to do: give `option` (how the command takes a tokenizer directory), or
    the command's `alternative` (e.g. ``"score token ids with --tokens F.npy"``)."""
    try:
        return load_tokenizer_from(model_dir if tokenizer_dir is None else tokenizer_dir)
    except NoTokenizer as e:
        if tokenizer_dir is not None:
            raise NoTokenizer(f"tokenizer directory {e}") from None
        also = f", or {alternative}" if alternative else ""
        raise NoTokenizer(f"model directory {e}: give {option}, a directory with the model's tokenizer{also}") from None


# ----- attention options ------------------------------------------------------------------------


def pretraining_length(config) -> int:
    """The family config's pretraining length (`models.declaration.ModelConfig`: each family says which
    config field holds it, e.g. BLOOM's ``seq_length`` or 2048)."""
    return config.pretraining_length


def add_method_options(group: argparse._ArgumentGroup) -> None:
    """Register every method parameter (`lminf_jax.spec.METHODS`' ``OPTIONS``) once, its help saying
    what it means to each method that takes it."""
    for parameter in PARAMETERS:
        options = {name: method.OPTIONS[parameter] for name, method in METHODS.items() if parameter in method.OPTIONS}
        uses: dict[str, list[str]] = {}  # meaning -> the methods the parameter has that meaning for
        for name, option in options.items():
            uses.setdefault(option.meaning, []).append(name)
        group.add_argument(*_flags(parameter), dest=parameter, metavar=next(iter(options.values())).symbol,
                           type=int_option(min(option.minimum for option in options.values())),
                           help="; ".join(f"{', '.join(names)}: {meaning}" for meaning, names in uses.items()))


def method_options(args: argparse.Namespace) -> dict[str, int | None]:
    """The method parameters given on the command line (None: not given)."""
    return {parameter: getattr(args, parameter, None) for parameter in PARAMETERS}


def _grammar(several: bool) -> str:
    """How a method is written (`MethodChoice`), for ``--method`` (one decoding method, whose lengths are
    not known in advance) or ``--methods`` (a comparison at known lengths)."""
    masks, frequencies = ", ".join(KINDS), ", ".join(FREQUENCY_METHODS)
    if not several:
        return (f"MASK[+FREQ@FACTOR]: a mask method ({masks}), optionally with a RoPE frequency method "
                f"({frequencies}) at an extension factor (target length / L_train; dynamic_ntk's may be left "
                "out), e.g. lm_infinite+yarn@4")
    stretched = ", ".join(name for name, method in METHODS.items() if method.STRETCH)
    return (f"each MASK[@{COVER}][+FREQ[@FACTOR]]: a mask method ({masks}; @{COVER}: the parameter of {stretched} "
            f"chosen per length), with or without a RoPE frequency method ({frequencies}) at an extension factor "
            "(without @: the one each length needs, length / L_train), e.g. yarn, pi@32, self_extend@cover")


def method_type(*names: str) -> Callable[[str], str]:
    """An argparse type: a method of `MethodChoice`'s grammar, or one of a command's own `names`,
    returned as written; anything else is refused while parsing, naming the part that is wrong."""

    def parse(text: str) -> str:
        if text not in names:
            try:
                MethodChoice.parse(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return parse


def add_attention_args(parser: argparse.ArgumentParser) -> None:
    """Register one attention method (``--method``, the method parameters and top-k middle tokens) on
    `parser`; `spec_from_args` and `frequencies_from_args` read them."""
    group = parser.add_argument_group("attention method")
    group.add_argument("--method", type=method_type(), default="lm_infinite", metavar="METHOD",
                       help=f"the attention method, {_grammar(several=False)}")
    add_method_options(group)
    add_top_k_args(group)


def add_methods_arg(parser: argparse.ArgumentParser, default: Sequence[str] | None,
                    names: dict[str, str] | None = None, unset: str | None = None) -> argparse._ArgumentGroup:
    """Register ``--methods`` (`default`: the methods compared without it; None: what `unset` says)
    with the command's own method `names` (and what each is) beside the grammar, and the method
    parameters, each applied to the methods that take it; returns their group."""
    names = names or {}
    group = parser.add_argument_group("methods (each parameter applies to the methods that take it)")
    own = "".join(f"; or {name}: {what}" for name, what in names.items())
    group.add_argument("--methods", nargs="+", type=method_type(*names), metavar="METHOD",
                       default=None if default is None else list(default),
                       help=f"the methods compared, {_grammar(several=True)}{own}"
                            + ("" if default is not None else f" (default: {unset})"))
    add_method_options(group)
    return group


def checked_methods(names: list[str], everything: str | None = "all") -> list[str]:
    """``--methods`` as given, after refusing a method listed twice (under any spelling, e.g. ``yarn@4``
    and ``vanilla+yarn@4.0``) and `everything` (the command's name for all its methods, if it has one)
    beside others."""
    if everything in names and len(names) > 1:
        raise ValueError(f"--methods: {everything} stands alone, got {' '.join(names)}")

    def canonical(name: str) -> str:
        try:
            return MethodChoice.parse(name).name
        except ValueError:  # a command's own name
            return name

    if len({canonical(name) for name in names}) != len(names):
        raise ValueError(f"--methods: a method is listed twice: {names}")
    return names


#: `TopK`'s declared defaults (its first and last layer are those of the --top-k-* options).
TOP_K_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TopK)}


def add_top_k_args(group: argparse.ArgumentParser | argparse._ArgumentGroup, k: str = "off") -> None:
    """Register the top-k middle-token options (`top_k_from_args` reads them); `k`: what happens
    without ``--top-k-middle`` in this command."""
    group.add_argument("--top-k-middle", type=int_option(TOP_K_OPTIONS["top_k_middle"]), metavar="K",
                       help=f"the last query of each model call also attends the K best middle tokens its mask "
                            f"hides (default: {k})")
    group.add_argument("--top-k-insert-at", type=int_option(TOP_K_OPTIONS["top_k_insert_at"]), metavar="N",
                       help="the distance the top-k middle tokens are scored at (default: L / 2)")
    group.add_argument("--top-k-from-layer", type=int_option(TOP_K_OPTIONS["top_k_from_layer"]), metavar="H",
                       help=f"the first layer using top-k middle tokens (default: {TOP_K_DEFAULTS['from_layer']}, as the "
                            "official runs; the last layer of a model with fewer layers)")
    group.add_argument("--top-k-to-layer", type=int_option(TOP_K_OPTIONS["top_k_to_layer"]), metavar="H",
                       help="the layers before H use top-k middle tokens (default: to the last layer)")


def top_k_from_args(args: argparse.Namespace, window: int | None, layers: int | None,
                    k: int | None = None) -> TopK | None:
    """The `TopK` of the --top-k-* options: ``--top-k-middle`` tokens (else `k`, for a method that
    uses them by name) scored at ``--top-k-insert-at`` (else ``window // 2``, the paper's L/2), in the
    layers ``--top-k-from-layer`` (else `TopK`'s, or the last of a model of fewer ``layers``) up to
    ``--top-k-to-layer``. None when there are no middle tokens; then any other --top-k-* option is a
    ValueError."""
    k = k if args.top_k_middle is None else args.top_k_middle
    if k is None:
        for name in TOP_K_OPTIONS:
            if getattr(args, name, None) is not None:
                raise ValueError(f"{'/'.join(_flags(name))} needs --top-k-middle")
        return None
    return TopK(k=k, insert_distance=window // 2 if args.top_k_insert_at is None else args.top_k_insert_at,
                from_layer=_default_from_layer(layers) if args.top_k_from_layer is None else args.top_k_from_layer,
                to_layer=TOP_K_DEFAULTS["to_layer"] if args.top_k_to_layer is None else args.top_k_to_layer)


def _default_from_layer(layers: int | None) -> int:
    """`TopK`'s first layer, or the last layer of a model with fewer (None: the layer count is unknown)."""
    declared = TOP_K_DEFAULTS["from_layer"]
    return declared if layers is None else min(declared, layers - 1)


def fixed_method(text: str, option: str = "--method ", parameter: Callable[[str], str] | None = None) -> MethodChoice:
    """The method `text` of a command whose lengths are not known in advance (decoding, lm-eval's
    requests): a fixed extension factor (``dynamic_ntk``'s may be left out: its base follows the length)
    and no ``@cover``. The ValueError names `option` (how the command takes the method) and
    ``parameter(name)`` (how it takes a method parameter; default: its flag)."""
    parameter = parameter or (lambda name: "/".join(_flags(name)))
    try:
        choice = MethodChoice.parse(text)
    except ValueError as e:
        raise ValueError(f"{option}{text}: {e}") from None
    if choice.cover:
        stretch = parameter(METHODS[choice.mask].STRETCH)
        raise ValueError(f"{option}{text}: @{COVER} chooses {stretch} per length, and the lengths here are not known "
                         f"in advance: give {stretch} instead")
    if choice.frequency not in (None, "dynamic_ntk") and choice.factor is None:
        raise ValueError(f"{option}{text}: give the extension factor, e.g. {choice.name}@4 (the lengths here are "
                         "not known in advance)")
    return choice


def spec_from_args(args: argparse.Namespace, config=None) -> AttentionSpec:
    """The `AttentionSpec` of ``--method``'s mask, the method parameters and the top-k options;
    ``config`` (a family config or HF config dict) supplies the pretraining length defaults come from.
    A ValueError names an option that does not apply."""
    name = fixed_method(args.method).mask
    method = METHODS[name]
    for parameter, value in method_options(args).items():
        if value is not None and parameter not in method.OPTIONS:
            raise ValueError(f"{'/'.join(_flags(parameter))} is not used by --method {args.method}")

    def default_length(parameter: str) -> int:
        if config is None:
            raise ValueError(f"--method {args.method} needs {'/'.join(_flags(parameter))} (no model config to take "
                             f"its default from)")
        return pretraining_length(config)

    spec = method.from_options(default_length, **{p: getattr(args, p) for p in method.OPTIONS})
    if args.top_k_middle is not None and not spec.hides_middle:
        raise ValueError(f"--top-k-middle needs a mask that hides middle tokens; --method {args.method} hides none")
    top_k = top_k_from_args(args, spec.window, getattr(config, "num_layers", None))
    return spec if top_k is None else dataclasses.replace(spec, top_k=top_k)


def frequencies_from_args(args: argparse.Namespace, config) -> RopeScaling | None:
    """The `RopeScaling` of ``--method``'s frequency method (None without one) for a model whose
    ``config`` gives L_train."""
    return fixed_method(args.method).frequencies(0, pretraining_length(config))


def method_spec(method: str, config=None, **options: int | None) -> AttentionSpec:
    """`spec_from_args` for one mask method, taking only the ``options`` (method parameters, None:
    default) that method uses: an experiment comparing several methods applies each option wherever
    it applies."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(KINDS)}")
    unknown = sorted(set(options) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"unknown method parameter {unknown[0]!r}; known: {', '.join(PARAMETERS)}")
    args = argparse.Namespace(method=method, **dict.fromkeys(TOP_K_OPTIONS),
                              **{p: (options.get(p) if p in METHODS[method].OPTIONS else None) for p in PARAMETERS})
    return spec_from_args(args, config)


#: ``MASK@cover``: the mask method's `AttentionSpec.STRETCH` parameter chosen per length (`AttentionSpec.covering`).
COVER = "cover"


@dataclasses.dataclass(frozen=True)
class MethodChoice:
    """One method of a comparison: a mask method (`KINDS`), its `AttentionSpec.STRETCH` parameter fixed
    or, with ``cover``, chosen per length so that no distance reaches L_train (`AttentionSpec.covering`),
    and, optionally, a frequency method (`lminf_jax.FREQUENCY_METHODS`) at a fixed extension ``factor``
    or, when ``factor`` is None, at the factor each length n needs: ``max(1, n / L_train)``
    (``dynamic_ntk``: 1, since its base already follows the sequence length; in one forward over n
    tokens it then equals ``ntk`` at n / L_train).

    Written ``MASK[@cover]``, ``FREQ[@FACTOR]`` (the vanilla mask) or ``MASK[@cover]+FREQ[@FACTOR]``,
    e.g. ``lm_infinite``, ``self_extend@cover``, ``yarn``, ``pi@32``, ``self_extend+ntk``."""

    mask: str
    frequency: str | None = None
    factor: float | None = None
    cover: bool = False

    def __post_init__(self) -> None:
        if self.cover and METHODS[self.mask].STRETCH is None:
            raise ValueError(f"method {self.name!r}: {self.mask} has no parameter to choose per length "
                             f"(@{COVER} applies to {', '.join(k for k, m in METHODS.items() if m.STRETCH)})")

    @classmethod
    def parse(cls, text: str) -> MethodChoice:
        """The choice written as ``text``; a ValueError names the part that is not a method."""
        mask, _, rest = text.rpartition("+") if "+" in text else ("", "", text)
        if not rest:
            raise ValueError(f"method {text!r}: nothing after '+'")
        if not mask and rest.partition("@")[0] in KINDS:
            mask, rest = rest, ""
        mask, at_mask, cover = mask.partition("@")
        if at_mask and cover != COVER:
            raise ValueError(f"method {text!r}: a mask method takes only '@{COVER}' (its parameter per length), "
                             f"got '@{cover}'")
        if mask and mask not in KINDS:
            raise ValueError(f"method {text!r}: {mask!r} is not a mask method ({', '.join(KINDS)})")
        if not rest:
            return cls(mask, cover=bool(at_mask))
        name, at, factor_text = rest.partition("@")
        if name not in FREQUENCY_METHODS:
            known = f"a mask method ({', '.join(KINDS)})" if not mask and not at else ""
            raise ValueError(f"method {text!r}: {name!r} is not {known + ' or ' if known else ''}a frequency method "
                             f"({', '.join(FREQUENCY_METHODS)})")
        factor = None
        if at:
            try:
                factor = float(factor_text)
            except ValueError:
                factor = math.nan
            if not (math.isfinite(factor) and factor >= 1):
                raise ValueError(f"method {text!r}: the factor after '@' must be a number >= 1, got {factor_text!r}")
        return cls(mask or "vanilla", name, factor, bool(at_mask))

    @property
    def name(self) -> str:
        """The choice as written in its canonical form (``vanilla+`` left out)."""
        mask = f"{self.mask}@{COVER}" if self.cover else self.mask
        if self.frequency is None:
            return mask
        freq = self.frequency if self.factor is None else f"{self.frequency}@{self.factor:g}"
        return freq if mask == "vanilla" else f"{mask}+{freq}"

    def spec(self, spec: AttentionSpec, length: int, l_train: int) -> AttentionSpec:
        """The mask method (``spec``, built from the options) for sequences of ``length`` tokens."""
        return spec.covering(length, l_train) if self.cover else spec

    def frequencies(self, length: int, l_train: int) -> RopeScaling | None:
        """The RoPE scaling for sequences of ``length`` tokens of a model pretrained on ``l_train``."""
        if self.frequency is None:
            return None
        factor = self.factor
        if factor is None:
            factor = 1.0 if self.frequency == "dynamic_ntk" else max(1.0, length / l_train)
        return frequency_method(self.frequency, factor, l_train)


def spec_settings(spec: AttentionSpec) -> dict:
    """The spec as a JSON-serialisable dict (for result files)."""
    out = dataclasses.asdict(spec)
    out["describe"] = spec.describe()
    return out


# ----- command lines ----------------------------------------------------------------------------


def parse_cli(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """`experiments.options.parse_checked` (which also refuses an output where an input is), or the
    exit code when argparse exits (it has printed the usage and ``error: ...`` on stderr, or the
    help), so that ``main(argv)`` returns a code."""
    try:
        return parse_checked(parser, argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2


def save_result(record: dict, out: str | os.PathLike, draw: Callable[[dict, Path], object] | None = None,
                plot_path: str | os.PathLike | None = None) -> None:
    """Write `record` as JSON at `out`, draw it with ``draw(record, plot_path)`` when both are given,
    and print where they went."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    where = [str(out)]
    if draw is not None and plot_path is not None:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        draw(record, Path(plot_path))
        where.append(str(plot_path))
    print(f"wrote {' and '.join(where)}")


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """A CLI's ``main``: parse, then ``run(args)``; bad input (OSError, ValueError, ImportError)
    prints ``error: ...`` on stderr and returns 1."""
    args = parse_cli(parser, argv)
    if isinstance(args, int):
        return args
    try:
        return run(args)
    except (OSError, ValueError, ImportError) as e:  # bad input: the message says what and where
        print(f"error: {e}", file=sys.stderr)
        return 1
