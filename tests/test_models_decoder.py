"""The cached step of every family: chunked prefill + token-by-token decoding equal one forward."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODELS, _perturbed, grid, random_model, rel_err
from test_logprobs import numpy_scores

from lminf_jax import (AttentionCall, InfLLM, LeakyReRoPE, LMInfinite, LongHeads, SelfExtend, StreamingLLM, TopK,
                       Vanilla, frequency_method)
from lminf_jax.cache import KVCache
from lminf_jax.models import registry

G, L = 3, 8
T = 8 * L
PREFILL_CHUNKS = (5, 13, 6)  # 24 prompt tokens in uneven chunks (one longer than L), then 40 decoding steps


def _tokens_and_positions(batch: int = 2, pad: int = 5, seed: int = 0):
    tokens = np.random.default_rng(seed).integers(0, 97, (batch, T)).astype(np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (batch, T)).copy()
    positions[-1, :pad] = -1  # the last row is left-padded
    positions[-1, pad:] = np.arange(T - pad)
    return jnp.asarray(tokens), jnp.asarray(positions)


def _incremental_logits(model, params, tokens, positions, cache, chunks=PREFILL_CHUNKS):
    outs, t = [], 0
    for c in list(chunks) + [1] * (tokens.shape[1] - sum(chunks)):
        logits, cache = model(params, tokens[:, t:t + c], positions[:, t:t + c], cache)
        outs.append(logits)
        t += c
    return jnp.concatenate(outs, axis=1), cache


SPECS = {"lm_infinite": LMInfinite(G, L), "vanilla": Vanilla(),
         # fractional global positions (g = 3 does not divide W; leak 3) under each positional encoding
         "self_extend": SelfExtend(3, L), "leaky_rerope": LeakyReRoPE(L, 3)}


# every family's Λ-cache; the full cache for the families whose positions differ (BLOOM's ALiBi is MPT's, NeoX's
# half-layout partial RoPE is llama's and GPT-J's: their parity tests decode with it too). Core: each family, the
# Λ-cache and the full cache under each positional encoding (RoPE, interleaved partial RoPE, ALiBi), each method.
@pytest.mark.parametrize("name,spec_name", grid([
    *((name, spec) for name in sorted(TINY_MODELS) for spec in ("lm_infinite", "vanilla")
      if spec == "lm_infinite" or name not in ("bloom", "neox")),
    ("gptj", "self_extend"), ("mpt_biases_qk_ln", "self_extend"), ("llama_gqa", "leaky_rerope"),
], core=[("gemma2_window", "lm_infinite"), ("bloom", "lm_infinite"), ("neox", "lm_infinite"), ("gptj", "lm_infinite"),
         ("mpt_biases_qk_ln", "vanilla"), ("gptj", "self_extend"), ("llama_gqa", "leaky_rerope")]))
def test_prefill_plus_decoding_equals_one_forward(name, spec_name):
    family, cfg, params = random_model(name)
    spec = SPECS[spec_name]
    model = family.model(cfg, AttentionCall(spec))
    tokens, positions = _tokens_and_positions()
    cache = model.init_cache(2, capacity=T)
    assert cache.bounded == spec.bounded
    got, cache = _incremental_logits(model, params, tokens, positions, cache)
    want = model.forward(params, tokens, positions)
    valid = np.asarray(positions) >= 0
    got, want = np.asarray(got)[valid], np.asarray(want)[valid]
    assert np.max(np.abs(got - want)) <= 1e-4
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("name,spec", [  # grouped KV heads, native window layers and soft caps; ALiBi
    ("gemma2_window", LongHeads(chunk_size=4, span=16)), ("mpt_biases_qk_ln", InfLLM(2, 8, 4, 2, 2, 4)),
], ids=["longheads-gemma2_window", "infllm-mpt_alibi"])
def test_retrieval_prefill_plus_decoding_equals_one_forward(name, spec):
    """A full cache with the method's state: uneven prefill chunks, then one token per call (InfLLM's calls cut
    its query steps, so its chunks keep them where one forward has them: at multiples of its step)."""
    family, cfg, params = random_model(name)
    model = family.model(cfg, AttentionCall(spec))
    chunks, pad = ((5, 13, 6), 5) if isinstance(spec, LongHeads) else ((8, 16, 40), 4)
    tokens, positions = _tokens_and_positions(pad=pad)
    cache = model.init_cache(2, capacity=T)
    assert not cache.bounded and not cache.rotated and cache.state is not None
    got, cache = _incremental_logits(model, params, tokens, positions, cache, chunks=chunks)
    want = model.forward(params, tokens, positions)
    valid = np.asarray(positions) >= 0
    assert rel_err(np.asarray(got)[valid], np.asarray(want)[valid]) < 1e-5
    plain = family.model(cfg, AttentionCall()).forward(params, tokens, positions)
    assert rel_err(np.asarray(plain)[valid], np.asarray(want)[valid]) > 1e-2  # it is not vanilla


@pytest.mark.parametrize("name,spec_name,method", grid([
    ("gptj", "lm_infinite", "yarn"), ("gptj", "vanilla", "pi"), ("llama_gqa", "self_extend", "ntk"),
    ("llama_gqa", "vanilla", "yarn"),
], core=[("gptj", "lm_infinite", "yarn"), ("llama_gqa", "self_extend", "ntk")]))
def test_static_frequency_methods_decode_as_one_forward(name, spec_name, method):
    family, cfg, params = random_model(name)
    model = family.model(cfg, AttentionCall(SPECS[spec_name], frequencies=frequency_method(method, 4.0, 16)))
    tokens, positions = _tokens_and_positions()
    got, _ = _incremental_logits(model, params, tokens, positions, model.init_cache(2, capacity=T))
    want = model.forward(params, tokens, positions)
    valid = np.asarray(positions) >= 0
    assert rel_err(np.asarray(got)[valid], np.asarray(want)[valid]) < 1e-5


def test_blockwise_prefill_chunks_equal_one_forward():
    family, cfg, params = random_model("llama_gqa")
    call = AttentionCall(StreamingLLM(G, L), implementation="blockwise", block_q=4, block_k=4)
    model = family.model(cfg, call)
    tokens, positions = _tokens_and_positions()
    got, _ = _incremental_logits(model, params, tokens, positions, model.init_cache(2), chunks=(9, 20, 3, 17))
    want = dataclasses.replace(model, call=AttentionCall(call.spec, "reference")).forward(params, tokens, positions)
    valid = np.asarray(positions) >= 0
    assert rel_err(np.asarray(got)[valid], np.asarray(want)[valid]) < 1e-5


def test_top_k_applied_at_the_prompt_end_equals_one_forward():
    """Chunks before the last run without top-k (as `generate`'s prefill_step does), so the
    prompt's last position gets the middle tokens exactly as in one forward over the prompt."""
    family, cfg, params = random_model("gptj")
    spec = LMInfinite(G, L, top_k=TopK(k=2, insert_distance=L // 2, from_layer=1))
    with_top_k = family.model(cfg, AttentionCall(spec))
    without = family.model(cfg, AttentionCall(dataclasses.replace(spec, top_k=None)))
    tokens, positions = _tokens_and_positions(batch=1, pad=0)
    cache = with_top_k.init_cache(1, capacity=T)
    _, cache = without(params, tokens[:, :40], positions[:, :40], cache)
    last, _ = with_top_k(params, tokens[:, 40:], positions[:, 40:], cache)
    want = with_top_k.forward(params, tokens, positions)
    plain = without.forward(params, tokens, positions)
    assert rel_err(last, want[:, 40:]) < 1e-5
    assert rel_err(want[:, -1], plain[:, -1]) > 1e-3  # top-k changed the last position


def test_lambda_cache_has_the_same_size_after_10_and_10000_tokens():
    family, cfg, params = random_model("mpt_biases_qk_ln")
    model = family.model(cfg, AttentionCall(LMInfinite(G, L)))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (1, 10_000)), jnp.int32)
    positions = jnp.arange(10_000, dtype=jnp.int32)[None]
    short = model(params, tokens[:, :10], positions[:, :10], model.init_cache(1))[1]
    long = model.init_cache(1)
    for t in range(0, 10_000, 1000):
        long = model(params, tokens[:, t:t + 1000], positions[:, t:t + 1000], long)[1]
    assert jax.tree_util.tree_structure(short) == jax.tree_util.tree_structure(long)
    for a, b in zip(jax.tree_util.tree_leaves(short), jax.tree_util.tree_leaves(long), strict=True):
        assert (a.shape, a.dtype, a.nbytes) == (b.shape, b.dtype, b.nbytes)
    assert short.nbytes == long.nbytes
    assert sorted(np.asarray(long.positions[0]).tolist()) == [0, 1, 2, *range(10_000 - L, 10_000)]


def test_step_rejects_bad_positions_and_caches():
    family, cfg, params = random_model("llama_gqa")
    model = family.model(cfg, AttentionCall(Vanilla()))
    tokens, positions = _tokens_and_positions(batch=1, pad=0)
    cache = model.init_cache(1, capacity=16)
    _, cache = model(params, tokens[:, :8], positions[:, :8], cache)
    with pytest.raises(ValueError, match="continue after the cache"):
        model(params, tokens[:, :4], positions[:, 4:8], cache)
    with pytest.raises(ValueError, match="capacity 16"):
        model(params, tokens[:, :10], positions[:, 8:18], cache)
    with pytest.raises(ValueError, match="capacity is required"):
        model.init_cache(1)
    with pytest.raises(ValueError, match="needs a full cache"):
        model(params, tokens[:, :1], positions[:, :1], KVCache.lambda_cache(2, 1, 2, 8, sinks=G, window=L))
    with pytest.raises(ValueError, match="cache keys have shape"):
        model(params, tokens[:, :1], positions[:, :1], KVCache.full(3, 1, 2, 8, capacity=16))
    with pytest.raises(ValueError, match="2 rows"):
        model(params, tokens[:, :1], positions[:, :1], model.init_cache(2, capacity=16))


def test_positions_beyond_int32_are_refused_not_wrapped_into_padding():
    family = registry.family_for_config(TINY_MODELS["llama_gqa"])
    cfg = family.config_from_hf(TINY_MODELS["llama_gqa"])
    model = family.model(cfg, AttentionCall(LMInfinite(G, L)))
    tokens, _ = _tokens_and_positions(batch=1, pad=0)
    far = np.asarray([[2**31 - 2, 2**31 - 1, 2**31]], np.int64)
    params = None  # refused before any parameter is read
    with pytest.raises(ValueError, match="positions must lie in int32's range"):
        model(params, tokens[:, :3], far, model.init_cache(1))
    with pytest.raises(ValueError, match="positions must lie in int32's range"):
        model.forward(params, tokens[:, :3], far)


@pytest.mark.parametrize("name,spec_name,how", grid([
    ("llama_gqa", "vanilla", "checkpoint"), ("gptj", "lm_infinite", "call"), ("llama_gqa", "self_extend", "call"),
], core=[("llama_gqa", "vanilla", "checkpoint"), ("gptj", "lm_infinite", "call")]))
def test_dynamic_ntk_rotates_every_cached_key_with_the_current_length(name, spec_name, how):
    """Dynamic NTK's frequencies follow the length T (largest position + 1 over the batch, as Hugging
    Face's). Every cached call rotates all its keys, cached ones included (stored as projected),
    with the frequencies of its own T. In one layer, keys and values do not depend on the frequencies,
    so each call then equals one forward over the tokens up to its last one (Hugging Face's cache keeps
    each key at the rotation of the step that wrote it, and cannot). Deeper layers' cached keys come from
    hidden states computed at earlier lengths, as in any cached decoding."""
    lengths = {"num_hidden_layers": 1, "max_position_embeddings": 4} if name == "llama_gqa" else \
        {"n_layer": 1, "n_positions": 4}  # L_train 4: every call is past it, by up to 16x
    config = dict(TINY_MODELS[name], **lengths)
    frequencies = frequency_method("dynamic_ntk", 2.0, 4)
    if how == "checkpoint":
        config["rope_scaling"], frequencies = {"rope_type": "dynamic", "factor": 2.0}, None
    family = registry.family_for_config(config)
    cfg = family.config_from_hf(config)
    params = _perturbed(family.init_params(cfg, jax.random.key(3)), jax.random.key(3))
    model = family.model(cfg, AttentionCall(SPECS[spec_name], frequencies=frequencies))
    tokens, positions = _tokens_and_positions()
    got, _ = _incremental_logits(model, params, tokens, positions, model.init_cache(2, capacity=T))
    valid = np.asarray(positions) >= 0
    ends = {4: 0, 17: 5, 23: 18, 24: 24, 40: 40, 63: 63}  # last token of a call -> its first token (PREFILL_CHUNKS)
    for end, start in ends.items():
        want = model.forward(params, tokens[:, :end + 1], positions[:, :end + 1])[:, start:]
        rows = valid[:, start:end + 1]
        assert rel_err(np.asarray(got[:, start:end + 1])[rows], np.asarray(want)[rows]) < 1e-5, end
    if name == "llama_gqa":  # (the tiny GPT-J's logits hardly depend on its 6 rotary dims)
        # the frequencies do change with the length: a forward over all 64 tokens scores token 23 otherwise
        whole = model.forward(params, tokens, positions)
        assert rel_err(np.asarray(got[:, 23])[valid[:, 23]], np.asarray(whole[:, 23])[valid[:, 23]]) > 1e-3


# the probe is family-agnostic but for native window layers (gemma2_window) and ALiBi (mpt)
@pytest.mark.parametrize("name", grid(sorted(TINY_MODELS), core=["gemma2_window", "mpt_biases_qk_ln"]))
def test_probe_records_rows_of_every_layer_during_one_forward(name):
    family, cfg, params = random_model(name, seed=4)
    g, window = 2, 6
    model = family.model(cfg, AttentionCall(LMInfinite(g, window), block_q=8, block_k=8))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 29)), jnp.int32)
    rows = [0, 5, 6, 7, 28]
    probe = model.probe(params, tokens, rows)
    dec = model.decoder()
    assert rel_err(probe.logits, model.forward(params, tokens)) < 1e-6
    assert probe.hidden.shape == (dec.num_layers + 1, 2, len(rows), probe.hidden.shape[-1])
    np.testing.assert_allclose(probe.hidden[0], np.asarray(dec.embed(params, tokens), np.float32)[:, rows], atol=1e-6)
    stats = probe.attention
    assert stats.lse.shape == (dec.num_layers, 2, dec.num_heads, len(rows))
    # a row i attends min(i + 1, L) window keys plus the sinks j < G with i - j >= L; a layer with a native
    # window W (gemma2_window's layers 0 and 2) attends min(i + 1, W) keys
    native = dec.native_window
    want = np.asarray([[min(i + 1, native.window) if native is not None and native.layers[layer]
                        else min(i + 1, window) + max(0, min(g, i - window + 1)) for i in rows]
                       for layer in range(dec.num_layers)])
    np.testing.assert_array_equal(np.asarray(stats.attended), np.broadcast_to(want[:, None, None], stats.attended.shape))
    entropy = np.asarray(stats.entropy)
    assert (entropy >= -1e-6).all() and (entropy <= np.log(want[:, None, None]) + 1e-5).all()
    np.testing.assert_allclose(np.asarray(stats.bucket_mass).sum(-1), 1.0, atol=1e-5)
    assert (np.asarray(stats.max_logit) >= np.asarray(stats.lse) - np.log(want[:, None, None]) - 1e-5).all()
    assert probe.rows is None
    full = model.probe(params, tokens, rows, full_rows=True).rows  # whole rows: (layers, B, heads, R, T)
    assert full.probs.shape == (dec.num_layers, 2, dec.num_heads, len(rows), 29)
    probs = np.asarray(full.probs, np.float64)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal((probs > 0).sum(-1), np.asarray(stats.attended))
    ent = -np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1)), 0).sum(-1)
    np.testing.assert_allclose(ent, np.asarray(stats.entropy), atol=2e-5)
    np.testing.assert_allclose(np.asarray(full.logits).max(-1), np.asarray(stats.max_logit), atol=2e-5)
    with pytest.raises(ValueError, match=r"rows must be .* in \[0, 29\)"):
        model.probe(params, tokens, [29])


@pytest.mark.parametrize("name", ["llama_gqa", "gemma2_window"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_forward_and_cached_step_lower_for_gpu_and_tpu(platform, name):
    """The whole model, its forward pass and a cached decoding step, lowered for an accelerator on
    this CPU machine (a host callback, as dynamic NTK's, cannot be lowered for another platform than
    the one present, so it is not among these); gemma2_window: window layers chosen by lax.cond and
    soft-capped scores."""
    family, cfg, params = random_model(name)
    tokens = jnp.zeros((2, 40), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))
    for spec in (LMInfinite(G, L), Vanilla()):
        model = family.model(cfg, AttentionCall(spec, block_q=8, block_k=8))
        cache = model.init_cache(2, capacity=48)
        for fn, args in ((model.forward, (params, tokens)),
                         (model.__call__, (params, tokens[:, :1], positions[:, :1], cache))):
            assert "stablehlo" in jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _max_diffs(got, want, valid) -> tuple[float, float]:
    """Max |difference| of log-probabilities and entropies on ``valid``; top-1 must agree exactly."""
    np.testing.assert_array_equal(np.asarray(got.top1)[valid], want[2][valid])
    return (float(np.abs(np.asarray(got.logprobs, np.float64) - want[0])[valid].max()),
            float(np.abs(np.asarray(got.entropy, np.float64) - want[1])[valid].max()))


# gemma2_window: windowed layers and a final logit soft cap; gptj: a head bias; llama_gqa: GQA, attention biases
@pytest.mark.parametrize("name", grid(["llama_gqa", "gemma2_window", "gptj"], core=["gemma2_window", "gptj"]))
def test_score_equals_the_log_softmax_of_the_forward_logits(name):
    family, cfg, params = random_model(name)
    model = family.model(cfg, AttentionCall(LMInfinite(G, L)))
    tokens, positions = _tokens_and_positions(seed=1)  # the last row left-padded
    logits = np.asarray(model.forward(params, tokens, positions))
    valid = np.asarray(positions) >= 0
    got = model.score(params, tokens, positions, chunk=2 * 24)  # 24 positions per head call: the last overlaps
    assert got.logprobs.shape == (2, T - 1) and got.logprobs.dtype == jnp.float32
    assert max(_max_diffs(got, numpy_scores(logits[:, :-1], np.asarray(tokens)[:, 1:]), valid[:, :-1])) <= 1e-5
    targets = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, T))
    targets[0, ::3] = logits[0, ::3].argmax(-1)  # some top-1 hits
    got = model.score(params, tokens, positions, targets=jnp.asarray(targets), chunk=2 * 24)
    assert got.logprobs.shape == (2, T) and np.asarray(got.top1)[0, ::3].all()
    assert max(_max_diffs(got, numpy_scores(logits, targets), valid)) <= 1e-5
    with pytest.raises(ValueError, match="targets must have the tokens' shape"):
        model.score(params, tokens, targets=tokens[:, 1:])


def test_score_step_and_last_logits_equal_the_step():
    family, cfg, params = random_model("gemma2_window")
    model = family.model(cfg, AttentionCall(LMInfinite(G, L)))
    tokens, positions = _tokens_and_positions()
    cache = model.init_cache(2, capacity=T)
    chunk, cols = (tokens[:, :24], positions[:, :24]), slice(1, 25)
    logits, want = model(params, *chunk, cache)
    scores, got = model.score_step(params, *chunk, cache, tokens[:, cols], chunk=20)
    valid = np.asarray(positions[:, :24]) >= 0
    assert max(_max_diffs(scores, numpy_scores(np.asarray(logits), np.asarray(tokens[:, cols])), valid)) <= 1e-5
    jax.tree.map(np.testing.assert_array_equal, got, want)
    last, got = model.last_logits(params, *chunk, cache)
    np.testing.assert_allclose(last, logits[:, -1], rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    with pytest.raises(ValueError, match="targets must have the tokens' shape"):
        model.score_step(params, *chunk, cache, tokens[:, :23])


def test_score_plans_no_sequence_of_logits():
    """16k tokens at a 32k vocabulary: the logits would be 2.1 GB; the scoring pass plans a tenth of that."""
    family = registry.FAMILIES["llama"]
    cfg = family.config_from_hf({"model_type": "llama", "vocab_size": 32000, "hidden_size": 256,
                                 "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4})
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                          jax.eval_shape(lambda: family.init_params(cfg, jax.random.key(0))))
    model = family.model(cfg, AttentionCall(LMInfinite(4, 256)), jnp.bfloat16)
    t = 16384
    plan = jax.jit(model.score).lower(params, jax.ShapeDtypeStruct((1, t), jnp.int32)).compile().memory_analysis()
    assert plan.output_size_in_bytes + plan.temp_size_in_bytes < t * cfg.vocab_size * 4 / 10, plan
