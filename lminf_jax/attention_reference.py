"""Dense reference attention: O(Tq * Tk) float32, the oracle for every fast path.

Also the probing path: it can return the full score (logit) and probability
matrices. It accepts keys in any order (ring-buffer caches included).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lminf_jax.scores import (
    NEG_INF,
    Positional,
    masked_scores,
    masked_softmax,
    middle_scores,
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
    scale: float,
    layer: int | jax.Array | None = None,
    return_probe: bool = False,
) -> jax.Array | tuple[jax.Array, AttentionProbe]:
    """Dense attention; inputs already validated (see `lminf_jax.attention`).

    q: (B, Tq, Hq, d); k: (B, Tk, Hkv, d); v: (B, Tk, Hkv, dv); positions (B, Tq), (B, Tk).
    Returns (B, Tq, Hq, dv) in q's dtype, plus an `AttentionProbe` if requested.
    """
    out_dtype = q.dtype
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    q = q.astype(jnp.float32).reshape(b, tq, hkv, hq // hkv, d)
    k = k.astype(jnp.float32)
    v = v.astype(jnp.float32)
    q_local, q_global = prepare_queries(q, q_positions, spec, positional)
    k_local, k_global = prepare_keys(k, k_positions, spec, positional)
    scores, _ = masked_scores(
        q_local, q_global, k_local, k_global, q_positions, k_positions, spec=spec, positional=positional, scale=scale
    )
    active = top_k_active(spec, layer)
    if active is not False:
        scores = _insert_top_k(scores, q, k, q_positions, k_positions, spec, positional, scale, active)
    probs = masked_softmax(scores)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v, precision=jax.lax.Precision.HIGHEST)
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


def _insert_top_k(scores, q, k, q_positions, k_positions, spec, positional, scale, active):
    """Add the top-k middle keys of the last query slot of each row to its scores."""
    last = middle_scores(
        q[:, -1:], k, q_positions[:, -1:], k_positions, spec=spec, positional=positional, scale=scale
    )[..., 0, :]
    n = min(spec.top_k.k, k.shape[1])
    values, index = jax.lax.top_k(last, n)
    chosen = jnp.zeros(last.shape, bool)
    chosen = jnp.put_along_axis(chosen, index, values > NEG_INF, axis=-1, inplace=False)
    new_last = jnp.where(chosen & active, last, scores[..., -1, :])
    return scores.at[..., -1, :].set(new_last)
