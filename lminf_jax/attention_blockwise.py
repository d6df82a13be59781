"""Jitted blockwise attention: O(T * (G + L)) time, memory bounded by the block sizes.

A `lax.scan` walks over query blocks of ``block_q`` queries. Each block merges, with an
online softmax, (1) the G sink keys (global class only, gathered once per call) and
(2) the keys inside the block's window (local class), visited in chunks of ``block_k``
keys by an inner scan. No array larger than ``block_q x max(G, block_k)`` scores per
head exists at any time. Modes whose attended set is unbounded (vanilla,
distance_limit) scan every key chunk up to the block's last query, skipping chunks
in its future with `lax.cond`: flash-attention cost and memory, O(T^2) time.

Contract (what lets a block find its window by index): in each batch row, key slots
with a position >= 0 hold strictly increasing positions and come after every empty
(negative) slot; valid query positions are consecutive integers, after every empty
query slot. `lminf_jax.attention` checks this whenever the positions are concrete.
The dense reference has no such contract.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lminf_jax.online_softmax import (
    SoftmaxState,
    softmax_finish,
    softmax_init,
    softmax_merge,
    softmax_state_of,
    softmax_update,
)
from lminf_jax.scores import (
    Positional,
    Scaling,
    scaling,
    attends_non_finite,
    finite_values,
    masked_scores,
    matmul_precision,
    middle_scores,
    last_key_position,
    local_scores,
    prepare_keys,
    prepare_queries,
)
from lminf_jax.int32 import INT32_MAX
from lminf_jax.spec import AttentionSpec

def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_time(x: jax.Array, length: int, value) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def _rows(x: jax.Array, start: jax.Array, size: int, axis: int) -> jax.Array:
    """Per batch row ``b``, ``size`` entries of ``x[b]`` along its ``axis`` from ``start[b]`` (clamped to fit);
    a scalar ``start`` is every row's."""
    if jnp.ndim(start) == 0:
        return lax.dynamic_slice_in_dim(x, start, size, axis=axis + 1)
    return jax.vmap(lambda row, s: lax.dynamic_slice_in_dim(row, s, size, axis=axis))(x, start)


def _rows_first(x: jax.Array, start: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """`_rows` of ``x (B, T, ...)`` along T, and ``x`` with those rows written back (unchanged). Whatever
    reads the second comes after the gather, which XLA would otherwise be free to schedule last, keeping
    ``x`` alive for it after its other readers."""
    rows = _rows(x, start, size, axis=0)
    return rows, jax.vmap(lambda row, r, s: lax.dynamic_update_slice_in_dim(row, r, s, axis=0))(x, rows, start)


def _first_at_least(k_positions: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the index of the first key whose position is >= target[b]."""
    return jax.vmap(lambda row, t: jnp.searchsorted(row, t, side="left"))(k_positions, target).astype(jnp.int32)


def _keys_heads_first(k: jax.Array, k_positions: jax.Array, *, spec: AttentionSpec, positional: Positional,
                      last: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Keys ``(B, Tk, Hkv, d)`` rotated for local and for global scores, heads first ``(B, Hkv, Tk, d)``."""
    return tuple(x.transpose(0, 2, 1, 3) for x in prepare_keys(k, k_positions, spec, positional, last))


def _values_heads_first(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Values ``(B, Tk, Hkv, dv)`` cleaned by `finite_values` and their non-finite rows, heads first:
    ``(B, Hkv, Tk, dv)`` and ``(B, Hkv, Tk)``."""
    v, bad = finite_values(v)
    return v.transpose(0, 2, 1, 3), bad.transpose(0, 2, 1)


def _weighted(p: jax.Array, v: jax.Array) -> jax.Array:
    """``p (B, Hkv, Hg, bq, n) @ v (B, Hkv, n, dv)`` in float32."""
    return jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                      precision=matmul_precision(v.dtype))


def _fold(state: SoftmaxState, scores: jax.Array, attended: jax.Array, v: jax.Array, bad: jax.Array) -> SoftmaxState:
    """Fold float32 ``scores (B, Hkv, Hg, bq, n)`` of the keys ``attended (B, 1, 1, bq, n)`` into the
    state, against finite ``v (B, Hkv, n, dv)`` whose rows ``bad (B, Hkv, n)`` were not (`finite_values`)."""
    poisoned = lax.cond(  # rare: skip the pass over every pair
        jnp.any(bad), lambda: jnp.broadcast_to(attends_non_finite(attended, bad, heads_first=True), state.m.shape),
        lambda: jnp.zeros(state.m.shape, bool))
    return softmax_update(state, scores, functools.partial(_weighted, v=v), poisoned)


@functools.partial(jax.jit, static_argnames=("spec", "positional", "scale", "block_q", "block_k"))
def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    spec: AttentionSpec,
    positional: Positional,
    scale: float | Scaling,
    block_q: int = 512,
    block_k: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """Blockwise attention (no top-k); inputs validated by `lminf_jax.attention`.

    Returns the output ``(B, Tq, Hq, dv)`` in q's dtype and the float32 log-sum-exp of
    the scores ``(B, Tq, Hq)`` (``-inf`` where nothing is attended), so that results
    over disjoint key sets can be merged exactly.
    """
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g, dv = hq // hkv, v.shape[-1]
    scale = scaling(scale, d)
    bq, bk = min(block_q, tq), min(block_k, tk)
    nq, tk_pad = -(-tq // bq), _round_up(tk, bk)

    # keys are rotated once, queries one block at a time (no rotated copy of every query, one per class),
    # laid out heads first: each tile's products are then plain batched matrix products over contiguous
    # rows (B, Hkv[, Hg], T, d). Keys are rotated for the global class only where they are scored so: every
    # key when the window's chunks score it, else the sinks alone.
    span_all = spec.window is None or not spec.global_keys_bounded
    window_global = span_all and spec.has_global
    qpos = _pad_time(q_positions, nq * bq, -1)
    last = last_key_position(k_positions, positional)
    q_pad = _pad_time(q.reshape(b, tq, hkv, g, d), nq * bq, 0)
    k_pad, v_pad, kpos = _pad_time(k, tk_pad, 0), _pad_time(v, tk_pad, 0), _pad_time(k_positions, tk_pad, -1)
    keys = functools.partial(_keys_heads_first, spec=spec, positional=positional, last=last)
    n_sink = min(spec.sinks, tk_pad)
    if n_sink:
        first_valid = _first_at_least(k_positions, jnp.zeros((b,), jnp.int32))
        sink_positions = _rows(kpos, first_valid, n_sink, axis=0)
        # taken before every key is rotated (XLA cannot delay it): the inputs die then, as without sinks
        sink_keys, k_pad = _rows_first(k_pad, first_valid, n_sink)
    k_local, k_global = keys(k_pad, kpos)
    v_clean, bad = _values_heads_first(v_pad)
    if not window_global:  # the chunks score local keys only
        k_global = k_local
    sinks = None
    if n_sink:
        sinks = (keys(sink_keys, sink_positions)[1], *(_rows(x, first_valid, n_sink, axis=1) for x in (v_clean, bad)),
                 sink_positions)
    score = functools.partial(masked_scores, spec=spec, positional=positional, scale=scale, heads_first=True)

    width = tk_pad if span_all else min(_round_up(bq + spec.window - 1, bk), tk_pad)
    window_chunks = width < tk_pad

    def query_block(_, i):
        qp = lax.dynamic_slice_in_dim(qpos, i * bq, bq, axis=1)
        queries = prepare_queries(lax.dynamic_slice_in_dim(q_pad, i * bq, bq, axis=1), qp, spec, positional, last)
        ql, qg = (x.transpose(0, 2, 3, 1, 4) for x in queries)
        state = softmax_init((b, hkv, g, bq), dv)
        if sinks is not None:
            sk, sv, sb, sp = sinks
            s, attended = score(ql, qg, sk, sk, qp, sp, include_local=False)
            state = _fold(state, s, attended, sv, sb)

        start = jnp.int32(0)  # per row (B,) under a window: its first key chunk, read in place (no copy)
        if window_chunks:
            pmin = jnp.min(jnp.where(qp >= 0, qp, INT32_MAX), axis=1)
            first = _first_at_least(k_positions, jnp.maximum(pmin - (spec.window - 1), 0))
            start = jnp.minimum(first, tk_pad - width)
        valid_q = qp >= 0
        q_lo, q_hi = jnp.min(jnp.where(valid_q, qp, INT32_MAX)), jnp.max(qp)
        every_q_valid = jnp.all(valid_q)

        def key_chunk(state, c):
            kl, kg, vc, kb = (_rows(x, start + c * bk, bk, axis=1) for x in (k_local, k_global, v_clean, bad))
            kp = _rows(kpos, start + c * bk, bk, axis=0)
            k_lo, k_hi = jnp.min(jnp.where(kp >= 0, kp, INT32_MAX)), jnp.max(kp)
            # from the position ranges alone (keys increase within a row): may any pair be attended,
            # and is every pair local (then no mask is needed)?
            reachable = k_hi >= 0
            if not window_global and spec.window is not None:
                reachable &= k_hi > q_lo - spec.window
            maybe_attended = reachable & (k_lo <= q_hi)
            all_local = every_q_valid & (jnp.min(kp) >= 0) & (k_hi <= q_lo)
            if spec.window is not None:
                all_local &= q_hi - k_lo < spec.window

            def masked(st):
                s, attended = score(ql, qg, kl, kg, qp, kp, include_global=window_global)
                return _fold(st, s, attended, vc, kb)

            def unmasked(st):
                s = local_scores(ql, kl, qp, kp, positional=positional, scale=scale, heads_first=True)
                poisoned = jnp.broadcast_to(jnp.any(kb, axis=2)[:, :, None, None], st.m.shape)
                return softmax_update(st, s, functools.partial(_weighted, v=vc), poisoned)

            branch = jnp.where(all_local, 2, jnp.where(maybe_attended, 1, 0))
            return lax.switch(branch, (lambda st: st, masked, unmasked), state), None

        state, _ = lax.scan(key_chunk, state, jnp.arange(width // bk))
        out, lse = softmax_finish(state)
        return None, (out.astype(q.dtype), lse)

    _, (out, lse) = lax.scan(query_block, None, jnp.arange(nq))  # (nq, B, Hkv, Hg, bq[, dv])
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, hq, dv)[:, :tq]
    lse = lse.transpose(1, 0, 4, 2, 3).reshape(b, nq * bq, hq)[:, :tq]
    return out, lse


@functools.partial(jax.jit, static_argnames=("spec", "positional", "scale"))
def merge_top_k(
    out: jax.Array,
    lse: jax.Array,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    active: jax.Array,
    *,
    spec: AttentionSpec,
    positional: Positional,
    scale: Scaling,
) -> jax.Array:
    """Add the top-k middle keys to the last query slot of each row (where ``active``).

    ``out``/``lse`` come from `blockwise_attention`; the merge is exact because both
    parts carry their log-sum-exp.
    """
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    q_last = q[:, -1:].reshape(b, 1, hkv, g, d)
    s, middle = middle_scores(q_last, k, q_positions[:, -1:], k_positions, spec=spec, positional=positional,
                              scale=scale)
    top = spec.selection.choose(s[..., 0, :], middle[..., 0, :])  # (B, Hkv, Hg, n)
    v_heads = jnp.swapaxes(v, 1, 2).astype(jnp.float32)  # (B, Hkv, Tk, dv)
    chosen_v = jnp.take_along_axis(v_heads[:, :, None], top.index[..., None], axis=3)  # (B, Hkv, Hg, n, dv)
    chosen_v = jnp.where(top.valid[..., None], chosen_v, 0.0)  # no middle key: its value stays out

    chosen = softmax_update(softmax_init((b, hkv, g), v.shape[-1]), top.scores,
                            lambda p: jnp.einsum("bhgn,bhgnd->bhgd", p, chosen_v, precision=lax.Precision.HIGHEST))
    finished = softmax_state_of(out[:, -1].reshape(b, hkv, g, -1), lse[:, -1].reshape(b, hkv, g))
    merged, _ = softmax_finish(softmax_merge(finished, chosen))
    merged = jnp.where(active, merged.reshape(b, hq, -1), out[:, -1].astype(jnp.float32))
    return out.at[:, -1].set(merged.astype(out.dtype))
