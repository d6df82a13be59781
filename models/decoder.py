"""A family's forward pass in pieces, and the model that drives them.

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

Each runs on one layer-scan driver (`lminf_jax.models.layer_scan`), which scans the stacked layers once (the
steps scan the cache's layer axis alongside), so compile time does not grow with depth.

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

from lminf_jax import AttentionCall, AttentionProbe, AttentionSpec, RopeScheme, SlidingWindow, Vanilla
from lminf_jax.attention import FUSED_IMPLEMENTATIONS
from lminf_jax.attention_decode import rotates_keys
from lminf_jax.cache import KVCache
from lminf_jax.logprobs import HEAD_CHUNK, Scores, head_scores
from lminf_jax.probes import RowProbe, num_distance_buckets
from lminf_jax.scores import Positional, Scaling
from lminf_jax.sharding import ShardingPlan
from lminf_jax.models.common import Params, check_tokens, default_positions
from lminf_jax.models.layer_scan import LayerScan, cache_shardings, probed_hidden, sequence_hidden, step_hidden

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

    def layer_kinds(self, call: AttentionCall) -> tuple[tuple[AttentionCall, Positional], ...]:
        """The attention of each kind of layer, global first: ``(call, positional)`` of the method's
        layers and, with a `native_window`, of the windowed layers (``call`` with the window's spec and
        no frequency method; one entry when all layers are of one kind)."""
        native = self.native_window
        if native is None or not any(native.layers):
            return ((call, self.positional),)
        local = (dataclasses.replace(call, spec=native.spec, frequencies=None),
                 self.positional if native.positional is None else native.positional)
        return (local,) if all(native.layers) else ((call, self.positional), local)

    def per_layer(self, call: AttentionCall, index: jax.Array, attend: Callable[[AttentionCall, Positional], Any]):
        """``attend(call, positional)`` for layer ``index`` (traced, inside the layer scan): the method's
        on a global layer, the native window's on a windowed one (`lax.cond` when the stack mixes them)."""
        kinds = self.layer_kinds(call)
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
    The decoder is built once, with the model (`decoder`), and is no part of its identity.
    """

    build: Callable[..., Decoder]
    config: Any
    call: AttentionCall = AttentionCall()
    dtype: Any = jnp.float32
    sharding: ShardingPlan | None = None
    _decoder: Decoder = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.call, AttentionCall):
            raise ValueError(f"call must be an AttentionCall, got {type(self.call).__name__}")
        if self.sharding is not None and not isinstance(self.sharding, ShardingPlan):
            raise ValueError(f"sharding must be a ShardingPlan or None, got {type(self.sharding).__name__}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        # built once; a frequency method on an ALiBi model, or over a checkpoint's own scaling, fails here
        dec = self._resolved_decoder()
        object.__setattr__(self, "_decoder", dec)
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
        return self._decoder

    def _resolved_decoder(self) -> Decoder:
        """The family's decoder built for the config and dtype, its positions resolved (see `decoder`)."""
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
    def spec(self) -> AttentionSpec:
        return self.call.spec

    def _layer_scan(self, length: str | None = "length") -> LayerScan:
        """The layer-scan driver of a whole-sequence pass (``length`` None: of a step)."""
        return LayerScan(self.decoder(), self.call, self.sharding, length)

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
            return KVCache.for_specs([call.spec for call, _ in dec.layer_kinds(self.call)], dec.num_layers, batch,
                                     dec.num_kv_heads, dec.head_dim, capacity=capacity,
                                     dtype=self.dtype if dtype is None else dtype, rotated=_rotated(dec, self.call),
                                     query_heads=dec.num_heads)

        if self.sharding is None:
            return make()
        return jax.jit(make, out_shardings=cache_shardings(self.sharding, dec, jax.eval_shape(make)))()

    def cache_bytes(self, batch: int = 1, *, capacity: int | None = None) -> int:
        """Bytes of the cache `init_cache` makes (keys, values, positions, a retrieval method's state),
        from its shapes: nothing is allocated."""
        shapes = jax.eval_shape(lambda: self.init_cache(batch, capacity=capacity))
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))

    def check_cache(self, cache: KVCache, *, batch: int | None = None) -> None:
        """Raise a ValueError naming what does not fit between ``cache`` and this model."""
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache, got {type(cache).__name__}")
        dec = self.decoder()
        for call, _ in dec.layer_kinds(self.call):
            cache.check_spec(call.spec)
        expected = (dec.num_layers, cache.keys.shape[1], dec.num_kv_heads, cache.slots, dec.head_dim)
        if cache.keys.shape != expected:
            raise ValueError(f"cache keys have shape {cache.keys.shape}; this model needs {expected} "
                             "(layers, batch, kv_heads, slots, head_dim)")
        if cache.rotated != _rotated(dec, self.call):
            raise ValueError(f"cache.rotated is {cache.rotated} but this model's positions need "
                             f"{_rotated(dec, self.call)} (build the cache with init_cache)")
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


def _rotated(dec: Decoder, call: AttentionCall) -> bool:
    """Whether the model's cache stores keys rotated: when every kind of layer's positions allow it and no
    layer re-positions keys per query (a retrieval method)."""
    return all(rotates_keys(positional) and not layer.spec.retrieves for layer, positional in dec.layer_kinds(call))


def _logits(scan: LayerScan, params: Params, h: jax.Array, length: str | None = None) -> jax.Array:
    """The head on hidden states ``(B, T, hidden)``: float32 logits ``(B, T, vocab)``, vocab split under a plan
    (and time over ``length``: a whole sequence's; None for a step or a chunk)."""
    return scan.constrain(scan.dec.head(params, h), "batch", length, "vocab")


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    scan = model._layer_scan()
    return _logits(scan, params, sequence_hidden(scan, params, tokens, positions), "length")


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _jit_probe(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array, rows: jax.Array,
               num_buckets: int, full_rows: bool) -> ModelProbe:
    scan = model._layer_scan()
    h, stats, full, hidden = probed_hidden(scan, params, tokens, positions, rows, num_buckets, full_rows)
    return ModelProbe(stats, hidden, _logits(scan, params, h, "length"), full)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _jit_score(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array, targets: jax.Array,
               chunk: int) -> Scores:
    scan = model._layer_scan()
    h = sequence_hidden(scan, params, tokens, positions)
    return head_scores(functools.partial(_logits, scan, params), h, targets, chunk=chunk)


@functools.partial(jax.jit, static_argnums=0)
def _jit_step(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache
              ) -> tuple[jax.Array, KVCache]:
    scan = model._layer_scan(length=None)
    h, cache = step_hidden(scan, params, tokens, positions, cache)
    return _logits(scan, params, h), cache


@functools.partial(jax.jit, static_argnums=(0, 6))
def _jit_score_step(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                    targets: jax.Array, chunk: int) -> tuple[Scores, KVCache]:
    scan = model._layer_scan(length=None)
    h, cache = step_hidden(scan, params, tokens, positions, cache)
    return head_scores(functools.partial(_logits, scan, params), h, targets, chunk=chunk), cache


@functools.partial(jax.jit, static_argnums=0)
def _jit_last_logits(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache
                     ) -> tuple[jax.Array, KVCache]:
    scan = model._layer_scan(length=None)
    h, cache = step_hidden(scan, params, tokens, positions, cache)
    return _logits(scan, params, h[:, -1:])[:, 0], cache
