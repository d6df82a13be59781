"""A family's forward pass in pieces, and the two drivers that compose them.

Each family module provides ``decoder(config, dtype) -> Decoder``: embedding, one
transformer layer (which calls an ``attend`` function it is handed), the head, and its
attention geometry and positional scheme. `LanguageModel` drives it:

* ``forward``: one pass over a whole sequence (no cache);
* ``__call__`` (the *step*): new tokens against a `KVCache`, returning their logits and
  the updated cache. This is the ``step(params, tokens, positions, cache)`` contract of
  `lminf_jax.decoding` and `lminf_jax.evaluation.streaming`;
* ``score`` / ``score_step``: the same passes returning, per position, the log-probability of a
  target token (`lminf_jax.logprobs.Scores`) with the head run on chunks of positions, never the
  ``(B, T, vocab)`` logits; ``last_logits``: the step with the head on each row's last token only.

Each scans the stacked layers once (the steps scan the cache's layer axis alongside),
so compile time does not grow with depth.

A model may have **native sliding-window layers** (`NativeWindow`: Mistral v0.1, Gemma-2/3, Phi-3,
Qwen's window layers): the call's method (spec and frequency method) applies to the other, *global*
layers, and each windowed layer keeps its own window, attending the keys ``i - j < window`` at their
true positions with its own RoPE. A mixed stack picks each layer's attention with ``lax.cond`` inside
the scan; one cache serves both kinds (`KVCache.for_specs`: a Λ-cache whose ring is the larger of
the method's window and the native one, or a full cache when the method needs every key).

With a `lminf_jax.sharding.ShardingPlan` the model runs SPMD over its mesh: activations are
constrained to (batch over ``data``, time over ``seq``, heads over ``model``), the cache to (batch,
KV heads), and when ``seq`` is larger than one a whole-sequence pass uses context-parallel
Λ-attention (`lminf_jax.context_parallel`) for bounded specs; unbounded ones (vanilla) let XLA
gather the keys they need.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lminf_jax import (Alibi, AttentionProbe, AttentionSpec, RopeScheme, SlidingWindow, Vanilla, attention,
                       attention_probe)
from lminf_jax.attention import FUSED_IMPLEMENTATIONS
from lminf_jax.attention_decode import rotates_keys
from lminf_jax.cache import KVCache, cached_attention
from lminf_jax.context_parallel import context_parallel_attention
from lminf_jax.logprobs import HEAD_CHUNK, Scores, head_scores
from lminf_jax.loop_slice import loop_slice
from lminf_jax.probes import RowProbe, num_distance_buckets, probe_rows
from lminf_jax.scores import Positional, Scaling
from lminf_jax.sharding import ShardingPlan
from lminf_jax.models.common import AttentionCall, Params, check_tokens, default_positions

#: ``attend(q, k, v) -> (out, aux)`` on projected ``(B, T, heads * d)`` tensors.
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class NativeWindow:
    """A model's own sliding-window layers: ``layers[i]`` is True where layer ``i`` attends only the
    keys ``i - j < window``; ``positional`` their positional encoding when it differs from the model's
    (Gemma-3's local RoPE base), else None."""

    window: int
    layers: tuple[bool, ...]
    positional: Positional | RopeScheme | None = None

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"a native sliding window must be an integer >= 1, got {self.window!r}")
        object.__setattr__(self, "layers", tuple(bool(x) for x in self.layers))

    @property
    def spec(self) -> SlidingWindow:
        return SlidingWindow(self.window)

    @classmethod
    def of(cls, window: int | None, layers: tuple[bool, ...], positional: Positional | RopeScheme | None = None
           ) -> NativeWindow | None:
        """The native window of a config (None when it has no window or no windowed layer)."""
        return cls(window, layers, positional) if window is not None and any(layers) else None


@dataclasses.dataclass(frozen=True)
class Decoder:
    """One family's forward pass, for one config and compute dtype.

    ``embed(params, tokens) -> h``; ``layer(layer_params, h, attend) -> (h, aux)`` passes
    on whatever ``attend`` returned as aux; ``head(params, h) -> float32 logits``;
    ``layer_params(params)`` the stacked per-layer tree. ``positional`` is an `Alibi` or the
    family's `RopeScheme`, which `LanguageModel.decoder` resolves to a `Rotary` for the call's
    frequency method and sequence length. ``scale``: the score scale (a number or a `Scaling` with
    Gemma-2's soft cap; None: ``1 / sqrt(head_dim)``). ``native_window``: the model's own
    sliding-window layers, if any.
    """

    embed: Callable[[Params, jax.Array], jax.Array]
    layer: Callable[[Params, jax.Array, Attend], tuple[jax.Array, Any]]
    head: Callable[[Params, jax.Array], jax.Array]
    layer_params: Callable[[Params], Params]
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    positional: Positional | RopeScheme
    scale: float | Scaling | None = None
    native_window: NativeWindow | None = None

    def layer_kinds(self, spec: AttentionSpec) -> tuple[tuple[AttentionSpec, Positional], ...]:
        """The attention of each kind of layer, global first: ``(spec, positional)`` of the method's
        layers and, with a `native_window`, of the windowed layers (one entry when all layers are of
        one kind)."""
        native = self.native_window
        if native is None or not any(native.layers):
            return ((spec, self.positional),)
        local = (native.spec, self.positional if native.positional is None else native.positional)
        return (local,) if all(native.layers) else ((spec, self.positional), local)

    def per_layer(self, spec: AttentionSpec, index: jax.Array, attend: Callable[[AttentionSpec, Positional], Any]):
        """``attend(spec, positional)`` for layer ``index`` (traced, inside the layer scan): the method's
        on a global layer, the native window's on a windowed one (`lax.cond` when the stack mixes them)."""
        kinds = self.layer_kinds(spec)
        if len(kinds) == 1:
            return attend(*kinds[0])
        windowed = jnp.asarray(self.native_window.layers)[index]
        return lax.cond(windowed, lambda: attend(*kinds[1]), lambda: attend(*kinds[0]))


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """A family's ``decoder`` builder with its config, attention call, compute dtype and
    optional `ShardingPlan` (params then placed by `models.registry.Family.param_shardings`).

    Frozen and hashable, so it is a valid ``jax.jit`` static argument and can be handed
    to `lminf_jax.decoding.generate` / `lminf_jax.evaluation.streaming.streaming_nll` as the step.
    """

    build: Callable[..., Decoder]
    config: Any
    call: AttentionCall = AttentionCall()
    dtype: Any = jnp.float32
    sharding: ShardingPlan | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.call, AttentionCall):
            raise ValueError(f"call must be an AttentionCall, got {type(self.call).__name__}")
        if self.sharding is not None and not isinstance(self.sharding, ShardingPlan):
            raise ValueError(f"sharding must be a ShardingPlan or None, got {type(self.sharding).__name__}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        dec = self.decoder()  # a frequency method on an ALiBi model, or over a checkpoint's own scaling, fails here
        if dec.native_window is not None and all(dec.native_window.layers) and (
                self.call.spec != Vanilla() or self.call.frequencies is not None):
            method = self.call.spec.describe() if self.call.spec != Vanilla() else self.call.frequencies.kind
            raise ValueError(f"every layer of this model attends only its native sliding window of "
                             f"{dec.native_window.window} tokens (config field 'sliding_window'): {method} applies to "
                             f"global layers, and there are none. To run the model without its window (full "
                             f"attention), set 'sliding_window' to null in its config.json")

    def decoder(self) -> Decoder:
        """The family's decoder with its positions resolved: RoPE under the call's frequency method
        (dynamic NTK's follows each call's sequence length, `lminf_jax.rope.LengthRule`)."""
        dec = self.build(self.config, self.dtype)
        native = dec.native_window
        if native is not None:  # windowed layers keep the checkpoint's own positions
            own = dec.positional if native.positional is None else native.positional
            native = dataclasses.replace(native, positional=own.rotary(None) if isinstance(own, RopeScheme) else own)
            dec = dataclasses.replace(dec, native_window=native)
        if isinstance(dec.positional, RopeScheme):
            return dataclasses.replace(dec, positional=dec.positional.rotary(self.call.frequencies))
        if self.call.frequencies is not None:
            raise ValueError(f"the frequency method {self.call.frequencies.kind!r} rescales RoPE, but this model's "
                             f"positions are {type(dec.positional).__name__}")
        return dec

    @property
    def spec(self):
        return self.call.spec

    def forward(self, params: Params, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Logits ``(B, T, vocab)`` in float32 for a whole sequence (see `models.registry.Family.forward`).
        To score tokens, `score` gives the same numbers without the logits."""
        padded, positions, t = self._sequence_inputs(tokens, positions)
        logits = _jit_forward(self, params, padded, positions)
        return logits if padded.shape[1] == t else logits[:, :t]

    def score(self, params: Params, tokens: jax.Array, positions: jax.Array | None = None, *,
              targets: jax.Array | None = None, chunk: int = HEAD_CHUNK) -> Scores:
        """`lminf_jax.logprobs.Scores` (log-probability, entropy, top-1) of each next token in one pass over
        a whole sequence, without its logits: ``(B, T - 1)`` of ``tokens[:, 1:]``, or ``(B, T)`` of
        ``targets (B, T)`` (position ``t`` predicting ``targets[:, t]``). ``positions`` as in `forward` (left
        padding: negative, its scores meaningless). The head runs on about ``chunk`` tokens at a time
        (`lminf_jax.logprobs.head_scores`): ``chunk x vocab`` float32 logits at once, never the
        ``B x T x vocab`` of `forward`, whose logits it scores to float32 rounding."""
        padded, positions, t = self._sequence_inputs(tokens, positions)
        if targets is None:
            given, targets = t - 1, padded[:, 1:]  # the last position predicts nothing: its score is dropped
        else:
            self._check_targets(targets, tokens.shape)
            given = t
        targets = jnp.pad(jnp.asarray(targets, jnp.int32), ((0, 0), (0, padded.shape[1] - targets.shape[1])))
        scores = _jit_score(self, params, padded, positions, targets, chunk)
        return jax.tree.map(lambda x: x[:, :given], scores)

    def _check_targets(self, targets: jax.Array, shape: tuple[int, ...]) -> None:
        """A ValueError unless ``targets`` are token ids of ``shape``."""
        if getattr(targets, "shape", None) != shape:
            raise ValueError(f"targets must have the tokens' shape {shape}, got {getattr(targets, 'shape', None)}")
        check_tokens(targets, self.config.vocab_size)

    def _sequence_inputs(self, tokens: jax.Array, positions: jax.Array | None
                         ) -> tuple[jax.Array, jax.Array | None, int]:
        """A whole sequence's checked tokens (padded for context parallelism, `_split_sequence`), their
        checked positions ``(B, T')`` or None (every row at 0..T'-1: self-attention the fused kernels
        take, `lminf_jax.attention`), and T."""
        check_tokens(tokens, self.config.vocab_size)
        if self.call.implementation in FUSED_IMPLEMENTATIONS and positions is not None:
            raise ValueError(f"implementation {self.call.implementation!r} runs the tokens at positions 0..T-1; "
                             "positions cannot be given")
        padded, t = self._split_sequence(tokens, positions)
        return padded, None if positions is None else default_positions(padded, positions, self.call.spec), t

    def _split_sequence(self, tokens: jax.Array, positions: jax.Array | None) -> tuple[jax.Array, int]:
        """Under context parallelism: tokens padded at the end to a multiple of the ``seq`` axis
        (causal attention keeps the padding out of every real token's view), and T."""
        t = tokens.shape[1]
        if self.sharding is None or not self.sharding.context_parallel:
            return tokens, t
        if positions is not None:
            raise ValueError("context-parallel encoding numbers the tokens 0..T-1; positions cannot be given "
                             "(use a mesh with seq=1 for padded or shifted positions)")
        return jnp.pad(tokens, ((0, 0), (0, -t % self.sharding.size("seq")))), t

    def __call__(self, params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache
                 ) -> tuple[jax.Array, KVCache]:
        """Logits ``(B, T, vocab)`` of new tokens at ``positions (B, T)`` (negative = padding)
        attending ``cache``, and the cache with them written.

        Positions must exceed every position already in the row's cache. With concrete
        inputs this is checked, with the cache's capacity; inside jit the caller ensures it.
        """
        return _jit_step(self, params, tokens, self._step_positions(tokens, positions, cache), cache)

    def last_logits(self, params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache
                    ) -> tuple[jax.Array, KVCache]:
        """The step (`__call__`) with the head on each row's last token only: its logits ``(B, vocab)``
        and the cache (what a prompt's last prefill chunk needs, `lminf_jax.decoding.generate`)."""
        return _jit_last_logits(self, params, tokens, self._step_positions(tokens, positions, cache), cache)

    def score_step(self, params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                   targets: jax.Array, *, chunk: int = HEAD_CHUNK) -> tuple[Scores, KVCache]:
        """The step (`__call__`) scoring ``targets (B, T)`` (what each new token's position predicts)
        instead of returning logits: `lminf_jax.logprobs.Scores` ``(B, T)`` and the cache, the head on
        about ``chunk`` tokens at a time as in `score` (the `lminf_jax.evaluation.streaming` scoring step)."""
        positions = self._step_positions(tokens, positions, cache)
        self._check_targets(targets, tokens.shape)
        return _jit_score_step(self, params, tokens, positions, cache, jnp.asarray(targets, jnp.int32), chunk)

    def _step_positions(self, tokens: jax.Array, positions: jax.Array, cache: KVCache) -> jax.Array:
        """A step's positions ``(B, T)``, its tokens, positions and cache checked (see `__call__`)."""
        check_tokens(tokens, self.config.vocab_size)
        positions = default_positions(tokens, positions, self.call.spec)
        self.check_cache(cache, batch=tokens.shape[0])
        if not any(isinstance(x, jax.core.Tracer) for x in (positions, cache.positions)):
            _check_step_positions(np.asarray(positions), np.asarray(cache.positions), cache)
        return positions

    def probe(self, params: Params, tokens: jax.Array, rows: np.ndarray | list[int], *,
              positions: jax.Array | None = None, max_distance: int | None = None,
              full_rows: bool = False) -> ModelProbe:
        """One forward pass that also records, for the query rows ``rows`` (time indices),
        per-layer attention statistics (`lminf_jax.probes.RowProbe`, computed blockwise over the
        keys) and the hidden states entering each layer and after the last one.

        ``max_distance`` sets the distance buckets (default: the largest in the sequence, T - 1).
        ``full_rows`` also keeps every logit and probability of those rows against all T keys
        (`lminf_jax.AttentionProbe`, ``(layers, B, heads, rows, T)``: R x T per head, never T x T)."""
        check_tokens(tokens, self.config.vocab_size)
        rows = np.asarray(rows, np.int64)
        t = tokens.shape[1]
        if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= t:
            raise ValueError(f"rows must be a non-empty list of time indices in [0, {t}), got {rows.tolist()}")
        if self.spec.top_k is not None:
            raise ValueError("probe does not support top-k middle tokens (spec.top_k must be None)")
        buckets = num_distance_buckets(t - 1 if max_distance is None else max_distance)
        padded, _ = self._split_sequence(tokens, positions)
        probe = _jit_probe(self, params, padded, default_positions(padded, positions, self.call.spec),
                           jnp.asarray(rows, jnp.int32),
                           buckets, full_rows)
        return probe if padded.shape[1] == t else dataclasses.replace(probe, logits=probe.logits[:, :t])

    def init_cache(self, batch: int, *, capacity: int | None = None, dtype=None) -> KVCache:
        """An empty cache for this model's spec: a Λ-cache when the spec's attended set is
        bounded, else a full cache of ``capacity`` slots. ``dtype`` defaults to the compute dtype.
        With a sharding plan it is created directly in its shards (batch over ``data``, KV heads
        over ``model``)."""
        dec = self.decoder()

        def make() -> KVCache:
            return KVCache.for_specs([spec for spec, _ in dec.layer_kinds(self.spec)], dec.num_layers, batch,
                                     dec.num_kv_heads, dec.head_dim, capacity=capacity,
                                     dtype=self.dtype if dtype is None else dtype, rotated=_rotated(dec, self.spec))

        if self.sharding is None:
            return make()
        return jax.jit(make, out_shardings=_cache_shardings(self.sharding, dec, jax.eval_shape(make)))()

    def check_cache(self, cache: KVCache, *, batch: int | None = None) -> None:
        """Raise a ValueError naming what does not fit between ``cache`` and this model."""
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache, got {type(cache).__name__}")
        dec = self.decoder()
        for spec, _ in dec.layer_kinds(self.spec):
            cache.check_spec(spec)
        expected = (dec.num_layers, cache.keys.shape[1], dec.num_kv_heads, cache.slots, dec.head_dim)
        if cache.keys.shape != expected:
            raise ValueError(f"cache keys have shape {cache.keys.shape}; this model needs {expected} "
                             "(layers, batch, kv_heads, slots, head_dim)")
        if cache.rotated != _rotated(dec, self.spec):
            raise ValueError(f"cache.rotated is {cache.rotated} but this model's positions need "
                             f"{_rotated(dec, self.spec)} (build the cache with init_cache)")
        if batch is not None and cache.keys.shape[1] != batch:
            raise ValueError(f"cache holds {cache.keys.shape[1]} rows but tokens have {batch}")


@dataclasses.dataclass(frozen=True)
class ModelProbe:
    """What `LanguageModel.probe` recorded: ``attention`` a `RowProbe` with a leading layer axis
    (``(layers, B, Hq, R)``...); ``hidden`` ``(layers + 1, B, R, width)`` float32, the residual
    stream entering each layer and after the last (before the final norm); ``logits`` of the
    whole sequence, as `LanguageModel.forward` returns them; ``rows`` the rows' full attention
    (`AttentionProbe` with a leading layer axis) when asked for, else None."""

    attention: RowProbe
    hidden: jax.Array
    logits: jax.Array
    rows: AttentionProbe | None = None


jax.tree_util.register_dataclass(ModelProbe, data_fields=["attention", "hidden", "logits", "rows"], meta_fields=[])


def _check_step_positions(positions: np.ndarray, cached: np.ndarray, cache: KVCache) -> None:
    positions = positions.astype(np.int64)
    valid = positions >= 0
    if not valid.any():
        return
    if not cache.bounded and positions.max() >= cache.slots:
        raise ValueError(f"position {positions.max()} does not fit the full cache's capacity {cache.slots}")
    newest_cached = cached.max(axis=1)
    first_new = np.where(valid, positions, np.iinfo(np.int64).max).min(axis=1)
    bad = np.nonzero(valid.any(axis=1) & (first_new <= newest_cached))[0]
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"positions must continue after the cache: row {b} starts at {first_new[b]} but the "
                         f"cache already holds position {newest_cached[b]}")


def _rotated(dec: Decoder, spec: AttentionSpec) -> bool:
    """Whether the model's cache stores keys rotated: when every kind of layer's positions allow it."""
    return all(rotates_keys(positional) for _, positional in dec.layer_kinds(spec))


def _units(dec: Decoder) -> dict[str, int]:
    return {"heads": dec.num_heads, "kv_heads": dec.num_kv_heads}


def _constrain(plan: ShardingPlan | None, dec: Decoder, x: jax.Array, *logical: str | None) -> jax.Array:
    """``x`` constrained to its logical axes under ``plan`` (unchanged without one)."""
    return x if plan is None else plan.constrain(x, logical, _units(dec))


def _cache_shardings(plan: ShardingPlan, dec: Decoder, cache: KVCache) -> KVCache:
    """The cache's shardings: keys/values ``(layers, batch, kv_heads, slots, d)``, positions
    ``(batch, slots)``."""
    kv = ("layers", "batch", "kv_heads", None, "head_dim")
    return dataclasses.replace(cache, keys=plan.named(kv, cache.keys.shape, _units(dec)),
                               values=plan.named(kv, cache.values.shape, _units(dec)),
                               positions=plan.named(("batch", None), cache.positions.shape))


def _layer_scan(dec: Decoder, params: Params, h: jax.Array, make_attend, extra_xs=(),
                plan: ShardingPlan | None = None, length: str | None = "length"):
    """Scan ``dec.layer`` over the stacked layers; ``make_attend(index, *extra) -> attend``. The
    residual stream is kept at (batch, ``length``, hidden) under ``plan``."""
    def body(h, index, xs):
        p, *extra = xs
        h, aux = dec.layer(p, _constrain(plan, dec, h, "batch", length, "hidden"), make_attend(index, *extra))
        return _constrain(plan, dec, h, "batch", length, "hidden"), aux

    return _scan_stacked(body, h, (dec.layer_params(params), *extra_xs))


def _scan_stacked(body: Callable[[Any, jax.Array, Any], tuple[Any, Any]], init: Any, stacked: Any):
    """``lax.scan`` over the leading axis of ``stacked`` (a tree): step ``i`` is ``body(carry, i, stacked[i])``.

    Each step's slice is taken again by `_pinned_slice` (`lminf_jax.loop_slice`), so that no conversion of a
    whole stack can leave the loop: on XLA:CPU a float32 copy of every layer's weights (twice their bytes)."""
    length = jax.tree_util.tree_leaves(stacked)[0].shape[0]

    def step(carry, xs):
        sliced, index = xs
        return body(carry, index, _pinned_slice(sliced, stacked, index))

    return lax.scan(step, init, (stacked, jnp.arange(length)))


@jax.custom_jvp
def _pinned_slice(sliced, stacked, index: jax.Array):
    """``sliced``, the scan's slice ``index`` of ``stacked``, taken again by `lminf_jax.loop_slice.loop_slice`
    (XLA converts, if it must, only the slice, inside the loop, and drops the scan's own slice, which nothing
    uses). Derivatives go through the scan's slice (``sliced``): the backward pass is a plain scan's."""
    return loop_slice(stacked, index)


@_pinned_slice.defjvp
def _pinned_slice_jvp(primals, tangents):
    return primals[0], tangents[0]  # the scan's slice: its residuals and transpose are a plain scan's


def _split_heads(dec: Decoder, q: jax.Array, k: jax.Array, v: jax.Array, plan: ShardingPlan | None = None,
                 length: str | None = "length") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projected ``(B, T, heads * d)`` tensors as ``(B, T, heads, d)`` (constrained under ``plan``)."""
    return (_constrain(plan, dec, _heads(q, dec.num_heads), "batch", length, "heads", "head_dim"),
            _constrain(plan, dec, _heads(k, dec.num_kv_heads), "batch", length, "kv_heads", "head_dim"),
            _constrain(plan, dec, _heads(v, dec.num_kv_heads), "batch", length, "kv_heads", "head_dim"))


def _self_attention(dec: Decoder, call: AttentionCall, qh, kh, vh, positions: jax.Array | None, index,
                    plan: ShardingPlan | None = None) -> jax.Array:
    """Attention of a whole sequence over itself in layer ``index``, merged back to ``(B, T, heads *
    dv)``: context parallel under a plan with a ``seq`` axis and a bounded spec, else `lminf_jax.attention`
    (``positions`` None: every row at 0..T-1)."""

    def attend(spec: AttentionSpec, positional: Positional) -> jax.Array:
        if plan is not None and plan.context_parallel and spec.bounded:
            heads_split = not isinstance(positional, Alibi) and plan.spec(
                ("kv_heads",), (dec.num_kv_heads,)) == jax.sharding.PartitionSpec("model")
            return context_parallel_attention(
                qh, kh, vh, mesh=plan.mesh, axis="seq", spec=spec, positional=positional, scale=dec.scale,
                block_q=call.block_q, block_k=call.block_k, head_axis="model" if heads_split else None,
                batch_axis="data" if plan.spec(("batch",), qh.shape[:1])[0] else None)
        return attention(qh, kh, vh, q_positions=positions, k_positions=positions, spec=spec, positional=positional,
                         scale=dec.scale, layer=index if spec.top_k is not None else None,
                         implementation=call.implementation, block_q=call.block_q, block_k=call.block_k)

    return dec.per_layer(call.spec, index, attend).reshape(*qh.shape[:2], -1)


def _heads(x: jax.Array, n: int) -> jax.Array:
    b, t, _ = x.shape
    return x.reshape(b, t, n, -1)


def _final_hidden(model: LanguageModel, dec: Decoder, params: Params, tokens: jax.Array, positions: jax.Array
                  ) -> jax.Array:
    """The hidden states ``(B, T, hidden)`` after the last layer of a whole-sequence pass (the head's input)."""
    call, plan = model.call, model.sharding

    def make_attend(index):
        def attend(q, k, v):
            return _self_attention(dec, call, *_split_heads(dec, q, k, v, plan), positions, index, plan), None
        return attend

    h, _ = _layer_scan(dec, params, dec.embed(params, _constrain(plan, dec, tokens, "batch", "length")), make_attend,
                       plan=plan)
    return h


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    dec = model.decoder()
    h = _final_hidden(model, dec, params, tokens, positions)
    return _constrain(model.sharding, dec, dec.head(params, h), "batch", "length", "vocab")


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _jit_probe(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array, rows: jax.Array,
               num_buckets: int, full_rows: bool) -> ModelProbe:
    dec = model.decoder()
    call, plan = model.call, model.sharding
    row_positions = jnp.take(positions, rows, axis=1)

    def make_attend(index):
        def attend(q, k, v):
            qh, kh, vh = _split_heads(dec, q, k, v, plan)
            out = _self_attention(dec, call, qh, kh, vh, positions, index, plan)
            q_rows = jnp.take(qh, rows, axis=1)

            def probe(spec: AttentionSpec, positional: Positional):
                stats = probe_rows(q_rows, kh, row_positions, positions, spec=spec, positional=positional,
                                   scale=dec.scale, num_buckets=num_buckets, block_k=call.block_k)
                full = None
                if full_rows:
                    full = attention_probe(q_rows, kh, vh, q_positions=row_positions, k_positions=positions,
                                           spec=spec, positional=positional, scale=dec.scale)[1]
                return stats, full

            return out, dec.per_layer(call.spec, index, probe)
        return attend

    def body(h, index, p):
        entering = jnp.take(h, rows, axis=1).astype(jnp.float32)
        h, (stats, full) = dec.layer(p, h, make_attend(index))
        return h, (stats, full, entering)

    h, (stats, full, entering) = _scan_stacked(body, dec.embed(params, tokens), dec.layer_params(params))
    hidden = jnp.concatenate([entering, jnp.take(h, rows, axis=1).astype(jnp.float32)[None]], axis=0)
    return ModelProbe(stats, hidden, dec.head(params, h), full)


def _step_hidden(model: LanguageModel, dec: Decoder, params: Params, tokens: jax.Array, positions: jax.Array,
                 cache: KVCache) -> tuple[jax.Array, KVCache]:
    """The step's hidden states ``(B, T, hidden)`` after the last layer (the head's input) and the cache
    with the new tokens written."""
    call, plan = model.call, model.sharding
    update = cache.plan(positions)

    def make_attend(index, layer_keys, layer_values):
        def attend(q, k, v):
            qh, kh, vh = _split_heads(dec, q, k, v, plan, length=None)

            def step(spec: AttentionSpec, positional: Positional) -> tuple[jax.Array, jax.Array]:
                return cached_attention(
                    qh, kh, vh, positions, layer_keys, layer_values, update, spec=spec, positional=positional,
                    rotated=cache.rotated, scale=dec.scale, layer=index if spec.top_k is not None else None,
                    implementation=call.implementation, block_q=call.block_q, block_k=call.block_k)

            out, stored = dec.per_layer(call.spec, index, step)
            return out.reshape(*q.shape[:2], -1), (stored, vh)
        return attend

    # the layers read the cache; every layer's new keys and values are written once, after them
    h, (keys, values) = _layer_scan(dec, params, dec.embed(params, tokens), make_attend, (cache.keys, cache.values),
                                    plan=plan, length=None)
    cache = cache.written(keys, values, update)
    if plan is not None:
        cache = jax.lax.with_sharding_constraint(cache, _cache_shardings(plan, dec, cache))
    return h, cache


@functools.partial(jax.jit, static_argnums=0)
def _jit_step(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache
              ) -> tuple[jax.Array, KVCache]:
    dec = model.decoder()
    h, cache = _step_hidden(model, dec, params, tokens, positions, cache)
    return _head(model, dec, params)(h), cache


def _head(model: LanguageModel, dec: Decoder, params: Params) -> Callable[[jax.Array], jax.Array]:
    """The head on hidden states ``(B, c, hidden)`` of a step or a chunk: logits ``(B, c, vocab)`` (vocab split
    under a plan)."""
    return lambda h: _constrain(model.sharding, dec, dec.head(params, h), "batch", None, "vocab")


@functools.partial(jax.jit, static_argnums=(0, 5))
def _jit_score(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array, targets: jax.Array,
               chunk: int) -> Scores:
    dec = model.decoder()
    h = _final_hidden(model, dec, params, tokens, positions)
    return head_scores(_head(model, dec, params), h, targets, chunk=chunk)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _jit_score_step(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                    targets: jax.Array, chunk: int) -> tuple[Scores, KVCache]:
    dec = model.decoder()
    h, cache = _step_hidden(model, dec, params, tokens, positions, cache)
    return head_scores(_head(model, dec, params), h, targets, chunk=chunk), cache


@functools.partial(jax.jit, static_argnums=0)
def _jit_last_logits(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache
                     ) -> tuple[jax.Array, KVCache]:
    dec = model.decoder()
    h, cache = _step_hidden(model, dec, params, tokens, positions, cache)
    return _head(model, dec, params)(h[:, -1:])[:, 0], cache
