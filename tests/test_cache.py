"""KVCache: slot layout, chunked writes, cached attention against one full attention call."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    SPEC_FACTORIES,
    grid,
    make_positional,
    naive_positional_kwargs,
    naive_spec_kwargs,
    random_qkv,
    rel_err,
)
from naive_attention import naive_attention

from lminf_jax import (AttentionCall, DistanceLimit, LMInfinite, Scaling, SlidingWindow, StreamingLLM, TopK, Vanilla,
                       attention)
from lminf_jax.cache import KVCache, cached_attention
from lminf_jax.rope import apply_rope

G, L = 3, 8
HQ, HKV, D = 4, 2, 16


@functools.partial(jax.jit, static_argnames=("call", "positional", "scale"))
def _cached_step(cache: KVCache, q, k, v, positions, *, call, positional, scale=None) -> tuple[jax.Array, KVCache]:
    """One call of `cached_attention` on a one-layer cache, as a model step does it."""
    update = cache.update_for(positions)
    out, stored, _ = cached_attention(q, k, v, positions, cache.keys[0], cache.values[0], update, call=call,
                                   positional=positional, rotated=cache.rotated, scale=scale, layer=5)
    return out, cache.written(stored[None], v[None], update)


def _run_chunks(cache: KVCache, q, k, v, positions, chunks, call, positional, scale=None):
    """Feed (1-layer) q/k/v through `cached_attention` in the given chunk sizes."""
    outs, t = [], 0
    for c in chunks:
        sl = slice(t, t + c)
        out, cache = _cached_step(cache, *(jnp.asarray(x[:, sl]) for x in (q, k, v, positions)), call=call,
                                  positional=positional, scale=scale)
        outs.append(out)
        t += c
    return jnp.concatenate(outs, axis=1), cache


def _chunks(total: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(min(rng.choice([1, 1, 5, 13]), total - sum(sizes))))
    return sizes


CHUNKED_RUNS = [
    *((name, "rope_half", "blockwise", True) for name in sorted(SPEC_FACTORIES)),
    ("lm_infinite", "rope_half", "softcap", True), ("self_extend", "alibi", "softcap", False),
    ("lm_infinite", "rope_interleaved_partial", "auto", True), ("lm_infinite", "rope_half", "auto", False),
    ("self_extend", "rope_interleaved_partial", "auto", False), ("lm_infinite", "rope_half", "reference", True),
    ("lm_infinite", "alibi", "blockwise", False), ("streaming_llm", "alibi", "auto", False),
    ("vanilla", "alibi", "auto", False),
]
# extended: kinds whose cache is another's (Λ-mask's and StreamingLLM's ring is LM-Infinite's, a distance limit's
# full cache is vanilla's, SelfExtend's g dividing W is a case of its positions), ALiBi under auto (blockwise's)
CHUNKED_EXTENDED = [("lambda_mask", "rope_half", "blockwise", True), ("distance_limit", "rope_half", "blockwise", True),
                    ("streaming_llm", "rope_half", "blockwise", True),
                    ("self_extend_g_divides_w", "rope_half", "blockwise", True),
                    ("streaming_llm", "alibi", "auto", False), ("vanilla", "alibi", "auto", False)]


@pytest.mark.parametrize("spec_name,positional_name,implementation,rotated",
                         grid(CHUNKED_RUNS, core=[run for run in CHUNKED_RUNS if run not in CHUNKED_EXTENDED]))
def test_chunked_cached_attention_equals_one_full_call(spec_name, positional_name, implementation, rotated):
    """Every chunk size (1 included: the decoding path), stored keys rotated or as projected;
    "softcap": blockwise with Gemma-2's logit soft-capping (a cap that binds)."""
    scale = Scaling(0.25, softcap=1.5) if implementation == "softcap" else None
    implementation = "blockwise" if implementation == "softcap" else implementation
    spec = SPEC_FACTORIES[spec_name](G, L)
    positional = make_positional(positional_name, D, HQ)
    b, t = 2, 8 * L
    q, k, v = random_qkv(7, b, t, t, HQ, HKV, D)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    positions[1, :5] = -1  # row 1 is left-padded by 5: its real tokens sit at 0..t-6
    positions[1, 5:] = np.arange(t - 5)
    cache = KVCache.for_spec(spec, 1, b, HKV, D, capacity=t, rotated=rotated)
    assert cache.bounded == spec.bounded
    got, cache = _run_chunks(cache, q, k, v, positions, _chunks(t, 3), AttentionCall(spec, implementation, 4, 4),
                             positional, scale=scale)
    want = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_positions=jnp.asarray(positions),
                     k_positions=jnp.asarray(positions), spec=spec, positional=positional, scale=scale,
                     implementation="reference")
    valid = positions >= 0
    assert rel_err(np.asarray(got)[valid], np.asarray(want)[valid]) < 1e-5
    np.testing.assert_array_equal(np.asarray(got)[~valid], 0.0)


def test_top_k_with_full_cache_equals_reference_at_each_decoding_step():
    spec = LMInfinite(G, L, top_k=TopK(k=3, insert_distance=L // 2, from_layer=4))
    positional = make_positional("rope_half", D, HQ)
    t = 6 * L
    q, k, v = random_qkv(11, 1, t, t, HQ, HKV, D)
    positions = np.arange(t, dtype=np.int32)[None]
    prompt = 3 * L
    cache = KVCache.full(1, 1, HKV, D, capacity=t)
    got, _ = _run_chunks(cache, q, k, v, positions, [prompt] + [1] * (t - prompt), AttentionCall(spec), positional)
    for i in [prompt - 1, prompt, t - 1]:  # the prompt's last query and decoding steps: top-k at the query
        want = attention(jnp.asarray(q[:, i:i + 1]), jnp.asarray(k[:, :i + 1]), jnp.asarray(v[:, :i + 1]),
                         q_positions=jnp.asarray([i]), k_positions=jnp.arange(i + 1), spec=spec,
                         positional=positional, layer=5, implementation="reference")
        assert rel_err(got[:, i], want[:, 0]) < 1e-5


@pytest.mark.parametrize("sinks,window", [(3, 8), (0, 5), (10, 1)])
def test_lambda_cache_holds_exactly_the_sinks_and_the_last_window(sinks, window):
    n = 200
    cache = KVCache.lambda_cache(1, 2, 1, 4, sinks=sinks, window=window)
    rng = np.random.default_rng(0)
    values = rng.standard_normal((2, n, 1, 4)).astype(np.float32)
    positions = np.broadcast_to(np.arange(n, dtype=np.int32), (2, n))
    _, cache = _run_chunks(cache, values, values, values, positions, _chunks(n, sinks + window),
                           AttentionCall(SlidingWindow(window)), None)
    held = np.asarray(cache.positions)
    expected = set(range(sinks)) | set(range(n - window, n))
    for row in range(2):
        assert set(held[row].tolist()) == expected
        for slot, p in enumerate(held[row]):
            assert slot == (p if p < sinks else sinks + (p - sinks) % window)
            np.testing.assert_array_equal(np.asarray(cache.keys[0, row, :, slot]), values[row, p])


def test_lambda_cache_size_is_independent_of_stream_length():
    def fill(n):
        cache = KVCache.lambda_cache(2, 1, 2, 8, sinks=4, window=16, dtype=jnp.bfloat16)
        pos = jnp.arange(n, dtype=jnp.int32)[None]
        kv = jnp.ones((2, 1, n, 2, 8), jnp.bfloat16)
        return cache.written(kv, kv, cache.update_for(pos))

    a, b = fill(10), fill(10_000)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert (x.shape, x.dtype) == (y.shape, y.dtype)
    assert a.nbytes == b.nbytes == 2 * (2 * 20 * 2 * 8 * 2) + 20 * 4
    assert sorted(np.asarray(b.positions[0]).tolist()) == [0, 1, 2, 3, *range(10_000 - 16, 10_000)]


def _filled(cache: KVCache, k, v, positions, positional) -> KVCache:
    """``cache`` (one layer) holding the projected k/v at the given positions (keys stored as the
    cache stores them)."""
    stored = apply_rope(jnp.asarray(k), jnp.asarray(positions), positional) if cache.rotated else jnp.asarray(k)
    return cache.written(stored[None], jnp.asarray(v)[None], cache.update_for(jnp.asarray(positions)))


@pytest.mark.parametrize("rotated", [True, False])
def test_cached_rope_is_exact_beyond_1e8(rotated):
    """Decoding at position ~1e8 (and near 2^31) with the same cache contents as at a small
    position gives the same output (LM-Infinite sees only relative distances and its sinks at
    p - D), and matches the float64 oracle there; keys stored rotated or as projected."""
    spec = LMInfinite(G, L)
    rope = make_positional("rope_half", D, HQ)
    q, k, v = random_qkv(5, 1, 2, G + L, HQ, HKV, D)
    outs = []
    for newest in (G + L + 5, 100_000_000 + 12_345, 2**31 - 3):
        key_pos = np.concatenate([np.arange(G), newest - L + 1 + np.arange(L)]).astype(np.int32)[None]
        cache = _filled(KVCache.lambda_cache(1, 1, HKV, D, sinks=G, window=L, rotated=rotated), k, v, key_pos, rope)
        pos = jnp.asarray([[newest + 1]], jnp.int32)
        out, _, _ = cached_attention(jnp.asarray(q[:, :1]), jnp.asarray(k[:, :1]), jnp.asarray(v[:, :1]), pos,
                                  cache.keys[0], cache.values[0], cache.update_for(pos), call=AttentionCall(spec),
                                  positional=rope, rotated=rotated)
        want = naive_attention(q[:, :1], np.concatenate([k, k[:, :1]], 1), np.concatenate([v, v[:, :1]], 1),
                               np.asarray(pos), np.concatenate([key_pos, np.asarray(pos)], 1), scale=D ** -0.5,
                               **naive_spec_kwargs(spec), **naive_positional_kwargs(rope))
        assert rel_err(out, want) < 2e-5, newest
        outs.append(np.asarray(out))
    for other in outs[1:]:
        assert rel_err(other, outs[0]) < 2e-5


def test_a_rotated_cache_needs_fixed_rope_frequencies():
    cache = KVCache.lambda_cache(1, 1, HKV, D, sinks=G, window=L, rotated=True)
    q, k, v = (jnp.asarray(x) for x in random_qkv(1, 1, 1, 1, HQ, HKV, D))
    pos = jnp.asarray([[0]], jnp.int32)
    for positional in (None, make_positional("alibi", D, HQ)):
        with pytest.raises(ValueError, match="fixed frequencies"):
            cached_attention(q, k, v, pos, cache.keys[0], cache.values[0], cache.update_for(pos),
                             call=AttentionCall(LMInfinite(G, L)), positional=positional, rotated=True)


def test_cache_rejects_specs_it_cannot_serve():
    cache = KVCache.lambda_cache(1, 1, 1, 4, sinks=4, window=16)
    cache.check_spec(LMInfinite(4, 16))
    cache.check_spec(SlidingWindow(8))
    with pytest.raises(ValueError, match="full cache"):
        cache.check_spec(Vanilla())
    with pytest.raises(ValueError, match="top-k"):
        cache.check_spec(LMInfinite(4, 16, top_k=TopK(2, 8, 0)))
    with pytest.raises(ValueError, match="global_branch 5"):
        cache.check_spec(LMInfinite(5, 16))
    with pytest.raises(ValueError, match="local_branch 32"):
        cache.check_spec(StreamingLLM(4, 32))
    with pytest.raises(ValueError, match="capacity is required"):
        KVCache.for_spec(DistanceLimit(8), 1, 1, 1, 4)
    with pytest.raises(ValueError, match="window"):
        KVCache.lambda_cache(1, 1, 1, 4, sinks=2, window=0)
    assert not SlidingWindow(4, top_k=TopK(1, 2, 0)).bounded  # top-k may pick any key: a full cache
    KVCache.full(1, 1, 1, 4, capacity=8).check_spec(LMInfinite(4, 16, top_k=TopK(2, 8, 0)))


def test_a_cache_beyond_memory_or_int32_is_refused_naming_what_drives_it():
    """No allocation is tried: the bytes a cache implies are checked against the memory there is."""
    with pytest.raises(ValueError, match=r"Λ-cache of G \+ L = 10 \+ 1000000000 slots needs [\d,]+ bytes .* "
                                         r"lower the window L \(local_branch\)"):
        KVCache.lambda_cache(64, 8, 8, 128, sinks=10, window=10**9)
    with pytest.raises(ValueError, match=r"G \+ L = 1000000000 \+ 512 slots .* lower the sinks G \(global_branch\)"):
        KVCache.for_spec(LMInfinite(10**9, 512), 64, 8, 8, 128)
    with pytest.raises(ValueError, match=r"full cache of capacity = 1000000000 slots .* lower capacity"):
        KVCache.full(64, 8, 8, 128, capacity=10**9)
    with pytest.raises(ValueError, match=r"capacity must be an integer >= 1 and <= 2147483647"):
        KVCache.full(1, 1, 1, 1, capacity=2**31)
    with pytest.raises(ValueError, match=r"sinks \+ window"):
        KVCache.lambda_cache(1, 1, 1, 1, sinks=2**30, window=2**30)


def test_update_for_refuses_positions_beyond_int32():
    cache = KVCache.lambda_cache(1, 1, 1, 4, sinks=2, window=4)
    with pytest.raises(ValueError, match="positions must lie in int32's range"):
        cache.update_for(np.asarray([[2**31 - 1, 2**31]], np.int64))


def test_update_for_drops_padding_and_tokens_overwritten_within_the_call():
    cache = KVCache.lambda_cache(1, 1, 1, 4, sinks=2, window=4)
    positions = jnp.asarray([[-1, -1, 0, 1, 2, 3, 4, 5, 6, 7]], jnp.int32)
    update = cache.update_for(positions)
    s = cache.slots
    assert np.asarray(update.slot).tolist() == [[s, s, 0, 1, s, s, 4, 5, 2, 3]]
    assert np.asarray(update.new_positions).tolist() == [[0, 1, 6, 7, 4, 5]]
