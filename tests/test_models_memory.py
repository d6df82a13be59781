"""Memory plans of bfloat16 passes (XLA's ``compiled.memory_analysis()``: deterministic, nothing allocated).
A pass holds the weights plus activations, never a copy of the stacked layers in another dtype, and
LM-Infinite plans no more than vanilla attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from lminf_jax import AttentionCall, LMInfinite, Vanilla
from lminf_jax.probes import num_distance_buckets
from lminf_jax.models import registry
from lminf_jax.models.decoder import _jit_probe

# the layers' weights dominate: 16 layers of 0.95M parameters (30 MB in bfloat16)
WIDE = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 16,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
# the sequence dominates: 8 windows of LM-Infinite, heads of 128 dims (as LLaMA's), blocks of 128
LONG = {**WIDE, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}
T_LONG, G, L, BLOCK = 2048, 4, 256, 128


def _abstract_model(hf: dict, spec=Vanilla(), block: int = 512):
    """``(model, params)``: the model in bfloat16 and its parameters' shapes (bfloat16, none allocated)."""
    family = registry.family_for_config(hf)
    cfg = family.config_from_hf(hf)
    params = jax.eval_shape(lambda: family.init_params(cfg, jax.random.key(0)))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
    return family.model(cfg, AttentionCall(spec, block_q=block, block_k=block), jnp.bfloat16), params


def _planned_temp(fn, *args) -> int:
    """Bytes of temporaries XLA plans for ``jax.jit(fn)(*args)``."""
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _tokens(t: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, t), jnp.int32)


@pytest.mark.parametrize("name", ["forward", "probe", "step"])
def test_passes_plan_no_converted_copy_of_the_stacked_layers(name):
    # XLA:CPU computes bfloat16 in float32: had it converted the stacked weights before the layer scan,
    # every layer's float32 copy (twice their bytes) would be planned at once
    model, params = _abstract_model(WIDE)
    layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["model"]["layers"]))
    t = 256
    if name == "forward":
        temp = _planned_temp(model.forward, params, _tokens(t))
    elif name == "probe":  # its own layer scan (model.probe needs concrete tokens)
        positions, rows = jnp.arange(t, dtype=jnp.int32)[None], jnp.asarray([3, t - 1], jnp.int32)
        buckets = num_distance_buckets(t - 1)
        temp = _planned_temp(lambda p, tokens: _jit_probe(model, p, tokens, positions, rows, buckets, False),
                             params, _tokens(t))
    else:
        cache = jax.eval_shape(lambda: model.init_cache(1, capacity=t))
        temp = _planned_temp(model, params, _tokens(1), _tokens(1), cache)
    assert temp < layer_bytes / 2, (temp, layer_bytes)


def test_lm_infinite_plans_no_more_than_vanilla():
    # LM-Infinite attends fewer keys: its global class, window and sinks may neither add an array of every
    # key or query nor keep one (the layer's keys and values) alive longer; its G sinks' rows take a few KiB
    temps = {}
    for name, spec in (("vanilla", Vanilla()), ("lm_infinite", LMInfinite(G, L))):
        model, params = _abstract_model(LONG, spec, BLOCK)
        temps[name] = _planned_temp(model.forward, params, _tokens(T_LONG))
    assert temps["lm_infinite"] <= temps["vanilla"] + 16 * 1024, temps
