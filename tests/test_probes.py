"""lminf_jax.probes: blockwise row statistics against the dense probe, exact distance buckets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_nan_stays_in_its_rows, attended_slots, grid, in_turn, make_positional, product, random_qkv

from lminf_jax import (DistanceLimit, LMInfinite, LambdaMask, Scaling, SlidingWindow, StreamingLLM, TopK, Vanilla,
                       attention_probe)
from lminf_jax.probes import (
    bucket_table, distance_bucket, distance_bucket_bounds, num_distance_buckets, probe_rows,
)


def test_distance_buckets_are_exact_half_octaves():
    d = np.arange(0, 70_000)
    got = np.asarray(distance_bucket(jnp.asarray(d)))
    want = np.where(d < 2, d, 2 * np.floor(np.log2(np.maximum(d, 1))).astype(int)
                    + (d >= 1.5 * 2.0 ** np.floor(np.log2(np.maximum(d, 1)))))
    np.testing.assert_array_equal(got, want)
    for i in range(got.max()):
        lo, hi = distance_bucket_bounds(i)
        assert d[got == i].min() == lo and d[got == i].max() == hi - 1
    big = np.asarray([2**31 - 1, 3 * 2**29, 3 * 2**29 - 1], np.int64)
    assert np.asarray(distance_bucket(jnp.asarray(big, jnp.int32))).tolist() == [61, 61, 60]
    assert num_distance_buckets(5) == 5 and bucket_table(5).tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 6]]


SPECS = [Vanilla(), LMInfinite(3, 40), LambdaMask(3, 40),
         DistanceLimit(50), SlidingWindow(40), StreamingLLM(2, 40)]


PROBE_POSITIONALS = ("rope_half", "rope_interleaved_partial", "alibi", "none", "rope_softcap")


# core: each kind under one encoding, the encodings in turn
@pytest.mark.parametrize("spec,positional", grid(product(SPECS, PROBE_POSITIONALS),
                                                 core=in_turn(SPECS, PROBE_POSITIONALS)),
                         ids=[f"{spec.kind}-{positional}" for spec, positional in product(SPECS, PROBE_POSITIONALS)])
def test_row_statistics_match_the_dense_probe(spec, positional):
    """"rope_softcap": Gemma-2's logit soft-capping, a cap that binds, in both probes."""
    scale = Scaling(0.25, softcap=1.5) if positional == "rope_softcap" else None
    positional = "rope_half" if positional == "rope_softcap" else positional
    b, t, hq, hkv, d = 2, 203, 4, 2, 16
    q, k, v = random_qkv(sum(map(ord, spec.kind + positional)), b, t, t, hq, hkv, d)
    q, k = 2 * q, 2 * k  # sharper distributions
    pos = make_positional(positional, d, hq)
    p = np.broadcast_to(np.arange(t), (b, t)).astype(np.int32).copy()
    p[1, :5] = -1  # a left-padded row
    rows = np.asarray([0, 3, 77, 202])
    qp = jnp.asarray(p[:, rows])
    _, dense = attention_probe(jnp.asarray(q[:, rows]), jnp.asarray(k), jnp.asarray(v), q_positions=qp,
                               k_positions=jnp.asarray(p), spec=spec, positional=pos, scale=scale)
    nb = num_distance_buckets(t)
    got = probe_rows(jnp.asarray(q[:, rows]), jnp.asarray(k), qp, jnp.asarray(p), spec=spec, positional=pos,
                     scale=scale, num_buckets=nb, block_k=32)
    logits = np.asarray(dense.logits, np.float64)
    probs = np.asarray(dense.probs, np.float64)
    if scale is not None:
        assert np.abs(logits[np.isfinite(logits)]).max() <= 1.5
    live = np.isfinite(logits).any(-1)
    sums = np.where(np.isfinite(logits), np.exp(logits), 0).sum(-1)
    lse = np.where(live, np.log(np.where(live, sums, 1.0)), -np.inf)
    entropy = -np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1)), 0).sum(-1)
    np.testing.assert_allclose(np.asarray(got.lse), lse, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got.entropy)[live], entropy[live], atol=2e-5, rtol=1e-5)
    assert np.isnan(np.asarray(got.entropy)[~live]).all()
    np.testing.assert_array_equal(np.asarray(got.attended), np.isfinite(logits).sum(-1))
    np.testing.assert_allclose(np.asarray(got.max_logit), logits.max(-1), atol=2e-5)
    dist = p[:, None, rows, None] - p[:, None, None, :]
    bucket = np.asarray(distance_bucket(jnp.asarray(np.maximum(dist, 0))))
    for i in range(nb):
        sel = (bucket == i) & np.isfinite(logits)
        np.testing.assert_allclose(np.asarray(got.bucket_max[..., i]), np.where(sel, logits, -np.inf).max(-1),
                                   atol=2e-5)
        np.testing.assert_allclose(np.asarray(got.bucket_mass[..., i]), np.where(sel, probs, 0).sum(-1), atol=2e-6)
    np.testing.assert_allclose(np.asarray(got.bucket_mass).sum(-1)[live], 1.0, atol=1e-5)


def test_far_distances_are_counted_in_the_last_bucket_and_bad_input_is_refused():
    q, k, _ = random_qkv(1, 1, 100, 100, 2, 2, 8)
    p = jnp.arange(100, dtype=jnp.int32)[None]
    got = probe_rows(jnp.asarray(q[:, -1:]), jnp.asarray(k), p[:, -1:], p, spec=Vanilla(), num_buckets=3)
    np.testing.assert_allclose(np.asarray(got.bucket_mass).sum(-1), 1.0, atol=1e-6)
    assert float(got.attended[0, 0, 0]) == 100
    with pytest.raises(ValueError, match="top-k"):
        probe_rows(jnp.asarray(q[:, -1:]), jnp.asarray(k), p[:, -1:], p, num_buckets=3,
                   spec=LMInfinite(2, 10, top_k=TopK(2, 5, 0)))
    with pytest.raises(ValueError, match="positions must be"):
        probe_rows(jnp.asarray(q[:, -1:]), jnp.asarray(k), p, p, spec=Vanilla(), num_buckets=3)
    with pytest.raises(ValueError, match="num_buckets"):
        probe_rows(jnp.asarray(q[:, -1:]), jnp.asarray(k), p[:, -1:], p, spec=Vanilla(), num_buckets=0)


@pytest.mark.parametrize("which", ["probe_rows", "attention_probe"])
def test_a_nan_reaches_only_the_rows_that_attend_it(which):
    """A NaN key (probe_rows reads no values) and a NaN value: statistics, logits and probabilities
    of rows that do not attend them are unchanged."""
    t, spec = 16, LMInfinite(2, 4)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t))
    q, k, v = random_qkv(6, 2, t, t, 4, 2, 8)
    rope = make_positional("rope_half", 8, 4)

    def rows(*xs):  # (B, Hq, Tq, ...) -> (B, Tq, ...)
        return np.concatenate([np.moveaxis(np.asarray(x), 2, 1).reshape(2, t, -1) for x in xs], axis=-1)

    def run(q, k, v):
        if which == "probe_rows":
            s = probe_rows(jnp.asarray(q), jnp.asarray(k), pos, pos, spec=spec, positional=rope, num_buckets=6,
                           block_k=4)
            return rows(s.lse, s.entropy, s.attended, s.max_logit, s.bucket_max, s.bucket_mass)
        out, probe = attention_probe(q, k, v, q_positions=pos, k_positions=pos, spec=spec, positional=rope)
        return np.concatenate([np.asarray(out).reshape(2, t, -1), rows(probe.logits, probe.probs)], axis=-1)

    assert_nan_stays_in_its_rows(run, q, k, v, attended_slots(pos, pos, spec), nan_key=[9, 1],
                                 nan_value=None if which == "probe_rows" else [6, 12])


def test_distances_beyond_int32_are_refused():
    with pytest.raises(ValueError, match="max_distance"):
        num_distance_buckets(2**31)
