"""Logits parity with transformers: tiny random HF models saved, converted, compared (fp32)."""

from __future__ import annotations

import json

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
