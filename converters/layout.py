"""`CheckpointLayout`: how a family's Hugging Face tensor names map onto its params.

Convention shared with `models`: names and layouts stay Hugging Face's; per-layer tensors
are stacked along a new leading axis of size `num_layers` under their name with the layer
index removed (``model.layers.7.mlp.up_proj.weight`` is row 7 of
``model.layers.mlp.up_proj.weight``); the params pytree is the flat names split on ".".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import jax
import numpy as np

from lminf_jax.converters.dtypes import numpy_dtype
from lminf_jax.converters.reader import CheckpointReader


@dataclass(frozen=True)
class Split:
    """A checkpoint tensor that fills several parameters (`models.declaration.Fused`): along its first
    axis after any layer axis it holds ``groups`` repeats of ``rows[i] // groups`` rows of each part in turn."""

    parts: tuple[str, ...]
    rows: tuple[int, ...]
    groups: int = 1

    def __call__(self, source: np.ndarray, stacked: bool) -> dict[str, np.ndarray]:
        """Part name -> its (contiguous) array, from the loaded ``source``."""
        lead = source.shape[:1] if stacked else ()
        rest = source.shape[len(lead) + 1:]
        grouped = source.reshape(*lead, self.groups, -1, *rest)
        pieces = np.split(grouped, np.cumsum([r // self.groups for r in self.rows])[:-1], axis=len(lead) + 1)
        return {name: np.ascontiguousarray(piece).reshape(*lead, rows, *rest)
                for name, rows, piece in zip(self.parts, self.rows, pieces, strict=True)}


@dataclass(frozen=True)
class CheckpointLayout:
    """A family's expected parameters and how checkpoint names reach them.

    layer_prefix: the per-layer name prefix, e.g. "model.layers." or "transformer.h.".
    template: flat name -> expected shape (stacked for layer tensors) and dtype, of which only
        the kind counts (float, integer or bool: the checkpoint's tensor must be of that kind).
    ignored: regexes (re.fullmatch) of checkpoint names skipped silently.
    aliases: exact checkpoint name -> replacement name, applied before the layer index is
        removed (a per-layer rename lists every layer's name).
    splits: template entry -> the parameters it fills when it holds several (a fused projection);
        every other template entry is one parameter.
    base_prefix: the base model's name prefix (e.g. "transformer."): a checkpoint saved from the base
        model alone (BLOOM's own, ``BloomModel``) names its tensors without it, and they are read as if
        they had it, as transformers reads them.
    layers_field: the config field num_layers comes from, named when a checkpoint holds another number.
    """

    layer_prefix: str
    num_layers: int
    template: Mapping[str, jax.ShapeDtypeStruct]
    ignored: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    splits: Mapping[str, Split] = field(default_factory=dict)
    base_prefix: str = ""
    layers_field: str = "num_layers"

    def __post_init__(self):
        strays = sorted(set(self.splits) - set(self.template))
        if strays:
            raise ValueError(f"splits name tensors that are not in the template: {strays}")
        for name, spec in self.template.items():
            if self.is_stacked(name) and tuple(spec.shape[:1]) != (self.num_layers,):
                raise ValueError(
                    f"template entry {name} is a layer tensor, so its leading axis must be "
                    f"num_layers={self.num_layers}; got shape {tuple(spec.shape)}"
                )

    @property
    def param_names(self) -> list[str]:
        """The flat names of the parameters this layout fills (a split tensor's parts in its place)."""
        return [part for name in self.template for part in (self.splits[name].parts if name in self.splits else (name,))]

    def is_stacked(self, flat_name: str) -> bool:
        """Whether the flat parameter `flat_name` stacks one tensor per layer."""
        return flat_name.startswith(self.layer_prefix)

    def locate(self, name: str) -> tuple[str, int | None] | None:
        """(flat name, layer index or None) for checkpoint tensor `name`; None if ignored."""
        if any(re.fullmatch(pattern, name) for pattern in self.ignored):
            return None
        name = self.aliases.get(name, name)
        if self.base_prefix and not name.startswith(self.base_prefix) and name not in self.template:
            name = self.base_prefix + name
        match = re.fullmatch(re.escape(self.layer_prefix) + r"(\d+)\.(.+)", name)
        if match is None:
            return name, None
        return self.layer_prefix + match[2], int(match[1])

    def layer_name(self, flat_name: str, layer: int) -> str:
        """The checkpoint name of row `layer` of the stacked parameter `flat_name`."""
        return f"{self.layer_prefix}{layer}.{flat_name[len(self.layer_prefix) :]}"

    def layers_held(self, names: Iterable[str]) -> int:
        """How many layers the checkpoint tensors `names` hold: their distinct layer indices (ignored
        tensors aside), counted rather than read off the highest, which one stray name could make huge."""
        located = (self.locate(name) for name in names)
        return len({found[1] for found in located if found is not None and found[1] is not None})


def check_layer_count(field: str, configured: int, held: int, holder: str, counted: str) -> None:
    """Refuse a config whose number of layers (config field `field`) is not the `held` layers of `holder`
    (a checkpoint, `counted` saying how), before anything is built or listed per layer."""
    if configured != held:
        raise ValueError(f"config field {field!r} is {configured:,}, but {holder} holds {held:,} layers ({counted}): "
                         "correct the config, or load the checkpoint it was written for")


def layout_from_checkpoint(
    reader: CheckpointReader, layer_prefix: str, ignored: tuple[str, ...] = ()
) -> CheckpointLayout:
    """The layout that accepts exactly the tensors `reader` holds.

    For checkpoints of no registered family and for inspection; a registered family's
    layout comes from `converters.families.layout_for`.
    """
    probe = CheckpointLayout(layer_prefix, 0, {}, ignored)
    plain, per_layer, num_layers = {}, {}, 0
    for name in reader.names():
        located = probe.locate(name)
        if located is None:
            continue
        flat, layer = located
        spec = jax.ShapeDtypeStruct(reader.shape(name), numpy_dtype(reader.dtype(name), name))
        if layer is None:
            plain[flat] = spec
        else:
            per_layer.setdefault(flat, spec)
            num_layers = max(num_layers, layer + 1)
    stacked = {k: jax.ShapeDtypeStruct((num_layers, *s.shape), s.dtype) for k, s in per_layer.items()}
    return CheckpointLayout(layer_prefix, num_layers, {**plain, **stacked}, ignored)
