"""Single-query attention (one decoding step): keys stored heads-first, each read once.

Every key is first scored as a *local* key, against the query rotated at its position ``p``; with
the keys rotated at their own positions (a rotated `lminf_jax.cache.KVCache`, or raw keys rotated
here) that is one product over the keys. A *global* key (``spec.classify``) is scored at other
positions: query at ``gq = global_query_position(p)``, key at ``gk = global_key_position(j)``, both
over ``s = position_scale``. With RoPE, one frequency pair of the key stored as ``a R(j θ) k``
(``a`` the attention scaling) gives that score as

    a² (R(gq θ/s) q) · (R(gk θ/s) k)  =  (a R(j θ + (gq - gk) θ/s) q) · (a R(j θ) k),

since rotations of one pair commute: the stored key is kept and the *query* is rotated per global
key (`lminf_jax.rope.rope_cos_sin` adds the two angles, each exact for any int32 integer). ALiBi adds
``-slope * (p - j)`` to a local score and ``-slope * (gq - gk) / s`` to a global one. A spec whose
global keys are sinks (``j < G``) scores only the first slots of a cache a second time (callers
pass ``far_slots``: in a `KVCache` position ``j < G`` lives in slot ``j``).

Keys come in *sets* (e.g. a cache and the step's own new token) that share one softmax, so a new
token is never copied into the cache before it is attended. Scores and softmax are float32; the
products run in the keys' dtype with float32 accumulation. Values of slots the query does not attend
are selected to zero before the product, so a NaN there cannot reach the output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.alibi import Alibi
from lminf_jax.rope import Rotary, rope_cos_sin, rotate
from lminf_jax.scores import (NEG_INF, Positional, Scaling, global_positional, last_key_position, masked_softmax,
                              matmul_precision, scaling)
from lminf_jax.spec import AttentionSpec


def rotates_keys(positional: Positional) -> bool:
    """Whether keys can be stored rotated at their own positions (`KVCache` ``rotated``): RoPE
    whose frequencies do not follow the sequence length (a `LengthRule` changes them every step)."""
    return isinstance(positional, Rotary) and positional.length_rule is None


@functools.partial(jax.jit, static_argnames=("spec", "positional", "scale", "rotated", "far_slots"))
def decode_attention(
    q: jax.Array,
    q_positions: jax.Array,
    keys: tuple[jax.Array, ...],
    values: tuple[jax.Array, ...],
    k_positions: tuple[jax.Array, ...],
    *,
    spec: AttentionSpec,
    positional: Positional,
    scale: float | Scaling,
    rotated: bool = False,
    far_slots: tuple[int | None, ...] | None = None,
) -> jax.Array:
    """Attention of one query per row, ``q (B, 1, Hq, d)`` un-rotated at ``q_positions (B, 1)``,
    over key sets ``keys[i]``/``values[i]`` ``(B, Hkv, S_i, d|dv)`` at ``k_positions[i] (B, S_i)``
    (negative = empty; any slot order), all in one softmax; no top-k.

    ``rotated``: the keys are stored rotated at their own positions (`rotates_keys` must hold);
    else RoPE keys are rotated here. ``far_slots[i]``: only the first that many slots of set ``i``
    can hold a global key (None: any slot). Returns ``(B, 1, Hq, dv)`` in q's dtype."""
    b, _, hq, d = q.shape
    hkv = keys[0].shape[1]
    scale = scaling(scale, d)
    if rotated and not rotates_keys(positional):
        raise ValueError("rotated keys need RoPE with fixed frequencies")
    far_slots = (None,) * len(keys) if far_slots is None else far_slots
    last = last_key_position(jnp.concatenate(k_positions, axis=1), positional)
    q32 = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, d)
    q_local = q32
    if isinstance(positional, Rotary):
        cos, sin = rope_cos_sin(q_positions, positional, last)  # (B, 1, n)
        q_local = rotate(q32, cos[:, None], sin[:, None], positional.layout)
    scores, attended = [], []
    for k, kp, n_far in zip(keys, k_positions, far_slots):
        if isinstance(positional, Rotary) and not rotated:
            cos, sin = rope_cos_sin(kp, positional, last)  # (B, S, n)
            k = rotate(k, cos[:, None], sin[:, None], positional.layout)
        s, a = _set_scores(q32, q_local, q_positions, k, kp, spec, positional, scale, last,
                           kp.shape[1] if n_far is None else min(n_far, kp.shape[1]))
        scores.append(s)
        attended.append(a)
    probs = masked_softmax(jnp.concatenate(scores, axis=-1))
    out, start = 0.0, 0
    for v, a in zip(values, attended):
        p = probs[..., start:start + v.shape[2]]
        start += v.shape[2]
        v = jnp.where(a[:, None, :, None], v, jnp.zeros((), v.dtype))  # a slot not attended adds an exact 0
        out = out + jnp.einsum("bhgk,bhkd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                               precision=matmul_precision(v.dtype))
    return out.reshape(b, 1, hq, values[0].shape[-1]).astype(q.dtype)


def _set_scores(q32, q_local, q_positions, k, kp, spec: AttentionSpec, positional: Positional, scale: Scaling,
                last, n_far: int) -> tuple[jax.Array, jax.Array]:
    """float32 scores ``(B, Hkv, Hg, S)`` (``-inf`` where not attended) and ``attended (B, S)`` of one
    key set ``k (B, Hkv, S, d)`` (rotated at its positions under RoPE); global keys only among the
    first ``n_far`` slots."""
    dtype = k.dtype
    scores = scale(jnp.einsum("bhgd,bhkd->bhgk", q_local.astype(dtype), k, preferred_element_type=jnp.float32,
                              precision=matmul_precision(dtype)))
    local, far = spec.classify(q_positions, kp)
    attended = local | far
    distance = (q_positions - kp).astype(jnp.float32)
    if spec.has_global and not spec.global_scores_equal_local and n_far > 0:
        far = far[:, :n_far]
        gq = spec.global_query_position(q_positions)
        gk = spec.global_key_position(kp[:, :n_far])
        if isinstance(positional, Rotary):
            cos, sin = rope_cos_sin(kp[:, :n_far], positional, last, extra=(gq - gk, global_positional(spec, positional)))
            q_far = rotate(q32[:, :, :, None], cos[:, None, None], sin[:, None, None], positional.layout)
            glob = scale(jnp.sum(q_far * k[:, :, None, :n_far].astype(jnp.float32), axis=-1))
            scores = scores.at[..., :n_far].set(jnp.where(far[:, None, None], glob, scores[..., :n_far]))
        global_distance = (gq - gk).astype(jnp.float32) / np.float32(spec.position_scale)
        distance = distance.at[:, :n_far].set(jnp.where(far, global_distance, distance[:, :n_far]))
    if isinstance(positional, Alibi):
        hkv, g = scores.shape[1:3]
        slopes = jnp.asarray(np.asarray(positional.slopes, np.float32).reshape(1, hkv, g, 1))
        scores = scores - slopes * distance[:, None, None, :]
    return jnp.where(attended[:, None, None, :], scores, NEG_INF), attended


def single_query_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    spec: AttentionSpec,
    positional: Positional,
    scale: Scaling,
) -> jax.Array:
    """`decode_attention` of ``q (B, 1, Hq, d)`` over un-rotated keys in `lminf_jax.attention`'s
    layout, ``k, v (B, S, Hkv, d|dv)`` at ``k_positions (B, S)``; inputs validated there."""
    return decode_attention(q, q_positions, (jnp.swapaxes(k, 1, 2),), (jnp.swapaxes(v, 1, 2),), (k_positions,),
                            spec=spec, positional=positional, scale=scale)
