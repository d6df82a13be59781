"""The single attention entry point: validation, then the dense or blockwise path."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.alibi import Alibi
from lminf_jax.attention_blockwise import blockwise_attention, merge_top_k
from lminf_jax.attention_decode import single_query_attention
from lminf_jax.attention_pallas import kernel_supports, lambda_attention
from lminf_jax.attention_reference import AttentionProbe, reference_attention
from lminf_jax.rope import Rotary
from lminf_jax.scores import Positional, Scaling, scaling, top_k_active
from lminf_jax.spec import AttentionSpec, Vanilla, int32_positions

Implementation = Literal["auto", "reference", "blockwise", "single_query", "pallas"]
IMPLEMENTATIONS = ("auto", "reference", "blockwise", "single_query", "pallas")
#: The Pallas kernel's largest tiles (queries x keys per program step).
PALLAS_MAX_BLOCKS = (128, 64)
#: "auto" uses the dense path up to this many scores per head (and for single queries).
DENSE_MAX_SCORES = 1 << 18


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array | np.ndarray,
    k_positions: jax.Array | np.ndarray,
    spec: AttentionSpec | None = None,
    positional: Positional = None,
    scale: float | Scaling | None = None,
    layer: int | jax.Array | None = None,
    implementation: Implementation = "auto",
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """Attention of q over k/v under ``spec`` with RoPE, ALiBi or no positional encoding.

    Args:
      q: ``(B, Tq, Hq, d)`` un-rotated queries; k: ``(B, Tk, Hkv, d)`` un-rotated keys;
        v: ``(B, Tk, Hkv, dv)``. ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA).
      q_positions, k_positions: integer positions ``(T,)`` or ``(B, T)``; negative marks
        an empty slot (padding). Masks and rotations come only from these.
      spec: `AttentionSpec` (default vanilla causal).
      positional: a `Rotary` (applied here, to q and k), an `Alibi`, or None.
      scale: score scale, a number or a `lminf_jax.scores.Scaling` (with a soft cap); default ``1 / sqrt(d)``.
      layer: layer index (int or traced); required when ``spec.top_k`` is set.
      implementation: "reference" (dense float32), "blockwise" (jitted, O(T(G+L))),
        "single_query" (one query per row, one pass over the keys: `lminf_jax.attention_decode`),
        "pallas" (the fused kernel of `lminf_jax.attention_pallas` for self-attention at
        positions 0..T-1 in every row under a bounded spec; tiles of at most
        `PALLAS_MAX_BLOCKS`; interpreted off GPU), or "auto": dense for single queries or at
        most `DENSE_MAX_SCORES` scores per head, blockwise otherwise.
      block_q, block_k: query block and key chunk sizes of the blockwise path.

    Returns ``(B, Tq, Hq, dv)`` in q's dtype; scores and softmax are float32.
    """
    spec = Vanilla() if spec is None else spec
    qp, kp, scale = _validate(q, k, v, q_positions, k_positions, spec, positional, scale, layer, block_q, block_k)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    tq, tk = q.shape[1], k.shape[1]
    if implementation == "pallas":
        if not kernel_supports(spec):
            raise ValueError(f"implementation 'pallas' serves a window with bounded sinks and no top-k; "
                             f"{spec.describe()} needs 'blockwise'")
        _check_self_attention(qp, kp)
        return lambda_attention(q, k, v, spec=spec, positional=positional, scale=scale,
                                block_q=min(block_q, PALLAS_MAX_BLOCKS[0]), block_k=min(block_k, PALLAS_MAX_BLOCKS[1]),
                                interpret=jax.default_backend() != "gpu")[0]
    if implementation == "single_query":
        if tq != 1 or spec.top_k is not None:
            raise ValueError(f"implementation 'single_query' takes one query per row and no top-k; got {tq} "
                             f"queries, top_k {spec.top_k}")
        return single_query_attention(q, k, v, qp, kp, spec=spec, positional=positional, scale=scale)
    if implementation == "reference" or (
        implementation == "auto" and (tq == 1 or tq * tk <= DENSE_MAX_SCORES)
    ):
        return reference_attention(q, k, v, qp, kp, spec=spec, positional=positional, scale=scale, layer=layer)
    _check_blockwise_contract(qp, kp)
    out, lse = blockwise_attention(
        q, k, v, qp, kp, spec=spec, positional=positional, scale=scale, block_q=block_q, block_k=block_k
    )
    active = top_k_active(spec, layer)
    if active is False:
        return out
    return merge_top_k(
        out, lse, q, k, v, qp, kp, jnp.asarray(active), spec=spec, positional=positional, scale=scale
    )


def attention_probe(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array | np.ndarray,
    k_positions: jax.Array | np.ndarray,
    spec: AttentionSpec | None = None,
    positional: Positional = None,
    scale: float | Scaling | None = None,
    layer: int | jax.Array | None = None,
) -> tuple[jax.Array, AttentionProbe]:
    """Dense attention that also returns logits, probabilities and classes per head.

    Same arguments as `attention`; O(Tq * Tk) memory, so probe long inputs by passing
    only the query rows of interest (with their positions) against all keys.
    """
    spec = Vanilla() if spec is None else spec
    qp, kp, scale = _validate(q, k, v, q_positions, k_positions, spec, positional, scale, layer, 1, 1)
    return reference_attention(
        q, k, v, qp, kp, spec=spec, positional=positional, scale=scale, layer=layer, return_probe=True
    )


def _validate(q, k, v, q_positions, k_positions, spec, positional, scale, layer, block_q, block_k):
    """Check shapes, dtypes and parameters; return (B, T) int32 positions and the `Scaling`."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have shape (batch, time, heads, head_dim), got shape {getattr(x, 'shape', None)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    b, tq, hq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"v must match k in (time, kv_heads): k {k.shape}, v {v.shape}")
    if k.shape[3] != d:
        raise ValueError(f"k head_dim {k.shape[3]} must equal q head_dim {d}")
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    if tq < 1 or k.shape[1] < 1:
        raise ValueError(f"q and k need at least one time step, got q {q.shape}, k {k.shape}")
    if not isinstance(spec, AttentionSpec):
        raise ValueError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    if isinstance(positional, Rotary):
        if positional.rotary_dim > d:
            raise ValueError(f"positional.rotary_dim ({positional.rotary_dim}) must be <= head_dim ({d})")
    elif isinstance(positional, Alibi):
        if len(positional.slopes) != hq:
            raise ValueError(f"positional (Alibi) has {len(positional.slopes)} slopes for {hq} query heads")
    elif positional is not None:
        raise ValueError(f"positional must be a Rotary, an Alibi or None, got {type(positional).__name__}")
    scale = scaling(scale, d)
    if spec.top_k is not None and layer is None:
        raise ValueError("layer must be given when spec.top_k is set (top-k runs only in some layers)")
    for name, n in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    qp = _positions("q_positions", q_positions, b, tq)
    spec.check_query_positions("q_positions", qp)
    kp = _positions("k_positions", k_positions, b, k.shape[1])
    return qp, kp, scale


def _positions(name: str, positions, batch: int, length: int) -> jax.Array:
    positions = int32_positions(name, positions)
    if positions.shape == (length,):
        return jnp.broadcast_to(positions, (batch, length))
    if positions.shape != (batch, length):
        raise ValueError(f"{name} must have shape ({length},) or ({batch}, {length}), got {positions.shape}")
    return positions


def _check_self_attention(q_positions: jax.Array, k_positions: jax.Array) -> None:
    """The kernel's contract: queries and keys both at 0..T-1 in every row (checked when concrete)."""
    if q_positions.shape != k_positions.shape:
        raise ValueError(f"implementation 'pallas' is self-attention: q and k need the same length, got "
                         f"{q_positions.shape[1]} and {k_positions.shape[1]}")
    if isinstance(q_positions, jax.core.Tracer) or isinstance(k_positions, jax.core.Tracer):
        return
    expected = np.arange(q_positions.shape[1])
    if not (np.array_equal(np.asarray(q_positions), np.broadcast_to(expected, q_positions.shape))
            and np.array_equal(np.asarray(k_positions), np.broadcast_to(expected, k_positions.shape))):
        raise ValueError("implementation 'pallas' needs q and k at positions 0..T-1 in every row (no padding); "
                         "use 'blockwise' for other positions")


def _check_blockwise_contract(q_positions: jax.Array, k_positions: jax.Array) -> None:
    """Check the blockwise ordering contract when positions are concrete (not traced)."""
    if isinstance(q_positions, jax.core.Tracer) or isinstance(k_positions, jax.core.Tracer):
        return
    for name, pos, step_ok in (
        ("k_positions", np.asarray(k_positions), lambda d: d > 0),
        ("q_positions", np.asarray(q_positions), lambda d: d == 1),
    ):
        valid = pos >= 0
        steps = np.diff(pos, axis=1)
        both = valid[:, 1:] & valid[:, :-1]
        if np.any(valid[:, :-1] & ~valid[:, 1:]) or not np.all(step_ok(steps[both])):
            rule = "strictly increasing" if name == "k_positions" else "consecutive"
            raise ValueError(
                f"{name}: the blockwise implementation needs empty (negative) slots first and {rule} "
                "positions after them in every row; use implementation='reference' for other layouts"
            )
