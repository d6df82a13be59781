"""Model families: real-config parameter counts, LM-Infinite vs the dense reference, config errors."""

from __future__ import annotations

import dataclasses
import tracemalloc
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODELS, grid, random_model, rel_err

from lminf_jax import AttentionCall, LMInfinite, TopK, Vanilla, frequency_method
from lminf_jax.models import registry
from lminf_jax.models.common import count_params

LLAMA2_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
GPTJ_6B = {"model_type": "gptj", "vocab_size": 50400, "n_embd": 4096, "n_layer": 28, "n_head": 16,
           "rotary_dim": 64, "n_inner": None, "n_positions": 2048, "activation_function": "gelu_new"}
MPT_7B = {"model_type": "mpt", "vocab_size": 50432, "d_model": 4096, "n_layers": 32, "n_heads": 32,
          "expansion_ratio": 4, "max_seq_len": 2048, "no_bias": True, "learned_pos_emb": True,
          "attn_config": {"alibi": True, "alibi_bias_max": 8, "clip_qkv": None, "qk_ln": False}}


# Hugging Face's parameter counts (num_parameters() of the transformers models). GPT-J-6B's
# model card says 6,053,381,344, which is 2,498,560 (= 610 x 4096) more than the HF architecture
# (and transformers' own GPTJForCausalLM) holds: 6,050,882,784.
@pytest.mark.parametrize("config,published", [(LLAMA2_7B, 6_738_415_616), (GPTJ_6B, 6_050_882_784),
                                              (MPT_7B, 6_649_286_656)])
def test_eval_shape_of_real_configs_gives_published_parameter_counts(config, published):
    family = registry.family_for_config(config)
    cfg = family.config_from_hf(config)
    shapes = jax.eval_shape(lambda: family.init_params(cfg, jax.random.key(0), jnp.bfloat16))
    leaves = jax.tree_util.tree_leaves(shapes)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == published == count_params(family.param_shapes(cfg))


# BLOOM and GPT-NeoX run these checks in their transformers parity tests (blockwise and reference
# logits, LM-Infinite with L >= T, a shorter window) and their decoding tests; top-k is family-agnostic
# core: native window layers, soft caps and grouped heads (gemma2_window); ALiBi (mpt)
@pytest.mark.parametrize("name", grid(sorted(set(TINY_MODELS) - {"bloom", "neox"}),
                                      core=["gemma2_window", "mpt_biases_qk_ln"]))
def test_lm_infinite_forward_matches_dense_reference_forward(name):
    family, cfg, params = random_model(name)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 70)), jnp.int32)
    spec = LMInfinite(3, 16)  # T = 70 > 2 x 16
    run = lambda impl, s=spec: family.forward(params, tokens, config=cfg, call=AttentionCall(  # noqa: E731
        s, implementation=impl, block_q=16, block_k=16))
    fast, ref = run("blockwise"), run("reference")
    assert rel_err(fast, ref) <= 1e-5
    vanilla = run("blockwise", Vanilla())
    assert rel_err(run("blockwise", LMInfinite(3, 70)), vanilla) <= 1e-6
    assert rel_err(fast, vanilla) > 1e-3  # the spec reaches the attention
    if name not in ("llama_gqa", "gemma2_window"):  # top-k is family-agnostic: grouped heads, native windows
        return
    top_k = LMInfinite(3, 16, top_k=TopK(2, 8, from_layer=1))
    assert rel_err(run("blockwise", top_k), run("reference", top_k)) <= 1e-5
    assert rel_err(run("blockwise", top_k)[:, -1], fast[:, -1]) > 1e-4  # layer 1 of 2 uses top-k


@pytest.mark.parametrize("name,hf", [
    ("pi", {"rope_type": "linear", "factor": 3.0}),
    ("dynamic_ntk", {"rope_type": "dynamic", "factor": 3.0}),
    ("yarn", {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16}),
])
def test_call_time_frequency_method_equals_the_checkpoint_carrying_it(name, hf):
    """A frequency method chosen at call time gives the logits of the same weights whose config says
    `rope_scaling` = that method (the path `transformers` parity is tested on)."""
    family, cfg, params = random_model("llama_gqa")
    cfg = dataclasses.replace(cfg, max_position_embeddings=16)
    scaled_cfg = family.config_from_hf(dict(TINY_MODELS["llama_gqa"], max_position_embeddings=16, rope_scaling=hf))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 97, (2, 50)), jnp.int32)
    call = AttentionCall(LMInfinite(2, 12), frequencies=frequency_method(name, 3.0, 16))
    got = family.forward(params, tokens, config=cfg, call=call)
    want = family.forward(params, tokens, config=scaled_cfg, call=AttentionCall(LMInfinite(2, 12)))
    plain = family.forward(params, tokens, config=cfg, call=AttentionCall(LMInfinite(2, 12)))
    assert rel_err(got, want) <= 1e-6
    assert rel_err(got, plain) > 1e-3  # the method reaches the attention


def test_frequency_methods_run_on_gptj_and_compose_with_any_mask():
    family, cfg, params = random_model("gptj")
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 97, (1, 40)), jnp.int32)
    run = lambda spec, freq=None: family.forward(params, tokens, config=cfg, call=AttentionCall(  # noqa: E731
        spec, frequencies=freq))
    yarn = frequency_method("yarn", 4.0, cfg.max_position_embeddings)
    assert rel_err(run(Vanilla(), yarn), run(Vanilla())) > 1e-3
    assert rel_err(run(LMInfinite(2, 8), yarn), run(Vanilla(), yarn)) > 1e-3
    # at factor 1 every static method is the model's own RoPE
    for name in ("pi", "ntk", "yarn"):
        assert rel_err(run(LMInfinite(2, 8), frequency_method(name, 1.0, 2048)), run(LMInfinite(2, 8))) <= 1e-6


def test_frequency_method_errors_name_the_conflict():
    family, cfg, params = random_model("mpt_biases_qk_ln")
    with pytest.raises(ValueError, match="rescales RoPE, but this model's positions are Alibi"):
        family.model(cfg, AttentionCall(Vanilla(), frequencies=frequency_method("pi", 2.0, 2048)))
    family = registry.family_for_config(TINY_MODELS["llama_gqa"])
    scaled = family.config_from_hf(dict(TINY_MODELS["llama_gqa"], rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(ValueError, match="already scales RoPE"):
        family.model(scaled, AttentionCall(Vanilla(), frequencies=frequency_method("yarn", 2.0, 2048)))
    with pytest.raises(ValueError, match="frequencies must be a RopeScaling"):
        AttentionCall(Vanilla(), frequencies="yarn")


def test_left_padding_rows_equal_unpadded_rows():
    family, cfg, params = random_model("llama_gqa")
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 97, (1, 40))
    padded = np.concatenate([np.zeros((1, 7), int), tokens], axis=1)
    positions = (np.arange(47) - 7)[None]
    call = AttentionCall(LMInfinite(2, 12), implementation="blockwise", block_q=8, block_k=8)
    a = family.forward(params, jnp.asarray(tokens, jnp.int32), config=cfg, call=call)
    b = family.forward(params, jnp.asarray(padded, jnp.int32), jnp.asarray(positions, jnp.int32), config=cfg,
                       call=call)
    assert rel_err(b[:, 7:], a) <= 1e-5


def test_bf16_compute_is_close_to_fp32():
    family, cfg, params = random_model("gptj")
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, (1, 32)), jnp.int32)
    f32 = family.forward(params, tokens, config=cfg)
    bf16 = family.forward(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params), tokens, config=cfg,
                          dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32 and rel_err(bf16, f32) < 3e-2


@pytest.mark.parametrize(
    "config,field",
    [
        ({"model_type": "bert"}, "model_type"),
        ({**LLAMA2_7B, "sliding_window": 4096}, "sliding_window"),
        ({**LLAMA2_7B, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type"),
        ({**LLAMA2_7B, "hidden_act": "swish2"}, "hidden_act"),
        ({k: v for k, v in LLAMA2_7B.items() if k != "vocab_size"}, "vocab_size"),
        ({**LLAMA2_7B, "num_key_value_heads": 5}, "num_key_value_heads"),
        ({**MPT_7B, "attn_config": {"alibi": False}}, "alibi"),
        ({**MPT_7B, "attn_config": {"alibi": True, "prefix_lm": True}}, "prefix_lm"),
        ({**MPT_7B, "logit_scale": 0.5}, "logit_scale"),
        ({**GPTJ_6B, "activation_function": "swiglu"}, "activation_function"),
    ],
)
def test_unsupported_configs_raise_naming_the_field(config, field):
    with pytest.raises(ValueError, match=field):
        family = registry.family_for_config(config)
        family.config_from_hf(config)


def test_bad_tokens_raise():
    family, cfg, params = random_model("gptj")
    with pytest.raises(ValueError, match="vocab_size"):
        family.forward(params, jnp.asarray([[1, 200]], jnp.int32), config=cfg)
    with pytest.raises(ValueError, match="tokens must be an integer array"):
        family.forward(params, jnp.asarray([1, 2], jnp.int32), config=cfg)


@pytest.mark.parametrize("config", [
    {**LLAMA2_7B, "model_type": "mistral", "sliding_window": 4096},
    {**LLAMA2_7B, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 4},
    TINY_MODELS["gemma2_window"],
], ids=["mistral", "qwen2", "gemma2"])
def test_reading_a_config_builds_nothing_per_layer(config):
    """Which layers are windowed is kept as the config states it: reading a config of 10^8 layers (refused
    only once compared with its checkpoint) builds no per-layer tuple."""
    family = registry.family_for_config(config)
    tracemalloc.start()
    try:
        cfg = family.config_from_hf({**config, "num_hidden_layers": 10**8})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert cfg.num_layers == 10**8 and cfg.sliding_window is not None and peak < 100_000


@pytest.mark.parametrize("name", ["llama_gqa", "gemma2_window", "neox"])
def test_rope_parameters_beside_a_different_rope_scaling_are_refused_naming_both(name):
    """transformers reads `rope_scaling` alone when both are set (its theta then from `rope_theta` or the
    default): a config whose `rope_parameters` say otherwise has no single reading."""
    family = registry.family_for_config(TINY_MODELS[name])
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    both = {**TINY_MODELS[name], "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}, "rope_scaling": yarn}
    with pytest.raises(ValueError, match="'rope_parameters' and 'rope_scaling' differ.*remove 'rope_scaling'"):
        family.config_from_hf(both)
    same = family.config_from_hf({**TINY_MODELS[name], "rope_parameters": yarn, "rope_scaling": dict(yarn)})
    assert same == family.config_from_hf({**TINY_MODELS[name], "rope_scaling": yarn})


def test_mpt_alibi_bias_max_other_than_8_is_honoured_with_a_warning():
    """MosaicML's code scales the slopes by `attn_config.alibi_bias_max`; transformers always uses 8."""
    family = registry.family_for_config(MPT_7B)
    config = {**MPT_7B, "attn_config": {**MPT_7B["attn_config"], "alibi_bias_max": 4}}
    with pytest.warns(UserWarning, match="'attn_config.alibi_bias_max' is 4.*transformers ignores it.*MosaicML"):
        assert family.config_from_hf(config).alibi_bias_max == 4.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert family.config_from_hf(MPT_7B).alibi_bias_max == 8.0
        assert family.config_from_hf({**MPT_7B, "attn_config": {"alibi": True}}).alibi_bias_max == 8.0
