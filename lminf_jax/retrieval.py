"""What the retrieval methods of `lminf_jax.spec` compute: exact and jitted, one batch row at a
time (`jax.vmap`), for a whole sequence or for new tokens over a full cache (`retrieval_attention`).

Every function works on **position-indexed buffers**: slot ``p`` of a row holds the token at position
``p`` (a full cache is laid out so, and a whole sequence is scattered so), so chunks, blocks and windows
are found by position whatever the padding of each row, and a call's new tokens are written into the
buffers before they attend. Keys and queries are kept un-rotated: both methods rotate them per query.
Scores and softmax are float32; the matmuls run at full float32 precision for float32 inputs.

Per layer, a method keeps state beside the cache (`initial_state`, carried by `lminf_jax.cache.KVCache`):

* LongHeads: every token's raw query (a chunk's representation needs its queries, and a chunk may
  complete over several calls) and each chunk's representation, recomputed only for the chunks a call
  touches; a decoding step costs one chunk's attention plus ``chunks x d`` scoring per head.
* InfLLM: the local attention mass each key has received (what a block's representatives are chosen
  by) and each formed block's representation, computed once, when the step that forms it ends (its mass
  is final then). A step scores the formed blocks (``blocks x d`` per head) and attends
  ``n_local + n_init + blocks_retrieved x block_size`` keys at most, plus a tail of fewer than
  ``block_size + step_size``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lminf_jax.alibi import Alibi
from lminf_jax.online_softmax import NEG_INF
from lminf_jax.spec import InfLLM, LongHeads, RetrievalSpec
from lminf_jax.rope import Rotary, rope_cos_sin, rotate
from lminf_jax.scores import Positional, Scaling, masked_softmax

#: Elements of the largest per-query-block gather (LongHeads' chunks of keys): about 64 MiB of float32.
GATHER_ELEMENTS = 1 << 24
_HIGHEST = lax.Precision.HIGHEST


#: The state entries that hold one row per slot (LongHeads' queries): a call returns its new tokens' rows,
#: written at their slots (`lminf_jax.cache.KVCache.written`), not the whole array.
SLOT_STATE = frozenset({"queries"})


def initial_state(spec: RetrievalSpec, batch: int, query_heads: int, slots: int, head_dim: int, dtype
                  ) -> dict[str, jax.Array]:
    """One layer's empty state for ``spec`` over a buffer of ``slots`` positions (see the module docstring)."""
    if isinstance(spec, LongHeads):
        chunks = -(-slots // spec.chunk_size)
        return {"queries": jnp.zeros((batch, query_heads, slots, head_dim), dtype),
                "representations": jnp.zeros((batch, query_heads, chunks, head_dim), jnp.float32)}
    if isinstance(spec, InfLLM):
        return {"mass": jnp.zeros((batch, query_heads, slots), jnp.float32),
                "representations": jnp.zeros((batch, query_heads, _block_count(spec, slots), head_dim), jnp.float32)}
    raise ValueError(f"{spec.describe()} is not a retrieval method")


def check_positional(spec: RetrievalSpec, positional: Positional) -> None:
    """A ValueError when ``positional`` cannot serve ``spec``: both rotate keys per query, which needs
    fixed RoPE frequencies (not frequencies that follow the length, such as dynamic NTK)."""
    if isinstance(positional, Rotary) and positional.length_rule is not None:
        raise ValueError(f"{spec.describe()} re-positions keys per query: it needs RoPE with fixed frequencies, "
                         "not frequencies that follow the sequence length (dynamic NTK)")


def retrieval_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
    buffer_keys: jax.Array, buffer_values: jax.Array, state: dict[str, jax.Array], *,
    spec: RetrievalSpec, positional: Positional, scale: Scaling,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """New tokens' attention under a retrieval method, and the layer's state after them.

    ``q (B, T, Hq, d)``, ``k``/``v (B, T, Hkv, d|dv)`` un-rotated at ``positions (B, T)`` (negative:
    padding; the valid ones consecutive and continuing the buffers); ``buffer_keys``/``buffer_values``
    ``(B, Hkv, S, d|dv)`` the earlier tokens, un-rotated, slot = position (the new tokens are read beside
    them, not written into them); ``state`` from `initial_state` (or the previous call). Returns ``(B, T,
    Hq, dv)`` in q's dtype (padding rows zero) and the state after the call: each entry of `SLOT_STATE` as the
    new tokens' rows ``(B, T, ...)``, to be written at their slots as keys are, every other entry whole.
    """
    check_positional(spec, positional)
    hq, hkv = q.shape[2], k.shape[2]
    heads = np.arange(hq) // (hq // hkv)  # each query head's key/value head
    slopes = None if not isinstance(positional, Alibi) else jnp.asarray(positional.slopes, jnp.float32)
    rotary = positional if isinstance(positional, Rotary) else None
    settings = dict(spec=spec, rotary=rotary, slopes=slopes, scale=scale, heads=heads)
    q32 = q.astype(jnp.float32)
    if isinstance(spec, LongHeads):
        row = lambda *xs: _longheads_row(*xs, **settings)  # noqa: E731
        out, reps = jax.vmap(row)(q32, positions, state["queries"], buffer_keys, buffer_values, k, v,
                                  state["representations"])
        new_state = {"queries": q.astype(state["queries"].dtype), "representations": reps}
    elif isinstance(spec, InfLLM):
        row = lambda *xs: _infllm_row(*xs, **settings)  # noqa: E731
        out, mass, reps = jax.vmap(row)(q32, positions, buffer_keys, buffer_values, k, v, state["mass"],
                                        state["representations"])
        new_state = {"mass": mass, "representations": reps}
    else:
        raise ValueError(f"{spec.describe()} is not a retrieval method")
    out = jnp.where((positions >= 0)[:, :, None, None], out, 0.0)
    return out.astype(q.dtype), new_state


def sequence_retrieval_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, *,
                                 spec: RetrievalSpec, positional: Positional, scale: Scaling) -> jax.Array:
    """`retrieval_attention` of a whole sequence over itself (empty buffers sized by its length): positions
    ``(B, T)``, each row's valid ones ``0..n-1`` after its padding."""
    b, t, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    empty = lambda width: jnp.zeros((b, hkv, t, width), k.dtype)  # noqa: E731
    state = initial_state(spec, b, hq, t, d, q.dtype)
    return retrieval_attention(q, k, v, positions, empty(d), empty(dv), state, spec=spec, positional=positional,
                               scale=scale)[0]


# ----- helpers ----------------------------------------------------------------------------------------------


class _Overlay(NamedTuple):
    """One row's buffer ``(H, S, e)`` (slot = position) with the call's new tokens ``(T, H, e)`` read in
    place of slots ``first..`` (the valid ones start at index ``first_index``): what `take` reads. One new
    token is read beside the buffer (a decoding step copies nothing of size S); several are written into a
    copy of it once (a prefill then gathers from one array)."""

    buffer: jax.Array
    new: jax.Array
    first: jax.Array
    first_index: jax.Array

    @classmethod
    def of(cls, buffer: jax.Array, new: jax.Array, positions: jax.Array, first: jax.Array,
           first_index: jax.Array) -> _Overlay:
        if new.shape[0] > 1:
            slot = jnp.where(positions >= 0, positions, buffer.shape[1])  # padding dropped
            buffer = buffer.at[:, slot].set(jnp.swapaxes(new, 0, 1).astype(buffer.dtype), mode="drop")
        return cls(buffer, new, first, first_index)

    def take(self, heads, slots) -> jax.Array:
        """float32 ``buffer[heads, slots]`` with the new tokens over their slots (index arrays broadcast)."""
        slots = jnp.asarray(slots)
        old = self.buffer[heads, jnp.clip(slots, 0, self.buffer.shape[1] - 1)].astype(jnp.float32)
        if self.new.shape[0] > 1:  # written into the buffer
            return old
        index = jnp.clip(self.first_index + slots - self.first, 0, self.new.shape[0] - 1)
        new = self.new[index, heads]
        return jnp.where((slots >= self.first)[..., None], new.astype(jnp.float32), old)


def _first(positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A row's first valid position and its index (int32 max and 0 when there is none)."""
    valid = positions >= 0
    return jnp.min(jnp.where(valid, positions, jnp.iinfo(jnp.int32).max)), jnp.argmax(valid)



def _rope_at(x: jax.Array, positions: jax.Array, rotary: Rotary | None) -> jax.Array:
    """float32 ``x (..., d)`` rotated at integer ``positions`` (x's shape without its last axis, or
    broadcastable to it); unchanged without RoPE."""
    x = x.astype(jnp.float32)
    if rotary is None:
        return x
    cos, sin = rope_cos_sin(jnp.broadcast_to(positions, x.shape[:-1]).astype(jnp.int32), rotary)
    return rotate(x, cos, sin, rotary.layout)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _bias(scores: jax.Array, slopes: jax.Array | None, distance: jax.Array, head_axis: int) -> jax.Array:
    """``scores`` minus ALiBi's ``slope x distance`` (slopes along ``head_axis``); unchanged without ALiBi."""
    if slopes is None:
        return scores
    shape = [1] * scores.ndim
    shape[head_axis] = -1
    return scores - slopes.reshape(shape) * distance.astype(jnp.float32)


# ----- LongHeads --------------------------------------------------------------------------------------------


def _chunk_representations(queries: jax.Array, keys: jax.Array, values: jax.Array, heads: np.ndarray,
                           chunk: int, rotary: Rotary | None) -> jax.Array:
    """``(Hq, n, d)`` representations of ``n`` chunks from their raw ``queries (Hq, n, w, d)``, ``keys (Hkv,
    n, w, d)`` and ``values (Hkv, n, w, dv)``: keys pooled by the attention of the chunk's mean bidirectional
    attention output, everything at chunk-local positions, scale ``1 / sqrt(d)`` (LongHeads' code)."""
    local = np.arange(chunk)
    qc = _rope_at(queries, local, rotary)
    kc = _rope_at(keys, local, rotary)[heads]  # (Hq, n, w, d)
    vc = values.astype(jnp.float32)[heads]
    factor = 1.0 / math.sqrt(queries.shape[-1])
    within = jax.nn.softmax(_dot("hcid,hcjd->hcij", qc, kc) * factor, axis=-1)
    mean_output = _dot("hcij,hcjd->hcid", within, vc).mean(axis=2)  # (Hq, n, dv)
    pool = jax.nn.softmax(_dot("hcd,hcjd->hcj", mean_output, kc) * factor, axis=-1)
    return _dot("hcj,hcjd->hcd", pool, kc)


def _longheads_row(q, positions, queries, keys, values, new_keys, new_values, reps, *, spec: LongHeads, rotary,
                   slopes, scale: Scaling, heads):
    """One row: ``q (T, Hq, d)`` float32 at ``positions (T,)`` with ``new_keys``/``new_values (T, Hkv, d|dv)``;
    ``queries (Hq, S, d)``, ``keys (Hkv, S, d)``, ``values (Hkv, S, dv)`` the earlier tokens by position;
    ``reps (Hq, S/w, d)``. Returns ``(T, Hq, dv)`` and the representations with those of the chunks this
    call touches recomputed."""
    w, c_count = spec.chunk_size, spec.chunks
    t, hq, d = q.shape
    hkv, slots = keys.shape[:2]
    n_chunks = reps.shape[1]
    first, first_index = _first(positions)
    queries, keys, values = (_Overlay.of(old, new, positions, first, first_index)
                             for old, new in ((queries, q), (keys, new_keys), (values, new_values)))

    # the chunks this call touches, from the first new position's chunk on (a chunk that reaches past the
    # buffer is incomplete: its representation, clipped here, is never read)
    touched = jnp.clip(first // w + jnp.arange(min(n_chunks, (t - 1) // w + 2)), 0, n_chunks - 1)
    at = (touched[:, None] * w + np.arange(w))[None]
    qc = queries.take(np.arange(hq)[:, None, None], at)
    kc, vc = (x.take(np.arange(hkv)[:, None, None], at) for x in (keys, values))
    fresh = _chunk_representations(qc, kc, vc, heads, w, rotary)
    reps = reps.at[:, touched].set(fresh)  # a repeated (clipped) index writes the same value

    # per query and head: the chunk at each rank 0..C-1 of its contiguous frame, and its own rank
    quirks = spec.prefill_code_quirks and t > 1  # the PyTorch prefill path (LongHeads.prefill_code_quirks)
    p = jnp.maximum(positions, 0)
    own_chunk, offset = p // w, p % w
    forced_previous = (offset < w - 1) | quirks  # the own chunk is partial: the previous chunk is kept too
    selective = positions >= spec.span if quirks else positions + 1 >= spec.span
    # the own chunk's last attended offset: the query's own, but for the prefill path's selective queries
    own_last = offset - (selective & quirks).astype(offset.dtype)
    scores = _dot("thd,hcd->thc", q, reps)  # raw query . representation, no scale
    chunk_ids = jnp.arange(n_chunks)
    last_candidate = (own_chunk - 1 - forced_previous)[:, None, None]
    candidate = (chunk_ids >= 1) & (chunk_ids <= last_candidate)
    top = jnp.sort(spec.selection.choose(scores, candidate).index, axis=-1)  # the frame keeps chronological order
    fp = forced_previous[:, None, None]
    oc = own_chunk[:, None, None]
    column = lambda x: jnp.broadcast_to(x, (*top.shape[:2], 1)).astype(top.dtype)  # noqa: E731
    chosen = jnp.concatenate([column(0), top, column(jnp.where(fp, oc - 1, oc)), column(jnp.where(fp, oc, -1))],
                             axis=-1)
    ranks = jnp.arange(c_count)
    every = jnp.where(ranks <= oc, ranks, -1)  # below the span: every chunk at its true place
    sel = selective[:, None, None]
    chosen = jnp.where(sel, chosen, every)
    own_rank = jnp.where(sel, jnp.where(fp, c_count - 1, c_count - 2), oc)  # (T, 1, 1)
    query_at = own_rank * w + offset[:, None, None]  # (T, 1, 1) position in the frame

    def block(xs):
        qb, chosen_b, own_b, at_b, last_b, valid_b = xs  # (n, Hq, d), (n, Hq, C), 3 x (n, 1, 1), (n,)
        within = jnp.arange(w)
        slot = chosen_b[..., None] * w + within  # (n, Hq, C, w)
        attended = (chosen_b[..., None] >= 0) & ((ranks[:, None] < own_b[..., None])
                                                 | ((ranks[:, None] == own_b[..., None])
                                                    & (within <= last_b[..., None])))
        attended = attended & valid_b[:, None, None, None]
        slot = jnp.clip(slot, 0, slots - 1)
        key_at = ranks[:, None] * w + within  # (C, w) frame positions
        rotated_q = _rope_at(jnp.broadcast_to(qb[:, :, None, :], (*qb.shape[:2], c_count, d)), at_b - ranks * w,
                             rotary)  # (n, Hq, C, d): the query where each rank's keys sit relative to it
        gathered = _rope_at(keys.take(heads[None, :, None, None], slot), within, rotary)  # (n, Hq, C, w, d)
        s = scale(_dot("nhrd,nhrwd->nhrw", rotated_q, gathered))
        s = _bias(s, slopes, at_b[..., None] - key_at, head_axis=1)
        s = jnp.where(attended, s, NEG_INF)
        n = s.shape[0]
        weights = masked_softmax(s.reshape(n, hq, c_count * w))
        vals = values.take(heads[None, :, None, None], slot).reshape(n, hq, c_count * w, -1)
        return _dot("nhk,nhke->nhe", weights, vals)

    size = max(1, min(t, GATHER_ELEMENTS // (hq * c_count * w * max(d, new_values.shape[-1]))))
    padded = -(-t // size) * size

    def blocks(x):
        x = jnp.pad(x, [(0, padded - t)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(padded // size, size, *x.shape[1:])

    own_rank, query_at, own_last = (jnp.broadcast_to(x, (t, 1, 1))
                                    for x in (own_rank, query_at, own_last[:, None, None]))
    out = lax.map(block, tuple(blocks(x) for x in (q, chosen, own_rank, query_at, own_last, positions >= 0)))
    return out.reshape(padded, hq, -1)[:t], reps


# ----- InfLLM -----------------------------------------------------------------------------------------------


def _block_count(spec: InfLLM, slots: int) -> int:
    """How many memory blocks a buffer of ``slots`` positions can form (at least one, for the shapes)."""
    return max(1, -(-max(slots - spec.local_branch - spec.global_branch, 0) // spec.block_size))


def _infllm_row(q, positions, keys, values, new_keys, new_values, mass, reps, *, spec: InfLLM, rotary, slopes,
                scale: Scaling, heads):
    """One row: ``q (T, Hq, d)`` float32 at ``positions (T,)`` with ``new_keys``/``new_values (T, Hkv, d|dv)``;
    ``keys (Hkv, S, d)``, ``values (Hkv, S, dv)`` the earlier tokens by position; ``mass (Hq, S)`` the local
    attention mass so far and ``reps (Hq, blocks, d)`` the formed blocks' representations. Returns ``(T, Hq,
    dv)``, the mass and the representations after this call's steps."""
    t, hq, d = q.shape
    hkv, slots = keys.shape[:2]
    n_init, n_local, bs = spec.global_branch, spec.local_branch, spec.block_size
    step = min(spec.step_size, t)
    distance = spec.limit_distance
    first, first_index = _first(positions)
    end = first + jnp.sum(positions >= 0)  # one past the last new position
    keys, values = (_Overlay.of(old, new, positions, first, first_index)
                    for old, new in ((keys, new_keys), (values, new_values)))
    kv_heads = np.arange(hkv)[:, None]
    n_steps = 1 if t == 1 else -(-t // spec.step_size) + 1
    n_blocks = reps.shape[1]
    forming = min(n_blocks, step // bs + 1)  # the most blocks one step can form
    q_global = _rope_at(q, distance, rotary)  # every global key is scored with the query at D

    def representations(mass: jax.Array, blocks: jax.Array) -> jax.Array:
        """``(Hq, n, d)``: each of ``blocks``' mean raw key over its tokens of most local mass (ties: lower
        position), per query head."""
        at = jnp.clip(n_init + blocks[:, None] * bs + np.arange(bs), 0, slots - 1)  # (n, bs) positions
        _, best = lax.top_k(mass[:, at], spec.representatives)  # (Hq, n, rk)
        chosen = jnp.take_along_axis(jnp.broadcast_to(at, (hq, *at.shape)), best, axis=-1)
        return keys.take(heads[:, None, None], chosen).mean(axis=2)

    def one_step(carry, index):
        mass, reps, out = carry
        m = first // spec.step_size + index
        a = jnp.maximum(m * spec.step_size, first)
        b = jnp.minimum((m + 1) * spec.step_size, end)
        u = a + jnp.arange(step)  # query positions
        live = u < b
        rows = first_index + (u - first)
        rows = jnp.where(live, rows, t)  # t: dropped on output
        take = jnp.clip(rows, 0, t - 1)
        qs, qg = q[take], q_global[take]  # (step, Hq, d)

        # the memory as the tokens before a have left it
        initial, formed = spec.memory(a, jnp)
        tail_start = initial + formed * bs
        mean_query = _rope_at(jnp.sum(jnp.where(live[:, None, None], qs, 0.0), axis=0)
                              / jnp.maximum(jnp.sum(live), 1), distance, rotary)  # (Hq, d)
        top = spec.selection.choose(_dot("hd,hjd->hj", mean_query, reps), np.arange(n_blocks) < formed, head_axis=0)
        far = jnp.concatenate([
            jnp.where(np.arange(n_init) < initial, np.arange(n_init), -1),
            jnp.where(top.valid[:, None], n_init + top.index[:, None] * bs + np.arange(bs), -1).ravel(),
            jnp.where(tail_start + np.arange(bs + step) < b - n_local, tail_start + np.arange(bs + step), -1)])
        near = a - n_local + 1 + np.arange(n_local + step - 1)  # the steps' windows

        def scores_of(key_positions, query, key_rotation, query_distance):
            k = _rope_at(keys.take(kv_heads, key_positions[None]), key_rotation, rotary)[heads]
            s = scale(_dot("qhd,hkd->qhk", query, k))
            return _bias(s, slopes, query_distance, head_axis=1)

        local_ok = (near >= 0) & (u[:, None] - near >= 0) & (u[:, None] - near < n_local)
        global_ok = (far >= 0) & ((u[:, None] - far >= n_local) | spec.main_double_count)  # (InfLLM.main_double_count)
        s_local = scores_of(near, _rope_at(qs, u[:, None], rotary), near, (u[:, None] - near)[:, None, :])
        s_global = scores_of(far, qg, 0 if rotary is None else jnp.zeros_like(far), jnp.full((1, 1, 1), distance))
        s = jnp.concatenate([jnp.where(local_ok[:, None, :], s_local, NEG_INF),
                             jnp.where(global_ok[:, None, :], s_global, NEG_INF)], axis=-1)
        weights = masked_softmax(s) * live[:, None, None]
        vals = jnp.concatenate([values.take(kv_heads, near[None]), values.take(kv_heads, far[None])], axis=1)[heads]
        out = out.at[rows].set(_dot("qhk,hke->qhe", weights, vals), mode="drop")
        gained = jnp.sum(weights[..., :near.shape[0]], axis=0)  # (Hq, window) local mass of this step's queries
        mass = mass.at[:, jnp.clip(near, 0, slots - 1)].add(jnp.where(near >= 0, gained, 0.0))
        # the blocks this step's end forms: no later query reaches them locally, so their mass is final
        new = formed + np.arange(forming)
        reps = reps.at[:, jnp.where(new < spec.memory(b, jnp)[1], new, n_blocks)].set(representations(mass, new),
                                                                                 mode="drop")
        return (mass, reps, out), None

    out = jnp.zeros((t, hq, new_values.shape[-1]), jnp.float32)
    (mass, reps, out), _ = lax.scan(one_step, (mass, reps, out), jnp.arange(n_steps))
    return out, mass, reps
