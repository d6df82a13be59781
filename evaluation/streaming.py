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

Checkpoints (``checkpoint_dir``), orbax, the two newest kept::

    checkpoint_dir/state-000000000120/    the state after 120 chunks (orbax composite):
        cache/     the cache leaves (StandardSave of {"leaf_00000": ..., ...}, in tree order)
        meta/      JSON, what the run is: format, version, chunk, streams, length, buckets, cache
                   signature (tree paths, dtypes, shapes), model: the params' `tree_fingerprint`
                   and the caller's ``identity`` (config, attention spec, compute dtype...)
        stats/     JSON: chunks and positions done, float64 sums (exact), counts, and stream: a
                   sha256 over the token windows read so far (all of the stream scored so far)
        checksum/  JSON: `json_digest` of meta + stats, `tree_fingerprint` of the cache leaves
    checkpoint_dir/tmp-000000000140-PID/  a save in progress (orbax writes it as
                                          tmp-000000000140-PID.orbax-checkpoint-tmp/ first)

A save writes ``tmp-*`` completely, renames it to ``state-*`` (atomic), then deletes all but the
two newest states and every ``tmp-*`` of the store (debris of saves killed half way). On start the
newest state that reads back intact (both checksums verified) is resumed; a damaged newer one is
removed with a warning on stderr (`newest_intact`).

What the store deletes is only ever its own: an entry of ``checkpoint_dir`` is the store's when its
name is ``state-<12 digits>`` or ``tmp-<12 digits>-<pid>`` (optionally followed by orbax's
``.orbax-checkpoint-tmp...``) and it is a directory (not a link) holding nothing but what the store
writes there (the items cache, meta, stats, checksum, orbax's _CHECKPOINT_METADATA and
commit_success.txt, and orbax's ``.orbax-checkpoint-tmp`` forms of the items). Every other name
(``tmp-mydata``, ``state-foo``...) is not the store's business and is never touched; an entry with
one of the store's names that is not its own (a file, a link, a folder holding anything else) is
refused with an error naming it, before any chunk runs (`check_checkpoint_dir`). A state of
another run is refused with a `Mismatch` naming each field that differs, including the stream:
the prefix the state scored is re-read and re-hashed on resume (the host hashes about 1 GB/s), so
the state stays constant-size whatever the number of chunks (per-chunk hashes would grow with it),
and a change anywhere in that prefix is caught. One run per directory at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.evaluation.fingerprint import check_identity, json_digest, newest_intact, tree_fingerprint
from lminf_jax.logprobs import token_scores
from lminf_jax.progress import Progress
from lminf_jax.spec import INT32_MAX

__all__ = ["BucketRow", "PositionBuckets", "StreamResult", "check_checkpoint_dir", "chunk_nll", "streaming_nll",
           "finite_or_none", "token_nll"]

STATE_FORMAT = "lminf_jax-streaming-nll"
STATE_VERSION = 2

StepFn = Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ----- position buckets ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PositionBuckets:
    """Log-spaced buckets of non-negative integer positions, `per_octave` buckets per doubling.

    Geometric bucket ``j`` holds the integers ``p`` with ``j <= per_octave * log2(p) < j + 1``,
    that is ``[ceil(2**(j/k)), ceil(2**((j+1)/k)))``. Where those would be narrower than one
    integer (small positions) every position gets its own bucket instead: positions
    ``0..linear_below-1`` are buckets ``0..linear_below-1``. With ``per_octave=4``:
    ``{0} {1} {2} {3} {4} {5} [6,7) [7,8) [8,10) [10,12) [12,14) [14,16) [16,20) ...``.
    Bucket indices and bounds are computed in closed form (no table), exact for positions
    up to 2**53 at least.
    """

    per_octave: int = 4

    def __post_init__(self) -> None:
        _check_int("per_octave", self.per_octave, 1)

    @functools.cached_property
    def _first_geometric(self) -> int:
        """The first geometric bucket index j0 whose width 2**(j/k) * (2**(1/k) - 1) is >= 1."""
        k, j = self.per_octave, 0
        growth = math.expm1(math.log(2.0) / k)
        while 2.0 ** (j / k) * growth < 1.0:
            j += 1
        return j

    @property
    def linear_below(self) -> int:
        """Positions below this each have their own bucket."""
        return int(self._edge(np.int64(self._first_geometric)))

    def _edge(self, j: np.ndarray) -> np.ndarray:
        """Lower bound ``ceil(2**(j/k))`` of geometric bucket ``j`` (int64)."""
        return np.ceil(np.exp2(np.asarray(j, np.float64) / self.per_octave)).astype(np.int64)

    def index(self, positions) -> np.ndarray:
        """Bucket index (int64) of each position (an int or integer array, all >= 0)."""
        p = np.asarray(positions)
        if p.dtype.kind not in "iu":
            raise ValueError(f"positions must be integers, got dtype {p.dtype}")
        p = p.astype(np.int64)
        if p.size and p.min() < 0:
            raise ValueError(f"positions must be >= 0, got {p.min()}")
        lin, j0 = self.linear_below, self._first_geometric
        out = p.copy()
        big = p >= lin
        if big.any():
            q = p[big]
            j = np.maximum(np.floor(np.log2(q.astype(np.float64)) * self.per_octave).astype(np.int64), j0)
            while True:  # exact correction of the float estimate (at most a step or two)
                up = self._edge(j + 1) <= q
                down = self._edge(j) > q
                if not (up.any() or down.any()):
                    break
                j = j + up - down
            out[big] = lin + (j - j0)
        return out

    def bounds(self, index) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)`` (int64 arrays, or 0-d for a scalar index): bucket ``i`` is ``[lo, hi)``."""
        i = np.asarray(index, np.int64)
        if i.size and i.min() < 0:
            raise ValueError(f"bucket indices must be >= 0, got {i.min()}")
        lin, j0 = self.linear_below, self._first_geometric
        j = np.maximum(i - lin, 0) + j0
        lo = np.where(i < lin, i, self._edge(j))
        hi = np.where(i < lin, i + 1, self._edge(j + 1))
        return lo, hi

    def count(self, max_position: int) -> int:
        """How many buckets cover positions ``0..max_position``."""
        return int(self.index(np.int64(max_position))) + 1

    def to_json(self) -> dict:
        return {"per_octave": self.per_octave}


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


@dataclasses.dataclass(frozen=True)
class BucketRow:
    """Scores at query positions ``[lo, hi)``, summed over streams."""

    lo: int
    hi: int
    count: int
    nll: float
    ppl: float


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
    stream = _check_tokens(tokens)
    _check_int("chunk", chunk, 1)
    _check_int("checkpoint_every", checkpoint_every, 1)
    if max_chunks is not None:
        _check_int("max_chunks", max_chunks, 0)
    if identity is not None and (not isinstance(identity, Mapping) or "params" in identity):
        raise ValueError(f"identity must be a mapping without the key 'params' (the params' fingerprint), got "
                         f"{identity!r}")
    if not isinstance(buckets, PositionBuckets):
        raise ValueError(f"buckets must be a PositionBuckets, got {type(buckets).__name__}")
    try:
        hash(step)
    except TypeError:
        raise ValueError(f"step must be hashable (it is a jit static argument), got {type(step).__name__}") from None

    chunk, checkpoint_every = int(chunk), int(checkpoint_every)
    num_streams, length = stream.shape
    to_score = length - 1
    num_chunks = -(-to_score // chunk)
    cache = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else jnp.asarray(x), cache)
    leaves, treedef = jax.tree.flatten(cache)
    stats = _Stats.empty(num_streams, buckets.count(to_score - 1))
    prefix = hashlib.sha256()  # of the windows read so far
    store = None
    if checkpoint_dir is not None:
        check_checkpoint_dir(checkpoint_dir)  # before the params are hashed
        meta = _metadata(stream, chunk, buckets, cache, params, identity or {})
        store = _Store(Path(checkpoint_dir), meta, leaves, stream)
    try:
        if store is not None:
            restored = store.restore(treedef)
            if restored is not None:
                stats, cache, prefix = restored
        resumed_tokens, first = stats.count, stats.chunks
        stop = num_chunks if max_chunks is None else min(num_chunks, first + max_chunks)
        pending = None  # the previous chunk's (nll on device, start, valid): one chunk in flight
        with Progress(num_streams * to_score, "tokens", "streaming NLL", enabled=progress, rate=True,
                      initial=resumed_tokens) as bar:

            def flush() -> None:
                nonlocal pending
                if pending is not None:
                    nll, start, valid = pending
                    pending = None
                    stats.add(np.asarray(nll)[:, :valid], start, buckets)
                    stats.chunks += 1
                    bar.update(num_streams * valid, postfix=f"mean NLL {stats.total / stats.count:.4f}")

            for k in range(first, stop):
                start, valid, window = _window(stream, chunk, k)
                prefix.update(_le_bytes(window))
                # fresh buffers: on CPU the device may alias host memory of a chunk still in flight
                inputs = np.zeros((num_streams, chunk), np.int32)
                targets = np.zeros((num_streams, chunk), np.int32)
                inputs[:, :valid] = window[:, :valid]
                targets[:, :valid] = window[:, 1:]
                nll, cache = chunk_nll(step, params, inputs, targets, np.int32(start), np.int32(valid), cache)
                flush()
                pending = (nll, start, valid)
                if store is not None and ((k + 1) % checkpoint_every == 0 or k + 1 == stop):
                    flush()
                    store.save(stats, prefix, cache)
            flush()
    finally:
        if store is not None:
            store.close()

    elapsed = time.monotonic() - began
    return _result(stats, buckets, num_streams, length, chunk, resumed_tokens, elapsed, cache)


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


def _metadata(stream: np.ndarray, chunk: int, buckets: PositionBuckets, cache, params,
              identity: Mapping[str, Any]) -> dict:
    signature = [f"{jax.tree_util.keystr(path)}: {jnp.dtype(leaf.dtype).name}{list(leaf.shape)}"
                 for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]]
    meta = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "chunk": chunk,
        "streams": int(stream.shape[0]),
        "length": int(stream.shape[1]),
        "buckets": buckets.to_json(),
        "cache": signature,
        "model": {"params": tree_fingerprint(params), **identity},
    }
    try:
        return json.loads(json.dumps(meta))  # the form it takes after a JSON round trip
    except TypeError as e:
        raise ValueError(f"identity must hold JSON values: {e}") from None


# ----- checkpoints ----------------------------------------------------------------------------

_STATE = re.compile(r"state-(\d{12})")
_TMP = re.compile(r"tmp-\d{12}-\d+(\.orbax-checkpoint-tmp.*)?")
#: What the store (through orbax) writes in a state: its items (orbax's unfinished forms too) and orbax's files.
_OWN_ENTRY = re.compile(r"(cache|meta|stats|checksum)(\.orbax-checkpoint-tmp.*)?"
                        r"|_CHECKPOINT_METADATA|commit_success\.txt")


def check_checkpoint_dir(directory: str | os.PathLike) -> list[Path]:
    """The store's entries in `directory` (none if it does not exist): those named like a state
    or a save in progress, each checked to be the store's own (see the module docstring).

    Raises ValueError naming an entry that has one of the store's names but is not its own.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _STATE.fullmatch(p.name) or _TMP.fullmatch(p.name)]
    for path in found:
        _check_own(path)
    return found


def _check_own(path: Path) -> None:
    """Refuse (ValueError) `path` unless it is a directory, not a link, holding only `_OWN_ENTRY` names."""
    if path.is_symlink() or not path.is_dir():
        why = "it is not a directory"
    else:
        foreign = sorted(p.name for p in path.iterdir() if not _OWN_ENTRY.fullmatch(p.name))
        if not foreign:
            return
        why = f"it holds {', '.join(foreign)}, which the store never writes"
    raise ValueError(f"checkpoint_dir {path.parent}: {path.name} is named like an entry of the checkpoint store but "
                     f"is not its own ({why}); move it out of {path.parent} or choose another checkpoint_dir")


def _discard(path: Path) -> None:
    """Delete one of the store's own entries, checked again: nothing else is ever deleted."""
    _check_own(path)
    shutil.rmtree(path)


class _Store:
    """Save/restore the two newest states in a directory (layout in the module docstring)."""

    def __init__(self, directory: Path, meta: dict, leaves: list, stream: np.ndarray):
        import orbax.checkpoint as ocp  # only checkpointing runs need orbax

        self.ocp, self.directory, self.meta, self.stream = ocp, directory.absolute(), meta, stream
        self.names = [f"leaf_{i:05d}" for i in range(len(leaves))]
        self.template = {
            name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
            for name, leaf in zip(self.names, leaves)
        }
        largest = max((leaf.size * leaf.dtype.itemsize for leaf in leaves), default=0)
        gb = max(96, math.ceil(largest / 1e9) + 1)  # orbax rejects an array larger than the limit
        self.checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(
            cache=ocp.StandardCheckpointHandler(save_concurrent_gb=gb, restore_concurrent_gb=gb),
            meta=ocp.JsonCheckpointHandler(), stats=ocp.JsonCheckpointHandler(),
            checksum=ocp.JsonCheckpointHandler(),
        ))
        self.directory.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.checkpointer.close()

    def states(self) -> list[Path]:
        """The ``state-*`` directories, newest first (each checked to be the store's own)."""
        states = [(int(m.group(1)), p) for p in check_checkpoint_dir(self.directory) if (m := _STATE.fullmatch(p.name))]
        return [p for _, p in sorted(states, reverse=True)]

    def restore(self, treedef) -> tuple[_Stats, Any, Any] | None:
        """``(stats, cache, prefix hash)`` of the newest intact state, or None when there is none."""
        found = newest_intact(self.states(), self._read, _discard)
        if found is None:
            return None
        stats, leaves, prefix = found[1]
        return stats, jax.tree.unflatten(treedef, leaves), prefix

    def _read(self, path: Path) -> tuple[_Stats, list, Any]:
        """One state, verified: raises a `Mismatch` for another run's, anything else if damaged."""
        args = self.ocp.args
        where = f"checkpoint {path}"
        meta = self.checkpointer.restore(path, args=args.Composite(meta=args.JsonRestore()))["meta"]
        check_identity({k: meta.get(k) for k in ("format", "version")},  # other formats lack the items below
                       {k: self.meta[k] for k in ("format", "version")}, where)
        got = self.checkpointer.restore(path, args=args.Composite(stats=args.JsonRestore(),
                                                                  checksum=args.JsonRestore()))
        stats, checksum = got["stats"], got["checksum"]
        if json_digest({"meta": meta, "stats": stats}) != checksum["json"]:
            raise ValueError("meta/stats do not match their checksum")
        check_identity(meta, self.meta, where)
        prefix = _prefix_hash(self.stream, self.meta["chunk"], stats["chunks"])
        field = f"stream (its first {stats['positions'] + 1} tokens)"
        check_identity({field: stats["stream"]}, {field: "sha256:" + prefix.hexdigest()}, where)
        leaves = {}
        if self.names:
            restored = self.checkpointer.restore(path, args=args.Composite(cache=args.StandardRestore(self.template)))
            leaves = dict(restored["cache"])
        if tree_fingerprint(leaves) != checksum["arrays"]:
            raise ValueError("the cache does not match its checksum")
        return _Stats.from_json(stats), [leaves[name] for name in self.names], prefix

    def save(self, stats: _Stats, prefix: Any, cache) -> None:
        final = self.directory / f"state-{stats.chunks:012d}"
        if final.exists():  # resumed here and nothing new (a deterministic run rewrites the same)
            return
        tmp = self.directory / f"tmp-{stats.chunks:012d}-{os.getpid()}"
        if tmp.exists():
            _discard(tmp)
        stats_json = {**stats.to_json(), "stream": "sha256:" + prefix.hexdigest()}
        leaves = dict(zip(self.names, jax.tree.leaves(cache)))
        checksum = {"json": json_digest({"meta": self.meta, "stats": stats_json}), "arrays": tree_fingerprint(leaves)}
        args = self.ocp.args
        items = {"meta": args.JsonSave(self.meta), "stats": args.JsonSave(stats_json),
                 "checksum": args.JsonSave(checksum)}
        if self.names:
            items["cache"] = args.StandardSave(leaves)
        self.checkpointer.save(tmp, args=args.Composite(**items))
        os.rename(tmp, final)  # atomic: `final` appears complete or not at all
        for p in self.states()[2:]:  # keep the two newest states
            _discard(p)
        for p in check_checkpoint_dir(self.directory):
            if _TMP.fullmatch(p.name):
                _discard(p)


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
