"""Checkpoint layouts for the model families in `models.registry`, and the check of a converted
checkpoint's params manifest against its config."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp

from lminf_jax.converters.convert import raise_problems
from lminf_jax.converters.layout import CheckpointLayout, Split, check_layer_count
from lminf_jax.models.registry import Family


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
        layers_field=family.layers_field,
    )


def check_manifest(family: Family, config, held: Mapping[str, tuple[int, ...]], source: Path) -> None:
    """Refuse a converted checkpoint whose params manifest (flat name -> shape, `converters.store.read_manifest`)
    is not exactly the parameters of its ``config``: the layer count first (`check_layer_count`), then every
    missing, unexpected and mis-shaped parameter. ``source``: the converted.json file, named by the errors."""
    layers = next((shape[0] for name, shape in held.items() if name.startswith(family.layer_prefix) and shape), 0)
    check_layer_count(family.layers_field, family.num_layers(config), layers, f"{source}'s params manifest",
                      f"the leading axis of its '{family.layer_prefix}*' parameters")
    wanted = family.param_shapes(config)
    raise_problems(f"{source}'s params manifest does not hold the parameters of its config:", {
        "missing": [name for name in wanted if name not in held],
        "unexpected": [name for name in held if name not in wanted],
        "mis-shaped": [f"{name}: the config gives {shape}, the manifest {held[name]}"
                       for name, shape in wanted.items() if name in held and held[name] != shape],
    })

