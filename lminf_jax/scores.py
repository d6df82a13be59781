"""Attention scores under a spec: the pieces shared by the dense and blockwise paths.

Arrays follow one layout: queries ``(B, Tq, Hkv, Hg, d)`` (query heads grouped by the
key/value head they share, ``Hg = Hq / Hkv`` per group; G is always the sink count), keys and
values ``(B, Tk, Hkv, d)``, scores ``(B, Hkv, Hg, Tq, Tk)`` in float32 with ``-inf`` where a key is not attended.

A row's output depends only on the keys and values it attends: scores of other keys are
replaced (selected, never multiplied) by ``-inf``, and the values of other keys are selected out
(one query) or cleaned by `finite_values`, so a NaN or inf elsewhere cannot reach the row through
``0 * nan``; a row that attends a non-finite value is not finite either (NaN).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lminf_jax.alibi import Alibi
from lminf_jax.online_softmax import NEG_INF
from lminf_jax.rope import Rotary, apply_rope
from lminf_jax.spec import AttentionSpec

Positional = Union[Rotary, Alibi, None]


def default_scale(head_dim: int) -> float:
    """The score scale when none is given: ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim)


@dataclasses.dataclass(frozen=True)
class Scaling:
    """How a query-key dot product becomes a score: times ``factor``, then, with a ``softcap`` c,
    ``c * tanh(score / c)`` (Gemma-2's attention-logit soft-capping), before any ALiBi bias. Every path
    (dense, blockwise, single-query, the Pallas kernel, top-k middle tokens, probes) scores through it.
    Hashable: a valid ``jax.jit`` static argument."""

    factor: float
    softcap: float | None = None

    def __post_init__(self) -> None:
        for name in ("factor", "softcap"):
            value = getattr(self, name)
            if name == "softcap" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"scale {name} must be a finite number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))

    def __call__(self, dots: jax.Array) -> jax.Array:
        """float32 scores of float32 dot products."""
        scores = dots * self.factor
        return scores if self.softcap is None else self.softcap * jnp.tanh(scores / self.softcap)


def scaling(scale: float | Scaling | None, head_dim: int) -> Scaling:
    """``scale`` as a `Scaling`: a number is the factor (no cap); None is `default_scale`. A ValueError
    names a factor or cap that is not a finite number > 0."""
    if isinstance(scale, Scaling):
        return scale
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be a number, a Scaling or None, got {scale!r}")
    return Scaling(default_scale(head_dim) if scale is None else scale)


def matmul_precision(dtype: jnp.dtype) -> lax.Precision:
    """Full float32 matmuls for float32 inputs (no TF32 on GPU); default otherwise."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def global_positional(spec: AttentionSpec, positional: Positional) -> Positional:
    """The positional encoding of global scores, whose positions are numerators over
    ``spec.position_scale``: RoPE with every frequency divided by it (exact for any integer numerator);
    ALiBi divides the distance instead (`masked_scores`)."""
    scale = spec.position_scale
    if scale == 1 or not isinstance(positional, Rotary):
        return positional
    return positional.divided(scale)


def last_key_position(k_positions: jax.Array, positional: Positional) -> jax.Array | None:
    """The largest key position of an attention call when RoPE follows the sequence length (its
    frequencies are those of that many tokens + 1, `lminf_jax.rope.LengthRule`), else None. Taken over
    every key of the call, which includes the newest token, so it must see all ``k_positions``."""
    if isinstance(positional, Rotary) and positional.length_rule is not None:
        return jnp.max(k_positions)
    return None


def global_distance(spec: AttentionSpec, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """float32 ALiBi distance of global scores for broadcastable query/key positions."""
    numerator = spec.global_query_position(q_positions) - spec.global_key_position(k_positions)
    return numerator.astype(jnp.float32) / np.float32(spec.position_scale)


def prepare_keys(
    k: jax.Array, k_positions: jax.Array, spec: AttentionSpec, positional: Positional,
    last: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Keys for local scores (rotated at their positions) and for global scores; ``last``: the
    call's `last_key_position`."""
    if not isinstance(positional, Rotary):
        return k, k
    k_local = apply_rope(k, k_positions, positional, last)
    if spec.keys_rotated_in_global or not spec.has_global:
        return k_local, k_local
    return k_local, apply_rope(k, spec.global_key_position(k_positions), global_positional(spec, positional), last)


def prepare_queries(
    q: jax.Array, q_positions: jax.Array, spec: AttentionSpec, positional: Positional,
    last: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Grouped queries ``(B, Tq, Hkv, Hg, d)`` rotated for local and for global scores; ``last``: the
    call's `last_key_position`."""
    if not isinstance(positional, Rotary):
        return q, q
    q_local = _rope_grouped(q, q_positions, positional, last)
    if not spec.has_global or spec.global_scores_equal_local:
        return q_local, q_local
    return q_local, _rope_grouped(q, spec.global_query_position(q_positions), global_positional(spec, positional),
                                  last)


def _rope_grouped(q: jax.Array, positions: jax.Array, rotary: Rotary, last: jax.Array | None) -> jax.Array:
    b, t, hkv, g, d = q.shape
    return apply_rope(q.reshape(b, t, hkv * g, d), positions, rotary, last).reshape(q.shape)


def dot_scores(q: jax.Array, k: jax.Array, heads_first: bool = False) -> jax.Array:
    """``(B, Tq, Hkv, Hg, d) x (B, Tk, Hkv, d) -> (B, Hkv, Hg, Tq, Tk)`` in float32; with ``heads_first``
    the inputs are ``(B, Hkv, Hg, Tq, d)`` and ``(B, Hkv, Tk, d)`` (the blockwise path's layout)."""
    spec = "bhgqd,bhkd->bhgqk" if heads_first else "bqhgd,bkhd->bhgqk"
    return jnp.einsum(spec, q, k, preferred_element_type=jnp.float32, precision=matmul_precision(q.dtype))


def _grouped_slopes(alibi: Alibi, hkv: int, g: int) -> jax.Array:
    return jnp.asarray(np.asarray(alibi.slopes, np.float32).reshape(hkv, g))[None, :, :, None, None]


def _pairs(q_positions: jax.Array, k_positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(B, Tq)`` and ``(B, Tk)`` positions broadcastable against ``(B, Hkv, Hg, Tq, Tk)`` scores."""
    return q_positions[:, None, None, :, None], k_positions[:, None, None, None, :]


def masked_scores(
    q_local: jax.Array,
    q_global: jax.Array,
    k_local: jax.Array,
    k_global: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    spec: AttentionSpec,
    positional: Positional,
    scale: Scaling,
    include_local: bool = True,
    include_global: bool = True,
    heads_first: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Scaled float32 scores with ``-inf`` outside the attended set, and that set.

    ``include_local`` / ``include_global`` restrict the result to one class, which
    lets the blockwise path score sinks and window separately without counting any
    key twice. Positions are ``(B, Tq)`` and ``(B, Tk)``; ``heads_first``: the layout of `dot_scores`.
    """
    qp, kp = _pairs(q_positions, k_positions)
    local, far = spec.classify(qp, kp)
    needs_global = include_global and spec.has_global
    global_is_local = not isinstance(positional, Rotary) or spec.global_scores_equal_local
    s_local = s_global = None
    if include_local or (needs_global and global_is_local):
        s_local = s_global = scale(dot_scores(q_local, k_local, heads_first))
    if needs_global and not global_is_local:
        s_global = scale(dot_scores(q_global, k_global, heads_first))
    if isinstance(positional, Alibi) and needs_global:
        s_global = s_global - _grouped_slopes(positional, *s_global.shape[1:3]) * global_distance(spec, qp, kp)
    if include_local:
        s_local = _local_bias(s_local, positional, qp, kp)
    b, tq, hkv, g, _ = q_local.shape
    if heads_first:
        b, hkv, g, tq, _ = q_local.shape
    scores = jnp.full((b, hkv, g, tq, k_positions.shape[1]), NEG_INF)
    attended = jnp.zeros_like(local)
    if needs_global:
        scores = jnp.where(far, s_global, scores)
        attended = far
    if include_local:
        scores = jnp.where(local, s_local, scores)
        attended = attended | local
    return scores, attended


def local_scores(q_local: jax.Array, k_local: jax.Array, q_positions: jax.Array, k_positions: jax.Array, *,
                 positional: Positional, scale: Scaling, heads_first: bool = False) -> jax.Array:
    """Scaled float32 scores of keys that every query attends in the local class (no mask to apply):
    the fast path of a key chunk lying wholly inside every query's window."""
    scores = scale(dot_scores(q_local, k_local, heads_first))
    return _local_bias(scores, positional, *_pairs(q_positions, k_positions))


def _local_bias(scores: jax.Array, positional: Positional, qp: jax.Array, kp: jax.Array) -> jax.Array:
    """``scores (B, Hkv, Hg, Tq, Tk)`` with ALiBi's bias of the true distance (unchanged under RoPE or none)."""
    if not isinstance(positional, Alibi):
        return scores
    return scores - _grouped_slopes(positional, *scores.shape[1:3]) * (qp - kp).astype(jnp.float32)


def finite_values(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``v (B, Tk, Hkv, dv)`` with its non-finite entries zeroed, and ``(B, Tk, Hkv)`` which key
    rows held one. A product ``p @ v`` over keys a row does not attend (``p = 0``) then never
    meets ``0 * nan``; `attends_non_finite` marks the rows that do attend such a value."""
    finite = jnp.isfinite(v)
    return jnp.where(finite, v, jnp.zeros((), v.dtype)), ~jnp.all(finite, axis=-1)


def attends_non_finite(attended: jax.Array, bad: jax.Array, heads_first: bool = False) -> jax.Array:
    """``(B, Hkv, Hg|1, Tq)``: the rows of ``attended (B, 1|Hkv, 1|Hg, Tq, Tk)`` that attend a key
    whose value row is non-finite (``bad (B, Tk, Hkv)`` from `finite_values`, ``(B, Hkv, Tk)`` with
    ``heads_first``); their output is NaN."""
    by_head = bad if heads_first else jnp.swapaxes(bad, 1, 2)
    return jnp.any(attended & by_head[:, :, None, None, :], axis=-1)


def masked_softmax(scores: jax.Array) -> jax.Array:
    """Softmax over the last axis of float32 scores with ``-inf`` at keys not attended; a row
    that attends no key gets zeros."""
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(jnp.isneginf(top), 0.0, top))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def middle_scores(
    q_last: jax.Array,
    k: jax.Array,
    q_last_positions: jax.Array,
    k_positions: jax.Array,
    *,
    spec: AttentionSpec,
    positional: Positional,
    scale: Scaling,
) -> tuple[jax.Array, jax.Array]:
    """Scores of every key for the top-k middle-token variant, and which keys compete (the mask hides them).

    ``q_last`` is ``(B, 1, Hkv, Hg, d)`` (un-rotated), ``k`` the un-rotated keys.
    The query is placed at ``spec.selection.distance`` from an un-rotated key.
    Returns ``(B, Hkv, Hg, 1, Tk)`` scores and the middle keys, broadcastable to them.
    """
    distance = spec.selection.distance
    if isinstance(positional, Rotary):
        q_last = _rope_grouped(q_last, jnp.full_like(q_last_positions, distance), positional,
                               last_key_position(k_positions, positional))
    s = scale(dot_scores(q_last, k))
    if isinstance(positional, Alibi):
        s = s - _grouped_slopes(positional, q_last.shape[2], q_last.shape[3]) * float(distance)
    return s, spec.middle(*_pairs(q_last_positions, k_positions))


def top_k_active(spec: AttentionSpec, layer: int | jax.Array | None) -> bool | jax.Array:
    """Whether the top-k variant runs in this layer (a traced bool for a traced layer)."""
    t = spec.top_k
    if t is None:
        return False
    if layer is None:
        raise ValueError("layer must be given when spec.top_k is set (top-k runs only in some layers)")
    upper = t.to_layer
    if isinstance(layer, int):
        return layer >= t.from_layer and (upper is None or layer < upper)
    active = layer >= t.from_layer
    return active if upper is None else active & (layer < upper)
