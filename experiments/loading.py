"""What the experiment CLIs share: loading a model and its tokenizer, and the attention options.

* `load_model(path, dtype)` -> ``(family, config, params)`` from a converted directory
  (``converted.json``, written by ``python -m converters``) or a Hugging Face directory
  (``config.json`` + weights, converted in memory on the fly).
* `load_tokenizer_from(path)`: the tokenizer stored in that directory.
* `add_mesh_args(parser, default)` / `sharding_plan(args, default)`: ``--mesh`` / ``--fsdp``, the
  `lminf_jax.sharding.ShardingPlan` a model and its params are spread over devices by.
* `add_attention_args(parser)` / `spec_from_args(args, config)`: one set of command-line
  options for the attention method, turned into an `AttentionSpec`::

      --method lm_infinite|vanilla|lambda_mask|distance_limit|sliding_window|streaming_llm|self_extend|leaky_rerope
      -G/--global-branch  -L/--local-branch  -D/--limit-distance  --group-size  --leak
      --top-k-middle K  --top-k-insert-at N  --top-k-from-layer H  --rope-scaling FREQ@FACTOR

  The options are the methods' own (`lminf_jax.spec.METHODS`, each class's ``OPTIONS``, with their
  defaults in its ``from_options``): ``lm_infinite`` by default, L from the model's pretraining length
  (`pretraining_length`); top-k middle tokens off, when on inserted at distance L/2 (the paper's) from
  layer 4. An option the chosen method does not take is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lminf_jax.converters.reader import read_json_object
from lminf_jax.experiments.options import int_option, parse_checked
from lminf_jax import FREQUENCY_METHODS, AttentionSpec, RopeScaling, TopK, frequency_method
from lminf_jax.spec import KINDS, METHODS, PARAMETERS

#: ``--dtype`` names, as in ``python -m converters``.
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}

CONVERTED_FILE = "converted.json"
HF_CONFIG_FILE = "config.json"


#: The paper's short flags; every other method parameter is ``--its-name``.
_SHORT_FLAGS = {"global_branch": "-G", "local_branch": "-L", "limit_distance": "-D"}
_TOP_K_FLAGS = {"top_k_insert_at": "--top-k-insert-at", "top_k_from_layer": "--top-k-from-layer"}


def _flags(parameter: str) -> list[str]:
    long = "--" + parameter.replace("_", "-")
    return [_SHORT_FLAGS[parameter], long] if parameter in _SHORT_FLAGS else [long]


# ----- models -----------------------------------------------------------------------------------


def resolve_dtype(dtype: Any) -> jnp.dtype | None:
    """None, a ``--dtype`` name (bf16 / fp16 / fp32) or anything `jnp.dtype` accepts."""
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
    from lminf_jax.sharding import ShardingPlan, parse_mesh

    if args.mesh is None and not args.fsdp and jax.device_count() == 1:
        return None
    plan = ShardingPlan(parse_mesh(args.mesh or default), fsdp=args.fsdp)
    print(f"devices: {plan.describe()}", file=sys.stderr)
    return plan


def nonfinite_params(params) -> dict[str, int]:
    """``{flat parameter name: count}`` of the floating parameters holding NaN or infinite values."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params, sep=".") if isinstance(params, dict) else {"params": params}
    counts = {name: int(jnp.size(x) - jnp.isfinite(x).sum()) for name, x in flat.items()
              if jnp.issubdtype(x.dtype, jnp.floating)}
    return {name: n for name, n in counts.items() if n}


def params_dtype(params) -> jnp.dtype:
    """The floating dtype holding most parameters (float32 when there are none)."""
    counts: dict[jnp.dtype, int] = {}
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
        raise ValueError(
            f"no tokenizer in {root}: expected tokenizer.model or tokenizer.json (a directory converted by an "
            "older `python -m converters` lacks them: copy them from the Hugging Face directory)") from None
    if isinstance(tokenizer, HFTokenizer) and (root / CONVERTED_FILE).is_file():
        config = hf_config(root)
        for kind in ("bos", "eos"):
            token_id = config.get(f"{kind}_token_id")
            usable = isinstance(token_id, int) and not isinstance(token_id, bool)
            if getattr(tokenizer, f"{kind}_id") is None and usable:
                setattr(tokenizer, f"{kind}_id", token_id)
    return tokenizer


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


def add_attention_args(parser: argparse.ArgumentParser) -> None:
    """Register the attention options (see the module docstring) on `parser`."""
    group = parser.add_argument_group("attention method")
    group.add_argument("--method", choices=KINDS, default="lm_infinite",
                       help="attention method (default: lm_infinite)")
    add_method_options(group)
    group.add_argument("--top-k-middle", type=int_option(1), metavar="K",
                       help="also attend the K best hidden middle tokens from the last query (default: off)")
    group.add_argument("--top-k-insert-at", type=int_option(0), metavar="N",
                       help="distance the top-k middle tokens are scored at (default: L / 2)")
    group.add_argument("--top-k-from-layer", type=int_option(0), metavar="H",
                       help="first layer using top-k middle tokens (default: 4)")
    group.add_argument("--rope-scaling", metavar="FREQ@FACTOR",
                       help=f"also rescale RoPE with a frequency method, one of {', '.join(FREQUENCY_METHODS)}, at an "
                            "extension factor (target length / L_train; dynamic_ntk: its factor s), e.g. yarn@4 "
                            "(default: the checkpoint's own RoPE)")


def spec_from_args(args: argparse.Namespace, config=None) -> AttentionSpec:
    """The `AttentionSpec` the attention options ask for; ``config`` (a family config or HF
    config dict) supplies the pretraining length defaults come from. A ValueError names an option
    that does not apply."""
    method = METHODS[args.method]
    for parameter, value in method_options(args).items():
        if value is not None and parameter not in method.OPTIONS:
            raise ValueError(f"{'/'.join(_flags(parameter))} is not used by --method {args.method}")
    if args.top_k_middle is None:
        for name, flag in _TOP_K_FLAGS.items():
            if getattr(args, name) is not None:
                raise ValueError(f"{flag} needs --top-k-middle")

    def default_length(parameter: str) -> int:
        if config is None:
            raise ValueError(f"--method {args.method} needs {'/'.join(_flags(parameter))} (no model config to take "
                             f"its default from)")
        return pretraining_length(config)

    spec = method.from_options(default_length, **{p: getattr(args, p) for p in method.OPTIONS})
    if args.top_k_middle is not None:
        if not spec.hides_middle:
            raise ValueError(f"--top-k-middle needs a mask that hides middle tokens; --method {args.method} hides none")
        insert_at = args.top_k_insert_at if args.top_k_insert_at is not None else spec.window // 2  # the paper's L/2
        spec = dataclasses.replace(spec, top_k=TopK(
            k=args.top_k_middle, insert_distance=insert_at,
            from_layer=4 if args.top_k_from_layer is None else args.top_k_from_layer))
    return spec


def frequencies_from_args(args: argparse.Namespace, config) -> RopeScaling | None:
    """The `RopeScaling` of ``--rope-scaling FREQ@FACTOR`` (None when not given) for a model whose
    ``config`` gives L_train."""
    text = getattr(args, "rope_scaling", None)
    if text is None:
        return None
    try:
        choice = MethodChoice.parse(text)
    except ValueError as e:
        raise ValueError(f"--rope-scaling: {e}") from None
    if choice.frequency is None or choice.mask != "vanilla" or "+" in text:
        raise ValueError(f"--rope-scaling takes FREQ@FACTOR (the mask is --method), got {text!r}")
    if choice.factor is None:
        raise ValueError(f"--rope-scaling {text}: give the extension factor, e.g. {choice.frequency}@4 (the length "
                         "a decoding run reaches is not known in advance)")
    return choice.frequencies(0, pretraining_length(config))


def method_spec(method: str, config=None, **options: int | None) -> AttentionSpec:
    """`spec_from_args` for one method, taking only the ``options`` (method parameters, None: default)
    that method uses: an experiment comparing several methods applies each option wherever it applies."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(KINDS)}")
    unknown = sorted(set(options) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"unknown method parameter {unknown[0]!r}; known: {', '.join(PARAMETERS)}")
    args = argparse.Namespace(method=method, top_k_middle=None, top_k_insert_at=None, top_k_from_layer=None,
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
