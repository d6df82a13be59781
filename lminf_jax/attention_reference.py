"""Dense reference attention: O(Tq * Tk) float32, the oracle for every fast path.

Also the probing path: it can return the full score (logit) and probability
matrices. It accepts keys in any order (ring-buffer caches included).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lminf_jax.scores import (
    Positional,
    Scaling,
    attends_non_finite,
    finite_values,
    masked_scores,
    masked_softmax,
    middle_scores,
    last_key_position,
    prepare_keys,
    prepare_queries,
    top_k_active,
)
from lminf_jax.spec import AttentionSpec


@dataclasses.dataclass(frozen=True)
class AttentionProbe:
    """Per-head attention internals, shaped ``(B, Hq, Tq, Tk)``.

    ``logits``: scaled scores (incl. ALiBi bias) with ``-inf`` where not attended.
    ``probs``: the softmax over attended keys (rows with no attended key are 0).
    ``local``/``global_``: which keys were scored in each class (top-k picks are in neither).
    """

    logits: jax.Array
    probs: jax.Array
    local: jax.Array
    global_: jax.Array


jax.tree_util.register_dataclass(AttentionProbe, data_fields=["logits", "probs", "local", "global_"], meta_fields=[])


def _ungroup(x: jax.Array) -> jax.Array:
    """``(B, Hkv, G, ...) -> (B, Hq, ...)``."""
    b, hkv, g = x.shape[:3]
    return x.reshape(b, hkv * g, *x.shape[3:])


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    spec: AttentionSpec,
    positional: Positional,
    scale: Scaling,
    layer: int | jax.Array | None = None,
    return_probe: bool = False,
) -> jax.Array | tuple[jax.Array, AttentionProbe]:
    """Dense attention; inputs already validated (see `lminf_jax.attention`).

    q: (B, Tq, Hq, d); k: (B, Tk, Hkv, d); v: (B, Tk, Hkv, dv); positions (B, Tq), (B, Tk).
    Returns (B, Tq, Hq, dv) in q's dtype, plus an `AttentionProbe` if requested. Compiled as one
    program (called eagerly, op by op, its many small ops would each compile on their own); an
    ``int`` layer (or None) is a static argument, any other ``layer`` (an array) a traced one.
    """
    dense = _dense_static_layer if layer is None or isinstance(layer, int) else _dense_traced_layer
    return dense(q, k, v, q_positions, k_positions, spec=spec, positional=positional, scale=scale, layer=layer,
                 return_probe=return_probe)


def _dense(q, k, v, q_positions, k_positions, *, spec, positional, scale, layer, return_probe):
    """`reference_attention`'s body (its arguments), compiled by the two jits below."""
    out_dtype = q.dtype
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    q = q.astype(jnp.float32).reshape(b, tq, hkv, hq // hkv, d)
    k = k.astype(jnp.float32)
    v = v.astype(jnp.float32)
    last = last_key_position(k_positions, positional)
    q_local, q_global = prepare_queries(q, q_positions, spec, positional, last)
    k_local, k_global = prepare_keys(k, k_positions, spec, positional, last)
    scores, attended = masked_scores(
        q_local, q_global, k_local, k_global, q_positions, k_positions, spec=spec, positional=positional, scale=scale
    )
    active = top_k_active(spec, layer)
    if active is not False:
        scores, attended = _insert_top_k(scores, attended, q, k, q_positions, k_positions, spec, positional, scale,
                                          active)
    probs = masked_softmax(scores)
    out = _weighted_values(probs, attended, v)
    out = out.reshape(b, tq, hq, v.shape[-1]).astype(out_dtype)
    if not return_probe:
        return out
    qp = q_positions[:, None, None, :, None]
    kp = k_positions[:, None, None, None, :]
    local, far = spec.classify(qp, kp)
    shape = scores.shape
    probe = AttentionProbe(
        logits=_ungroup(scores),
        probs=_ungroup(probs),
        local=_ungroup(jnp.broadcast_to(local, shape)),
        global_=_ungroup(jnp.broadcast_to(far, shape)),
    )
    return out, probe


_STATIC = ("spec", "positional", "scale", "return_probe")
_dense_static_layer = jax.jit(_dense, static_argnames=(*_STATIC, "layer"))
_dense_traced_layer = jax.jit(_dense, static_argnames=_STATIC)


def _weighted_values(probs: jax.Array, attended: jax.Array, v: jax.Array) -> jax.Array:
    """``probs @ v`` ``(B, Tq, Hkv, G, dv)`` in which a value no row attends never meets ``0 * nan``.

    One query whose keys are the same in every head (``attended (B, 1, 1, 1, Tk)``, decoding): its
    values are selected, which is exact and on CPU costs no pass of its own (XLA fuses the select
    into the product). Otherwise non-finite values are zeroed and the rows that attend one set to
    NaN (`finite_values`).
    """
    matmul = functools.partial(jnp.einsum, "bhgqk,bkhd->bqhgd", precision=jax.lax.Precision.HIGHEST)
    if attended.shape[1:4] == (1, 1, 1):
        return matmul(probs, jnp.where(jnp.moveaxis(attended[:, 0, 0], -1, 1)[..., None], v, 0.0))
    v, bad = finite_values(v)
    poisoned = jnp.moveaxis(attends_non_finite(attended, bad), -1, 1)[..., None]  # (B, Tq, Hkv, G|1, 1)
    return jnp.where(poisoned, jnp.nan, matmul(probs, v))


def _insert_top_k(scores, attended, q, k, q_positions, k_positions, spec, positional, scale, active):
    """Add the top-k middle keys of the last query slot of each row to its scores and attended set."""
    last, middle = middle_scores(q[:, -1:], k, q_positions[:, -1:], k_positions, spec=spec, positional=positional,
                                 scale=scale)
    last, middle = last[..., 0, :], middle[..., 0, :]
    top = spec.selection.choose(last, middle)
    chosen = jnp.zeros(last.shape, bool)
    chosen = jnp.put_along_axis(chosen, top.index, top.valid, axis=-1, inplace=False) & active
    new_last = jnp.where(chosen, last, scores[..., -1, :])
    attended = jnp.broadcast_to(attended, scores.shape)
    return scores.at[..., -1, :].set(new_last), attended.at[..., -1, :].set(attended[..., -1, :] | chosen)
