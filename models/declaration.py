"""A family's parameters as one table, and the config protocol every family's config follows.

Each family module declares ``parameters(config) -> tuple[Param, ...]``: every parameter's Hugging
Face name (per-layer tensors without the layer index, stacked on a leading ``layers`` axis), its
shape and its logical sharding axes (`lminf_jax.sharding`). Shapes for random initialisation and
``jax.eval_shape``, the sharding rules and the converters' checkpoint template are all derived from
that one table (`models.registry.Family`), so a parameter is named once. A checkpoint tensor that holds
several declared parameters (GPT-NeoX's and BLOOM's per-head ``query_key_value``, Phi-3's ``qkv_proj``
and ``gate_up_proj``) is a `Fused` entry of ``fused(config)``: the converters split it while loading,
and the model only ever sees the separate parameters.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Protocol

Axes = tuple[str | None, ...]


class ModelConfig(Protocol):
    """What the registry, caches and experiments read from any family's config (without building
    a model): the attention geometry and the pretraining length."""

    @property
    def num_layers(self) -> int: ...

    @property
    def num_heads(self) -> int: ...

    @property
    def num_kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def pretraining_length(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter: flat HF name (layer index removed), shape and logical axes (one per dim)."""

    name: str
    shape: tuple[int, ...]
    axes: Axes

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"parameter {self.name!r} has shape {self.shape} but {len(self.axes)} axes {self.axes}")


@dataclasses.dataclass(frozen=True)
class Fused:
    """A checkpoint tensor ``source`` (layer index removed) holding the declared parameters ``parts``
    along its first axis after any layer axis: ``groups`` repeats of each part's rows in turn (one
    group per head for a per-head interleaved q/k/v, one group for parts stored one after another)."""

    source: str
    parts: tuple[str, ...]
    groups: int = 1

    def shape(self, shapes: dict[str, tuple[int, ...]], stacked: bool) -> tuple[int, ...]:
        """The source's shape, from the parts' ``shapes``; a ValueError when they cannot be fused so."""
        lead = 1 if stacked else 0
        part_shapes = [shapes[p] for p in self.parts]
        tails = {s[:lead] + s[lead + 1:] for s in part_shapes}
        uneven = [p for p, s in zip(self.parts, part_shapes) if s[lead] % self.groups]
        if len(tails) != 1 or uneven:
            raise ValueError(f"{self.source} cannot hold {self.parts} in {self.groups} groups: shapes {part_shapes}")
        first = part_shapes[0]
        return (*first[:lead], sum(s[lead] for s in part_shapes), *first[lead + 1:])

    def rows(self, shapes: dict[str, tuple[int, ...]], stacked: bool) -> tuple[int, ...]:
        """Each part's rows (its first axis after any layer axis)."""
        return tuple(shapes[p][1 if stacked else 0] for p in self.parts)


def fused_linear(prefix: str, source: str, parts: Iterable[str], *, bias: bool, groups: int = 1
                 ) -> tuple[Fused, ...]:
    """The `Fused` entries of a checkpoint ``nn.Linear`` ``prefix + source`` that holds the declared linears
    ``prefix + part``: its weight and, with ``bias``, its bias, ``groups`` as in `Fused`."""
    parts = tuple(parts)
    kinds = ("weight", "bias") if bias else ("weight",)
    return tuple(Fused(f"{prefix}{source}.{kind}", tuple(f"{prefix}{part}.{kind}" for part in parts), groups)
                 for kind in kinds)


def linear(name: str, out: int, inp: int, *, axes: tuple[str | None, str | None], bias: bool,
           layers: int | None = None) -> tuple[Param, ...]:
    """HF ``nn.Linear`` ``name``: ``weight (out, in)`` with logical ``axes`` (out, in) and, with
    ``bias``, ``bias (out,)`` (on the out axis; ``hidden`` where that is ``embed``); stacked over
    ``layers`` when given."""
    lead, lead_axes = _stacked(layers)
    weight = Param(f"{name}.weight", (*lead, out, inp), (*lead_axes, *axes))
    if not bias:
        return (weight,)
    bias_axis = "hidden" if axes[0] == "embed" else axes[0]  # a bias is never split for FSDP
    return weight, Param(f"{name}.bias", (*lead, out), (*lead_axes, bias_axis))


def norm(name: str, width: int, *, bias: bool, layers: int | None = None) -> tuple[Param, ...]:
    """A norm's scale ``weight (width,)`` and, with ``bias``, ``bias (width,)`` (axis ``hidden``);
    stacked over ``layers`` when given."""
    lead, lead_axes = _stacked(layers)
    params = (Param(f"{name}.weight", (*lead, width), (*lead_axes, "hidden")),)
    return params + ((Param(f"{name}.bias", (*lead, width), (*lead_axes, "hidden")),) if bias else ())


def _stacked(layers: int | None) -> tuple[tuple[int, ...], Axes]:
    """The leading (shape, axes) of a parameter stacked over ``layers`` (none when None)."""
    return ((layers,), ("layers",)) if layers is not None else ((), ())


def table(*groups: Param | Iterable[Param]) -> tuple[Param, ...]:
    """The parameters of ``groups`` (single params or iterables of them) in order; a name given
    twice raises."""
    params: list[Param] = []
    for group in groups:
        params.extend([group] if isinstance(group, Param) else group)
    strays = [p for p in params if not isinstance(p, Param)]
    if strays:
        raise ValueError(f"a parameter table holds {strays[0]!r}, not a Param")
    names = [p.name for p in params]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"parameters declared twice: {repeated}")
    return tuple(params)


def shapes(params: Iterable[Param]) -> dict[str, tuple[int, ...]]:
    """Flat name -> shape."""
    return {p.name: p.shape for p in params}


def sharding_rules(params: Iterable[Param]) -> tuple[tuple[str, Axes], ...]:
    """The rules `lminf_jax.sharding.ShardingPlan.param_shardings` takes: one exact-name rule per
    parameter."""
    return tuple((re.escape(p.name), p.axes) for p in params)
