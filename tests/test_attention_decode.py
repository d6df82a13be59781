"""Single-query attention (one pass, sinks at effective positions) against the float64 oracle:
every spec and positional encoding, keys in ring order with empty slots, far positions, GQA,
float32 and bfloat16; cached decoding through it equals the dense path."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (SPEC_FACTORIES, case_seed, make_positional, naive_positional_kwargs, naive_spec_kwargs,
                      random_model, random_qkv, rel_err)
from naive_attention import naive_attention

from lminf_jax import LMInfinite, Rotary, attention
from lminf_jax.attention_decode import effective_key_positions
from models.common import AttentionCall


def _ring_positions(rng, query: int, slots: int, empty: int) -> np.ndarray:
    """Key positions as a Λ-cache holds them: some empty slots, the rest shuffled, ending at ``query``."""
    held = np.concatenate([np.arange(3), np.arange(query - (slots - empty - 3) + 1, query + 1)])
    k_pos = np.concatenate([held, -np.ones(empty, np.int64)])
    return rng.permutation(k_pos).astype(np.int32)


@pytest.mark.parametrize("positional_name", ["rope_half", "rope_interleaved_partial", "alibi", "none"])
@pytest.mark.parametrize("spec_name", sorted(SPEC_FACTORIES))
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


def test_sinks_are_scored_at_the_distance_limit():
    spec = LMInfinite(2, 8, 5)
    k_pos = np.array([[0, 1, 93, 94, 95, 96, 97, 98, 99, 100, -1]], np.int32)
    effective, attended = effective_key_positions(jnp.array([100]), jnp.asarray(k_pos), spec)
    assert effective.tolist() == [[95, 95, 93, 94, 95, 96, 97, 98, 99, 100, 0]]  # sinks at p - D
    assert attended.tolist() == [[True] * 10 + [False]]
    near = effective_key_positions(jnp.array([6]), jnp.asarray([[0, 1, 2, 6]], jnp.int32), spec)[0]
    assert near.tolist() == [[0, 1, 2, 6]]  # inside the window every key keeps its position


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
