"""Parameter tables and the config protocol: each family declares a parameter once, with its
shape and sharding axes, and its config answers the attention geometry without building a model."""

from __future__ import annotations

import re

import jax
import pytest
from conftest import TINY_MODELS

from lminf_jax.models import declaration
from lminf_jax.models.common import flatten
from lminf_jax.models.declaration import Param, linear, norm, table
from lminf_jax.models.registry import family_for_config


def test_a_table_refuses_a_name_twice_a_stray_entry_and_axes_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"declared twice: \['a.weight'\]"):
        table(norm("a", 4, bias=False), norm("a", 4, bias=True))
    with pytest.raises(ValueError, match="not a Param"):
        table([("a.weight", (4,))])
    with pytest.raises(ValueError, match=r"'w' has shape \(2, 3\) but 1 axes"):
        Param("w", (2, 3), ("embed",))


def test_linear_and_norm_follow_hugging_face_layouts():
    w, b = linear("x.proj", 6, 4, axes=("heads", "embed"), bias=True, layers=3)
    assert (w.shape, w.axes) == ((3, 6, 4), ("layers", "heads", "embed"))
    assert (b.shape, b.axes) == ((3, 6), ("layers", "heads"))
    _, out_bias = linear("x.out", 4, 6, axes=("embed", "heads"), bias=True)
    assert out_bias.axes == ("hidden",)  # a bias is never split for FSDP
    assert [(p.name, p.shape) for p in norm("ln", 5, bias=True)] == [("ln.weight", (5,)), ("ln.bias", (5,))]


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_family_declares_each_parameter_once_and_its_config_answers_the_geometry(name):
    family = family_for_config(TINY_MODELS[name])
    cfg = family.config_from_hf(TINY_MODELS[name])
    params = family.parameters(cfg)
    rules = declaration.sharding_rules(params)
    for p in params:  # each parameter is matched by its own rule and no other
        assert [axes for pattern, axes in rules if re.fullmatch(pattern, p.name)] == [p.axes], p.name
    created = flatten(jax.eval_shape(lambda: family.init_params(cfg, jax.random.key(0))))
    assert {k: v.shape for k, v in created.items()} == declaration.shapes(params)
    dec = family.model(cfg).decoder()
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        dec.num_layers, dec.num_heads, dec.num_kv_heads, dec.head_dim)
    assert cfg.pretraining_length >= 1 and family.num_layers(cfg) == cfg.num_layers
