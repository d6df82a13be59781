"""Streaming negative log-likelihood over token streams of any length, in constant device memory.

`streaming_nll` feeds a token stream (``(N,)``, or ``(B, N)`` for B equal-length streams
evaluated side by side, each starting at position 0) through a model's step function in
fixed-size chunks, carrying the model's cache from chunk to chunk. With a Λ-cache (constant
size) device memory does not depend on N; the stream itself is read from host memory (a
`np.memmap` works) one chunk at a time.

The step function contract (the `models` package provides real ones)::

    step(params, tokens, positions, cache) -> (logits, new_cache)

``tokens``/``positions`` int32 ``(B, T)``, ``logits`` float ``(B, T, V)``, ``cache`` any pytree
of arrays; ``step`` must be hashable (it is a static argument of the jitted chunk function).
A position of ``-1`` marks an empty (padding) query slot; see "The last chunk" below. A step may
also offer the scoring variant ``step.score_step(params, tokens, positions, cache, targets) ->
(scores, new_cache)`` (`lminf_jax.logprobs.Scores` of ``targets (B, T)``, e.g.
`models.decoder.LanguageModel.score_step`); it is then called instead, and the chunk's ``(B, T, V)``
logits never exist (the model's head runs on a few positions at a time).

What is scored: the query at position ``p`` (it has seen tokens ``0..p``) predicts the token at
``p + 1``; its NLL is ``logsumexp(logits[p]) - logits[p, token[p + 1]]`` in float32 on the
device (`lminf_jax.logprobs.token_scores`). A stream of N tokens gives N - 1 scores at query
positions ``0..N-2``; the last token is only a target. Per-position statistics are bucketed by
that query position (`PositionBuckets`, log-spaced), so "perplexity at length T" is the mean
over the buckets below T of one long run, as in the paper's NLL-vs-position curves. Only the
``(B, C)`` NLLs leave the device.

Statistics are accumulated on the host in float64 in a fixed order, so a run is deterministic.

The last chunk: chunk ``k`` runs the inputs ``tokens[:, kC:kC+C]`` at positions ``kC..kC+C-1``.
When fewer than C scores remain, the chunk is padded to C (token 0, position ``-1``) and the
padded slots are dropped on the host: there is exactly one compiled shape. Padding only
follows the real tokens, so under causal attention it cannot change their scores even for a
step that ignores the ``-1`` convention; the `lminf_jax.cache` caches drop negative positions,
so the final cache is not touched by the padding either.

Checkpoints (``checkpoint_dir``): the state every ``checkpoint_every`` chunks, resumed bit for bit by the
same run and refused to any other (`lminf_jax.evaluation.stream_store`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.evaluation.buckets import BucketRow, PositionBuckets, require_int
from lminf_jax.evaluation.resume import PARAMS
from lminf_jax.evaluation.stream_store import StreamStore, check_checkpoint_dir, metadata
from lminf_jax.logprobs import token_scores
from lminf_jax.progress import Progress
from lminf_jax.int32 import INT32_MAX

__all__ = ["StreamResult", "chunk_nll", "finite_or_none", "streaming_nll", "token_nll"]

StepFn = Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


# ----- the jitted chunk -----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("step",), donate_argnames=("cache",))
def chunk_nll(step: StepFn, params, tokens: jax.Array, targets: jax.Array, start: jax.Array, valid: jax.Array,
              cache) -> tuple[jax.Array, Any]:
    """One chunk: ``(nll (B, C) float32, new_cache)``; ``cache`` is donated.

    ``tokens``/``targets`` int32 ``(B, C)`` (targets = the next tokens), ``start`` the position
    of the chunk's first token and ``valid`` how many slots are real (int32 scalars, traced, so
    neither recompiles); slots ``>= valid`` run at position ``-1`` and their NLL is meaningless.
    The step's ``score_step``, when it offers one, scores the targets without the chunk's logits.
    """
    b, c = tokens.shape
    offsets = jnp.arange(c, dtype=jnp.int32)
    positions = jnp.broadcast_to(jnp.where(offsets < valid, start + offsets, -1), (b, c))
    score_step = getattr(step, "score_step", None)
    if score_step is not None:
        scores, new_cache = score_step(params, tokens, positions, cache, targets)
        return -scores.logprobs, new_cache
    logits, new_cache = step(params, tokens, positions, cache)
    return token_nll(logits, targets), new_cache


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``logsumexp(logits) - logits[target]`` in float32: logits ``(..., V)``, targets ``(...)``."""
    return -token_scores(logits, targets).logprobs


# ----- results --------------------------------------------------------------------------------


@dataclasses.dataclass
class StreamResult:
    """What `streaming_nll` measured. NLLs are in nats per token; ppl = exp(mean NLL).

    ``tokens``: scores summed over streams; ``positions``: query positions done per stream
    (``0..positions-1``); ``complete``: every one of the ``length - 1`` positions is done;
    ``resumed_tokens``: scores a checkpoint already held when this call started;
    ``elapsed_s``/``tokens_per_s``: this call only (compilation included);
    ``cache``: the cache after the last chunk (not part of equality or JSON).
    """

    tokens: int
    nll: float
    ppl: float
    buckets: list[BucketRow]
    stream_nll: list[float]
    complete: bool
    positions: int
    length: int
    streams: int
    chunk: int
    resumed_tokens: int
    elapsed_s: float
    tokens_per_s: float
    cache: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        """A JSON-serialisable dict (non-finite floats become None)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cache"}
        out["buckets"] = [dataclasses.asdict(row) for row in self.buckets]
        return finite_or_none(out)

    @classmethod
    def from_json(cls, data: dict) -> StreamResult:
        """The inverse of `to_json` (without the cache; None floats come back as NaN)."""
        data = dict(data)
        data["buckets"] = [BucketRow(**{k: _nan_if_none(v) for k, v in row.items()}) for row in data["buckets"]]
        data["stream_nll"] = [_nan_if_none(v) for v in data["stream_nll"]]
        for key in ("nll", "ppl", "elapsed_s", "tokens_per_s"):
            data[key] = _nan_if_none(data[key])
        return cls(**data)


# ----- host statistics ------------------------------------------------------------------------


@dataclasses.dataclass
class _Stats:
    chunks: int
    positions: int
    count: int
    total: float
    stream_sum: np.ndarray  # float64 (B,)
    bucket_sum: np.ndarray  # float64 (nb,)
    bucket_count: np.ndarray  # int64 (nb,)

    @classmethod
    def empty(cls, streams: int, num_buckets: int) -> _Stats:
        return cls(0, 0, 0, 0.0, np.zeros(streams), np.zeros(num_buckets), np.zeros(num_buckets, np.int64))

    def add(self, nll: np.ndarray, start: int, buckets: PositionBuckets) -> None:
        """Add the scores ``nll (B, v)`` of query positions ``start..start+v-1``."""
        x = nll.astype(np.float64)
        streams, v = x.shape
        ids = buckets.index(np.arange(start, start + v, dtype=np.int64))
        n = len(self.bucket_sum)
        self.bucket_sum += np.bincount(ids, weights=x.sum(axis=0), minlength=n)
        self.bucket_count += np.bincount(ids, minlength=n) * streams
        self.stream_sum += x.sum(axis=1)
        self.total += float(x.sum())
        self.count += x.size
        self.positions = start + v

    def to_json(self) -> dict:
        return {
            "chunks": self.chunks, "positions": self.positions, "count": self.count, "total": self.total,
            "stream_sum": self.stream_sum.tolist(), "bucket_sum": self.bucket_sum.tolist(),
            "bucket_count": self.bucket_count.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> _Stats:
        return cls(
            int(d["chunks"]), int(d["positions"]), int(d["count"]), float(d["total"]),
            np.asarray(d["stream_sum"], np.float64), np.asarray(d["bucket_sum"], np.float64),
            np.asarray(d["bucket_count"], np.int64),
        )


# ----- the driver -----------------------------------------------------------------------------


def streaming_nll(
    step: StepFn,
    params,
    tokens: np.ndarray,
    cache,
    *,
    chunk: int,
    buckets: PositionBuckets = PositionBuckets(),
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    identity: Mapping[str, Any] | None = None,
    progress: bool = True,
    max_chunks: int | None = None,
) -> StreamResult:
    """Streaming NLL of `tokens` under ``step`` (see the module docstring for the contract).

    ``tokens``: integer numpy array ``(N,)`` or ``(B, N)`` (a memmap is read chunk by chunk),
    N >= 2 and N <= 2**31 - 1. ``cache``: the model's empty cache for B rows (it is copied;
    the copy is donated chunk by chunk). ``chunk``: tokens per model call. ``checkpoint_dir``:
    save the state there every ``checkpoint_every`` chunks and at the end, and resume from it
    (a resumed run gives bit-identical statistics). ``identity``: JSON values naming what else
    determines the scores (the step's config, attention spec, compute dtype...); a checkpoint
    records them with the params' fingerprint and refuses to resume under others.
    ``max_chunks``: run at most this many chunks in this call, then return a result with
    ``complete=False``. ``progress``: a line with tokens/s and the running mean NLL on stderr.
    """
    began = time.monotonic()
    stream = _check_arguments(step, tokens, chunk, buckets, checkpoint_every, identity, max_chunks)
    chunk, checkpoint_every = int(chunk), int(checkpoint_every)
    num_streams, length = stream.shape
    num_chunks = -(-(length - 1) // chunk)
    cache = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else jnp.asarray(x), cache)
    stats, prefix = _Stats.empty(num_streams, buckets.count(length - 2)), hashlib.sha256()  # prefix: windows read
    store = None
    if checkpoint_dir is not None:
        check_checkpoint_dir(checkpoint_dir)  # before the params are hashed
        store = StreamStore(Path(checkpoint_dir), metadata(stream.shape, chunk, buckets, cache, params, identity or {}),
                            jax.tree.leaves(cache), functools.partial(_prefix_hash, stream, chunk))
    try:
        restored = None if store is None else store.restore(jax.tree.structure(cache))
        if restored is not None:
            stats, cache, prefix = _Stats.from_json(restored[0]), restored[1], restored[2]
        resumed_tokens, first = stats.count, stats.chunks
        stop = num_chunks if max_chunks is None else min(num_chunks, first + max_chunks)
        with Progress(num_streams * (length - 1), "tokens", "streaming NLL", enabled=progress, rate=True,
                      initial=resumed_tokens) as bar:
            host = _HostSide(stats, buckets, bar)
            for k in range(first, stop):
                start, valid, window = _window(stream, chunk, k)
                prefix.update(_le_bytes(window))
                nll, cache = chunk_nll(step, params, *_chunk_inputs(window, chunk, valid), np.int32(start),
                                       np.int32(valid), cache)
                host.push(nll, start, valid)
                if store is not None and ((k + 1) % checkpoint_every == 0 or k + 1 == stop):
                    host.flush()
                    store.save(stats.to_json(), prefix, cache)
            host.flush()
    finally:
        if store is not None:
            store.close()
    return _result(stats, buckets, num_streams, length, chunk, resumed_tokens, time.monotonic() - began, cache)


@dataclasses.dataclass
class _HostSide:
    """The host's half of the loop: one chunk in flight. A chunk's NLLs (still on the device) wait in
    ``pending`` while the next chunk is dispatched, then reach the statistics (`flush`)."""

    stats: _Stats
    buckets: PositionBuckets
    bar: Progress
    pending: tuple[jax.Array, int, int] | None = None

    def push(self, nll: jax.Array, start: int, valid: int) -> None:
        """Add the previous chunk's scores, and keep this one's (``valid`` scores from ``start``) pending."""
        self.flush()
        self.pending = (nll, start, valid)

    def flush(self) -> None:
        """Add the pending chunk's scores to the statistics (waiting for the device)."""
        if self.pending is None:
            return
        nll, start, valid = self.pending
        self.pending = None
        self.stats.add(np.asarray(nll)[:, :valid], start, self.buckets)
        self.stats.chunks += 1
        self.bar.update(nll.shape[0] * valid, postfix=f"mean NLL {self.stats.total / self.stats.count:.4f}")


def _chunk_inputs(window: np.ndarray, chunk: int, valid: int) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's ``(inputs, targets)`` int32 ``(B, chunk)`` from its window, slots past ``valid`` 0."""
    # fresh buffers: on CPU the device may alias host memory of a chunk still in flight
    inputs = np.zeros((window.shape[0], chunk), np.int32)
    targets = np.zeros((window.shape[0], chunk), np.int32)
    inputs[:, :valid] = window[:, :valid]
    targets[:, :valid] = window[:, 1:]
    return inputs, targets


def _check_arguments(step: StepFn, tokens, chunk: int, buckets: PositionBuckets, checkpoint_every: int,
                     identity: Mapping[str, Any] | None, max_chunks: int | None) -> np.ndarray:
    """`streaming_nll`'s arguments checked (a ValueError naming the first that is wrong); the stream as
    ``(B, N)``."""
    stream = _check_tokens(tokens)
    require_int("chunk", chunk, 1)
    require_int("checkpoint_every", checkpoint_every, 1)
    if max_chunks is not None:
        require_int("max_chunks", max_chunks, 0)
    if identity is not None and (not isinstance(identity, Mapping) or PARAMS in identity):
        raise ValueError(f"identity must be a mapping without the key '{PARAMS}' (the params' fingerprint), got "
                         f"{identity!r}")
    if not isinstance(buckets, PositionBuckets):
        raise ValueError(f"buckets must be a PositionBuckets, got {type(buckets).__name__}")
    try:
        hash(step)
    except TypeError:
        raise ValueError(f"step must be hashable (it is a jit static argument), got {type(step).__name__}") from None
    return stream


def _result(stats: _Stats, buckets: PositionBuckets, num_streams: int, length: int, chunk: int,
            resumed_tokens: int, elapsed: float, cache) -> StreamResult:
    rows = []
    for i in np.flatnonzero(stats.bucket_count):
        lo, hi = buckets.bounds(i)
        n = int(stats.bucket_count[i])
        mean = float(stats.bucket_sum[i] / n)
        rows.append(BucketRow(int(lo), int(hi), n, mean, _exp(mean)))
    mean = stats.total / stats.count if stats.count else math.nan
    stream_nll = [float(s / stats.positions) if stats.positions else math.nan for s in stats.stream_sum]
    return StreamResult(
        tokens=stats.count, nll=mean, ppl=_exp(mean), buckets=rows, stream_nll=stream_nll,
        complete=stats.positions == length - 1, positions=stats.positions, length=length, streams=num_streams,
        chunk=chunk, resumed_tokens=resumed_tokens, elapsed_s=elapsed,
        tokens_per_s=(stats.count - resumed_tokens) / max(elapsed, 1e-9), cache=cache,
    )


def _window(stream: np.ndarray, chunk: int, k: int) -> tuple[int, int, np.ndarray]:
    """``(start, valid, window)`` of chunk ``k``: its first position, its number of scores and the
    tokens ``stream[:, start:start + valid + 1]`` it reads (inputs and targets)."""
    start = k * chunk
    valid = min(chunk, stream.shape[1] - 1 - start)
    return start, valid, _read_window(stream, start, start + valid + 1)


def _le_bytes(window: np.ndarray) -> bytes:
    return np.ascontiguousarray(window, "<i4").tobytes()


def _prefix_hash(stream: np.ndarray, chunk: int, chunks: int) -> Any:
    """The sha256 (a hashlib object) of the windows of chunks ``0..chunks-1``, read again."""
    h = hashlib.sha256()
    for k in range(chunks):
        h.update(_le_bytes(_window(stream, chunk, k)[2]))
    return h


def _read_window(stream: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``stream[:, start:stop]`` as int32 on the host, checked to be valid token ids."""
    window = np.asarray(stream[:, start:stop])
    if window.size and (window.min() < 0 or window.max() > INT32_MAX):
        raise ValueError(f"tokens: ids must lie in [0, 2**31 - 1]; positions {start}..{stop - 1} hold "
                         f"{window.min()}..{window.max()}")
    return window.astype(np.int32, copy=False)


def _check_tokens(tokens) -> np.ndarray:
    """The stream as a 2-D ``(B, N)`` numpy view (no copy of a memmap)."""
    if not isinstance(tokens, np.ndarray):
        tokens = np.asarray(tokens)
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be an integer array, got dtype {tokens.dtype}")
    if tokens.ndim not in (1, 2):
        raise ValueError(f"tokens must be 1-D (N,) or 2-D (B, N), got shape {tokens.shape}")
    stream = tokens[None] if tokens.ndim == 1 else tokens
    if stream.shape[0] < 1:
        raise ValueError(f"tokens must hold at least one stream, got shape {tokens.shape}")
    if stream.shape[1] < 2:
        raise ValueError(f"tokens must hold at least 2 tokens per stream, got shape {tokens.shape}")
    if stream.shape[1] > INT32_MAX:
        raise ValueError(f"tokens: a stream of {stream.shape[1]} tokens is longer than 2**31 - 1 "
                         "(positions are int32 on the device)")
    return stream


# ----- small helpers --------------------------------------------------------------------------


def _exp(x: float) -> float:
    if math.isnan(x):
        return math.nan
    return math.exp(x) if x < 709.0 else math.inf  # math.exp raises past ~709.78


def finite_or_none(x):
    """`x` with every non-finite float (in nested dicts/lists/tuples) replaced by None, for JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def _nan_if_none(x):
    return math.nan if x is None else x
