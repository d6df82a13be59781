"""Single-query attention (one decoding step) in one pass over the keys.

The dense reference scores a spec with a global branch twice: every key against the query
rotated at its own position (local) and against the query rotated at the global position
(``spec.global_query_position``, e.g. D for LM-Infinite), then picks per key. For one query at
position p both scores are functions of a distance, so each key can instead be placed at an
*effective position* e and scored once against the query at p:

* a local key stays at its position j;
* a global key goes to ``p - (gq - gk)``, where ``gq`` is the global query position and ``gk`` the
  key's global position (``spec.global_key_position``: j, or 0 for LM-Infinite): RoPE then sees the
  distance ``gq - gk`` and ALiBi adds ``-slope * (gq - gk)``, exactly the reference's global score.

So every cached key and value is read once: RoPE keys are rotated at e on the fly (a Λ-cache's
sinks land at p - D). A method whose global positions are fractions (``spec.position_scale > 1``, e.g.
Self-Extend with g not dividing W) scores its global keys in a second product instead,
against the query at the global position with the frequencies of `global_positional`, so no position
is ever multiplied up. Scores and softmax are float32, and the products run in the cache's dtype
with float32 accumulation (the query and the probabilities are cast to it; a float32 cache is
computed in float32 throughout). Values of slots the query does not attend are selected to zero
before the product, so a NaN there (an empty or out-of-window slot) cannot reach the output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.alibi import Alibi
from lminf_jax.rope import Rotary, apply_rope
from lminf_jax.scores import (
    NEG_INF, Positional, global_positional, last_key_position, masked_softmax, matmul_precision,
)
from lminf_jax.spec import AttentionSpec


def effective_key_positions(q_positions: jax.Array, k_positions: jax.Array, spec: AttentionSpec
                            ) -> tuple[jax.Array, jax.Array]:
    """``(effective positions (B, S), attended (B, S))`` of the keys at ``k_positions (B, S)`` for
    the queries at ``q_positions (B,)``: the position each key is scored at in a single pass
    (a spec with ``position_scale == 1``)."""
    qp = q_positions[:, None]
    local, far = spec.classify(qp, k_positions)
    if spec.has_global and not spec.global_scores_equal_local:
        gq = spec.global_query_position(q_positions)[:, None]
        effective = jnp.where(far, qp - (gq - spec.global_key_position(k_positions)), k_positions)
    else:
        effective = k_positions
    attended = local | far
    return jnp.where(attended, effective, 0), attended


def _scores(q: jax.Array, q_positions: jax.Array, k: jax.Array, k_positions: jax.Array, positional: Positional,
            scale: float, last: jax.Array | None, distance_scale: int = 1) -> jax.Array:
    """float32 scores ``(B, Hkv, G, S)`` of ``q (B, 1, Hq, d)`` (float32, un-rotated) placed at
    ``q_positions (B, 1)`` against ``k (B, S, Hkv, d)`` at ``k_positions (B, S)``; ALiBi distances are
    divided by ``distance_scale``; ``last``: the call's `last_key_position`."""
    b, _, hq, d = q.shape
    hkv, dtype = k.shape[2], k.dtype
    if isinstance(positional, Rotary):
        q = apply_rope(q, q_positions, positional, last)
        k = apply_rope(k, k_positions, positional, last)
    grouped = q.astype(dtype).reshape(b, hkv, hq // hkv, d)
    scores = jnp.einsum("bhgd,bkhd->bhgk", grouped, k, preferred_element_type=jnp.float32,
                        precision=matmul_precision(dtype)) * scale
    if isinstance(positional, Alibi):
        slopes = jnp.asarray(np.asarray(positional.slopes, np.float32).reshape(1, hkv, hq // hkv, 1))
        distance = (q_positions - k_positions).astype(jnp.float32) / np.float32(distance_scale)
        scores = scores - slopes * distance[:, None, None, :]
    return scores


@functools.partial(jax.jit, static_argnames=("spec", "positional", "scale"))
def single_query_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    spec: AttentionSpec,
    positional: Positional,
    scale: float,
) -> jax.Array:
    """Attention of one query per row, ``q (B, 1, Hq, d)`` at ``q_positions (B, 1)``, over keys in
    any slot order ``k, v (B, S, Hkv, d|dv)`` at ``k_positions (B, S)`` (negative = empty); inputs
    validated by `lminf_jax.attention`; no top-k. Returns ``(B, 1, Hq, dv)`` in q's dtype."""
    b, _, hq, _ = q.shape
    q32 = q.astype(jnp.float32)
    last = last_key_position(k_positions, positional)
    if spec.position_scale == 1:
        effective, attended = effective_key_positions(q_positions[:, 0], k_positions, spec)
        scores = _scores(q32, q_positions, k, effective, positional, scale, last)
    else:
        local, far = spec.classify(q_positions, k_positions)
        attended = local | far
        scores = jnp.where(far[:, None, None, :],
                           _scores(q32, spec.global_query_position(q_positions), k, spec.global_key_position(k_positions),
                                   global_positional(spec, positional), scale, last, spec.position_scale),
                           _scores(q32, q_positions, k, k_positions, positional, scale, last))
    probs = masked_softmax(jnp.where(attended[:, None, None, :], scores, NEG_INF))
    v = jnp.where(attended[:, :, None, None], v, jnp.zeros((), v.dtype))  # a slot not attended adds an exact 0
    out = jnp.einsum("bhgk,bkhd->bhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32,
                     precision=matmul_precision(v.dtype))
    return out.reshape(b, 1, hq, v.shape[-1]).astype(q.dtype)
