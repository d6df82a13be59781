"""XL3M (Wang et al. 2024, arXiv 2405.17755) as a prompt-level pipeline over any model.

What is established (the abstract; `/work/shared/reference/retrieval-methods.md` §4.2): the input is cut
into short sub-contexts, each one independent segment plus a common "question" (a few tokens from the end
of the input); the model's certainty on the question measures each segment's relevance; the relevant
segments, spliced in chronological order, form a "key context" that replaces the input for inference.
**No official code exists** (§4.1) and the paper's method section could not be read, so everything below
is this library's choice, following the implementable spec of §4.4 (§4.3 lists what is unknown):

* Settings (`XL3M`): the question X_t is the last ``question_length`` (Lq) tokens; the content is cut into
  segments of ``segment_length`` (Ls) tokens with ``overlap`` (Lo) tokens shared by neighbours (stride
  Ls - Lo, the last segment clipped, at least one); ``budget`` is the key context's largest length,
  question included. `XL3M.for_model`'s defaults (Lq = L_train // 8, Ls = L_train // 4, Lo = Ls // 8,
  budget = L_train - max_new_tokens, so that the generation stays inside the pretraining length) are the
  library's, not the paper's.
* The input's first token (BOS) is kept as a sink: the content is ``x[1:N-Lq]`` and every scored
  sub-context is ``[x[0]] + X^c_i + X_t``, since a model fed text without its BOS at position 0 is out of
  distribution. The key context starts with it too.
* Relevance: H_i = the mean over the question positions of the next-token entropy ``-sum p log p``
  (natural log, float32 softmax), lower = more relevant. ``variant="question"`` (§4.4's variant A): the Lq
  positions of X_t (their distributions predict X_t[1:] and the token after the input);
  ``variant="last"`` (variant B): the final position only.
* Selection: the K = max(1, floor((budget - Lq - 1) / Ls)) segments with the smallest H_i (ties: the
  earlier segment), chosen while streaming (`choose_segments`): segments are scored in batches and a
  size-K heap keeps the best, so memory holds only the heap and one batch, whatever the input's length.
* Key context: ``[x[0]]`` + the chosen segments' tokens in position order, the tokens shared by
  overlapping chosen segments taken once (the union of their ranges, `splice`) + X_t; at most ``budget``
  tokens. An input of at most ``budget`` tokens is returned unchanged without scoring (XL3M is then
  vanilla).

Scoring runs the caller's model on sub-contexts of at most 1 + Ls + Lq tokens; §4.4 uses vanilla
attention there (which most length-extension methods equal below L_train). `model_entropy` adapts a
`lminf_jax.models` ``LanguageModel`` (duck-typed: anything with its ``score``); `key_context` takes any
function from sub-contexts to their H_i.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from lminf_jax.decoding import left_pad
from lminf_jax.evaluation.buckets import require_int

__all__ = ["XL3M", "KeyContext", "segment_ranges", "choose_segments", "splice", "key_context", "model_entropy"]

VARIANTS = ("question", "last")
EntropyFn = Callable[[list[list[int]]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class XL3M:
    """XL3M's settings (library choices, see the module docstring): question length Lq, segment length Ls,
    overlap Lo (0 <= Lo < Ls), the key context's ``budget`` (question included; >= 1 + Lq + Ls, so that BOS,
    one segment and the question fit) and the entropy ``variant``: "question" or "last"."""

    question_length: int
    segment_length: int
    overlap: int
    budget: int
    variant: str = "question"

    def __post_init__(self):
        require_int("question_length", self.question_length, 1)
        require_int("segment_length", self.segment_length, 1)
        require_int("overlap", self.overlap, 0)
        if self.overlap >= self.segment_length:
            raise ValueError(f"overlap must be < segment_length ({self.segment_length}), got {self.overlap}")
        require_int("budget", self.budget, 1 + self.question_length + self.segment_length)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    @classmethod
    def for_model(cls, pretraining_length: int, max_new_tokens: int, **fields: Any) -> XL3M:
        """The library's defaults for a model pretrained at ``pretraining_length`` (L_train): Lq = L_train // 8,
        Ls = L_train // 4, Lo = Ls // 8, budget = L_train - max_new_tokens (generation stays within L_train),
        variant "question"; ``fields`` override any field (Lo follows a given Ls)."""
        require_int("pretraining_length", pretraining_length, 8)
        require_int("max_new_tokens", max_new_tokens, 0)
        ls = fields.get("segment_length", pretraining_length // 4)
        overlap = ls // 8 if isinstance(ls, int) and not isinstance(ls, bool) else 0
        return cls(**{"question_length": pretraining_length // 8, "segment_length": ls, "overlap": overlap,
                      "budget": pretraining_length - max_new_tokens, **fields})

    @property
    def keep(self) -> int:
        """K: how many segments the key context holds."""
        return max(1, (self.budget - self.question_length - 1) // self.segment_length)


class KeyContext(NamedTuple):
    """`key_context`'s result: the key context's ``tokens``, the ``chosen`` segment indices (increasing),
    their ``entropies`` H_i (in the same order) and how many segments were ``scored`` (0: the input fitted)."""

    tokens: list[int]
    chosen: tuple[int, ...]
    entropies: tuple[float, ...]
    scored: int


def segment_ranges(n_tokens: int, settings: XL3M) -> list[tuple[int, int]]:
    """The content segments' ranges ``[s, e)`` in input positions: over ``[1, n_tokens - Lq)`` with stride
    Ls - Lo, the last one clipped, at least one (the content must hold a token)."""
    require_int("n_tokens", n_tokens, settings.question_length + 2)
    end, ls = n_tokens - settings.question_length, settings.segment_length
    stride = ls - settings.overlap
    count = 1 + max(0, -(-(end - 1 - ls) // stride))
    return [(1 + i * stride, min(1 + i * stride + ls, end)) for i in range(count)]


def _best(entropies: Iterable[tuple[int, float]], k: int) -> list[tuple[int, float]]:
    """The ``k`` pairs (index, H) with the smallest (H, index), by index, through a size-k heap."""
    require_int("k", k, 1)
    heap: list[tuple[float, int]] = []  # (-H, -index): the root is the worst kept pair
    for i, h in entropies:
        h = float(h)
        if math.isnan(h):
            raise ValueError(f"segment {i}'s entropy is NaN")
        if len(heap) < k:
            heapq.heappush(heap, (-h, -i))
        elif (-h, -i) > heap[0]:
            heapq.heapreplace(heap, (-h, -i))
    return sorted((-i, -h) for h, i in heap)


def choose_segments(entropies: Iterable[tuple[int, float]], k: int) -> list[int]:
    """The indices of the ``k`` segments with the smallest entropy (ties: the earlier segment), sorted,
    from a stream of (index, H) pairs in any order; memory: a heap of ``k``."""
    return [i for i, _ in _best(entropies, k)]


def splice(tokens: Sequence[int], chosen: Iterable[int], settings: XL3M) -> list[int]:
    """``[x[0]]`` + the ``chosen`` segments' tokens in position order (the union of their ranges, so shared
    tokens once) + the question X_t."""
    x = np.asarray(tokens)
    ranges = segment_ranges(len(x), settings)
    out, done = [int(x[0])], 1
    for s, e in (ranges[i] for i in sorted(set(chosen))):
        out += x[max(s, done):e].tolist()
        done = max(done, e)
    return out + x[len(x) - settings.question_length:].tolist()


def key_context(tokens: Sequence[int], entropy_of: EntropyFn, settings: XL3M, *, batch: int = 8) -> KeyContext:
    """XL3M's key context of ``tokens`` (the first one BOS). ``entropy_of(sub_contexts)`` gives the H_i
    ``(len(sub_contexts),)`` of up to ``batch`` sub-contexts ``[x[0]] + X^c_i + X_t`` at a time; segments are
    streamed through it and a size-K heap. An input of at most ``budget`` tokens is returned unchanged."""
    require_int("batch", batch, 1)
    x = np.asarray(tokens)
    if x.ndim != 1 or x.dtype.kind not in "iu":
        raise ValueError(f"tokens must be a 1-D sequence of integers, got {x.dtype} {x.shape}")
    if len(x) <= settings.budget:
        return KeyContext(x.tolist(), (), (), 0)
    ranges = segment_ranges(len(x), settings)
    head, question = [int(x[0])], x[len(x) - settings.question_length:].tolist()

    def scored() -> Iterator[tuple[int, float]]:
        for b in range(0, len(ranges), batch):
            subs = [head + x[s:e].tolist() + question for s, e in ranges[b:b + batch]]
            h = np.asarray(entropy_of(subs), np.float64)
            if h.shape != (len(subs),):
                raise ValueError(f"entropy_of must return shape ({len(subs)},), got {h.shape}")
            yield from zip(range(b, b + len(subs)), h.tolist())

    best = _best(scored(), settings.keep)
    out = splice(x, [i for i, _ in best], settings)
    assert len(out) <= settings.budget, (len(out), settings)
    return KeyContext(out, tuple(i for i, _ in best), tuple(h for _, h in best), len(ranges))


def model_entropy(model: Any, params: Any, settings: XL3M, *, batch: int = 8) -> EntropyFn:
    """`key_context`'s ``entropy_of`` from a model with ``score(params, tokens (B, T), positions (B, T),
    targets=(B, T))`` returning ``.entropy (B, T)`` (entropy at t: the distribution after t), as
    `lminf_jax.models`' ``LanguageModel.score``. Sub-contexts are left-padded (negative positions) to
    1 + Ls + Lq tokens and the rows to a multiple of ``batch`` (copies of the first), so that one compiled
    program serves every call. H_i: the float32 entropies' mean over the variant's question positions."""
    require_int("batch", batch, 1)
    width = 1 + settings.segment_length + settings.question_length
    last = settings.question_length if settings.variant == "question" else 1

    def entropy_of(subs: list[list[int]]) -> np.ndarray:
        if not subs or any(not settings.question_length < len(s) <= width for s in subs):
            raise ValueError(f"sub-contexts must number >= 1 and hold {settings.question_length + 1}..{width} "
                             f"tokens, got lengths {[len(s) for s in subs]}")
        out = []
        for b in range(0, len(subs), batch):
            rows = subs[b:b + batch]
            tokens, positions = left_pad(rows + [rows[0]] * (batch - len(rows)), multiple=width)
            entropy = model.score(params, tokens, positions, targets=tokens).entropy
            out.append(np.asarray(entropy, np.float64)[:len(rows), width - last:].mean(axis=1))
        return np.concatenate(out)

    return entropy_of
