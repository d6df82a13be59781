"""Checkpoint layouts for the model families in `models.registry`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from converters.layout import CheckpointLayout
from models.registry import Family


def layout_for(family: Family, config) -> CheckpointLayout:
    """The HF checkpoint layout (stacked-layer template, ignored buffers) of a family's config."""
    shapes = family.param_shapes(config)
    return CheckpointLayout(
        layer_prefix=family.layer_prefix,
        num_layers=family.num_layers(config),
        template={name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()},
        ignored=family.ignored_hf_tensors(config),
    )
