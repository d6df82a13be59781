"""Fused Λ-attention as one Pallas kernel (Triton backend on GPU; interpreted elsewhere).

For self-attention of a whole sequence (queries and keys at positions 0..T-1 in every row) under
a bounded spec, each program instance takes one block of ``block_q`` queries of one head and
runs an online softmax over

1. the sink block: the first G keys, in the global class only (``q - k >= L``), scored against
   the query prepared for global keys (RoPE: rotated at ``spec.global_query_position``, e.g. D,
   against un-rotated sinks; ALiBi: the bias of distance ``gq - gk``), then
2. only the key blocks that intersect the block's window (``q - L < k <= q``), scored in the
   local class,

with float32 scores, softmax and accumulators, inputs in their own dtype (bf16 on the matrix
units), GQA by mapping each query head to its key/value head. Work is O(T (G + L)) and nothing
larger than a ``block_q x block_k`` tile of scores exists. RoPE rotations are applied before
the kernel (elementwise XLA, from integer positions), so the kernel itself is positional-free
except for ALiBi's bias. Non-finite values are zeroed in each tile before the product and a row
that attends one is NaN, so a NaN reaches only the rows that attend it.

`lambda_attention` is the entry point; `lminf_jax.attention` calls it for
``implementation="pallas"``. The Triton backend needs power-of-two blocks of at least 16 and a
head dimension that is a power of two of at least 16 (checked); ``interpret=True`` runs the same
kernel body through XLA on any backend (tests use it on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from lminf_jax.alibi import Alibi
from lminf_jax.scores import NEG_INF, Positional, prepare_keys, prepare_queries
from lminf_jax.spec import AttentionSpec

#: Spec kinds the kernel serves: a window plus at most G sinks, no top-k.
KERNEL_KINDS = ("lm_infinite", "lambda_mask", "sliding_window", "streaming_llm")


def kernel_supports(spec: AttentionSpec) -> bool:
    """Whether ``spec`` attends a bounded set the kernel computes (window and sinks, no top-k)."""
    return spec.kind in KERNEL_KINDS and spec.top_k is None and spec.window is not None


def check_triton_shapes(head_dim: int, value_dim: int, block_q: int, block_k: int) -> None:
    """Raise a ValueError naming what the Triton backend cannot tile."""
    for name, n in (("head_dim", head_dim), ("value_dim", value_dim), ("block_q", block_q), ("block_k", block_k)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"the Pallas GPU kernel needs {name} to be a power of two >= 16, got {n} "
                             "(use implementation='blockwise')")


@functools.partial(jax.jit, static_argnames=("spec", "positional", "scale", "block_q", "block_k", "interpret"))
def lambda_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    spec: AttentionSpec,
    positional: Positional,
    scale: float,
    block_q: int = 128,
    block_k: int = 64,
    interpret: bool = False,
) -> jax.Array:
    """Self-attention ``q (B, T, Hq, d)`` over ``k, v (B, T, Hkv, d|dv)``, every row at positions
    0..T-1, under a bounded ``spec`` (`kernel_supports`). Returns ``(B, T, Hq, dv)`` in q's dtype."""
    if not kernel_supports(spec):
        raise ValueError(f"the Pallas kernel serves bounded specs without top-k; got {spec.describe()}")
    b, t, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    group = hq // hkv
    if not interpret:
        check_triton_shapes(d, dv, block_q, block_k)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q_local, q_global = (x.reshape(b, t, hq, d).astype(q.dtype)
                         for x in prepare_queries(q.reshape(b, t, hkv, group, d), positions, spec, positional))
    k_local, k_global = (x.astype(k.dtype) for x in prepare_keys(k, positions, spec, positional))

    padded = -(-t // max(block_q, block_k)) * max(block_q, block_k)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0)))  # noqa: E731
    sinks = min(spec.global_branch, t) if spec.has_global else 0  # keys beyond T do not exist
    sink_slots = max(16, 1 << max(sinks - 1, 0).bit_length())  # a power-of-two tile holding the G sinks
    to_slots = lambda x: jnp.pad(x[:, :sinks], ((0, 0), (0, sink_slots - sinks), (0, 0), (0, 0)))  # noqa: E731
    slopes = np.asarray(positional.slopes if isinstance(positional, Alibi) else np.zeros(hq), np.float32)

    kernel = functools.partial(_kernel, spec=spec, scale=scale, length=t, sinks=sinks, block_q=block_q,
                               block_k=block_k, alibi=isinstance(positional, Alibi))
    q_block = pl.BlockSpec((None, block_q, None, d), lambda bi, h, i: (bi, i, h, 0))
    whole = lambda width, n: pl.BlockSpec((None, n, None, width), lambda bi, h, i: (bi, 0, h // group, 0))  # noqa: E731
    compiler_params = None
    if not interpret and jax.default_backend() == "gpu":
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)
    out = pl.pallas_call(
        kernel,
        grid=(b, hq, padded // block_q),
        in_specs=[q_block, q_block, whole(d, padded), whole(dv, padded), whole(d, sink_slots), whole(dv, sink_slots),
                  pl.BlockSpec((hq,), lambda bi, h, i: (0,))],
        out_specs=pl.BlockSpec((None, block_q, None, dv), lambda bi, h, i: (bi, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, padded, hq, dv), q.dtype),
        interpret=interpret,
        compiler_params=compiler_params,
    )(pad(q_local), pad(q_global), pad(k_local), pad(v), to_slots(k_global), to_slots(v), jnp.asarray(slopes))
    return out[:, :t]


def _kernel(q_local_ref, q_global_ref, k_ref, v_ref, sink_k_ref, sink_v_ref, slopes_ref, out_ref, *,
            spec: AttentionSpec, scale: float, length: int, sinks: int, block_q: int, block_k: int, alibi: bool):
    """One block of queries of one head: the sink block, then the window's key blocks."""
    head, first = pl.program_id(1), pl.program_id(2) * block_q
    q_pos = first + lax.iota(jnp.int32, block_q)
    slope = slopes_ref[head] if alibi else None
    window = spec.window
    state = (jnp.full((block_q,), NEG_INF, jnp.float32), jnp.zeros((block_q,), jnp.float32),
             jnp.zeros((block_q, out_ref.shape[-1]), jnp.float32), jnp.zeros((block_q,), jnp.float32))

    def fold(state, q, keys, values, k_pos, attended, distance):
        m, total, acc, poisoned = state
        s = lax.dot_general(q, keys, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        if alibi:
            s = s - slope * distance.astype(jnp.float32)
        s = jnp.where(attended, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        correction = jnp.exp(m - m_safe)
        # non-finite values are zeroed (no 0 * nan at keys a row does not attend); rows attending one are NaN
        finite = jnp.abs(values.astype(jnp.float32)) < jnp.inf
        bad = jnp.max(jnp.where(finite, 0.0, 1.0), axis=1)
        poisoned = jnp.maximum(poisoned, jnp.max(jnp.where(attended, bad[None, :], 0.0), axis=1))
        values = jnp.where(finite, values, jnp.zeros((), values.dtype))
        pv = lax.dot_general(p.astype(values.dtype), values, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return m_new, correction * total + jnp.sum(p, axis=1), correction[:, None] * acc + pv, poisoned

    if sinks:
        k_pos = lax.iota(jnp.int32, sink_k_ref.shape[0])
        far = (k_pos[None, :] < sinks) & (q_pos[:, None] - k_pos[None, :] >= window) & (q_pos[:, None] < length)
        gq = spec.global_query_position(q_pos)
        gk = k_pos if spec.keys_rotated_in_global else jnp.zeros_like(k_pos)
        state = fold(state, q_global_ref[...], sink_k_ref[...], sink_v_ref[...], k_pos, far,
                     gq[:, None] - gk[None, :])

    q_local = q_local_ref[...]

    def window_block(j, state):
        start = pl.multiple_of(j * block_k, block_k)
        k_pos = start + lax.iota(jnp.int32, block_k)
        delta = q_pos[:, None] - k_pos[None, :]
        local = (delta >= 0) & (delta < window) & (k_pos[None, :] < length)
        return fold(state, q_local, k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :], k_pos, local,
                    delta)

    lo = jnp.maximum(first - (window - 1), 0) // block_k
    hi = (first + block_q - 1) // block_k + 1
    m, total, acc, poisoned = lax.fori_loop(lo, hi, window_block, state)
    out = jnp.where(poisoned[:, None] > 0, jnp.nan, acc / jnp.where(total > 0, total, 1.0)[:, None])
    out_ref[...] = out.astype(out_ref.dtype)
