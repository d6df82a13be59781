"""XL3M's key context (`lminf_jax.evaluation.xl3m`): the invariants of the reference's §4.4, a float64
brute force that scores every segment, sorts and splices by a position mask, and the model entropy against
numpy on a tiny random Llama's logits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_model

from lminf_jax.evaluation.xl3m import (XL3M, choose_segments, key_context, model_entropy, segment_ranges,
                                       splice)


def hash_entropy(calls=None, levels=7):
    """A deterministic fake entropy of each sub-context (few levels, so that ties occur); records the
    batch sizes in ``calls``."""
    def entropy_of(subs):
        if calls is not None:
            calls.append(len(subs))
        return np.array([(sum((j + 3) * t for j, t in enumerate(s)) % levels) / levels + 0.5 for s in subs])
    return entropy_of


def random_tokens(rng, n):
    return rng.integers(1, 1000, n).tolist()


def naive_key(x, entropy_of, s: XL3M):
    """Score every segment, sort by (H, index), keep K, splice by a position mask."""
    n, lq, ls, stride = len(x), s.question_length, s.segment_length, s.segment_length - s.overlap
    if n <= s.budget:
        return x
    starts = [1]
    while starts[-1] + ls < n - lq:
        starts.append(starts[-1] + stride)
    ranges = [(a, min(a + ls, n - lq)) for a in starts]
    h = np.asarray(entropy_of([[x[0]] + x[a:b] + x[n - lq:] for a, b in ranges]), np.float64)
    k = max(1, (s.budget - lq - 1) // ls)
    chosen = sorted(sorted(range(len(ranges)), key=lambda i: (h[i], i))[:k])
    mask = np.zeros(n, bool)
    mask[0] = mask[n - lq:] = True
    for i in chosen:
        mask[ranges[i][0]:ranges[i][1]] = True
    return np.asarray(x)[mask].tolist(), chosen, ranges


def test_settings_are_validated_and_hashable():
    s = XL3M.for_model(512, 64)
    assert (s.question_length, s.segment_length, s.overlap, s.budget, s.keep) == (64, 128, 16, 448, 2)
    assert hash(s) == hash(XL3M(64, 128, 16, 448))
    for kw, field in [({"question_length": 0}, "question_length"), ({"segment_length": 0}, "segment_length"),
                      ({"overlap": -1}, "overlap"), ({"overlap": 8}, "overlap"), ({"budget": 12}, "budget"),
                      ({"variant": "first"}, "variant"), ({"question_length": 2.0}, "question_length")]:
        with pytest.raises(ValueError, match=field):
            XL3M(**{"question_length": 4, "segment_length": 8, "overlap": 2, "budget": 20, **kw})
    with pytest.raises(ValueError, match="budget"):
        XL3M.for_model(512, 400)  # no room for BOS + a segment + the question


def test_one_segment_returns_the_input_without_scoring(rng):
    s = XL3M(4, 8, 2, 13)
    for n in range(1, s.budget + 1):  # n - Lq - 1 <= Ls: one segment, and it always fits
        x = random_tokens(rng, n)
        out = key_context(x, lambda subs: pytest.fail("scored"), s)
        assert out.tokens == x and out.scored == 0 and out.chosen == ()
    assert len(segment_ranges(13, s)) == 1


def test_choice_is_independent_of_order_and_ties_pick_the_earlier(rng):
    for _ in range(50):
        m, k = int(rng.integers(1, 30)), int(rng.integers(1, 8))
        h = rng.integers(0, 4, m) / 4.0 + 0.25  # many ties
        want = sorted(sorted(range(m), key=lambda i: (h[i], i))[:k])
        pairs = list(enumerate(h))
        for _ in range(3):
            rng.shuffle(pairs)
            assert choose_segments(iter(pairs), k) == want
    assert choose_segments([(i, 1.0) for i in range(9, -1, -1)], 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="NaN"):
        choose_segments([(0, 1.0), (1, float("nan"))], 1)


def test_all_segments_recover_the_input_and_key_stays_in_budget(rng):
    for overlap in (0, 3):
        s = XL3M(3, 7, overlap, 11)
        x = random_tokens(rng, 60)
        assert splice(x, range(len(segment_ranges(60, s))), s) == x
    for _ in range(30):
        lq, ls = int(rng.integers(1, 6)), int(rng.integers(1, 9))
        s = XL3M(lq, ls, int(rng.integers(0, ls)), 1 + lq + ls + int(rng.integers(0, 3 * ls)))
        x = random_tokens(rng, int(rng.integers(s.budget + 1, 4 * s.budget)))
        out = key_context(x, hash_entropy(), s, batch=int(rng.integers(1, 5)))
        assert len(out.tokens) <= s.budget and list(out.chosen) == sorted(set(out.chosen))
        assert len(out.chosen) == s.keep and out.scored == len(segment_ranges(len(x), s))
        assert out.tokens[0] == x[0] and out.tokens[-lq:] == x[-lq:]


def test_key_context_equals_the_float64_brute_force(rng):
    for trial in range(60):
        lq, ls = int(rng.integers(1, 6)), int(rng.integers(1, 10))
        s = XL3M(lq, ls, int(rng.integers(0, ls)), 1 + lq + ls + int(rng.integers(0, 4 * ls)),
                 ("question", "last")[trial % 2])
        x = random_tokens(rng, int(rng.integers(2, 5 * s.budget)))
        batch, calls = int(rng.integers(1, 6)), []
        got = key_context(x, hash_entropy(calls), s, batch=batch)
        want = naive_key(x, hash_entropy(), s)
        if len(x) <= s.budget:
            assert got.tokens == want and not calls
            continue
        tokens, chosen, ranges = want
        assert got.tokens == tokens and list(got.chosen) == chosen and got.scored == len(ranges)
        h = hash_entropy()([[x[0]] + x[a:b] + x[len(x) - lq:] for a, b in ranges])
        assert got.entropies == tuple(h[chosen])
        assert max(calls) <= batch and sum(calls) == len(ranges)  # streamed in batches


class RecordingModel:
    """A duck-typed model recording the shapes ``score`` gets; entropy = the position."""

    def __init__(self):
        self.shapes = []

    def score(self, params, tokens, positions, *, targets):
        self.shapes.append(tokens.shape)
        assert targets.shape == tokens.shape and positions.dtype == np.int32

        class Out:
            entropy = np.maximum(positions, 0).astype(np.float32)
        return Out


def test_model_entropy_pads_to_one_shape():
    s = XL3M(2, 5, 1, 12, "last")
    model = RecordingModel()
    entropy_of = model_entropy(model, None, s, batch=4)
    got = entropy_of([[1] * 8, [1] * 5, [1] * 3, [1] * 6, [1] * 7])  # 1 + Ls + Lq = 8 at most
    np.testing.assert_array_equal(got, [7, 4, 2, 5, 6])  # the last position: length - 1
    assert model.shapes == [(4, 8), (4, 8)]
    with pytest.raises(ValueError, match="sub-contexts"):
        entropy_of([[1] * 9])


@pytest.mark.parametrize("variant", ["question", "last"])
def test_model_entropy_equals_numpy_on_the_logits(rng, variant):
    family, cfg, params = random_model("llama_gqa")
    model = family.model(cfg)
    s = XL3M(3, 6, 1, 14, variant)
    subs = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (10, 7)]  # a full and a clipped segment
    got = model_entropy(model, params, s, batch=3)(subs)
    last = 3 if variant == "question" else 1
    for sub, g in zip(subs, got):
        logits = np.asarray(model.forward(params, np.asarray([sub], np.int32)), np.float64)[0, -last:]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        want = np.mean(-(np.exp(logp) * logp).sum(-1))
        assert abs(g - want) <= 1e-5 * abs(want)
