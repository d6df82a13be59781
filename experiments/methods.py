"""The attention-method options, the same in every command that chooses a method::

      --method M  (one method: generate, stream_nll)  |  --methods M [M ...]  (a comparison)
      -G/--global-branch  -L/--local-branch  -D/--limit-distance  --group-size  --leak
      --top-k-middle K  --top-k-insert-at N  --top-k-from-layer H  --top-k-to-layer H

A method is written ``MASK[@cover][+FREQ[@FACTOR]]`` (`MethodChoice`). `add_attention_args` /
`spec_from_args` + `frequencies_from_args` register and read one method; `add_methods_arg` a
comparison, whose commands build each method with `method_spec`; both build it with
`spec_from_options`. The parameters are the methods' own (`lminf_jax.method_parameters.PARAMETERS`,
short flags included, and each method's ``OPTIONS``, which declare what each means and its default):
``lm_infinite`` by default, L from the model's pretraining length
(`experiments.loading.pretraining_length`); top-k middle tokens (`add_top_k_args`, `top_k_from_args`)
off unless asked for, with `TopK`'s defaults (inserted at L/2, the paper's) but for a model with fewer
layers. An option the chosen method does not take is an error. The generation tasks (passkey, RULER)
compare `TASK_METHODS` (`add_task_methods_arg`, `task_method_specs`, `task_attention_call`).

Nothing here imports jax before it is used: a command parses its arguments (and shows ``--help``)
without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from lminf_jax.experiments.loading import pretraining_length
from lminf_jax.experiments.options import int_option
from lminf_jax.experiments.task_generation import PROMPT_METHODS, SETTABLE, PromptSettings
from lminf_jax.method_parameters import PARAMETERS
from lminf_jax.rope import FREQUENCY_METHODS, RopeScaling, frequency_method
from lminf_jax.spec import KINDS, METHODS, AttentionSpec, TopK

if TYPE_CHECKING:
    from lminf_jax import AttentionCall

#: The top-k middle-token options (``--top-k-middle`` and the like) and the smallest value of each.
TOP_K_OPTIONS = {"top_k_middle": 1, "top_k_insert_at": 0, "top_k_from_layer": 0, "top_k_to_layer": 1}


def _flags(option: str) -> list[str]:
    """The command-line flags of a method parameter or top-k option: ``--its-name``, after ``-SYMBOL``
    for a parameter declared with a short flag."""
    long = "--" + option.replace("_", "-")
    parameter = PARAMETERS.get(option)
    return [f"-{parameter.symbol}", long] if parameter is not None and parameter.short_flag else [long]


def _flag_text(option: str) -> str:
    """The flags of a method parameter or top-k option as a message names them, e.g. ``-L/--local-branch``."""
    return "/".join(_flags(option))


def _parameter_help(parameter: str) -> str:
    """What ``parameter`` means to each method that takes it, and its default there (the most common
    first, then the methods whose default differs)."""
    uses: dict[str, dict[str, str]] = {}  # meaning -> {method: its default}
    for name, method in METHODS.items():
        if parameter in method.OPTIONS:
            option = method.OPTIONS[parameter]
            default = option.describe_default(method.__dataclass_fields__[parameter].default)
            uses.setdefault(option.meaning, {})[name] = default
    parts = []
    for meaning, defaults in uses.items():
        values = list(defaults.values())
        common = max(values, key=values.count)
        others = "".join(f"; {name}: {value}" for name, value in defaults.items() if value != common)
        parts.append(f"{', '.join(defaults)}: {meaning} (default: {common}{others})")
    return "; ".join(parts)


def add_method_options(group: argparse._ArgumentGroup) -> None:
    """Register every method parameter (`lminf_jax.method_parameters.PARAMETERS`) once, its help saying
    what it means to each method that takes it and its default there."""
    for parameter, declared in PARAMETERS.items():
        group.add_argument(*_flags(parameter), dest=parameter, metavar=declared.symbol,
                           type=int_option(declared.minimum), help=_parameter_help(parameter))


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


def _top_k_options(args: argparse.Namespace) -> dict[str, int | None]:
    """The --top-k-* options given on the command line (None: not given)."""
    return {name: getattr(args, name, None) for name in TOP_K_OPTIONS}


def top_k_from_args(args: argparse.Namespace, window: int | None, layers: int | None,
                    k: int | None = None) -> TopK | None:
    """`top_k_from_options` of the --top-k-* options on the command line."""
    return top_k_from_options(_top_k_options(args), window, layers, k)


def top_k_from_options(options: Mapping[str, int | None], window: int | None, layers: int | None,
                       k: int | None = None) -> TopK | None:
    """The `TopK` of the top-k options (`TOP_K_OPTIONS`' names; None or left out: not given) for a
    method whose window is ``window`` (unused without middle tokens): ``top_k_middle`` tokens (else
    `k`, for a method that uses them by name) scored at ``top_k_insert_at`` (else `TopK`'s, half the
    window), in the layers ``top_k_from_layer`` (else `TopK`'s, or the last of a model of fewer
    ``layers``) up to ``top_k_to_layer`` (else `TopK`'s). None when there are no middle tokens; then any
    other top-k option is a ValueError."""
    given = {name: options.get(name) for name in TOP_K_OPTIONS}
    k = k if given["top_k_middle"] is None else given["top_k_middle"]
    if k is None:
        for name, value in given.items():
            if value is not None:
                raise ValueError(f"{_flag_text(name)} needs --top-k-middle")
        return None
    from_layer = _default_from_layer(layers) if given["top_k_from_layer"] is None else given["top_k_from_layer"]
    return TopK(k=k, insert_distance=given["top_k_insert_at"], from_layer=from_layer,
                to_layer=given["top_k_to_layer"]).at_window(window)


def _default_from_layer(layers: int | None) -> int:
    """`TopK`'s first layer, or the last layer of a model with fewer (None: the layer count is unknown)."""
    declared = TOP_K_DEFAULTS["from_layer"]
    return declared if layers is None else min(declared, layers - 1)


def fixed_method(text: str, option: str = "--method ", parameter: Callable[[str], str] | None = None) -> MethodChoice:
    """The method `text` of a command whose lengths are not known in advance (decoding, lm-eval's
    requests): a fixed extension factor (``dynamic_ntk``'s may be left out: its base follows the length)
    and no ``@cover``. The ValueError names `option` (how the command takes the method) and
    ``parameter(name)`` (how it takes a method parameter; default: its flag)."""
    parameter = parameter or _flag_text
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


def spec_from_options(mask: str, options: Mapping[str, int | None], config=None,
                      top_k: Mapping[str, int | None] | None = None, method: str | None = None) -> AttentionSpec:
    """The `AttentionSpec` of mask method ``mask`` (one of `KINDS`) with the method parameters
    ``options`` (`PARAMETERS`' names; None or left out: the method's default) and the top-k options
    ``top_k`` (`top_k_from_options`; none: no middle tokens); ``config`` (a family config) supplies the
    pretraining length defaults come from and the layer count. A ValueError names an option that does
    not apply to ``--method {method}`` (default: ``mask``)."""
    method = method or mask
    cls = METHODS[mask]
    for parameter, value in options.items():
        if value is not None and parameter not in cls.OPTIONS:
            raise ValueError(f"{_flag_text(parameter)} is not used by --method {method}")

    def default_length(parameter: str) -> int:
        if config is None:
            raise ValueError(f"--method {method} needs {_flag_text(parameter)} (no model config to take "
                             f"its default from)")
        return pretraining_length(config)

    spec = cls.from_options(default_length, **{p: options.get(p) for p in cls.OPTIONS})
    top_k = top_k or {}
    if top_k.get("top_k_middle") is not None and not spec.hides_middle:
        raise ValueError(f"--top-k-middle needs a mask that hides middle tokens; --method {method} hides none")
    chosen = top_k_from_options(top_k, spec.window, getattr(config, "num_layers", None))
    return spec if chosen is None else dataclasses.replace(spec, top_k=chosen)


def spec_from_args(args: argparse.Namespace, config=None) -> AttentionSpec:
    """`spec_from_options` of ``--method``'s mask, the method parameters and the top-k options given on
    the command line."""
    return spec_from_options(fixed_method(args.method).mask, method_options(args), config, _top_k_options(args),
                             method=args.method)


def frequencies_from_args(args: argparse.Namespace, config) -> RopeScaling | None:
    """The `RopeScaling` of ``--method``'s frequency method (None without one) for a model whose
    ``config`` gives L_train."""
    return fixed_method(args.method).frequencies(0, pretraining_length(config))


def method_spec(method: str, config=None, **options: int | None) -> AttentionSpec:
    """`spec_from_options` for one mask method, taking only the ``options`` (method parameters, None:
    default) that method uses: an experiment comparing several methods applies each option wherever
    it applies."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(KINDS)}")
    unknown = sorted(set(options) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"unknown method parameter {unknown[0]!r}; known: {', '.join(PARAMETERS)}")
    taken = METHODS[method].OPTIONS
    return spec_from_options(method, {p: value for p, value in options.items() if p in taken}, config)


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


# ----- the generation tasks' methods --------------------------------------------------------------


#: The methods of the generation tasks (`experiments.passkey`, `experiments.ruler`) by default: vanilla,
#: vanilla on the prompt's end (truncation), LM-Infinite, and LM-Infinite with top-k middle tokens.
TASK_METHODS = ("vanilla", "truncation", "lm_infinite", "lm_infinite_top_k")
#: ``--methods all``: the four above, the other mask methods that decode, the frequency methods, the
#: methods whose parameter is chosen per length, the retrieval methods and the methods of
#: `experiments.task_generation.PROMPT_METHODS`.
ALL_TASK_METHODS = (*TASK_METHODS, "streaming_llm", "distance_limit", "self_extend", "leaky_rerope", "pi", "ntk", "yarn",
                    "dynamic_ntk", "self_extend@cover", "leaky_rerope@cover", "longheads", "infllm", "sirllm", "xl3m")


def add_task_methods_arg(p: argparse.ArgumentParser) -> None:
    """``--methods``, the method parameters and the ``--top-k-*`` options: the methods of this
    evaluation and of `experiments.ruler`, which evaluates the same ones."""
    group = add_methods_arg(p, TASK_METHODS, {
        **PROMPT_METHODS, "lm_infinite_top_k": "lm_infinite plus the top-k middle tokens (--top-k-*)",
        "all": ", ".join(ALL_TASK_METHODS)})
    add_top_k_args(group, k=f"{TOP_K_DEFAULTS['k']}, TopK's, for lm_infinite_top_k")
    add_prompt_settings_args(group)


def add_prompt_settings_args(group: argparse._ArgumentGroup, methods: Sequence[str] = tuple(SETTABLE)) -> None:
    """``--sirllm``/``--xl3m FIELD=VALUE ...``: fields of SirLLM's policy / XL3M's settings over their defaults
    for the model (`experiments.task_generation.PromptSettings`)."""
    # the fields are the dataclasses' own (a wrong one is refused naming them); named here without importing jax
    where = {"sirllm": "SirLLM's policy (lminf_jax.entropy_cache.SirLLM)",
             "xl3m": "XL3M's settings (lminf_jax.evaluation.xl3m.XL3M)"}
    for method in methods:
        group.add_argument(f"--{method}", nargs="+", metavar="FIELD=VALUE",
                           help=f"set fields of {where[method]} over its defaults for L_train, e.g. "
                                f"--{method} {'entropy=64 decay=0.9' if method == 'sirllm' else 'segment_length=128'}")


def prompt_settings(args: argparse.Namespace, methods: Sequence[str]) -> PromptSettings:
    """The ``--sirllm``/``--xl3m`` settings of ``args`` for a run of ``methods`` (checked: `PromptSettings.parse`)."""
    return PromptSettings.parse({m: getattr(args, m, None) for m in SETTABLE}, methods)


def task_method_names(names: list[str]) -> list[str]:
    """``--methods`` checked (`checked_methods`) and ``all`` expanded."""
    return list(ALL_TASK_METHODS) if checked_methods(names) == ["all"] else names


def task_attention_call(name: str, spec: AttentionSpec, length: int, l_train: int) -> AttentionCall:
    """Method ``name`` (its mask method ``spec``) for prompts of ``length`` tokens: the mask's parameter
    chosen for the length with ``@cover``, the RoPE scaling of a frequency method (else the model's own)."""
    from lminf_jax import AttentionCall

    if name in TASK_METHODS or name in PROMPT_METHODS:
        return AttentionCall(spec)
    choice = MethodChoice.parse(name)
    return AttentionCall(choice.spec(spec, length, l_train), frequencies=choice.frequencies(length, l_train))


def task_method_specs(config, name: str, args) -> tuple[AttentionSpec, AttentionSpec | None]:
    """``(spec, prefill spec)`` of a method, the method parameters applied where they apply; the prefill
    spec (the same without top-k) only for the top-k method, whose middle tokens join at the prompt's
    last token."""
    mask = "vanilla" if name == "vanilla" or name in PROMPT_METHODS else "lm_infinite" if name in TASK_METHODS \
        else MethodChoice.parse(name).mask
    spec = method_spec(mask, config, **method_options(args))
    if name != "lm_infinite_top_k":
        return spec, None
    return dataclasses.replace(spec, top_k=top_k_from_args(args, spec.window, config.num_layers, k=TOP_K_DEFAULTS["k"])), spec
