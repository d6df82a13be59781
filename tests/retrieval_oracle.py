"""Deliberately naive float64 oracles for two retrieval attention methods, LongHeads and InfLLM.

Written from their definitions in ``/work/shared/reference/retrieval-methods.md`` (§1 LongHeads,
§1.3-§1.11, oracle pseudo-code §1.11; §2 InfLLM, §2.3-§2.11, oracle pseudo-code §2.11), which in
turn were read from the official code:

* LongHeads (Lu et al. 2024, arXiv 2402.10685): ``LuLuLuyi/LongHeads`` @ 1c9f72e726401cbccf320d2c5c72244dd92a336f,
  ``modeling_longheads/modeling_llama.py``;
* InfLLM (Xiao et al. 2024, arXiv 2402.04617): ``thunlp/InfLLM`` main @ 12b70798f56e56ebb23c53c7018091a3f540a028
  and the first release e247ad957d8903befff9cdca3049969a305fb8e9 ("init").

One layer, one sequence (positions 0..n-1), one query / one key at a time with plain Python loops, in
float64. Nothing is shared with the library: RoPE is ``naive_attention.rotate`` (the frequencies are
passed in), ALiBi is ``-slope * distance``.

Canonical choices (the reference's recommendations, or where it leaves the choice open):

LongHeads
  * The decode rule (§1.5 decode path, §1.6) is canonical for every query: the selective threshold is
    ``p + 1 >= B``; the keys are chunk 0, the top ``C - 3`` candidates among chunks ``1..g-2`` and the
    last complete chunk ``g - 1`` (``g = (p+1) // w``), then the partial own chunk including the query's
    own key; they get contiguous positions ``0..m-1`` and the query sits at ``m - 1``.
    ``prefill_code_quirks=True`` reproduces the PyTorch prefill path (§1.8 items 1-3) for the
    positions ``< n_prefill``.
  * GQA (§1.9, a library decision): selection per *query* head; the chunk representation of query
    head ``h`` uses that head's queries and its KV head's keys and values.
  * Ties in the top-(C-3): the lower chunk index first.
  * The chunk representation (§1.4) uses the default ``1/sqrt(d)`` scale of
    ``F.scaled_dot_product_attention`` / FlashAttention, not the ``scale`` argument (which scales
    only the final attention scores), and the RoPE attention scaling applies to the chunk-local
    rotation as to any rotation. It carries no ALiBi bias (the chunk attention has no position
    other than the chunk-local RoPE, the identity without RoPE). It needs ``dv == d`` (the mean
    attention output is used as a query).
  * With fewer candidates than ``C - 3`` (only when ``B`` is below ``L``) all of them are taken and
    the query attends fewer keys; forced chunks are never duplicated.

InfLLM
  * The init-commit rule (§2.8) is canonical: a global key ``t`` is attended by query ``u`` only if
    ``u - t >= n_local``, so every key is attended exactly once; ``main_code=True`` attends the whole
    global set ``G`` (the main-branch double count in multi-token steps).
  * GQA: the representatives and the accumulated local mass are per *query* head, built from that
    head's KV head's raw keys; the retrieval score is summed over all query heads (blocks shared).
  * Global keys are scored with the query rotated at ``D = n_local - 1`` and the key "at position 0"
    (``rotate(k, 0)``: no rotation, but the RoPE attention scaling, as ``naive_attention`` scores
    LM-Infinite sinks); with ALiBi the global bias is ``-slope * D``.
  * Ties: representative tokens by the lower position first, retrieved blocks by the lower block
    index first.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from naive_attention import rotate


def _softmax(logits) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    w = np.exp(logits - logits.max())
    return w / w.sum()


def _top(scores: list[tuple[float, int]], count: int) -> list[int]:
    """The indices of the ``count`` largest scores, ties broken by the lower index first."""
    ranked = sorted(scores, key=lambda s: (-s[0], s[1]))
    return [index for _, index in ranked[: max(count, 0)]]


def _attend(q_vec, q_pos, keys, key_pos, values, *, rope, slope, scale) -> np.ndarray:
    """softmax_j(<rope(q, q_pos), rope(k_j, key_pos_j)> * scale - slope * (q_pos - key_pos_j)) @ v.

    A key position None stands for a key scored un-rotated at position 0 with the query at q_pos."""
    logits = []
    for k_vec, kp in zip(keys, key_pos):
        kp = 0 if kp is None else kp
        if rope is not None:
            s = float(rotate(q_vec, q_pos, *rope) @ rotate(k_vec, kp, *rope)) * scale
        else:
            s = float(np.asarray(q_vec, np.float64) @ np.asarray(k_vec, np.float64)) * scale
        if slope is not None:
            s -= slope * (q_pos - kp)
        logits.append(s)
    return _softmax(logits) @ np.asarray(values, np.float64)


def _check_shapes(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n, hq, _ = q.shape
    assert len(k) == n and v.shape[:2] == k.shape[:2] and hq % k.shape[1] == 0, (q.shape, k.shape, v.shape)
    return q, k, v, n, hq, hq // k.shape[1]


# ----------------------------------------------------------------------------------------------------------
# LongHeads (reference §1)
# ----------------------------------------------------------------------------------------------------------


def longheads_chunk_rep(q, k, v, h: int, c: int, *, chunk: int, rope=None) -> np.ndarray:
    """rep_c for query head h (§1.4): attention-pooled chunk-local-RoPE keys of the complete chunk c.

    q: (n, Hq, d), k: (n, Hkv, d), v: (n, Hkv, d); query head h reads KV head h // (Hq // Hkv)."""
    q, k, v, n, _, group = _check_shapes(q, k, v)
    kh, w = h // group, chunk
    d = q.shape[-1]
    assert v.shape[-1] == d, "LongHeads uses the mean attention output as a query: needs dv == d"
    assert (c + 1) * w <= n, "only complete chunks have a representation"
    inv_sqrt_d = 1.0 / np.sqrt(d)
    tokens = range(c * w, (c + 1) * w)

    def local(x, t):  # chunk-local RoPE at t mod w (identity without RoPE)
        return rotate(x, t % w, *rope) if rope is not None else np.asarray(x, np.float64)

    q_loc = {t: local(q[t, h], t) for t in tokens}
    k_loc = {t: local(k[t, kh], t) for t in tokens}
    # Bidirectional attention inside the chunk, then the mean output.
    outputs = []
    for t in tokens:
        p = _softmax([float(q_loc[t] @ k_loc[u]) * inv_sqrt_d for u in tokens])
        outputs.append(sum(p_u * v[u, kh] for p_u, u in zip(p, tokens)))
    vbar = sum(outputs) / w
    # The mean output (a value-space vector) pools the chunk's local keys.
    a = _softmax([float(vbar @ k_loc[u]) * inv_sqrt_d for u in tokens])
    return sum(a_u * k_loc[u] for a_u, u in zip(a, tokens))


class LongHeadsSelection(NamedTuple):
    selective: bool  # False: full causal attention at true positions
    chunks: list[int]  # selected complete chunks, chronological ([] when not selective)
    keys: list[int]  # attended key positions (true), chronological
    key_pos: list[int]  # the positions the method gives them
    q_pos: int  # the position the method gives the query


ScoreFn = Callable[[int, int, int], float]  # (query position p, query head h, chunk c) -> score


def longheads_selection(q, k, v, p: int, h: int, *, chunk: int, span: int, threshold: int | None = None,
                        quirky: bool = False, rope=None, score_fn: ScoreFn | None = None,
                        reps: dict | None = None) -> LongHeadsSelection:
    """Keys and positions that query position p, query head h attends (§1.5, §1.6).

    quirky: the PyTorch prefill path (§1.8) instead of the decode rule. score_fn overrides
    s_c(p) = q_p . rep_c (raw query, no scale). reps: an optional cache {(h, c): rep_c}."""
    w, L = chunk, span
    B = span if threshold is None else threshold
    assert L % w == 0 and L // w >= 3, "span must be a multiple of chunk, with at least 3 chunks"
    C = L // w
    reps = {} if reps is None else reps

    def score(c: int) -> float:
        if score_fn is not None:
            return float(score_fn(p, h, c))
        if (h, c) not in reps:
            reps[(h, c)] = longheads_chunk_rep(q, k, v, h, c, chunk=w, rope=rope)
        return float(np.asarray(q[p, h], np.float64) @ reps[(h, c)])

    if (quirky and p < B) or (not quirky and p + 1 < B):
        return LongHeadsSelection(False, [], list(range(p + 1)), list(range(p + 1)), p)

    if quirky:  # prefill path: forced {0, c_p - 1} (and the own chunk), candidates 1..c_p-2, self excluded
        cp, o = divmod(p, w)
        forced, candidates = {c for c in (0, cp - 1) if 0 <= c < cp}, range(1, cp - 1)
        own = list(range(cp * w, cp * w + o))  # offsets 0..o-1 of the own chunk: no self key
    else:  # decode rule: forced {0, g - 1}, candidates 1..g-2, own partial chunk including self
        g = (p + 1) // w  # complete chunks, the own one included when (p + 1) % w == 0
        forced, candidates = {c for c in (0, g - 1) if 0 <= c < g}, range(1, g - 1)
        own = list(range(g * w, p + 1))
    top = _top([(score(c), c) for c in candidates], C - 3)
    chunks = sorted(forced | set(top))
    keys = [t for c in chunks for t in range(c * w, (c + 1) * w)] + own
    key_pos = list(range(len(keys)))  # contiguous, chronological
    # Decode: the query is its own last key, at m - 1; prefill: the query sits at m (no key at distance 0).
    q_pos = len(keys) if quirky else len(keys) - 1
    return LongHeadsSelection(True, chunks, keys, key_pos, q_pos)


def longheads_oracle(q, k, v, *, chunk: int, span: int, threshold: int | None = None, n_prefill: int = 0,
                     prefill_code_quirks: bool = False, rope=None, slopes=None, scale: float,
                     score_fn: ScoreFn | None = None) -> np.ndarray:
    """LongHeads attention output (n, Hq, dv) in float64 (reference §1.11, generalised to GQA).

    q: (n, Hq, d), k: (n, Hkv, d), v: (n, Hkv, dv), raw (un-rotated). chunk = w, span = L (a multiple
    of w), threshold = B (default L). rope: None or (inv_freq, layout, attention_scaling). slopes: None
    or per-query-head ALiBi slopes (bias at the method's re-indexed positions). scale: the final
    attention scale. Positions < n_prefill use the PyTorch prefill path when prefill_code_quirks.
    score_fn: optional override of the selection score (p, h, c) -> float."""
    q, k, v, n, hq, group = _check_shapes(q, k, v)
    out = np.zeros((n, hq, v.shape[-1]))
    reps: dict = {}  # (h, c) -> rep_c, computed once per complete chunk and head
    for p in range(n):
        quirky = prefill_code_quirks and p < n_prefill
        for h in range(hq):
            kh = h // group
            sel = longheads_selection(q, k, v, p, h, chunk=chunk, span=span, threshold=threshold, quirky=quirky,
                                      rope=rope, score_fn=score_fn, reps=reps)
            out[p, h] = _attend(q[p, h], sel.q_pos, [k[t, kh] for t in sel.keys], sel.key_pos,
                                [v[t, kh] for t in sel.keys], rope=rope,
                                slope=None if slopes is None else float(slopes[h]), scale=scale)
    return out


# ----------------------------------------------------------------------------------------------------------
# InfLLM (reference §2)
# ----------------------------------------------------------------------------------------------------------


def infllm_steps(n_prompt: int, n_total: int, step: int) -> list[tuple[int, int]]:
    """The step schedule: [0, step), [step, 2 step), ... over the prompt [0, n_prompt) (the last one
    clipped), then one step per token over [n_prompt, n_total)."""
    steps = [(a, min(a + step, n_prompt)) for a in range(0, n_prompt, step)]
    return steps + [(u, u + 1) for u in range(n_prompt, n_total)]


def infllm_oracle(q, k, v, steps, *, n_init: int, n_local: int, block: int, topk: int, repr_topk: int,
                  main_code: bool = False, rope=None, slopes=None, scale: float, return_mass: bool = False):
    """InfLLM attention output (n, Hq, dv) in float64 (reference §2.11, generalised to GQA).

    q: (n, Hq, d), k: (n, Hkv, d), v: (n, Hkv, dv), raw. steps: the (a, b) query steps covering [0, n)
    in order. rope: None or (inv_freq, layout, attention_scaling); slopes: None or per-query-head ALiBi
    slopes. main_code: the main-branch rule (every query of a step attends all of G).

    With return_mass, returns (out, info), info a dict with
      "mass": S (Hq, n), the accumulated local joint-softmax probability mass of every key;
      "blocks": the memory blocks, each a list of positions, in formation order;
      "reps": per block, its representatives (Hq, d);
      "steps": per step, a dict with a, b, n_init_tokens / blocks (memory before the step), selected
               (retrieved block indices), tail (range) and, after the step, n_init_after / blocks_after;
      "global_keys": {(u, h): the global key positions query u attends} (the same for every h)."""
    q, k, v, n, hq, group = _check_shapes(q, k, v)
    assert [t for a, b in steps for t in range(a, b)] == list(range(n)), "steps must cover [0, n) in order"
    D = n_local - 1
    S = np.zeros((hq, n))  # accumulated local probability mass per (query head, key)
    blocks: list[list[int]] = []  # positions of each memory block
    reps: list[np.ndarray] = []  # per block, (Hq, d) representatives (raw keys)
    n_i, r0 = 0, 0  # initial tokens [0, n_i); blocks cover [n_i, r0); the tail starts at r0
    out = np.zeros((n, hq, v.shape[-1]))
    info_steps, global_keys = [], {}
    for a, b in steps:
        # Retrieval: one selection per step, shared by all heads (§2.6).
        if len(blocks) <= topk:
            selected = list(range(len(blocks)))
        else:
            qbar = [sum(q[u, h] for u in range(a, b)) / (b - a) for h in range(hq)]  # step-mean raw query
            qrot = [rotate(x, D, *rope) if rope is not None else x for x in qbar]  # rotated at D
            # score_j = sum_h <rope(qbar_h, D), rep_{j,h}>: key un-rotated, no scale.
            scores = [(sum(float(qrot[h] @ reps[j][h]) for h in range(hq)), j) for j in range(len(blocks))]
            selected = sorted(_top(scores, topk))
        tail = list(range(r0, max(r0, b - n_local)))
        G = list(range(n_i)) + [t for j in selected for t in blocks[j]] + tail
        info_steps.append(dict(a=a, b=b, n_init_tokens=n_i, blocks=len(blocks), selected=selected,
                               tail=(r0, max(r0, b - n_local))))
        for u in range(a, b):
            local = list(range(max(0, u - n_local + 1), u + 1))
            # Canonical (init commit): a global key only beyond the window; main: all of G.
            glob = list(G) if main_code else [t for t in G if u - t >= n_local]
            for h in range(hq):
                kh = h // group
                slope = None if slopes is None else float(slopes[h])
                logits = []
                for t in local:  # true positions
                    if rope is not None:
                        s = float(rotate(q[u, h], u, *rope) @ rotate(k[t, kh], t, *rope)) * scale
                    else:
                        s = float(q[u, h] @ k[t, kh]) * scale
                    logits.append(s if slope is None else s - slope * (u - t))
                for t in glob:  # query at D, key at 0: every global key at distance D
                    if rope is not None:
                        s = float(rotate(q[u, h], D, *rope) @ rotate(k[t, kh], 0, *rope)) * scale
                    else:
                        s = float(q[u, h] @ k[t, kh]) * scale
                    logits.append(s if slope is None else s - slope * D)
                P = _softmax(logits)  # one joint softmax over local + global
                keys = local + glob
                out[u, h] = sum(P[i] * v[t, kh] for i, t in enumerate(keys))
                for i, t in enumerate(local):  # only the local part accumulates mass
                    S[h, t] += P[i]
                global_keys[(u, h)] = glob
        # Memory update after the step (append_global, §2.3 / §2.11).
        if n_i < n_init and b - n_i > n_local:
            n_i = min(n_init, b - n_local)
            r0 = n_i
        while n_i == n_init and (b - r0) - block >= n_local:
            pos = list(range(r0, r0 + block))
            rep = np.zeros((hq, k.shape[-1]))
            for h in range(hq):
                best = _top([(S[h, t], t) for t in pos], repr_topk)  # ties: the lower position first
                rep[h] = sum(np.asarray(k[t, h // group], np.float64) for t in best) / len(best)
            blocks.append(pos)
            reps.append(rep)
            r0 += block
        info_steps[-1].update(n_init_after=n_i, blocks_after=len(blocks))
    if not return_mass:
        return out
    return out, dict(mass=S, blocks=blocks, reps=reps, steps=info_steps, global_keys=global_keys)
