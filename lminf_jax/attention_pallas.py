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

`lambda_attention` is the entry point (it returns the log-sum-exp too); `lminf_jax.attention` calls it for
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
from lminf_jax.online_softmax import softmax_finish, softmax_init, softmax_update
from lminf_jax.scores import (
    NEG_INF, Positional, Scaling, global_distance, scaling, last_key_position, prepare_keys, prepare_queries,
)
from lminf_jax.spec import AttentionSpec

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
    scale: float | Scaling,
    block_q: int = 128,
    block_k: int = 64,
    interpret: bool = False,
) -> jax.Array:
    """Self-attention ``q (B, T, Hq, d)`` over ``k, v (B, T, Hkv, d|dv)``, every row at positions
    0..T-1, under a bounded ``spec`` (`AttentionSpec.bounded`). Returns the output ``(B, T, Hq, dv)`` in q's
    dtype and the float32 log-sum-exp of each row's scores ``(B, T, Hq)`` (``-inf``: nothing attended),
    so that results over other keys can be merged exactly (`lminf_jax.online_softmax`).
    ``interpret=False`` compiles with Triton (GPU)."""
    if not spec.bounded:
        raise ValueError(f"the Pallas kernel serves bounded specs without top-k; got {spec.describe()}")
    b, t, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    group = hq // hkv
    scale = scaling(scale, d)
    if not interpret:
        check_triton_shapes(d, dv, block_q, block_k)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    last = last_key_position(positions, positional)
    q_local, q_global = (x.reshape(b, t, hq, d).astype(q.dtype)
                         for x in prepare_queries(q.reshape(b, t, hkv, group, d), positions, spec, positional, last))
    k_local, k_global = (x.astype(k.dtype) for x in prepare_keys(k, positions, spec, positional, last))

    padded = -(-t // max(block_q, block_k)) * max(block_q, block_k)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0)))  # noqa: E731
    sinks = min(spec.sinks, t)  # keys beyond T do not exist
    sink_slots = max(16, 1 << max(sinks - 1, 0).bit_length())  # a power-of-two tile holding the G sinks
    to_slots = lambda x: jnp.pad(x[:, :sinks], ((0, 0), (0, sink_slots - sinks), (0, 0), (0, 0)))  # noqa: E731
    slopes = np.asarray(positional.slopes if isinstance(positional, Alibi) else np.zeros(hq), np.float32)

    kernel = functools.partial(_kernel, spec=spec, scale=scale, length=t, sinks=sinks, block_q=block_q,
                               block_k=block_k, alibi=isinstance(positional, Alibi))
    q_block = pl.BlockSpec((None, block_q, None, d), lambda bi, h, i: (bi, i, h, 0))
    whole = lambda width, n: pl.BlockSpec((None, n, None, width), lambda bi, h, i: (bi, 0, h // group, 0))  # noqa: E731
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, hq, padded // block_q),
        in_specs=[q_block, q_block, whole(d, padded), whole(dv, padded), whole(d, sink_slots), whole(dv, sink_slots),
                  pl.BlockSpec((hq,), lambda bi, h, i: (0,))],
        out_specs=[pl.BlockSpec((None, block_q, None, dv), lambda bi, h, i: (bi, i, h, 0)),
                   pl.BlockSpec((None, None, block_q), lambda bi, h, i: (bi, h, i))],
        out_shape=[jax.ShapeDtypeStruct((b, padded, hq, dv), q.dtype),
                   jax.ShapeDtypeStruct((b, hq, padded), jnp.float32)],
        interpret=interpret,
        compiler_params=compiler_params,
    )(pad(q_local), pad(q_global), pad(k_local), pad(v), to_slots(k_global), to_slots(v), jnp.asarray(slopes))
    return out[:, :t], lse[:, :, :t].swapaxes(1, 2)


#: Float32 tiles multiply in float32 (Triton's default for a float32 dot is TF32, about 1e-3 relative
#: error); bfloat16 tiles are unaffected and use the matrix units as before.
_EXACT = lax.Precision.HIGHEST


def _kernel(q_local_ref, q_global_ref, k_ref, v_ref, sink_k_ref, sink_v_ref, slopes_ref, out_ref, lse_ref, *,
            spec: AttentionSpec, scale: Scaling, length: int, sinks: int, block_q: int, block_k: int, alibi: bool):
    """One block of queries of one head: the sink block, then the window's key blocks. Which keys a
    query attends, and where a global key is scored, come from the spec (`AttentionSpec.classify`,
    `global_distance` and the queries and keys `prepare_queries` / `prepare_keys` rotated), as in every
    other path."""
    head, first = pl.program_id(1), pl.program_id(2) * block_q
    q_pos = first + lax.iota(jnp.int32, block_q)
    slope = slopes_ref[head] if alibi else None
    state = softmax_init((block_q,), out_ref.shape[-1], poisoned_dtype=jnp.float32)  # Triton reduces floats

    def fold(state, q, keys, values, attended, distance):
        s = scale(lax.dot_general(q, keys, (((1,), (1,)), ((), ())), precision=_EXACT,
                                  preferred_element_type=jnp.float32))
        if alibi:
            s = s - slope * distance.astype(jnp.float32)
        s = jnp.where(attended, s, NEG_INF)
        # non-finite values are zeroed (no 0 * nan at keys a row does not attend); rows attending one are NaN
        finite = jnp.abs(values.astype(jnp.float32)) < jnp.inf
        bad = jnp.max(jnp.where(finite, 0.0, 1.0), axis=1)
        values = jnp.where(finite, values, jnp.zeros((), values.dtype))
        return softmax_update(
            state, s,
            lambda p: lax.dot_general(p.astype(values.dtype), values, (((1,), (0,)), ((), ())), precision=_EXACT,
                                      preferred_element_type=jnp.float32),
            jnp.max(jnp.where(attended, bad[None, :], 0.0), axis=1))

    if sinks:
        k_pos = lax.iota(jnp.int32, sink_k_ref.shape[0])
        _, far = spec.classify(q_pos[:, None], k_pos[None, :])
        state = fold(state, q_global_ref[...], sink_k_ref[...], sink_v_ref[...],
                     far & (k_pos[None, :] < sinks) & (q_pos[:, None] < length),
                     global_distance(spec, q_pos[:, None], k_pos[None, :]))

    q_local = q_local_ref[...]

    def window_block(j, state):
        start = pl.multiple_of(j * block_k, block_k)
        k_pos = start + lax.iota(jnp.int32, block_k)
        local, _ = spec.classify(q_pos[:, None], k_pos[None, :])
        return fold(state, q_local, k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :],
                    local & (k_pos[None, :] < length), q_pos[:, None] - k_pos[None, :])

    lo = jnp.maximum(first - (spec.window - 1), 0) // block_k
    hi = (first + block_q - 1) // block_k + 1
    out, lse = softmax_finish(lax.fori_loop(lo, hi, window_block, state))
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse
