"""Λ-attention on the vendors' fused kernels: their window attention plus a sink branch, merged exactly.

A spec that attends a window and at most its ``sinks`` leading keys beyond it (`AttentionSpec.bounded`:
LM-Infinite, the Λ-mask, StreamingLLM's prefill, a sliding window) or every earlier key (vanilla) splits
into two disjoint key sets per query ``i``:

1. **the window** (``0 <= i - j < L``; every ``j <= i`` for vanilla), scored at the true positions: exactly
   the causal sliding-window attention the vendors fuse, which also returns each row's log-sum-exp:
   cuDNN's flash attention on GPU (`jax.nn.dot_product_attention`'s ``"cudnn"`` implementation) and
   splash attention on TPU (``jax.experimental.pallas.ops.tpu.splash_attention``, with a ``LocalMask``);
2. **the sinks** beyond the window (``i - j >= L`` and ``j < G``), scored where the spec places global
   keys (`lminf_jax.scores.masked_scores`): a ``(T, G)`` product, G/L of the window's work.

The two are merged by the online softmax (`lminf_jax.online_softmax`), so the result is the spec's
attention exactly, whatever kernel computed the window. RoPE is applied before the kernels (from
integer positions, `lminf_jax.scores.prepare_queries` / `prepare_keys`), so the kernels see plain dot
products. The vendor kernels assume self-attention over contiguous positions: every row at ``0..T-1``.

What the kernels cannot carry stays elsewhere (`unsupported` says why): ALiBi's bias (neither kernel
takes a per-head linear bias without an O(T^2) array), soft-capping on cuDNN (jax's call has none;
splash has ``attn_logits_soft_cap``), float32 inputs on cuDNN (it takes 16-bit inputs; splash takes
float32 but multiplies at the TPU's default precision, so "auto" keeps float32 calls on the blockwise
path's full-precision products), head dims cuDNN refuses,
and specs whose global class is unbounded or that add top-k middle tokens.

Rows that attend a non-finite key or value are NaN and no other row is touched: keys and values are
cleaned before the kernels (a flash kernel multiplies masked weights, 0, by every value of a tile) and
the rows whose window or sinks hold a non-finite entry are marked (a running count over the keys).

Differentiation: the forward runs the kernels; the backward is the blockwise path's (`jax.custom_vjp`),
exact, because jax's cuDNN backward ignores the log-sum-exp's cotangent that the merge produces.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.alibi import Alibi
from lminf_jax.attention_blockwise import blockwise_attention
from lminf_jax.online_softmax import softmax_finish, softmax_init, softmax_merge, softmax_state_of, softmax_update
from lminf_jax.scores import (
    Positional, Scaling, attends_non_finite, last_key_position, masked_scores, prepare_keys, prepare_queries,
)
from lminf_jax.spec import AttentionSpec

#: The window kernels: cuDNN (GPU), splash attention (TPU), and ``"xla"``: the very call that carries cuDNN
#: with jax's dense XLA attention in its place (O(T^2) memory), which runs anywhere (what CPU tests check).
WindowKernel = Literal["cudnn", "splash", "xla"]
#: Input dtypes the fused kernels take (they multiply 16-bit inputs on the matrix units).
SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
#: Splash attention tiles sequences in multiples of this many tokens (its lane width).
SPLASH_TILE = 128


class Route(NamedTuple):
    """Which implementation a call runs on one platform, and why."""

    implementation: str
    reason: str


def unsupported(kernel: WindowKernel, spec: AttentionSpec, positional: Positional, scale: Scaling,
                dtype, head_dim: int, value_dim: int) -> str | None:
    """Why the window-kernel route with ``kernel`` cannot take a call (None when it can)."""
    if spec.top_k is not None:
        return "top-k middle tokens may pick any key"
    if spec.far == "all":
        return f"{spec.kind} scores every key beyond its window (not a window plus sinks)"
    if isinstance(positional, Alibi):
        return "ALiBi's bias is not in the fused window kernels"
    if kernel == "splash":
        return None
    if scale.softcap is not None:
        return "jax's cuDNN attention has no logit soft-capping"
    if kernel == "xla":
        return None
    if jnp.dtype(dtype) not in SIXTEEN_BIT:
        return f"cuDNN takes bfloat16 or float16 inputs, not {jnp.dtype(dtype).name}"
    limit = cudnn_head_dim_limit()
    if limit is None:
        return "no cuDNN where the call is traced"
    if head_dim != value_dim or head_dim % 8 or head_dim > limit:
        return f"cuDNN takes equal key and value head dims, multiples of 8 up to {limit}; got {head_dim}, {value_dim}"
    return None


@functools.cache
def cudnn_head_dim_limit() -> int | None:
    """The largest head dim cuDNN's flash attention takes here (256 from Hopper on, else 128), or None
    when this process has no cuDNN (then the route cannot be traced)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused

        fused.check_cudnn_version()
        return 256 if fused.check_compute_capability("9.0") else 128
    except Exception:  # noqa: BLE001 - no CUDA plugin, no GPU: not available
        return None


def window_sink_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, spec: AttentionSpec, positional: Positional,
                          scale: Scaling, kernel: WindowKernel, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Self-attention ``q (B, T, Hq, d)`` over ``k, v (B, T, Hkv, d|dv)``, every row at positions 0..T-1,
    under ``spec``: the window from ``kernel``, the sinks beyond it from a ``(T, G)`` branch, merged.
    Returns the output ``(B, T, Hq, dv)`` in q's dtype and the float32 log-sum-exp ``(B, T, Hq)``.
    ``interpret``: splash attention through the Pallas interpreter (any backend). The caller checks
    `unsupported` first."""
    return _routed(q, k, v, (spec, positional, scale, kernel, interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _routed(q, k, v, config):
    return _forward(q, k, v, *config)


def _routed_fwd(q, k, v, config):
    return _forward(q, k, v, *config), (q, k, v)


def _routed_bwd(config, residuals, cotangents):
    spec, positional, scale = config[:3]
    q, k, v = residuals
    positions = _positions(q)
    _, pull = jax.vjp(lambda q, k, v: blockwise_attention(q, k, v, positions, positions, spec=spec,
                                                          positional=positional, scale=scale), q, k, v)
    return pull(cotangents)


_routed.defvjp(_routed_fwd, _routed_bwd)


def _positions(q: jax.Array) -> jax.Array:
    b, t = q.shape[:2]
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _forward(q, k, v, spec: AttentionSpec, positional: Positional, scale: Scaling, kernel: WindowKernel,
             interpret: bool) -> tuple[jax.Array, jax.Array]:
    b, t, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    g = hq // hkv
    positions = _positions(q)
    k, bad_k = _cleaned(k)
    v, bad_v = _cleaned(v)
    bad = bad_k | bad_v  # (B, T, Hkv): keys whose score or value is not finite
    last = last_key_position(positions, positional)
    q_local, q_global = prepare_queries(q.reshape(b, t, hkv, g, d), positions, spec, positional, last)
    k_local, k_global = prepare_keys(k, positions, spec, positional, last)
    window = spec.window if spec.window is not None and spec.window < t else None  # None: every earlier key
    run = (functools.partial(_splash_window, interpret=interpret) if kernel == "splash"
           else functools.partial(_gpu_window, implementation=kernel))
    out, lse = run(q_local.reshape(b, t, hq, d).astype(q.dtype), k_local.astype(k.dtype), v, window=window,
                   scale=scale)
    out = jnp.where(_window_attends(bad, window)[:, :, :, None, None], jnp.nan,
                    out.reshape(b, t, hkv, g, dv).astype(jnp.float32))
    state = softmax_state_of(out.transpose(0, 2, 3, 1, 4), lse.astype(jnp.float32).reshape(b, t, hkv, g)
                             .transpose(0, 2, 3, 1))  # (B, Hkv, Hg, T[, dv])
    sinks = min(spec.sinks, t)
    if spec.has_global and window is not None and sinks:
        state = softmax_merge(state, _sink_state(q_local, q_global, k_local[:, :sinks], k_global[:, :sinks],
                                                 v[:, :sinks], bad[:, :sinks], positions, spec=spec,
                                                 positional=positional, scale=scale))
    out, lse = softmax_finish(state)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, dv).astype(q.dtype)
    return out, lse.transpose(0, 3, 1, 2).reshape(b, t, hq)


def _cleaned(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x (B, T, H, n)`` with non-finite entries zeroed, and ``(B, T, H)``: which rows held one."""
    finite = jnp.isfinite(x)
    return jnp.where(finite, x, jnp.zeros((), x.dtype)), ~jnp.all(finite, axis=-1)


def _window_attends(bad: jax.Array, window: int | None) -> jax.Array:
    """``(B, T, Hkv)``: the queries whose window (keys ``i - window < j <= i``; every ``j <= i`` for None)
    holds a ``bad`` key, from a running count of them."""
    count = jnp.cumsum(bad.astype(jnp.int32), axis=1)
    if window is None:
        return count > 0
    before = jnp.pad(count, ((0, 0), (window, 0), (0, 0)))[:, : count.shape[1]]
    return count - before > 0


def _sink_state(q_local, q_global, k_local, k_global, v, bad, positions, *, spec: AttentionSpec,
                positional: Positional, scale: Scaling):
    """The online-softmax state ``(B, Hkv, Hg, T[, dv])`` of every query over the sinks in its global
    class (beyond its window), scored where ``spec`` places global keys."""
    sink_positions = positions[:, : k_local.shape[1]]
    scores, attended = masked_scores(q_local, q_global, k_local, k_global, positions, sink_positions, spec=spec,
                                     positional=positional, scale=scale, include_local=False)
    state = softmax_init(scores.shape[:-1], v.shape[-1])
    poisoned = jnp.broadcast_to(attends_non_finite(attended, bad), state.m.shape)
    return softmax_update(state, scores, lambda p: jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), v,
                                                              preferred_element_type=jnp.float32), poisoned)


def _gpu_window(q, k, v, *, window: int | None, scale: Scaling, implementation: str):
    """Causal attention over the last ``window`` keys (None: all) through `jax.nn.dot_product_attention`'s
    arguments: ``(B, T, Hq, dv)`` and the float32 log-sum-exp ``(B, T, Hq)``. jax.nn's public call rounds
    the log-sum-exp to the output's dtype (bfloat16: 3 significant digits, too coarse for the merge), so
    cuDNN is called through the function that call wraps, with the arguments it passes: a causal mask
    and ``sliding_window_length = left window + 1``."""
    local = None if window is None else (window - 1, 0)
    if implementation == "xla":
        out, lse = jax.nn.dot_product_attention(q, k, v, scale=scale.factor, is_causal=True, local_window_size=local,
                                                implementation="xla", return_residual=True)
        return out, lse.astype(jnp.float32)
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    out, lse = dot_product_attention(q, k, v, scale=scale.factor, mask_type=MaskType.CAUSAL,
                                     sliding_window_length=None if local is None else local[0] + 1,
                                     return_residual=True)
    return out, jnp.swapaxes(lse, 1, 2)  # cuDNN's residual is (B, Hq, T)


def _splash_window(q, k, v, *, window: int | None, scale: Scaling, interpret: bool):
    """The same window through splash attention (TPU; ``interpret`` anywhere). Splash does not scale the
    logits, so queries are scaled first (in float32, rounded once); sequences are padded at the end to
    whole tiles, which no real query attends (they come after it)."""
    b, t, hq, d = q.shape
    padded = -(-t // SPLASH_TILE) * SPLASH_TILE
    kernel = _splash_kernel(padded, window, hq, scale.softcap, interpret)
    heads_first = lambda x: jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731
    scaled = (q.astype(jnp.float32) * scale.factor).astype(q.dtype)
    out, (lse,) = jax.vmap(kernel)(heads_first(scaled), heads_first(k), heads_first(v))
    return out.transpose(0, 2, 1, 3)[:, :t], lse.transpose(0, 2, 1)[:, :t]


def _splash_kernel(length: int, window: int | None, heads: int, softcap: float | None, interpret: bool):
    """A splash attention kernel of ``heads`` heads over ``length`` tokens (a multiple of `SPLASH_TILE`)
    with a causal window of ``window`` keys (None: causal), returning the log-sum-exp. Built in each trace
    (its mask arrays are that trace's constants; a kernel kept across traces would leak them): the costly
    part, splash's processing of the mask into blocks, is cached by splash itself, keyed by the mask."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    one = _band_mask(length, window)
    block = next(n for n in (512, 256, SPLASH_TILE) if length % n == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)
    return splash.make_splash_mha(masks.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
                                  block_sizes=sizes, save_residuals=True, attn_logits_soft_cap=softcap,
                                  interpret=interpret)



def _band_mask(length: int, window: int | None):
    """Splash's causal ``LocalMask`` over ``length`` tokens with a left window of ``window - 1`` keys (None:
    causal), whose blocks wholly outside or inside the band are answered by a one-element array. Splash's
    host-side mask processing visits every (query block, key block) pair and asks only whether a block is
    empty, full or partial (then it keeps its entries): answered from the block's corners, 131,072 tokens
    take seconds instead of minutes (153 s per kernel on one CPU core with the plain mask). The kernel
    itself computes the same mask in place (`mask_function`)."""
    return _band_mask_class()((length, length), (None if window is None else window - 1, 0), offset=0)


@functools.cache
def _band_mask_class() -> type:
    """The class of `_band_mask`, made once (masks hash by their class: splash's mask cache then hits)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    class BandMask(masks.LocalMask):
        def __getitem__(self, idx):
            if len(idx) == 2 and all(isinstance(s, slice) and s.step in (None, 1) for s in idx):
                (q0, q1, _), (k0, k1, _) = idx[0].indices(self.shape[0]), idx[1].indices(self.shape[1])
                left = self.window_size[0]
                if q1 > q0 and k1 > k0:
                    if k0 > q1 - 1 or (left is not None and k1 - 1 < q0 - left):
                        return np.zeros((1, 1), np.bool_)  # every key after every query, or before its window
                    if k1 - 1 <= q0 and (left is None or k0 >= q1 - 1 - left):
                        return np.ones((1, 1), np.bool_)  # every key in every query's window
            return super().__getitem__(idx)

    return BandMask
