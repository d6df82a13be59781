"""Logits parity with transformers: tiny random HF models saved, converted, compared (fp32)."""

from __future__ import annotations

import dataclasses
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lminf_jax.converters.convert import load_params
from lminf_jax.converters.families import layout_for
from lminf_jax.models import registry
from lminf_jax import AttentionCall, LMInfinite
from conftest import grid

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

T = 40  # > 2 x the window used below
WINDOW = 16
NATIVE_WINDOW = 12  # a model's own sliding window (not 8: XLA-CPU at the suite's -O1 fails to compile an 8-slot cache's step)
#: Cases whose prefill + token-by-token decoding is also compared (the older families' own decoding
#: tests use `TINY_MODELS`)
DECODED = ("qwen", "bloom", "neox", "mistral_sliding", "gemma", "phi3")

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
    "mistral_sliding_window": lambda: transformers.MistralConfig(  # every layer windowed (v0.1's design)
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=NATIVE_WINDOW),
    "gemma1_mqa": lambda: transformers.GemmaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16),
    "gemma2_softcaps_alternating_window": lambda: transformers.Gemma2Config(  # layers 0, 2 windowed
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20, sliding_window=NATIVE_WINDOW,
        attn_logit_softcapping=1.0, final_logit_softcapping=2.0),
    "gemma3_local_rope_scaled_global": lambda: transformers.Gemma3TextConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=NATIVE_WINDOW, max_position_embeddings=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}),
    "phi3_fused_partial_rotary": lambda: transformers.Phi3Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=64, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}),
    "phi3_sliding_window": lambda: transformers.Phi3Config(  # every layer windowed, as Phi-3-mini-4k's 2047
        vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
        max_position_embeddings=64, original_max_position_embeddings=64, sliding_window=NATIVE_WINDOW, pad_token_id=0),
    "gptj_partial_rotary": lambda: transformers.GPTJConfig(
        vocab_size=101, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64),
    "gptj_full_rotary": lambda: transformers.GPTJConfig(
        vocab_size=101, n_embd=48, n_layer=2, n_head=3, rotary_dim=16, n_positions=64),
    "qwen2_tied_gqa": lambda: transformers.Qwen2Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=1),
    "qwen2_sliding_layers": lambda: transformers.Qwen2Config(  # layer 1 windowed, by max_window_layers
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=NATIVE_WINDOW, max_window_layers=1),
    "qwen3_sliding_layer_types": lambda: transformers.Qwen3Config(  # layers 0 and 2 windowed, by layer_types
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=NATIVE_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "qwen3_head_dim_bias": lambda: transformers.Qwen3Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, attention_bias=True),
    "mpt_6_heads": lambda: transformers.MptConfig(vocab_size=101, d_model=60, n_layers=2, n_heads=6, max_seq_len=64),
    "mpt_clip_qkv": lambda: transformers.MptConfig(
        vocab_size=101, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
        attn_config={"alibi": True, "clip_qkv": 0.5, "alibi_bias_max": 8}),
    "bloom_6_heads": lambda: transformers.BloomConfig(vocab_size=101, hidden_size=60, n_layer=2, n_head=6),
    "bloom_residual_post_ln": lambda: transformers.BloomConfig(
        vocab_size=101, hidden_size=64, n_layer=2, n_head=4, apply_residual_connection_post_layernorm=True,
        tie_word_embeddings=False),
    "neox_parallel_partial_rotary": lambda: transformers.GPTNeoXConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        rotary_pct=0.25, max_position_embeddings=64),
    "neox_sequential_full_rotary": lambda: transformers.GPTNeoXConfig(  # also tied, without attention biases
        vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
        rotary_pct=1.0, rotary_emb_base=500, use_parallel_residual=False, tie_word_embeddings=True,
        attention_bias=False, max_position_embeddings=64),
}


def _save(name: str, path, **save_kwargs):
    torch.manual_seed(zlib.crc32(name.encode()))  # str hashes change per process
    model = transformers.AutoModelForCausalLM.from_config(CASES[name]()).eval()
    if name.startswith(("bloom", "neox", "gemma")):  # zero biases, unit norms would hide a wrong split of the fused q/k/v bias
        with torch.no_grad():
            for p in model.parameters():  # BLOOM's 0.02 weights too: else a window changes its logits by ~1e-3
                if p.ndim == 1 or name.startswith(("bloom", "gemma")):
                    p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, **save_kwargs)
    return model


def _convert(path):
    config = json.loads((path / "config.json").read_text())
    family = registry.family_for_config(config)
    cfg = family.config_from_hf(config)
    return family, cfg, load_params(path, layout_for(family, cfg), dtype=jnp.float32, progress=False)


# core: every family and each of its layouts and features; extended: a plain MHA llama, Mistral's GQA (llama's),
# GPT-J's full rotary, Qwen2's tied GQA, Phi-3's every-layer window (Mistral's, in Phi-3's fused layout)
@pytest.mark.parametrize("name", grid(sorted(CASES), core=sorted(set(CASES) - {
    "llama2_mha", "mistral_gqa", "gptj_full_rotary", "qwen2_tied_gqa", "phi3_sliding_window"})))
def test_logits_match_transformers(name, tmp_path):
    sharded = name in ("llama3_gqa_rope_scaling", "mpt_6_heads", "bloom_6_heads", "neox_parallel_partial_rotary",
                       "gemma2_softcaps_alternating_window", "phi3_fused_partial_rotary")
    model = _save(name, tmp_path, **({"max_shard_size": "30KB"} if sharded else {}))
    if sharded:
        assert (tmp_path / "model.safetensors.index.json").exists()
    family, cfg, params = _convert(tmp_path)
    tokens = np.random.default_rng(0).integers(0, 101, (2, T))
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    windows = getattr(cfg, "window_layers", ())
    # "auto" is the dense reference at T = 40: the LM-Infinite forward below checks it against transformers where
    # a global layer lets a method apply; models windowed in every layer check it here
    for impl in ("reference", "blockwise") if windows and all(windows) else ("blockwise",):
        got = family.forward(params, jnp.asarray(tokens, jnp.int32), config=cfg,
                             call=AttentionCall(implementation=impl, block_q=16, block_k=8))
        assert float(np.max(np.abs(np.asarray(got) - want))) <= 1e-4, impl
    if getattr(cfg, "attn_logit_softcapping", None) is not None:  # the caps bind
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            uncapped = family.forward(params, jnp.asarray(tokens, jnp.int32), config=dataclasses.replace(cfg, **{cap: None}))
            assert float(np.max(np.abs(np.asarray(uncapped) - want))) > 1e-3, cap
    if any(windows):  # the native window binds: without it the logits differ
        full = family.forward(params, jnp.asarray(tokens, jnp.int32), config=dataclasses.replace(cfg, sliding_window=None))
        assert float(np.max(np.abs(np.asarray(full) - want))) > 1e-3
    if windows and all(windows):  # no global layer for a method to apply to
        with pytest.raises(ValueError, match="native sliding window of 12 tokens .*'sliding_window'"):
            family.forward(params, jnp.asarray(tokens, jnp.int32), config=cfg, call=AttentionCall(LMInfinite(4, T)))
    else:
        lm_inf = family.forward(params, jnp.asarray(tokens, jnp.int32), config=cfg,
                                call=AttentionCall(LMInfinite(4, T)))
        assert float(np.max(np.abs(np.asarray(lm_inf) - want))) <= 1e-4
        windowed = family.forward(params, jnp.asarray(tokens, jnp.int32), config=cfg,
                                  call=AttentionCall(LMInfinite(4, WINDOW)))
        assert float(np.max(np.abs(np.asarray(windowed) - want))) > 1e-3
    if name.startswith(DECODED):
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
    "Mistral-7B-v0.1": {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                        "sliding_window": 4096, "tie_word_embeddings": False},
    "Phi-3-mini-4k": {"model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
                      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                      "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
                      "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "sliding_window": 2047,
                      "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False},
    "Gemma-2-9B": {"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336,
                   "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
                   "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
                   "max_position_embeddings": 8192, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
                   "rope_theta": 10000.0, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "attention_bias": False},
    "Gemma-3-12B": {"model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 3840,  # its text_config
                    "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
                    "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
                    "rope_local_base_freq": 10000.0, "sliding_window": 1024, "sliding_window_pattern": 6,
                    "max_position_embeddings": 131072, "final_logit_softcapping": None,
                    "attn_logit_softcapping": None},
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
    "BLOOM-7b1": {"model_type": "bloom", "vocab_size": 250880, "hidden_size": 4096, "n_layer": 30, "n_head": 32,
                  "layer_norm_epsilon": 1e-5, "apply_residual_connection_post_layernorm": False,
                  "pretraining_tp": 1, "slow_but_exact": False},  # tied head: no tie_word_embeddings field
    "Pythia-6.9B": {"model_type": "gpt_neox", "vocab_size": 50432, "hidden_size": 4096, "intermediate_size": 16384,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "rotary_pct": 0.25, "rotary_emb_base": 10000,
                    "max_position_embeddings": 2048, "use_parallel_residual": True, "tie_word_embeddings": False,
                    "layer_norm_eps": 1e-5, "hidden_act": "gelu"},
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


WINDOW_CASES = {
    **{name: config for name, config in REAL_CONFIGS.items()},
    **{f"Qwen2.5-0.5B-{i}": dict(REAL_CONFIGS["Qwen2.5-0.5B"], **overrides) for i, overrides in enumerate([
        dict(use_sliding_window=True, max_window_layers=21),
        dict(use_sliding_window=False, max_window_layers=21),
        dict(use_sliding_window=True, layer_types=["full_attention"] * 23 + ["sliding_attention"]),
        dict(use_sliding_window=False, layer_types=["sliding_attention"] * 24)])},
    "Gemma-3-12B-pattern-4": dict(REAL_CONFIGS["Gemma-3-12B"], sliding_window_pattern=4),
}


@pytest.mark.parametrize("name", sorted(WINDOW_CASES))
def test_window_layers_and_rope_are_read_as_transformers_reads_them(name):
    """Which layers are windowed, the window, and (Gemma-3) both layer types' RoPE, against transformers'
    own reading of the same config.json."""
    config = WINDOW_CASES[name]
    cfg = registry.family_for_config(config).config_from_hf(config)
    theirs = transformers.AutoConfig.for_model(**config)
    window = getattr(theirs, "sliding_window", None)
    types = getattr(theirs, "layer_types", None) or ["sliding_attention"] * theirs.num_hidden_layers
    assert getattr(cfg, "sliding_window", None) == window
    assert getattr(cfg, "window_layers", ()) == (tuple(t == "sliding_attention" for t in types) if window else ())
    if config["model_type"] == "gemma3_text":
        full, local = theirs.rope_parameters["full_attention"], theirs.rope_parameters["sliding_attention"]
        assert (cfg.rope_theta, cfg.rope_scaling.kind, cfg.rope_scaling.factor) == (
            full["rope_theta"], full["rope_type"], full["factor"])
        assert cfg.rope_local_base_freq == local["rope_theta"]


def test_phi3_longrope_is_refused_naming_the_field():
    config = dict(REAL_CONFIGS["Phi-3-mini-4k"], max_position_embeddings=131072, rope_scaling={
        "type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48})
    with pytest.raises(ValueError, match="'rope_scaling' \\(rope_type 'longrope'\\)"):
        registry.family_for_config(config).config_from_hf(config)


def test_bad_layer_types_are_refused_naming_the_field():
    config = dict(REAL_CONFIGS["Qwen2.5-0.5B"], use_sliding_window=True, layer_types=["sliding_attention"] * 3)
    with pytest.raises(ValueError, match="'layer_types' must list one of .* per layer \\(24\\)"):
        registry.family_for_config(config).config_from_hf(config)


def test_a_checkpoint_of_the_base_model_alone_loads_as_transformers_loads_it(tmp_path):
    """BLOOM's own checkpoints were saved from ``BloomModel``: tensor names without ``transformer.``
    (``h.0.…``, ``word_embeddings.weight``); with the tied head they hold every parameter."""
    model = _save("bloom_6_heads", tmp_path / "full")
    model.transformer.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    family, cfg, params = _convert(tmp_path / "base")
    tokens = np.random.default_rng(0).integers(0, 101, (2, T))
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    got = family.forward(params, jnp.asarray(tokens, jnp.int32), config=cfg)
    assert float(np.max(np.abs(np.asarray(got) - want))) <= 1e-4
