"""Checkpoint layouts for the model families in `models.registry`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from converters.layout import CheckpointLayout, Split
from models.registry import Family


def layout_for(family: Family, config) -> CheckpointLayout:
    """The HF checkpoint layout of a family's config: its parameters' stacked-layer template, with each
    fused tensor (`models.declaration.Fused`) in place of the parameters it holds, and ignored buffers."""
    shapes = family.param_shapes(config)
    template = dict(shapes)
    splits = {}
    for fused in family.fused(config):
        stacked = fused.source.startswith(family.layer_prefix)
        template[fused.source] = fused.shape(shapes, stacked)
        splits[fused.source] = Split(fused.parts, fused.rows(shapes, stacked), fused.groups)
        for part in fused.parts:
            del template[part]
    return CheckpointLayout(
        layer_prefix=family.layer_prefix,
        num_layers=family.num_layers(config),
        template={name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in template.items()},
        ignored=family.ignored_hf_tensors(config),
        splits=splits,
        base_prefix=family.layer_prefix.split(".")[0] + ".",
    )
