"""Perplexity vs length on the same held-out text at every length.

The text: S segments of ``T - 1`` tokens (T the longest length), evenly spaced over a token
stream (`text_segments`). At each length n every segment is cut into consecutive tiles of
``n - 1`` tokens, each scored as BOS (when the model has one) + the tile (`tile_segments`), so
every length scores the same text (less each segment's last ``(T - 1) mod (n - 1)`` tokens):
differences between lengths come from the positions the tokens sit at, not from different text
(a few long samples per length add more variance than the effect being measured). The query at
position ``p`` (it has seen tokens ``0..p``) predicts token ``p + 1``; a sequence of n tokens gives
``n - 1`` scores.

At the longest length each segment is one sequence: its NLL by query position (`position_buckets`)
is the paper's NLL-vs-position curve, and `prefix_ppl` (perplexity over query positions
``[0, n - 1)`` of those sequences) is the paper's "perplexity at length n" on them; under a causal
mask it equals scoring the first n tokens alone, but it sees only S samples of the first
positions, so the tiled `LengthPoint` is the estimate to compare lengths by.

The forward contract (the `models` package provides real ones)::

    forward(params, tokens) -> logits      tokens int32 (B, T), logits float (B, T, V)

or one that returns the next tokens' `lminf_jax.logprobs.Scores` ``(B, T - 1)`` instead
(`models.decoder.LanguageModel.score`: the same numbers without the logits, which at 128k tokens
and a 32k vocabulary would be 16.8 GB). ``forward`` must be hashable (it is a static argument of
the jitted scoring function).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.logprobs import Scores
from lminf_jax.evaluation.buckets import BucketRow, PositionBuckets, require_int
from lminf_jax.evaluation.streaming import finite_or_none, token_nll

__all__ = ["LengthPoint", "bos_sequences", "length_point", "position_buckets", "prefix_ppl", "sequence_nll", "text_segments",
           "tile_segments"]

ForwardFn = Callable[[Any, jax.Array], jax.Array | Scores]


def text_segments(stream: np.ndarray, count: int | None, tokens: int) -> np.ndarray:
    """``(S, tokens)`` int32: S non-overlapping segments of a 1-D token stream with evenly spaced
    starts (the first at 0, the last ending at the stream's end when S > 1), so that they sample
    the whole stream. ``count`` None: as many as fit. A ValueError says what is missing."""
    stream = np.asarray(stream)
    if stream.ndim != 1 or stream.dtype.kind not in "iu":
        raise ValueError(f"the token stream must be a 1-D integer array, got {stream.dtype} {stream.shape}")
    require_int("segment tokens", tokens, 1)
    fits = stream.shape[0] // tokens
    if count is not None:
        require_int("count", count, 1)
    wanted = fits if count is None else count
    if fits < max(wanted, 1):
        raise ValueError(f"{max(wanted, 1)} segment(s) of {tokens:,} tokens need {max(wanted, 1) * tokens:,} stream "
                         f"tokens; the stream has {stream.shape[0]:,}")
    spare = stream.shape[0] - wanted * tokens
    starts = [s * tokens + (spare * s) // max(wanted - 1, 1) for s in range(wanted)]
    return np.stack([stream[a:a + tokens] for a in starts]).astype(np.int32)


def tile_segments(segments: np.ndarray, length: int, bos_id: int | None = None) -> np.ndarray:
    """``(S * k, length)`` int32 sequences: each segment cut into its ``k`` whole tiles of
    ``length - 1`` tokens (``length`` without a BOS), each prefixed with ``bos_id``; rows are
    segment-major (rows ``s*k .. s*k+k-1`` come from segment s)."""
    segments = np.asarray(segments)
    if segments.ndim != 2 or segments.dtype.kind not in "iu":
        raise ValueError(f"segments must be a 2-D integer array, got {segments.dtype} {segments.shape}")
    require_int("length", length, 2)
    take = length - (bos_id is not None)
    k = segments.shape[1] // take
    if k < 1:
        raise ValueError(f"a segment of {segments.shape[1]:,} tokens holds no tile of {take:,} tokens")
    body = segments[:, : k * take].reshape(-1, take).astype(np.int32)
    if bos_id is None:
        return body
    return np.concatenate([np.full((body.shape[0], 1), bos_id, np.int32), body], axis=1)


def bos_sequences(stream: np.ndarray, count: int | None, length: int, bos_id: int | None = None) -> np.ndarray:
    """``(S, length)`` int32: `count` evenly spaced segments of the stream (`text_segments`), each
    behind ``bos_id`` when given (then ``length - 1`` stream tokens each)."""
    return tile_segments(text_segments(stream, count, length - (bos_id is not None)), length, bos_id)


@functools.partial(jax.jit, static_argnums=0)
def _nll(forward: ForwardFn, params, tokens: jax.Array) -> jax.Array:
    out = forward(params, tokens)
    return -out.logprobs if isinstance(out, Scores) else token_nll(out[:, :-1], tokens[:, 1:])


def sequence_nll(forward: ForwardFn, params, tokens: np.ndarray | jax.Array) -> np.ndarray:
    """NLL (float32, nats) of each next token: ``(B, T - 1)`` for integer tokens ``(B, T)``, under a
    ``forward`` that returns logits or `Scores` (module docstring)."""
    if getattr(tokens, "ndim", None) != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must have shape (batch, time >= 2), got {getattr(tokens, 'shape', None)}")
    try:
        hash(forward)
    except TypeError:
        raise ValueError(f"forward must be hashable (a jit static argument), got {type(forward).__name__}") from None
    return np.asarray(_nll(forward, params, jnp.asarray(tokens, jnp.int32)))


@dataclasses.dataclass(frozen=True)
class LengthPoint:
    """Scores at one length: ``sequences`` tiles, ``tokens`` scores, their mean NLL (nats), its
    standard error across tiles, ``ppl = exp(nll)`` and the perplexity of each segment's tiles."""

    length: int
    sequences: int
    tokens: int
    nll: float
    nll_sem: float
    ppl: float
    segment_ppl: tuple[float, ...]

    def to_json(self) -> dict:
        return finite_or_none(dataclasses.asdict(self))


def length_point(nll: np.ndarray, segments: int) -> LengthPoint:
    """`LengthPoint` of the scores ``nll (S * k, n - 1)`` of `tile_segments`' rows (float64 sums)."""
    x = np.asarray(nll, np.float64)
    require_int("segments", segments, 1)
    if x.ndim != 2 or x.shape[1] < 1 or x.shape[0] % segments:
        raise ValueError(f"nll must have shape (segments * tiles, positions >= 1) with {segments} segments, "
                         f"got {x.shape}")
    per_tile = x.mean(axis=1)
    sem = float(per_tile.std(ddof=1) / math.sqrt(per_tile.size)) if per_tile.size > 1 else math.nan
    mean = float(x.mean())
    per_segment = x.reshape(segments, -1).mean(axis=1)
    return LengthPoint(x.shape[1] + 1, x.shape[0], int(x.size), mean, sem, _exp(mean),
                       tuple(_exp(float(v)) for v in per_segment))


def prefix_ppl(nll: np.ndarray, lengths: Sequence[int]) -> tuple[float, ...]:
    """Perplexity over query positions ``[0, n - 1)`` of the sequences ``nll (S, T - 1)``, for each
    n in ``lengths`` (each in ``[2, T]``)."""
    x = np.asarray(nll, np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"nll must have shape (sequences, positions >= 1), got {x.shape}")
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 2 <= n <= x.shape[1] + 1:
            raise ValueError(f"lengths must be integers in [2, {x.shape[1] + 1}] (the sequences' length), got {n!r}")
    total = np.cumsum(x.sum(axis=0))  # total[n - 2] = sum over sequences of their first n - 1 scores
    return tuple(_exp(total[n - 2] / (x.shape[0] * (n - 1))) for n in lengths)


def position_buckets(nll: np.ndarray, buckets: PositionBuckets = PositionBuckets()) -> tuple[BucketRow, ...]:
    """Mean NLL of ``nll (S, T - 1)`` by query-position bucket (bounds clipped to ``T - 1``)."""
    x = np.asarray(nll, np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"nll must have shape (sequences, positions >= 1), got {x.shape}")
    ids = buckets.index(np.arange(x.shape[1], dtype=np.int64))
    sums = np.bincount(ids, weights=x.sum(axis=0))
    counts = np.bincount(ids) * x.shape[0]
    rows = []
    for i in np.flatnonzero(counts):
        lo, hi = buckets.bounds(i)
        mean = float(sums[i] / counts[i])
        rows.append(BucketRow(int(lo), int(min(hi, x.shape[1])), int(counts[i]), mean, _exp(mean)))
    return tuple(rows)


def _exp(value: float) -> float:
    return math.exp(value) if value < 700 else math.inf
