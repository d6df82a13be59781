"""Context-parallel Λ-attention: the sequence split over the devices of one mesh axis.

LM-Infinite's locality makes sequence parallelism cheap: a query needs only the keys of the last L
positions and the G sinks. With `context_parallel_attention` each device holds one contiguous chunk
of C tokens (queries, keys, values, positions) and receives

* the halo: the ``L - 1`` keys before its chunk, from its ``h = ceil((L - 1) / C)`` left neighbours
  (``h`` ``ppermute`` hops: whole chunks, then only the tail the farthest hop needs), and
* the sinks: the first G keys of the sequence, from the device holding them (a ``psum`` of a
  G-key block that only the first device fills),

then runs the blockwise attention of `lminf_jax.attention` on [sinks, halo, own chunk]. Traffic
per device is L - 1 + G keys and values, whatever the total length; nothing gathers the sequence.

A sequence whose length is not a multiple of the device count is padded at its end with zero
tokens at the following positions: causal attention never lets a real query see them, and their
outputs are dropped (or kept, with ``keep_padding``, for a pipeline that stays sharded).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from lminf_jax.alibi import Alibi
from lminf_jax.attention import attention
from lminf_jax.rope import Rotary
from lminf_jax.scores import Positional, Scaling
from lminf_jax.spec import AttentionSpec

__all__ = ["context_parallel_attention"]


def context_parallel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    axis: str,
    spec: AttentionSpec,
    positional: Positional = None,
    scale: float | Scaling | None = None,
    block_q: int = 512,
    block_k: int = 512,
    keep_padding: bool = False,
    batch_axis: str | None = None,
    head_axis: str | None = None,
) -> jax.Array:
    """Self-attention of ``q (B, T, Hq, d)`` over ``k, v (B, T, Hkv, d|dv)`` at positions 0..T-1
    under a bounded `spec` (a window L and sinks only among the first G positions: lm_infinite,
    lambda_mask, sliding_window, streaming_llm; no top-k), the time axis split over mesh axis
    `axis`. Returns ``(B, T, Hq, dv)`` equal to `lminf_jax.attention` on one device.

    ``keep_padding``: when T is not a multiple of the device count, return the padded
    ``(B, n * ceil(T / n), Hq, dv)`` (real tokens first) still split over the devices. Trimming it
    inside the computation makes XLA gather the whole output to one layout; a sharded pipeline
    keeps the padding and trims its final per-token results instead.

    ``batch_axis`` / ``head_axis``: other mesh axes the batch and the heads stay split over
    (data and tensor parallelism alongside); heads only with RoPE or no positional encoding (ALiBi
    slopes belong to fixed heads), and only when both head counts divide the axis."""
    if not spec.bounded:
        raise ValueError(f"context parallelism needs a bounded window and sinks, without top-k; "
                         f"{spec.describe()} attends unboundedly many keys")
    if isinstance(positional, Rotary) and positional.length_rule is not None:
        raise ValueError("context parallelism does not split RoPE that follows the sequence length (dynamic NTK): "
                         "every device would need the whole sequence's last position; run it on one device")
    for name, value in (("axis", axis), ("batch_axis", batch_axis), ("head_axis", head_axis)):
        if value is not None and value not in mesh.axis_names:
            raise ValueError(f"{name}: mesh has no axis {value!r}; its axes are {mesh.axis_names}")
    if head_axis is not None:
        if isinstance(positional, Alibi):
            raise ValueError("head_axis: ALiBi slopes belong to fixed heads; keep heads whole (head_axis=None)")
        if q.shape[2] % mesh.shape[head_axis] or k.shape[2] % mesh.shape[head_axis]:
            raise ValueError(f"head_axis: {q.shape[2]} query / {k.shape[2]} key heads do not divide over "
                             f"{mesh.shape[head_axis]} devices")
    t = q.shape[1]
    n = mesh.shape[axis]
    chunk = math.ceil(t / n)
    pad = n * chunk - t
    positions = jnp.arange(t + pad, dtype=jnp.int32)
    qp, kp, vp = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    needed = min(spec.window - 1, (n - 1) * chunk)  # keys before a chunk that its queries can see
    hops = math.ceil(needed / chunk)
    last = needed - (hops - 1) * chunk  # tokens the farthest hop carries
    g = min(spec.sinks, n * chunk)  # sinks beyond the sequence do not exist

    def local(q_c, k_c, v_c, pos_c):
        halo_k, halo_v, halo_p = [], [], []
        cur = (k_c, v_c, pos_c + 1)  # positions shifted by one: what no device sent arrives as -1
        perm = [(i, i + 1) for i in range(n - 1)]
        for hop in range(1, hops + 1):
            send = cur if hop < hops else tuple(x[:, chunk - last:] if x.ndim > 1 else x[chunk - last:] for x in cur)
            cur = tuple(jax.lax.ppermute(x, axis, perm) for x in send)
            halo_k.insert(0, cur[0])
            halo_v.insert(0, cur[1])
            halo_p.insert(0, cur[2] - 1)
        keys, values, key_pos = [k_c], [v_c], [pos_c]
        if halo_k:
            keys, values, key_pos = halo_k + keys, halo_v + values, halo_p + key_pos
        if g:
            sink_k, sink_v, sink_p = _sinks(k_c, v_c, pos_c, g, axis)
            known = jnp.concatenate(key_pos)
            first = jnp.min(jnp.where(known >= 0, known, jnp.iinfo(jnp.int32).max))
            sink_p = jnp.where(sink_p < first, sink_p, -1)  # sinks already among the keys are not repeated
            order = jnp.argsort(sink_p, stable=True)  # empty slots first, as the blockwise path needs
            keys.insert(0, jnp.take(sink_k, order, axis=1))
            values.insert(0, jnp.take(sink_v, order, axis=1))
            key_pos.insert(0, jnp.take(sink_p, order))
        return attention(q_c, jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1), q_positions=pos_c,
                         k_positions=jnp.concatenate(key_pos), spec=spec, positional=positional, scale=scale,
                         implementation="blockwise", block_q=block_q, block_k=block_k)

    seq = P(batch_axis, axis, head_axis, None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, P(axis)), out_specs=seq,
                        check_vma=False)(qp, kp, vp, positions)
    return out if keep_padding or not pad else out[:, :t]


def _sinks(k_c: jax.Array, v_c: jax.Array, pos_c: jax.Array, g: int, axis: str):
    """The keys, values and positions of positions 0..g-1, from whichever device holds them (a
    ``psum`` of g-key blocks; a slot nobody holds keeps position -1)."""
    c = pos_c.shape[0]
    want = jnp.arange(g, dtype=jnp.int32)
    slot = jnp.clip(jnp.searchsorted(pos_c, want), 0, c - 1)  # positions are sorted within a chunk
    held = jnp.take(pos_c, slot) == want
    mine_k = jnp.where(held[None, :, None, None], jnp.take(k_c, slot, axis=1), 0)
    mine_v = jnp.where(held[None, :, None, None], jnp.take(v_c, slot, axis=1), 0)
    k_s = jax.lax.psum(mine_k.astype(jnp.float32), axis).astype(k_c.dtype)
    v_s = jax.lax.psum(mine_v.astype(jnp.float32), axis).astype(v_c.dtype)
    found = jax.lax.psum(held.astype(jnp.int32), axis) > 0
    return k_s, v_s, jnp.where(found, want, -1)
