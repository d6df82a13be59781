"""A deliberately naive float64 oracle, written from the method's definition.

One query, one key at a time, with plain Python branching: no code shared with the
library except reading the frequencies / slopes off the positional object.
"""

from __future__ import annotations

import numpy as np


def rotate(x: np.ndarray, position: int, inv_freq, layout: str, scaling: float) -> np.ndarray:
    """Rotate one head vector x (d,) to `position` in float64."""
    x = np.asarray(x, np.float64).copy()
    n = len(inv_freq)
    ang = position * np.asarray(inv_freq, np.float64)
    c, s = np.cos(ang) * scaling, np.sin(ang) * scaling
    if layout == "half":
        a, b = x[:n].copy(), x[n : 2 * n].copy()
        x[:n], x[n : 2 * n] = a * c - b * s, b * c + a * s
    else:
        a, b = x[0 : 2 * n : 2].copy(), x[1 : 2 * n : 2].copy()
        x[0 : 2 * n : 2], x[1 : 2 * n : 2] = a * c - b * s, b * c + a * s
    return x


def naive_attention(q, k, v, q_pos, k_pos, *, kind, G=0, L=None, D=None, group=None, leak=None, rope=None,
                    slopes=None, scale, softcap=None, top_k=None, top_k_active=False, return_lse=False):
    """Return (B, Tq, Hq, dv) float64, and with ``return_lse`` the log-sum-exp of each row's
    attended logits (B, Tq, Hq) (-inf where none).

    kind: vanilla | lm_infinite | lambda_mask | distance_limit | sliding_window | streaming_llm |
    self_extend (neighbour window L, group) | leaky_rerope (window D, leak). Positions may be fractions.
    rope: None or (inv_freq, layout, attention_scaling). slopes: None or per-query-head slopes.
    softcap: None or c, each scaled score becoming c * tanh(score / c).
    top_k: None or (k, insert_distance); applied to the last query slot when top_k_active.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
    bsz, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    out = np.zeros((bsz, tq, hq, v.shape[-1]))
    lse = np.full((bsz, tq, hq), -np.inf)

    rotated: dict = {}  # each (vector, position) is rotated once; the scores stay per (i, j)

    def rotation(x, index, position):
        key = (x is q, index, position)
        if key not in rotated:
            rotated[key] = rotate(x[index], position, *rope)
        return rotated[key]

    def score(qv, kv, qp, kp, h):
        """Query slot qv = (b, t, h) placed at qp, key slot kv = (b, s, kh) at kp (kp=None: the key at
        position 0, as LM-Infinite scores sinks)."""
        if rope is not None:
            qv, kv = rotation(q, qv, qp), rotation(k, kv, 0 if kp is None else kp)
        else:
            qv, kv = q[qv], k[kv]
        s = float(qv @ kv) * scale
        if softcap is not None:  # Gemma-2: cap * tanh(score / cap), before any bias
            s = softcap * np.tanh(s / softcap)
        if slopes is not None:
            s -= slopes[h] * (qp - (0 if kp is None else kp))
        return s

    for b in range(bsz):
        for t in range(tq):
            i = int(q_pos[b, t])
            if i < 0:
                continue
            for h in range(hq):
                kh = h // (hq // hkv)
                logits, values, middle = [], [], []
                for s_ in range(tk):
                    j = int(k_pos[b, s_])
                    if j < 0 or j > i:
                        continue
                    qv, kv = (b, t, h), (b, s_, kh)
                    placed = placement(i, j, kind=kind, G=G, L=L, D=D, group=group, leak=leak)
                    if placed is None:
                        middle.append((s_, score(qv, kv, top_k[1], None, h) if top_k else 0.0))
                        continue
                    logits.append(score(qv, kv, *placed, h))
                    values.append(v[b, s_, kh])
                if top_k is not None and top_k_active and t == tq - 1 and middle:
                    for s_, sc in sorted(middle, key=lambda m: -m[1])[: top_k[0]]:
                        logits.append(sc)
                        values.append(v[b, s_, kh])
                if not logits:
                    continue
                w = np.exp(np.array(logits) - max(logits))
                out[b, t, h] = (w / w.sum()) @ np.array(values)
                lse[b, t, h] = max(logits) + np.log(w.sum())
    return (out, lse) if return_lse else out


def placement(i: int, j: int, *, kind, G=0, L=None, D=None, group=None, leak=None) -> tuple | None:
    """The (query, key) positions at which query position i scores key position j <= i, or None
    when the method hides the key (a middle token). A key position None: the key unrotated, at 0."""
    delta = i - j
    if kind == "vanilla":
        return i, j
    if kind == "self_extend":  # Jin et al. 2024, as in LongLM's self_extend_patch/Llama.py
        return (i, j) if delta < L else (i // group + L - L / group, j // group)
    if kind == "leaky_rerope":  # distance w + (delta - w) / k beyond the window w
        return (i, j) if delta < D else (D + (i - D) / leak, j / leak)
    if kind == "distance_limit":
        return (i, j) if delta < D else (D, None)
    if delta < L:
        return i, j
    if kind == "sliding_window" or j >= G:
        return None
    # lm_infinite, lambda_mask, streaming_llm: a sink beyond the window
    return {"lm_infinite": (D, None), "lambda_mask": (i, j), "streaming_llm": (min(i, G + L - 1), j)}[kind]


def allowed_keys(i: int, k_pos: np.ndarray, *, kind, **params) -> np.ndarray:
    """Boolean mask over key slots that query position i attends (no top-k)."""
    return np.array([0 <= j <= i and placement(i, int(j), kind=kind, **params) is not None for j in np.asarray(k_pos)],
                    bool)
