"""The single attention entry point: validation, then the path each platform takes (`attention_route`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lminf_jax.alibi import Alibi
from lminf_jax.attention_blockwise import blockwise_attention, merge_top_k
from lminf_jax.attention_call import AttentionCall, Implementation
from lminf_jax.attention_decode import single_query_attention
from lminf_jax.attention_pallas import lambda_attention
from lminf_jax.attention_reference import AttentionProbe, reference_attention
from lminf_jax.attention_vendor import SIXTEEN_BIT, Route, unsupported, window_sink_attention
from lminf_jax.retrieval import sequence_retrieval_attention
from lminf_jax.rope import Rotary
from lminf_jax.scores import Positional, Scaling, scaling, top_k_active
from lminf_jax.int32 import int32_positions
from lminf_jax.spec import AttentionSpec, Vanilla

#: The explicit implementations that run a fused window kernel (`lminf_jax.attention_vendor`) and theirs.
WINDOW_ROUTES = {"cudnn": "cudnn", "splash": "splash", "window_xla": "xla"}
#: The implementations of self-attention at positions 0..T-1 only (fused kernels).
FUSED_IMPLEMENTATIONS = ("pallas", *WINDOW_ROUTES)
#: The platforms "auto" routes for by `lax.platform_dependent`; any other platform lowers as "cpu".
PLATFORMS = ("cpu", "cuda", "tpu")
#: The Pallas kernel's largest tiles (queries x keys per program step).
PALLAS_MAX_BLOCKS = (128, 64)
#: "auto" uses the dense path up to this many scores per head (and for single queries).
DENSE_MAX_SCORES = 1 << 18


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array | np.ndarray | None = None,
    k_positions: jax.Array | np.ndarray | None = None,
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
        an empty slot (padding). Masks and rotations come only from these. Both None:
        self-attention of one sequence at positions ``0..T-1`` in every row, a fact known
        when tracing, which the fused kernels need.
      spec: `AttentionSpec` (default vanilla causal).
      positional: a `Rotary` (applied here, to q and k), an `Alibi`, or None.
      scale: score scale, a number or a `lminf_jax.scores.Scaling` (with a soft cap); default ``1 / sqrt(d)``.
      layer: layer index (int or traced); required when ``spec.top_k`` is set.
      implementation: "reference" (dense float32), "blockwise" (jitted, O(T(G+L))),
        "single_query" (one query per row, one pass over the keys: `lminf_jax.attention_decode`),
        "pallas" (the fused kernel of `lminf_jax.attention_pallas`; tiles of at most
        `PALLAS_MAX_BLOCKS`; interpreted off GPU), "cudnn", "splash" (the vendor's window kernel
        plus a sink branch, `lminf_jax.attention_vendor`; splash interpreted off TPU),
        "window_xla" (that route with jax's dense XLA attention for the window: cuDNN's call,
        runnable anywhere), or "auto"; a retrieval method (``spec.retrieves``) runs its own exact
        computation (`lminf_jax.retrieval`) under "auto", "reference" and "blockwise", on
        self-attention only (each row at positions ``0..n-1`` after its padding): `attention_route` per platform (`PLATFORMS`), chosen when
        the program is lowered (`lax.platform_dependent`). The fused kernels take
        self-attention at positions ``0..T-1`` (positions None, or concrete and equal to those).
      block_q, block_k: query block and key chunk sizes of the blockwise path.

    Returns ``(B, Tq, Hq, dv)`` in q's dtype; scores and softmax are float32.
    """
    call = AttentionCall(Vanilla() if spec is None else spec, implementation, block_q, block_k)
    return call_attention(q, k, v, call=call, q_positions=q_positions, k_positions=k_positions, positional=positional,
                          scale=scale, layer=layer)


def call_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    call: AttentionCall,
    q_positions: jax.Array | np.ndarray | None = None,
    k_positions: jax.Array | np.ndarray | None = None,
    positional: Positional = None,
    scale: float | Scaling | None = None,
    layer: int | jax.Array | None = None,
) -> jax.Array:
    """`attention` under the settings ``call`` carries (its spec, implementation and block sizes; its
    ``frequencies`` are already resolved into ``positional``); the other arguments as there."""
    contiguous = _contiguous(q, k, q_positions, k_positions)
    if call.spec.retrieves:
        return _retrieval(q, k, v, call, q_positions, k_positions, positional, scale, layer, contiguous)
    if call.implementation in FUSED_IMPLEMENTATIONS and not contiguous:
        _check_self_attention(call.implementation, q_positions, k_positions)
    if contiguous:
        q_positions = k_positions = np.arange(q.shape[1], dtype=np.int32)
    qp, kp, scale = _validate(q, k, v, q_positions, k_positions, call.spec, positional, scale, layer)
    run = functools.partial(_run, qp=qp, kp=kp, call=call, positional=positional, scale=scale, layer=layer)
    if call.implementation != "auto":
        _check_explicit(call, q, v, positional, scale)
        interpret = (call.implementation == "pallas" and jax.default_backend() != "gpu") or (
            call.implementation == "splash" and jax.default_backend() != "tpu")
        return run(call.implementation, q, k, v, interpret=interpret)
    routes = {platform: _route(q, k, v, contiguous, call, positional, scale, platform).implementation
              for platform in PLATFORMS}
    if len(set(routes.values())) == 1:
        return run(routes["cpu"], q, k, v)
    branch = {name: functools.partial(run, name) for name in set(routes.values())}  # one per implementation
    return lax.platform_dependent(q, k, v, cuda=branch[routes["cuda"]], tpu=branch[routes["tpu"]],
                                  default=branch[routes["cpu"]])


def attention_route(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array | np.ndarray | None = None,
    k_positions: jax.Array | np.ndarray | None = None,
    spec: AttentionSpec | None = None,
    positional: Positional = None,
    scale: float | Scaling | None = None,
    implementation: Implementation = "auto",
    platform: str | None = None,
) -> Route:
    """Which implementation `attention` with these arguments runs when lowered for ``platform`` (one of
    `PLATFORMS`; default: this process's backend, "gpu" read as "cuda"), and why. Only shapes and dtypes
    of q, k and v are read (``jax.ShapeDtypeStruct`` will do)."""
    call = AttentionCall(Vanilla() if spec is None else spec, implementation)
    platform = platform or {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    if platform not in PLATFORMS:
        platform = "cpu"
    contiguous = _contiguous(q, k, q_positions, k_positions)
    scale = scaling(scale, q.shape[-1])
    if call.implementation != "auto":
        return Route(call.implementation, "chosen by the caller")
    if call.spec.retrieves:
        return Route("retrieval", f"{call.spec.kind} chooses its keys when it runs (lminf_jax.retrieval)")
    return _route(q, k, v, contiguous, call, positional, scale, platform)


def _route(q, k, v, contiguous: bool, call: AttentionCall, positional: Positional, scale: Scaling,
           platform: str) -> Route:
    """The routing table of "auto" (see `attention_route`)."""
    spec = call.spec
    tq, tk = q.shape[1], k.shape[1]
    if tq == 1:
        return Route("reference", "one query per row: dense")
    if tq * tk <= DENSE_MAX_SCORES:
        return Route("reference", f"at most {DENSE_MAX_SCORES:,} scores per head: dense")
    kernel = {"cuda": "cudnn", "tpu": "splash"}.get(platform)
    if kernel is None:
        return Route("blockwise", f"{platform}: no fused kernel")
    if not contiguous:
        return Route("blockwise", "positions given: the fused kernels need self-attention at 0..T-1 known when tracing")
    if jnp.dtype(q.dtype) not in SIXTEEN_BIT:
        return Route("blockwise", f"{jnp.dtype(q.dtype).name} inputs: full-precision products")
    why = unsupported(kernel, spec, positional, scale, q.dtype, q.shape[-1], v.shape[-1])
    if why is not None:
        return Route("blockwise", why)
    sinks = " plus the sink branch" if spec.has_global else ""
    return Route(kernel, f"{kernel}'s fused {'causal' if spec.window is None else 'window'} kernel{sinks}")


#: The implementations a retrieval method runs under (all of them its one exact computation).
RETRIEVAL_IMPLEMENTATIONS = ("auto", "reference", "blockwise")


def _retrieval(q, k, v, call: AttentionCall, q_positions, k_positions, positional, scale, layer,
               contiguous: bool) -> jax.Array:
    """A retrieval method's attention of a sequence over itself (`lminf_jax.retrieval`), after the checks
    every call gets and those of its own: self-attention, each row at ``0..n-1`` after its padding."""
    if call.implementation not in RETRIEVAL_IMPLEMENTATIONS:
        raise ValueError(f"{call.spec.describe()} runs its own computation (lminf_jax.retrieval); implementation "
                         f"must be one of {RETRIEVAL_IMPLEMENTATIONS}, got {call.implementation!r}")
    if contiguous:
        q_positions = k_positions = np.arange(q.shape[1], dtype=np.int32)
    if q.shape[1] != k.shape[1] or (q_positions is not k_positions and not (
            _concrete(q_positions, k_positions) and np.array_equal(np.asarray(q_positions), np.asarray(k_positions)))):
        raise ValueError(f"{call.spec.describe()} attends a sequence over itself: give the same positions for queries "
                         "and keys (a cache's step goes through lminf_jax.cache.cached_attention)")
    qp, _, scale = _validate(q, k, v, q_positions, k_positions, call.spec, positional, scale, layer)
    if _concrete(qp):
        rows = np.asarray(qp)
        valid = rows >= 0
        expected = np.cumsum(valid, axis=1) - 1
        if not np.all(np.where(valid, rows == expected, True)) or np.any(valid[:, :-1] & ~valid[:, 1:]):
            raise ValueError(f"{call.spec.describe()}: each row's positions must be its padding (negative) followed by "
                             "0, 1, ..., n-1")
    return sequence_retrieval_attention(q, k, v, qp, spec=call.spec, positional=positional, scale=scale)


def _concrete(*arrays) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in arrays)


def _run(implementation: str, q, k, v, *, qp, kp, call: AttentionCall, positional, scale, layer,
         interpret: bool = False) -> jax.Array:
    """The attention output through ``implementation`` (the call's own or the one "auto" routed to; inputs
    validated and, for an explicit choice, checked)."""
    spec, block_q, block_k = call.spec, call.block_q, call.block_k
    if implementation == "pallas":
        return lambda_attention(q, k, v, spec=spec, positional=positional, scale=scale,
                                block_q=min(block_q, PALLAS_MAX_BLOCKS[0]), block_k=min(block_k, PALLAS_MAX_BLOCKS[1]),
                                interpret=interpret)[0]
    if implementation in WINDOW_ROUTES:
        return window_sink_attention(q, k, v, spec=spec, positional=positional, scale=scale,
                                     kernel=WINDOW_ROUTES[implementation], interpret=interpret)[0]
    if implementation == "single_query":
        return single_query_attention(q, k, v, qp, kp, spec=spec, positional=positional, scale=scale)
    if implementation == "reference":
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


def _check_explicit(call: AttentionCall, q, v, positional: Positional, scale: Scaling) -> None:
    """A ValueError naming what the call's explicitly chosen implementation cannot take."""
    implementation, spec, tq = call.implementation, call.spec, q.shape[1]
    if implementation == "single_query" and (tq != 1 or spec.top_k is not None):
        raise ValueError(f"implementation 'single_query' takes one query per row and no top-k; got {tq} "
                         f"queries, top_k {spec.top_k}")
    if implementation == "pallas" and not spec.bounded:
        raise ValueError(f"implementation 'pallas' serves a window with bounded sinks and no top-k; "
                         f"{spec.describe()} needs 'blockwise'")
    if implementation in WINDOW_ROUTES:
        why = unsupported(WINDOW_ROUTES[implementation], spec, positional, scale, q.dtype, q.shape[-1], v.shape[-1])
        if why is not None:
            raise ValueError(f"implementation {implementation!r} cannot take {spec.describe()} here: {why}; "
                             "use 'blockwise'")


def _contiguous(q, k, q_positions, k_positions) -> bool:
    """Whether a call is self-attention at positions 0..T-1 by construction (both positions None)."""
    if (q_positions is None) != (k_positions is None):
        raise ValueError("give both q_positions and k_positions, or neither (self-attention at 0..T-1)")
    if q_positions is None and q.shape[1] != k.shape[1]:
        raise ValueError(f"without positions attention is self-attention at 0..T-1: q and k need the same length, "
                         f"got {q.shape[1]} and {k.shape[1]}")
    return q_positions is None


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
    call = AttentionCall(Vanilla() if spec is None else spec, "reference")  # the dense path; checks the spec
    qp, kp, scale = _validate(q, k, v, q_positions, k_positions, call.spec, positional, scale, layer)
    return reference_attention(
        q, k, v, qp, kp, spec=call.spec, positional=positional, scale=scale, layer=layer, return_probe=True
    )


def _validate(q, k, v, q_positions, k_positions, spec: AttentionSpec, positional, scale, layer):
    """Check shapes, dtypes and the per-layer parameters (`AttentionCall` checks its own); return (B, T) int32
    positions and the `Scaling`."""
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


def _check_self_attention(implementation: str, q_positions, k_positions) -> None:
    """The fused kernels' contract for given positions: queries and keys both at 0..T-1 in every row,
    checked on the concrete values (traced positions cannot be checked, so they are refused)."""
    if isinstance(q_positions, jax.core.Tracer) or isinstance(k_positions, jax.core.Tracer):
        raise ValueError(f"implementation {implementation!r} takes self-attention at positions 0..T-1: pass "
                         "q_positions=k_positions=None (traced positions cannot be checked)")
    qp, kp = np.asarray(q_positions), np.asarray(k_positions)
    if not (qp.ndim in (1, 2) and kp.ndim in (1, 2) and qp.shape[-1] == kp.shape[-1]
            and all(np.array_equal(p, np.broadcast_to(np.arange(p.shape[-1]), p.shape)) for p in (qp, kp))):
        raise ValueError(f"implementation {implementation!r} needs q and k at positions 0..T-1 in every row (no "
                         "padding, same length); use 'blockwise' for other positions")


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
