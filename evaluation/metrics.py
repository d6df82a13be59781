"""Overlap scores between a generated sequence and a reference (any hashable items: words, ids).

* `bleu`: sentence BLEU (Papineni et al. 2002) with clipped n-gram precisions up to ``max_n``,
  their geometric mean and the brevity penalty ``min(1, exp(1 - r / c))``. With ``smooth=True``
  the precisions of n >= 2 get add-one smoothing (Lin and Och 2004, "smoothing 2"), so short or
  partly wrong candidates do not score exactly 0.
* `rouge_l`: ROUGE-L (Lin 2004) from the longest common subsequence: precision ``LCS / len(c)``,
  recall ``LCS / len(r)`` and their harmonic mean F1.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

__all__ = ["bleu", "rouge_l"]


def _ngrams(items: Sequence[Hashable], n: int) -> Counter:
    return Counter(tuple(items[i:i + n]) for i in range(len(items) - n + 1))


def bleu(candidate: Sequence[Hashable], reference: Sequence[Hashable], max_n: int = 4, smooth: bool = True) -> float:
    """Sentence BLEU in [0, 1] of `candidate` against one `reference`."""
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    c, r = list(candidate), list(reference)
    if not c or not r:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        cand, ref = _ngrams(c, n), _ngrams(r, n)
        matched = sum(min(count, ref[g]) for g, count in cand.items())
        total = max(len(c) - n + 1, 0)
        if smooth and n > 1:
            matched, total = matched + 1, total + 1
        if matched == 0 or total == 0:
            return 0.0
        log_sum += math.log(matched / total)
    brevity = min(0.0, 1.0 - len(r) / len(c))
    return math.exp(brevity + log_sum / max_n)


def rouge_l(candidate: Sequence[Hashable], reference: Sequence[Hashable]) -> tuple[float, float, float]:
    """``(precision, recall, f1)`` of the longest common subsequence (0s for an empty side)."""
    c, r = list(candidate), list(reference)
    if not c or not r:
        return 0.0, 0.0, 0.0
    previous = [0] * (len(r) + 1)
    for x in c:
        current = [0]
        for j, y in enumerate(r):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0, 0.0, 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return p, rec, 2 * p * rec / (p + rec)
