"""lminf_jax.evaluation.metrics: BLEU and ROUGE-L on hand-computed examples."""

from __future__ import annotations

import math

import pytest

from lminf_jax.evaluation.metrics import bleu, rouge_l


def test_bleu_matches_hand_computed_values():
    ref = "the cat is on the mat".split()
    assert bleu(ref, ref) == pytest.approx(1.0)
    # Papineni et al.'s example: clipped unigram precision 2/7, no brevity penalty (c = 7 > r = 6)
    assert bleu("the the the the the the the".split(), ref, max_n=1) == pytest.approx(2 / 7)
    # all precisions 1, brevity penalty exp(1 - 6/4); a 3-token candidate has no 4-gram at all
    assert bleu(ref[:4], ref, smooth=False) == pytest.approx(math.exp(1 - 6 / 4))
    assert bleu(ref[:3], ref, smooth=False) == 0.0
    # smoothing 2: n >= 2 precisions (m + 1) / (t + 1)
    got = bleu(list("abcd"), list("abxd"))
    assert got == pytest.approx(math.exp((math.log(3 / 4) + math.log(2 / 4) + math.log(1 / 3) + math.log(1 / 2)) / 4))
    assert bleu(list("abcd"), list("abxd"), smooth=False) == 0.0  # no matching trigram
    assert bleu([], ref) == 0.0 and bleu(list("xyz"), ref) == 0.0
    assert bleu([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == pytest.approx(1.0)  # any hashable items
    with pytest.raises(ValueError, match="max_n"):
        bleu(ref, ref, max_n=0)


def test_rouge_l_from_the_longest_common_subsequence():
    p, r, f = rouge_l("police kill the gunman".split(), "police killed the gunman".split())
    assert (p, r, f) == pytest.approx((0.75, 0.75, 0.75))
    p, r, f = rouge_l(list("abcbdab"), list("bdcaba"))  # LCS length 4 (e.g. "bcba")
    assert (p, r) == pytest.approx((4 / 7, 4 / 6)) and f == pytest.approx(2 * p * r / (p + r))
    assert rouge_l([], list("ab")) == (0.0, 0.0, 0.0) and rouge_l(list("ab"), list("cd")) == (0.0, 0.0, 0.0)
