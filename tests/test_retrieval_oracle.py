"""Invariants of the naive LongHeads and InfLLM oracles (tests/retrieval_oracle.py), from
/work/shared/reference/retrieval-methods.md §1.12 and §2.11, checked on small random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import POSITIONALS
from naive_attention import naive_attention, rotate
from retrieval_oracle import (infllm_oracle, infllm_steps, longheads_chunk_rep, longheads_oracle,
                              longheads_selection)

D_HEAD = 8
RTOL = 1e-10


def _qkv(seed: int, n: int, hq: int, hkv: int, d: int = D_HEAD, dv: int | None = None):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, hq, d)), rng.standard_normal((n, hkv, d)),
            rng.standard_normal((n, hkv, d if dv is None else dv)))


def _positional(name: str, hq: int, d: int = D_HEAD) -> dict:
    """kwargs rope= / slopes= for both the oracles and naive_attention (theta 100: visible rotations)."""
    if name == "rope_half":
        return dict(rope=(100.0 ** (-np.arange(0, d, 2) / d), "half", 1.0))
    if name == "rope_interleaved_partial":  # rotary on 6 of the 8 dims, with an attention scaling
        return dict(rope=(100.0 ** (-np.arange(0, 6, 2) / 6), "interleaved", 1.1))
    if name == "alibi":
        return dict(slopes=0.5 ** np.arange(1, hq + 1))
    assert name == "none"
    return {}


def _naive(q, k, v, kind: str, positional: dict, **params) -> np.ndarray:
    n = len(q)
    pos = np.arange(n)[None]
    return naive_attention(q[None], k[None], v[None], pos, pos, kind=kind, scale=D_HEAD**-0.5, **positional,
                           **params)[0]


def _naive_on_keys(q, k, v, p, h, keys, key_pos, q_pos, positional) -> np.ndarray:
    """naive_attention (vanilla placement) of the single query (p, h) over the gathered keys, placed at
    the given positions."""
    hq, hkv = q.shape[1], k.shape[1]
    kh = h // (hq // hkv)
    pos = dict(positional)
    if "slopes" in pos:
        pos["slopes"] = [pos["slopes"][h]]
    return naive_attention(q[None, p : p + 1, h : h + 1], k[None, keys, kh : kh + 1], v[None, keys, kh : kh + 1],
                           np.array([[q_pos]]), np.array([key_pos]), kind="vanilla", scale=D_HEAD**-0.5,
                           **pos)[0, 0, 0]


# ------------------------------------------------------------------------------------------------ LongHeads

W, L = 4, 16  # chunk, span: C = 4, one chunk selected
LH = dict(chunk=W, span=L)


@pytest.mark.parametrize("positional_name", POSITIONALS)
@pytest.mark.parametrize("quirks", [False, True])
def test_longheads_short_is_vanilla(positional_name, quirks):
    n, hq, hkv = L - 1, 4, 2  # n <= B - 1: no query selects
    q, k, v = _qkv(1, n, hq, hkv)
    positional = _positional(positional_name, hq)
    got = longheads_oracle(q, k, v, **LH, n_prefill=n, prefill_code_quirks=quirks, scale=D_HEAD**-0.5,
                           **positional)
    np.testing.assert_allclose(got, _naive(q, k, v, "vanilla", positional), rtol=RTOL, atol=1e-13)


@pytest.mark.parametrize("quirky", [False, True])
def test_longheads_selection_invariants(quirky):
    w, span, n, hq, hkv = 4, 24, 62, 2, 1  # C = 6: three of the candidates selected
    C = span // w
    q, k, v = _qkv(2, n, hq, hkv)
    rope = _positional("rope_half", hq)["rope"]
    reps: dict = {}
    for p in range(n):
        for h in range(hq):
            sel = longheads_selection(q, k, v, p, h, chunk=w, span=span, quirky=quirky, rope=rope, reps=reps)
            assert sel.selective == ((p >= span) if quirky else (p + 1 >= span))
            if not sel.selective:
                assert sel.keys == sel.key_pos == list(range(p + 1)) and sel.q_pos == p
                continue
            m = len(sel.keys)
            assert sel.keys == sorted(set(sel.keys)) and sel.key_pos == list(range(m))  # chronological, contiguous
            assert sel.chunks[0] == 0 and sel.keys[:w] == list(range(w))  # chunk 0 always included
            assert len(sel.chunks) == C - 1
            if quirky:  # (C-1)w + o keys, no self key, the query at m
                cp, o = divmod(p, w)
                assert m == (C - 1) * w + o and p not in sel.keys and sel.q_pos == m
                assert cp - 1 in sel.chunks and sel.keys[len(sel.keys) - o :] == list(range(cp * w, p))
            else:  # (C-1)w + r keys, the query is its own last key at m - 1
                g, r = divmod(p + 1, w)
                assert m == (C - 1) * w + r and sel.keys[-1] == p and sel.q_pos == m - 1
                assert sel.chunks[-1] == g - 1
            assert sel.q_pos - min(sel.key_pos) < span  # the largest distance stays below L
    # §1.8 item 2: at p = B - 1 the prefill path is vanilla, the decode rule drops a chunk.
    p = span - 1
    assert not longheads_selection(q, k, v, p, 0, chunk=w, span=span, quirky=True, rope=rope).selective
    sel = longheads_selection(q, k, v, p, 0, chunk=w, span=span, rope=rope)
    assert sel.selective and len(sel.keys) == (C - 1) * w and len(sel.chunks) == C - 1


@pytest.mark.parametrize("positional_name", ["rope_interleaved_partial", "alibi"])
def test_longheads_recent_scores_are_sink_chunk_plus_window(positional_name):
    """Scores favouring the latest candidates: chunk 0 plus a sliding window, positions shifted to [0, L)."""
    n, hq, hkv, C = 45, 4, 2, L // W
    q, k, v = _qkv(3, n, hq, hkv)
    positional = _positional(positional_name, hq)
    n_prefill = 30
    got = longheads_oracle(q, k, v, **LH, n_prefill=n_prefill, prefill_code_quirks=True, scale=D_HEAD**-0.5,
                           score_fn=lambda p, h, c: float(c), **positional)
    for p in range(n):
        quirky = p < n_prefill
        if (p < L) if quirky else (p + 1 < L):
            keys = list(range(p + 1))
            key_pos, q_pos = keys, p
        else:
            # quirky prefill: C-2 chunks plus o tokens before the query; decode: C-2 chunks plus r tokens
            # ending at the query itself.
            tail = (C - 2) * W + (p % W if quirky else (p + 1) % W)
            end = p if quirky else p + 1
            keys = list(range(W)) + list(range(end - tail, end))
            key_pos = list(range(len(keys)))
            q_pos = len(keys) if quirky else len(keys) - 1
        for h in range(hq):
            want = _naive_on_keys(q, k, v, p, h, keys, key_pos, q_pos, positional)
            np.testing.assert_allclose(got[p, h], want, rtol=RTOL, atol=1e-13)


def _rep_vectorised(q, k, v, h, c, w, rope):
    """rep_c of §1.4 with matrices: chunk-local RoPE, bidirectional attention, mean output, pooling."""
    kh = h // (q.shape[1] // k.shape[1])
    tokens = range(c * w, (c + 1) * w)
    Q = np.stack([rotate(q[t, h], t % w, *rope) for t in tokens])
    K = np.stack([rotate(k[t, kh], t % w, *rope) for t in tokens])
    V = v[c * w : (c + 1) * w, kh]

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    d = q.shape[-1]
    vbar = (softmax(Q @ K.T / np.sqrt(d)) @ V).mean(0)
    return softmax(vbar @ K.T / np.sqrt(d)) @ K


def test_longheads_reps_and_selection_match_vectorised():
    w, span, n, hq, hkv = 4, 24, 50, 4, 2
    q, k, v = _qkv(4, n, hq, hkv)
    rope = _positional("rope_interleaved_partial", hq)["rope"]
    for h in range(hq):
        for c in range(n // w):
            np.testing.assert_allclose(longheads_chunk_rep(q, k, v, h, c, chunk=w, rope=rope),
                                       _rep_vectorised(q, k, v, h, c, w, rope), rtol=RTOL, atol=1e-13)
    reps = np.array([[_rep_vectorised(q, k, v, h, c, w, rope) for c in range(n // w)] for h in range(hq)])
    picked = 0
    for p in range(span - 1, n):
        for h in range(hq):
            g = (p + 1) // w
            scores = reps[h, 1 : g - 1] @ q[p, h]  # raw query, no scale
            top = sorted(1 + np.argsort(-scores, kind="stable")[: span // w - 3])
            sel = longheads_selection(q, k, v, p, h, chunk=w, span=span, rope=rope)
            assert sel.chunks == [0] + [int(c) for c in top] + [g - 1]
            picked += top != list(range(g - 1 - len(top), g - 1))
    assert picked  # the selection is not trivially the most recent chunks


@pytest.mark.parametrize("positional_name", ["rope_half", "alibi", "none"])
def test_longheads_output_is_attention_over_selection(positional_name):
    n, hq, hkv = 40, 4, 2
    q, k, v = _qkv(5, n, hq, hkv)
    positional = _positional(positional_name, hq)
    got = longheads_oracle(q, k, v, **LH, scale=D_HEAD**-0.5, **positional)
    rope = positional.get("rope")
    for p in range(n):
        for h in range(hq):
            sel = longheads_selection(q, k, v, p, h, **LH, rope=rope)
            want = _naive_on_keys(q, k, v, p, h, sel.keys, sel.key_pos, sel.q_pos, positional)
            np.testing.assert_allclose(got[p, h], want, rtol=RTOL, atol=1e-13)
    # Without the quirks flag n_prefill is irrelevant; with it, only positions < n_prefill change.
    same = longheads_oracle(q, k, v, **LH, n_prefill=25, scale=D_HEAD**-0.5, **positional)
    np.testing.assert_array_equal(got, same)
    quirky = longheads_oracle(q, k, v, **LH, n_prefill=25, prefill_code_quirks=True, scale=D_HEAD**-0.5,
                              **positional)
    np.testing.assert_array_equal(quirky[25:], got[25:])
    assert np.abs(quirky[L - 1 : 25] - got[L - 1 : 25]).max() > 1e-6


# ------------------------------------------------------------------------------------------------- InfLLM

INF = dict(n_init=2, n_local=8, block=4, repr_topk=2)
N_LOCAL = INF["n_local"]


@pytest.mark.parametrize("positional_name", POSITIONALS)
@pytest.mark.parametrize("main_code", [False, True])
def test_infllm_short_is_vanilla(positional_name, main_code):
    n, hq, hkv = N_LOCAL, 4, 2
    q, k, v = _qkv(6, n, hq, hkv)
    positional = _positional(positional_name, hq)
    for steps in (infllm_steps(6, n, 4), infllm_steps(n, n, 3)):
        got, info = infllm_oracle(q, k, v, steps, **INF, topk=2, main_code=main_code, scale=D_HEAD**-0.5,
                                  return_mass=True, **positional)
        np.testing.assert_allclose(got, _naive(q, k, v, "vanilla", positional), rtol=RTOL, atol=1e-13)
        np.testing.assert_allclose(info["mass"].sum(1), n, rtol=RTOL)  # every probability is local


@pytest.mark.parametrize("positional_name", POSITIONALS)
def test_infllm_all_blocks_is_distance_limit(positional_name):
    n, hq, hkv = 46, 4, 2
    q, k, v = _qkv(7, n, hq, hkv)
    positional = _positional(positional_name, hq)
    got, info = infllm_oracle(q, k, v, infllm_steps(30, n, 4), **INF, topk=100, scale=D_HEAD**-0.5,
                              return_mass=True, **positional)
    assert len(info["blocks"]) >= 6  # the memory is in use
    want = _naive(q, k, v, "distance_limit", positional, D=N_LOCAL - 1)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-13)


def test_infllm_memory_schedule_and_representatives():
    n, hq, hkv = 50, 4, 2
    n_init, n_local, bs, rk = INF["n_init"], INF["n_local"], INF["block"], INF["repr_topk"]
    q, k, v = _qkv(8, n, hq, hkv)
    rope = _positional("rope_half", hq)["rope"]
    _, info = infllm_oracle(q, k, v, infllm_steps(22, n, 4), **INF, topk=2, rope=rope, scale=D_HEAD**-0.5,
                            return_mass=True)
    for st in info["steps"]:  # §2.3: the deterministic schedule
        b = st["b"]
        assert st["n_init_after"] == min(max(b - n_local, 0), n_init)
        assert st["blocks_after"] == (max(0, (b - n_local - n_init) // bs) if st["n_init_after"] == n_init else 0)
        assert st["selected"] == sorted(st["selected"]) and len(st["selected"]) == min(2, st["blocks"])
    for j, pos in enumerate(info["blocks"]):
        assert pos == list(range(n_init + j * bs, n_init + (j + 1) * bs))
        # A block's keys receive no local mass after it forms, so the final mass decides its representatives.
        for h in range(hq):
            best = pos[0] + np.argsort(-info["mass"][h, pos], kind="stable")[:rk]
            np.testing.assert_allclose(info["reps"][j][h], k[best, h // 2].mean(0), rtol=RTOL)
    # The retrieval of every step: the top-2 blocks by sum_h <rope(qbar_h, D), rep_{j,h}>.
    dropped = 0
    for st in info["steps"]:
        if st["blocks"] <= 2:
            continue
        qbar = q[st["a"] : st["b"]].mean(0)
        rq = np.stack([rotate(qbar[h], n_local - 1, *rope) for h in range(hq)])
        scores = [np.sum(rq * info["reps"][j]) for j in range(st["blocks"])]
        assert st["selected"] == sorted(np.argsort(-np.array(scores), kind="stable")[:2].tolist())
        dropped += 1
    assert dropped


def test_infllm_retrieval_drops_blocks():
    n, hq, hkv = 40, 2, 1
    q, k, v = _qkv(9, n, hq, hkv)
    positional = _positional("alibi", hq)
    steps = infllm_steps(24, n, 4)
    kw = dict(**INF, scale=D_HEAD**-0.5, **positional)
    got, info = infllm_oracle(q, k, v, steps, topk=1, return_mass=True, **kw)
    full = infllm_oracle(q, k, v, steps, topk=100, **kw)
    first = min(st["a"] for st in info["steps"] if st["blocks"] > 1)  # the first step that drops a block
    assert first == 20  # two blocks once b - n_local - n_init >= 2 * block, after the step [16, 20)
    np.testing.assert_array_equal(got[:first], full[:first])
    assert np.abs(got[first:] - full[first:]).max() > 1e-6


@pytest.mark.parametrize("prompt", [0, 1])
def test_infllm_single_token_steps_main_equals_canonical(prompt):
    n, hq, hkv = 40, 4, 2
    q, k, v = _qkv(10, n, hq, hkv)
    positional = _positional("rope_half", hq)
    steps = infllm_steps(prompt, n, 4)
    assert all(b - a == 1 for a, b in steps)
    kw = dict(**INF, topk=2, scale=D_HEAD**-0.5, return_mass=True, **positional)
    canon, ci = infllm_oracle(q, k, v, steps, **kw)
    main, mi = infllm_oracle(q, k, v, steps, main_code=True, **kw)
    np.testing.assert_array_equal(main, canon)
    np.testing.assert_array_equal(mi["mass"], ci["mass"])
    assert mi["global_keys"] == ci["global_keys"]


@pytest.mark.parametrize("positional_name", ["rope_interleaved_partial", "alibi"])
def test_infllm_main_code_double_counts_only_inside_the_window(positional_name):
    n, hq, hkv, step = 44, 4, 2, 4
    q, k, v = _qkv(11, n, hq, hkv)
    positional = _positional(positional_name, hq)
    steps = infllm_steps(32, n, step)
    kw = dict(**INF, topk=100, scale=D_HEAD**-0.5, return_mass=True, **positional)
    canon, ci = infllm_oracle(q, k, v, steps, **kw)
    main, mi = infllm_oracle(q, k, v, steps, main_code=True, **kw)
    doubled = 0
    for a, b in steps:
        for u in range(a, b):
            for h in range(hq):
                glob_c, glob_m = ci["global_keys"][(u, h)], mi["global_keys"][(u, h)]
                assert set(glob_c) <= set(glob_m)
                assert all(u - t >= N_LOCAL for t in glob_c)  # canonical: each key once
                extra = set(glob_m) - set(glob_c)
                # the double-counted keys: local ones with n_local - len_q < u - t < n_local, at most
                # len_q - 1 - i of them for the i-th query of the step
                assert all(N_LOCAL - (b - a) < u - t < N_LOCAL for t in extra)
                assert len(extra) <= b - 1 - u
                if extra:
                    doubled += 1
                    assert np.abs(main[u, h] - canon[u, h]).max() > 1e-9
                else:
                    np.testing.assert_array_equal(main[u, h], canon[u, h])
    assert doubled
    # decode steps (one token) do not double count
    assert all(not (set(mi["global_keys"][(u, 0)]) - set(ci["global_keys"][(u, 0)])) for u in range(32, n))
