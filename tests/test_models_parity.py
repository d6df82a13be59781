"""Logits parity with transformers: tiny random HF models saved, converted, compared (fp32)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.convert import load_params
from converters.families import layout_for
from models import registry
from models.common import AttentionCall
from lminf_jax import LMInfinite

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

T = 40  # > 2 x the window used below
WINDOW = 16

CASES = {
    "llama2_mha": lambda: transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, rms_norm_eps=1e-5),
    "llama3_gqa_rope_scaling": lambda: transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=64,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}),
    "llama_tied_biases": lambda: transformers.LlamaConfig(
        vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
        num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "mistral_gqa": lambda: transformers.MistralConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None),
    "gptj_partial_rotary": lambda: transformers.GPTJConfig(
        vocab_size=101, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64),
    "gptj_full_rotary": lambda: transformers.GPTJConfig(
        vocab_size=101, n_embd=48, n_layer=2, n_head=3, rotary_dim=16, n_positions=64),
    "qwen2_tied_gqa": lambda: transformers.Qwen2Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=1),
    "qwen3_head_dim_bias": lambda: transformers.Qwen3Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, attention_bias=True),
    "mpt_6_heads": lambda: transformers.MptConfig(vocab_size=101, d_model=60, n_layers=2, n_heads=6, max_seq_len=64),
    "mpt_clip_qkv": lambda: transformers.MptConfig(
        vocab_size=101, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
        attn_config={"alibi": True, "clip_qkv": 0.5, "alibi_bias_max": 8}),
}


def _save(name: str, path, **save_kwargs):
    torch.manual_seed(hash(name) % 2**31)
    model = transformers.AutoModelForCausalLM.from_config(CASES[name]()).eval()
    model.save_pretrained(path, **save_kwargs)
    return model


def _convert(path):
    config = json.loads((path / "config.json").read_text())
    family = registry.family_for_config(config)
    cfg = family.config_from_hf(config)
    return family, cfg, load_params(path, layout_for(family, cfg), dtype=jnp.float32, progress=False)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name, tmp_path):
    sharded = name in ("llama3_gqa_rope_scaling", "mpt_6_heads")
    model = _save(name, tmp_path, **({"max_shard_size": "30KB"} if sharded else {}))
    if sharded:
        assert (tmp_path / "model.safetensors.index.json").exists()
    family, cfg, params = _convert(tmp_path)
    tokens = np.random.default_rng(0).integers(0, 101, (2, T))
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    for impl in ("reference", "blockwise"):
        got = family.forward(params, jnp.asarray(tokens, jnp.int32), config=cfg,
                             call=AttentionCall(implementation=impl, block_q=16, block_k=8))
        assert float(np.max(np.abs(np.asarray(got) - want))) <= 1e-4, impl
    lm_inf = family.forward(params, jnp.asarray(tokens, jnp.int32), config=cfg,
                            call=AttentionCall(LMInfinite(4, T)))
    assert float(np.max(np.abs(np.asarray(lm_inf) - want))) <= 1e-4
    windowed = family.forward(params, jnp.asarray(tokens, jnp.int32), config=cfg,
                              call=AttentionCall(LMInfinite(4, WINDOW)))
    assert float(np.max(np.abs(np.asarray(windowed) - want))) > 1e-3
    if name.startswith("qwen"):  # the families' own decoding tests use `TINY_MODELS`
        model = family.model(cfg)
        cache, prefill = model.init_cache(2, capacity=T), T - 4
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
        steps = [model(params, jnp.asarray(tokens[:, :prefill], jnp.int32), positions[:, :prefill], cache)]
        for t in range(prefill, T):
            steps.append(model(params, jnp.asarray(tokens[:, t:t + 1], jnp.int32), positions[:, t:t + 1],
                               steps[-1][1]))
        decoded = np.concatenate([np.asarray(logits) for logits, _ in steps], axis=1)
        assert float(np.max(np.abs(decoded - want))) <= 1e-4


# Real configs (no download): the parameter count of our table under jax.eval_shape must equal that of
# transformers' own model built on the meta device.
REAL_CONFIGS = {
    "Qwen2.5-7B": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072,
                   "max_window_layers": 28},
    "Qwen2.5-0.5B": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                     "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768,
                     "max_window_layers": 24},
    "Qwen3-8B": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                 "attention_bias": False, "tie_word_embeddings": False, "use_sliding_window": False,
                 "sliding_window": None, "max_window_layers": 36},
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_eval_shape_parameter_counts_equal_transformers_on_the_meta_device(name):
    config = REAL_CONFIGS[name]
    family = registry.family_for_config(config)
    cfg = family.config_from_hf(config)
    shapes = jax.eval_shape(lambda: family.init_params(cfg, jax.random.key(0), jnp.bfloat16))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(hf_config).parameters())
    assert ours == theirs, (ours, theirs)


def test_qwen_sliding_window_layers_are_refused_naming_the_fields():
    config = dict(REAL_CONFIGS["Qwen2.5-0.5B"], use_sliding_window=True, max_window_layers=21)
    with pytest.raises(ValueError, match=r"layers \[21, 22, 23\] are sliding-window layers .*'use_sliding_window'"):
        registry.family_for_config(config).config_from_hf(config)
    layered = dict(REAL_CONFIGS["Qwen3-8B"], layer_types=["full_attention"] * 35 + ["sliding_attention"])
    with pytest.raises(ValueError, match=r"layers \[35\]"):
        registry.family_for_config(layered).config_from_hf(layered)
