"""The online softmax: attention over keys visited in pieces, merged exactly.

Every path that does not hold all of a row's scores at once uses these four functions: the
blockwise scan over key chunks, the Pallas kernel's loop over key tiles, the top-k merge of
middle tokens into a finished result, and the probes' statistics. A `SoftmaxState` holds, per
query row, the running maximum score ``m``, the sum ``total`` of ``exp(score - m)``, the sum
``acc`` of those weights times a per-key quantity (the value rows, or a probe's statistics),
and whether the row attends a non-finite value (``poisoned``: its output is NaN).

Shapes are generic: scores ``(..., n)`` over ``n`` keys give ``m``, ``total``, ``poisoned``
``(...)`` and ``acc`` ``(..., dv)``. ``-inf`` marks a key a row does not attend; a row that
attends nothing finishes with output 0 and log-sum-exp ``-inf``. Scores and state are float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = float("-inf")


class SoftmaxState(NamedTuple):
    """Running online-softmax statistics of a set of query rows (module docstring)."""

    m: jax.Array
    total: jax.Array
    acc: jax.Array
    poisoned: jax.Array


def softmax_init(rows: tuple[int, ...], dv: int, poisoned_dtype=bool) -> SoftmaxState:
    """The state of ``rows`` query rows that have seen no key. ``poisoned_dtype``: bool, or float32
    where a backend reduces floats only (the Pallas kernel: 1.0 = poisoned)."""
    return SoftmaxState(jnp.full(rows, NEG_INF, jnp.float32), jnp.zeros(rows, jnp.float32),
                        jnp.zeros((*rows, dv), jnp.float32), jnp.zeros(rows, poisoned_dtype))


def _safe(m: jax.Array) -> jax.Array:
    """The shift used for rows with maximum ``m``: 0 where a row has seen no score (``-inf``)."""
    return jnp.where(m == NEG_INF, 0.0, m)


def softmax_update(state: SoftmaxState, scores: jax.Array, weighted: Callable[[jax.Array], jax.Array],
                   poisoned: jax.Array | None = None) -> SoftmaxState:
    """Fold in float32 ``scores (..., n)`` (``-inf``: not attended). ``weighted(p)`` maps the weights
    ``p (..., n)`` to ``(..., dv)``, e.g. ``p @ values``; ``poisoned (...)`` marks rows that attend a
    non-finite value among these keys."""
    m = lax.stop_gradient(jnp.maximum(state.m, jnp.max(scores, axis=-1)))  # a shift: no gradient flows through it
    shift = _safe(m)
    correction = jnp.exp(state.m - shift)
    p = jnp.exp(scores - shift[..., None])
    total = correction * state.total + jnp.sum(p, axis=-1)
    acc = correction[..., None] * state.acc + weighted(p)
    bad = state.poisoned if poisoned is None else jnp.maximum(state.poisoned, poisoned.astype(state.poisoned.dtype))
    return SoftmaxState(m, total, acc, bad)


def softmax_merge(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """The state of the union of two disjoint key sets of the same rows."""
    m = jnp.maximum(a.m, b.m)
    shift = _safe(m)
    ca, cb = jnp.exp(a.m - shift), jnp.exp(b.m - shift)
    return SoftmaxState(m, ca * a.total + cb * b.total, ca[..., None] * a.acc + cb[..., None] * b.acc,
                        jnp.maximum(a.poisoned, b.poisoned))


def softmax_finish(state: SoftmaxState) -> tuple[jax.Array, jax.Array]:
    """``(out (..., dv), lse (...))``: ``acc / total`` and the log-sum-exp of the attended scores;
    rows that attended nothing give 0 and ``-inf``, poisoned rows NaN."""
    seen = state.total > 0
    total = jnp.where(seen, state.total, 1.0)
    out = jnp.where(state.poisoned[..., None] > 0, jnp.nan, state.acc / total[..., None])
    return out, jnp.where(seen, state.m + jnp.log(total), NEG_INF)


def softmax_state_of(out: jax.Array, lse: jax.Array) -> SoftmaxState:
    """The state a finished ``(out, lse)`` stands for (NaN rows stay poisoned), so that a result
    can be merged with more keys (`softmax_merge`) without recomputing it."""
    seen = lse > NEG_INF
    poisoned = jnp.any(jnp.isnan(out), axis=-1)
    acc = jnp.where(seen[..., None] & ~poisoned[..., None], out.astype(jnp.float32), 0.0)
    return SoftmaxState(lse.astype(jnp.float32), seen.astype(jnp.float32), acc, poisoned)
