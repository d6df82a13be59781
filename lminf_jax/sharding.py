"""Device meshes and sharding rules: where parameters, caches and activations live.

One `jax.sharding.Mesh` with three axes, used through JAX's own SPMD machinery (`NamedSharding`,
`jax.lax.with_sharding_constraint`, `jax.shard_map`):

* ``data``: the batch (data parallelism); with ``fsdp`` also the hidden dimension of every weight
  (each device stores 1/data of the weights, gathered layer by layer when used);
* ``seq``: the sequence (context parallelism of LM-Infinite encoding, `lminf_jax.context_parallel`);
* ``model``: attention heads, MLP width and vocabulary (tensor parallelism).

Model families name the dimensions of their parameters with *logical* axes (`LOGICAL_AXES`); a
`ShardingPlan` maps them onto the mesh. A dimension is split only when its count divides the mesh
axis (heads are counted in heads, not in head_dim-sized columns, so no head is ever cut); otherwise
it stays whole on every device (e.g. 8 KV heads on a 16-way ``model`` axis). This module knows no model family: the rules come from `models`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["LOGICAL_AXES", "MESH_AXES", "ParamRules", "ShardingPlan", "make_mesh", "parse_mesh"]

#: The mesh axes, outermost first (``model`` innermost: its collectives are the most frequent).
MESH_AXES = ("data", "seq", "model")

#: Logical axis -> mesh axis. ``embed`` (a weight's hidden dimension) goes to ``data`` only with FSDP;
#: ``hidden`` (the activations' hidden dimension) and ``layers`` are never split.
LOGICAL_AXES: dict[str, str | None] = {
    "batch": "data", "length": "seq", "heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model",
    "embed": None, "hidden": None, "layers": None, "head_dim": None,
}

#: ``(regex over flat parameter names, logical axis per dimension)`` pairs; the first full match wins.
ParamRules = Sequence[tuple[str, tuple[str | None, ...]]]


def make_mesh(*, data: int = 1, seq: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, seq, model)`` mesh over ``devices`` (default: all, in the platform's preferred
    order); the sizes must multiply to the number of devices."""
    sizes = {"data": data, "seq": seq, "model": model}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh axis {name} must be an integer >= 1, got {size!r}")
    available = list(jax.devices() if devices is None else devices)
    if math.prod(sizes.values()) != len(available):
        raise ValueError(f"mesh data={data} x seq={seq} x model={model} = {math.prod(sizes.values())} devices, "
                         f"but {len(available)} are given")
    if devices is None:
        return jax.make_mesh((data, seq, model), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.array(available).reshape(data, seq, model), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def parse_mesh(text: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from ``"data=2,seq=4"``-style text (omitted axes are 1; ``-1`` for one axis takes
    the devices left over), as the experiments' ``--mesh`` option gives it."""
    available = len(jax.devices() if devices is None else devices)
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\w+)=(-?\d+)", part)
        if match is None or match[1] not in MESH_AXES or match[1] in sizes:
            raise ValueError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with distinct axes among "
                             f"{MESH_AXES}, got {part!r}")
        sizes[match[1]] = int(match[2])
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size < 1 and size != -1 for size in sizes.values()):
        raise ValueError(f"--mesh {text!r}: sizes must be >= 1, with at most one -1")
    if free:
        rest = math.prod(s for s in sizes.values() if s != -1)
        if available % rest:
            raise ValueError(f"--mesh {text!r}: {available} devices do not divide by {rest}")
        sizes[free[0]] = available // rest
    return make_mesh(**sizes, devices=devices)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A mesh and how logical axes map onto it. Hashable (a jit static argument).

    ``fsdp``: also split every weight's ``embed`` dimension over ``data`` (fully sharded data
    parallelism: weight memory per device divided by data x model)."""

    mesh: Mesh
    fsdp: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.mesh, Mesh) or tuple(self.mesh.axis_names) != MESH_AXES:
            names = getattr(self.mesh, "axis_names", None)
            raise ValueError(f"ShardingPlan needs a mesh with axes {MESH_AXES} (see make_mesh), got {names}")

    def size(self, axis: str) -> int:
        """Devices along a mesh axis."""
        return self.mesh.shape[axis]

    @property
    def context_parallel(self) -> bool:
        """Whether sequences are split over devices (``seq`` axis larger than one)."""
        return self.size("seq") > 1

    def mesh_axis(self, logical: str | None) -> str | None:
        """The mesh axis a logical axis goes to (None: not split)."""
        if logical is None:
            return None
        if logical not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {logical!r}; known: {sorted(LOGICAL_AXES)}")
        if logical == "embed" and self.fsdp:
            return "data"
        return LOGICAL_AXES[logical]

    def partition_spec(self, logical: Sequence[str | None], shape: Sequence[int],
                       units: Mapping[str, int] | None = None) -> P:
        """The `PartitionSpec` of an array of ``shape`` whose dimensions are ``logical``.

        A dimension is split when its logical axis maps to a mesh axis of size > 1 not used by an
        earlier dimension, and its count (``units[logical]``, default the dimension's size)
        divides that axis."""
        if len(logical) != len(shape):
            raise ValueError(f"{len(logical)} logical axes {tuple(logical)} for an array of shape {tuple(shape)}")
        units = units or {}
        used: set[str] = set()
        out = []
        for name, dim in zip(logical, shape):
            axis = self.mesh_axis(name)
            count = units.get(name, dim) if name is not None else dim
            if axis is None or axis in used or self.size(axis) == 1 or count % self.size(axis) or dim % self.size(axis):
                out.append(None)
            else:
                used.add(axis)
                out.append(axis)
        return P(*out)

    def named(self, logical: Sequence[str | None], shape: Sequence[int], units: Mapping[str, int] | None = None
              ) -> NamedSharding:
        """`partition_spec` as a `NamedSharding` on this mesh."""
        return NamedSharding(self.mesh, self.partition_spec(logical, shape, units))

    def constrain(self, x: jax.Array, logical: Sequence[str | None], units: Mapping[str, int] | None = None
                  ) -> jax.Array:
        """``x`` constrained (inside jit) to the sharding of its logical axes."""
        return jax.lax.with_sharding_constraint(x, self.named(logical, x.shape, units))

    def param_shardings(self, shapes: Mapping[str, Sequence[int]], rules: ParamRules,
                        units: Mapping[str, int] | None = None) -> dict[str, NamedSharding]:
        """Flat parameter name -> `NamedSharding` by the first rule whose regex fully matches the
        name. A name no rule matches, or a rule of the wrong rank, raises a ValueError naming it."""
        out = {}
        for name, shape in shapes.items():
            logical = next((axes for pattern, axes in rules if re.fullmatch(pattern, name)), None)
            if logical is None:
                raise ValueError(f"no sharding rule matches parameter {name!r}")
            if len(logical) != len(shape):
                raise ValueError(f"the sharding rule for {name!r} names {len(logical)} axes {logical}, "
                                 f"but the parameter has shape {tuple(shape)}")
            out[name] = self.named(logical, shape, units)
        return out

    def describe(self, shardings: Mapping[str, NamedSharding] | None = None) -> str:
        """One line: the mesh, FSDP, and (given `param_shardings`' result) how many parameters are
        split over devices rather than held whole by each."""
        axes = " x ".join(f"{name}={self.size(name)}" for name in MESH_AXES)
        text = f"mesh {axes} ({self.mesh.devices.size} {self.mesh.devices.flat[0].platform} devices)"
        text += ", FSDP" if self.fsdp else ""
        if shardings:
            split = sum(any(a is not None for a in s.spec) for s in shardings.values())
            text += f"; {split}/{len(shardings)} parameters split"
        return text
