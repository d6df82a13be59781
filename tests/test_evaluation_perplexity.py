"""lminf_jax.evaluation.perplexity: segments and tiles, scores against a float64 log-softmax, the statistics."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model

from lminf_jax import LMInfinite, Vanilla
from lminf_jax.evaluation.buckets import PositionBuckets
from lminf_jax.evaluation.perplexity import (
    bos_sequences, length_point, position_buckets, prefix_ppl, sequence_nll, text_segments, tile_segments,
)
from lminf_jax import AttentionCall


def test_segments_are_evenly_spaced_disjoint_slices_of_the_stream():
    stream = np.arange(1000, 1103, dtype=np.uint16)  # 103 tokens
    seg = text_segments(stream, 3, 20)
    assert seg.shape == (3, 20) and seg.dtype == np.int32
    starts = seg[:, 0] - 1000
    assert starts.tolist() == [0, 41, 83]  # first at 0, last ends at the stream's end
    for row in seg:
        assert np.array_equal(row, np.arange(row[0], row[0] + 20))
    assert text_segments(stream, None, 20).shape == (5, 20)  # all that fit
    assert text_segments(stream, 1, 103)[0, -1] == 1102
    with pytest.raises(ValueError, match="6 segment.*120 stream tokens; the stream has 103"):
        text_segments(stream, 6, 20)
    with pytest.raises(ValueError, match="1-D integer"):
        text_segments(stream.astype(np.float32), 1, 20)
    with pytest.raises(ValueError, match="count must be an integer >= 1"):
        text_segments(stream, 0, 20)


def test_tiles_cover_each_segment_in_order_behind_a_bos():
    seg = np.arange(2 * 11, dtype=np.int32).reshape(2, 11) + 10
    tiles = tile_segments(seg, 4, bos_id=1)  # 3 text tokens per tile: 3 whole tiles per segment
    assert tiles.shape == (6, 4)
    assert (tiles[:, 0] == 1).all()
    assert tiles[:3, 1:].ravel().tolist() == list(range(10, 19))  # segment 0, its last 2 tokens left out
    assert tiles[3:, 1:].ravel().tolist() == list(range(21, 30))
    plain = tile_segments(seg, 4)
    assert plain.shape == (4, 4) and plain.ravel().tolist() == [*range(10, 18), *range(21, 29)]
    assert tile_segments(seg, 12, bos_id=1).shape == (2, 12)  # one tile: the whole segment
    with pytest.raises(ValueError, match="holds no tile of 12 tokens"):
        tile_segments(seg, 13, bos_id=1)
    with pytest.raises(ValueError, match="length must be an integer >= 2"):
        tile_segments(seg, 1)


def test_bos_sequences_are_whole_segments_behind_a_bos():
    stream = np.arange(10, 110, dtype=np.int32)
    seqs = bos_sequences(stream, 3, 21, bos_id=1)
    assert seqs.shape == (3, 21) and (seqs[:, 0] == 1).all()
    np.testing.assert_array_equal(seqs[:, 1:], text_segments(stream, 3, 20))
    np.testing.assert_array_equal(bos_sequences(stream, 3, 21), text_segments(stream, 3, 21))


@pytest.mark.parametrize("spec", [Vanilla(), LMInfinite(2, 8)])
def test_scores_match_a_float64_log_softmax_and_a_prefix_alone(spec):
    family, cfg, params = random_model("llama_gqa", seed=3)
    model = family.model(cfg, AttentionCall(spec, block_q=8, block_k=8))
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    nll = sequence_nll(model.forward, params, tokens)
    assert nll.shape == (2, 39) and nll.dtype == np.float32
    logits = np.asarray(model.forward(params, jnp.asarray(tokens)), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5)
    # causal: the scores of the first 17 tokens do not depend on what follows them
    np.testing.assert_allclose(sequence_nll(model.forward, params, tokens[:, :17]), nll[:, :16], rtol=1e-5, atol=1e-5)


def test_sequence_nll_of_a_scoring_forward_equals_that_of_the_logits():
    family, cfg, params = random_model("gemma2_window", seed=3)  # a final logit soft cap
    model = family.model(cfg, AttentionCall(LMInfinite(2, 8), block_q=8, block_k=8))
    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    np.testing.assert_allclose(sequence_nll(model.score, params, tokens), sequence_nll(model.forward, params, tokens),
                               rtol=0, atol=1e-5)


def test_sequence_nll_rejects_bad_input():
    family, cfg, params = random_model("llama_gqa")
    model = family.model(cfg)
    with pytest.raises(ValueError, match=r"shape \(batch, time >= 2\)"):
        sequence_nll(model.forward, params, np.zeros((3,), np.int32))
    with pytest.raises(ValueError, match="forward must be hashable"):
        sequence_nll(_Unhashable(), params, np.ones((1, 4), np.int32))


class _Unhashable:
    __hash__ = None

    def __call__(self, params, tokens):
        raise AssertionError("never called")


def test_length_point_statistics():
    rng = np.random.default_rng(0)
    nll = rng.gamma(2.0, 1.0, size=(6, 5))  # 2 segments x 3 tiles, 5 scores each
    point = length_point(nll, 2)
    assert (point.length, point.sequences, point.tokens) == (6, 6, 30)
    assert point.nll == pytest.approx(nll.mean()) and point.ppl == pytest.approx(math.exp(nll.mean()))
    assert point.nll_sem == pytest.approx(nll.mean(axis=1).std(ddof=1) / math.sqrt(6))
    assert point.segment_ppl == pytest.approx([math.exp(nll[:3].mean()), math.exp(nll[3:].mean())])
    assert point.to_json()["segment_ppl"] == list(point.segment_ppl)
    assert math.isnan(length_point(nll[:1], 1).nll_sem) and length_point(nll[:1], 1).to_json()["nll_sem"] is None
    assert length_point(np.full((1, 2), 800.0), 1).to_json()["ppl"] is None  # overflow -> inf -> null
    with pytest.raises(ValueError, match="with 4 segments"):
        length_point(nll, 4)


def test_prefix_ppl_and_position_buckets():
    rng = np.random.default_rng(1)
    nll = rng.gamma(2.0, 1.0, size=(3, 15))  # sequences of 16 tokens
    got = prefix_ppl(nll, [2, 8, 16])
    assert got == pytest.approx([math.exp(nll[:, :n - 1].mean()) for n in (2, 8, 16)])
    with pytest.raises(ValueError, match=r"in \[2, 16\]"):
        prefix_ppl(nll, [17])
    rows = position_buckets(nll, PositionBuckets(1))  # {0} {1} [2,4) [4,8) [8,15)
    assert [(r.lo, r.hi, r.count) for r in rows] == [(0, 1, 3), (1, 2, 3), (2, 4, 6), (4, 8, 12), (8, 15, 21)]
    assert rows[3].nll == pytest.approx(nll[:, 4:8].mean()) and rows[3].ppl == pytest.approx(math.exp(rows[3].nll))
    assert sum(r.count for r in rows) == nll.size
