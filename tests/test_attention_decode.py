"""Single-query attention (each key read once, global keys scored by a query rotated per key)
against the float64 oracle: every spec and positional encoding, keys in ring order with empty
slots, stored rotated or not, far positions, GQA, float32 and bfloat16; cached decoding through it
equals the dense path."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (POSITIONALS, SPEC_FACTORIES, case_seed, grid, in_turn, make_positional, naive_positional_kwargs,
                      naive_spec_kwargs, product, random_model, random_qkv, rel_err)
from naive_attention import naive_attention

from lminf_jax import AttentionCall, LMInfinite, Rotary, attention
from lminf_jax.attention_decode import decode_attention, rotates_keys
from lminf_jax.rope import apply_rope


def _ring_positions(rng, query: int, slots: int, empty: int) -> np.ndarray:
    """Key positions as a Λ-cache holds them: some empty slots, the rest shuffled, ending at ``query``."""
    held = np.concatenate([np.arange(3), np.arange(query - (slots - empty - 3) + 1, query + 1)])
    k_pos = np.concatenate([held, -np.ones(empty, np.int64)])
    return rng.permutation(k_pos).astype(np.int32)


@pytest.mark.parametrize("spec_name,positional_name", grid(product(sorted(SPEC_FACTORIES), POSITIONALS),
                                                           core=in_turn(sorted(SPEC_FACTORIES), POSITIONALS, shift=0)))
def test_single_query_matches_naive_oracle(spec_name, positional_name):
    b, s, hq, hkv, d = 3, 24, 6, 2, 8
    rng = np.random.default_rng(case_seed(spec_name, positional_name))
    q, k, v = random_qkv(int(rng.integers(2**31)), b, 1, s, hq, hkv, d)
    queries = np.array([40, 23, 1_000_003])
    k_pos = np.stack([_ring_positions(rng, int(p), s, empty) for p, empty in zip(queries, (0, 3, 5))])
    q_pos = queries[:, None].astype(np.int32)
    spec = SPEC_FACTORIES[spec_name](3, 16)
    positional = make_positional(positional_name, d, hq)
    want = naive_attention(q, k, v, q_pos, k_pos, scale=d**-0.5, **naive_spec_kwargs(spec),
                           **naive_positional_kwargs(positional))
    out = attention(q, k, v, q_positions=q_pos, k_positions=k_pos, spec=spec, positional=positional,
                    implementation="single_query")
    assert rel_err(out, want) < 1e-5
    low = attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), q_positions=q_pos, k_positions=k_pos,
                    spec=spec, positional=positional, implementation="single_query")
    assert low.dtype == jnp.bfloat16 and rel_err(low.astype(jnp.float32), want) < 1e-2


@pytest.mark.parametrize("spec_name,positional_name", grid(product(sorted(SPEC_FACTORIES), POSITIONALS),
                                                           core=in_turn(sorted(SPEC_FACTORIES), POSITIONALS, shift=2)))
def test_a_cache_and_the_new_key_in_one_softmax_match_the_oracle(spec_name, positional_name):
    """`decode_attention` as a cached step calls it: the cache's keys stored rotated (under RoPE),
    sinks in their own slots and only there scored as global keys (``far_slots``), the ring
    shuffled with empty slots, and the step's own key as a second set."""
    b, s, hq, hkv, d, sinks = 2, 20, 4, 2, 8, 3
    rng = np.random.default_rng(case_seed("sets", spec_name, positional_name))
    q, k, v = random_qkv(int(rng.integers(2**31)), b, 1, s + 1, hq, hkv, d)
    queries = np.array([41, 1_000_003])
    k_pos = np.stack([np.concatenate([np.arange(sinks), rng.permutation(np.concatenate(
        [np.arange(p - (s - sinks - empty), p), -np.ones(empty, np.int64)]))]) for p, empty in zip(queries, (0, 4))])
    k_pos = np.concatenate([k_pos, queries[:, None]], axis=1).astype(np.int32)  # the new token's own key last
    q_pos = queries[:, None].astype(np.int32)
    spec = SPEC_FACTORIES[spec_name](sinks, 12)
    positional = make_positional(positional_name, d, hq)
    want = naive_attention(q, k, v, q_pos, k_pos, scale=d**-0.5, **naive_spec_kwargs(spec),
                           **naive_positional_kwargs(positional))
    rotated = rotates_keys(positional)
    stored = apply_rope(jnp.asarray(k), jnp.asarray(k_pos), positional) if rotated else jnp.asarray(k)
    heads_first = lambda x: jnp.swapaxes(jnp.asarray(x), 1, 2)  # noqa: E731
    out = decode_attention(jnp.asarray(q), jnp.asarray(q_pos), (heads_first(stored[:, :s]), heads_first(stored[:, s:])),
                           (heads_first(v[:, :s]), heads_first(v[:, s:])),
                           (jnp.asarray(k_pos[:, :s]), jnp.asarray(k_pos[:, s:])), spec=spec, positional=positional,
                           scale=d**-0.5, rotated=rotated,
                           far_slots=(spec.sinks if spec.global_keys_bounded else None, 0))
    assert rel_err(out, want) < 1e-5


def test_cached_decoding_through_single_query_equals_the_dense_path():
    family, cfg, params = random_model("llama_gqa")
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 40)), jnp.int32)
    spec = LMInfinite(2, 12)
    models = [family.model(cfg, AttentionCall(spec, name, 8, 8)) for name in ("auto", "single_query")]
    caches = [m.init_cache(2) for m in models]
    for start, length in ((0, 20), (20, 1), (21, 1), (22, 1), (23, 17)):
        pos = jnp.broadcast_to(jnp.arange(start, start + length), (2, length))
        (want, caches[0]), (got, caches[1]) = (m(params, tokens[:, start:start + length], pos, c)
                                               for m, c in zip(models, caches))
        assert rel_err(got, want) < 1e-5, start


def test_single_query_is_one_query_without_top_k():
    q, k, v = random_qkv(0, 1, 2, 5, 2, 2, 4)
    with pytest.raises(ValueError, match="one query per row"):
        attention(q, k, v, q_positions=np.array([3, 4]), k_positions=np.arange(5), implementation="single_query",
                  positional=Rotary.create(4))
