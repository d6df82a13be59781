"""A family's forward pass in pieces, and the two drivers that compose them.

Each family module provides ``decoder(config, dtype) -> Decoder``: embedding, one
transformer layer (which calls an ``attend`` function it is handed), the head, and its
attention geometry and positional scheme. `LanguageModel` drives it:

* ``forward``: one pass over a whole sequence (no cache);
* ``__call__`` (the *step*): new tokens against a `KVCache`, returning their logits and
  the updated cache. This is the ``step(params, tokens, positions, cache)`` contract of
  `lminf_jax.decoding` and `lminf_jax.streaming`.

Both scan the stacked layers once (the step scans the cache's layer axis alongside),
so compile time does not grow with depth.

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

from lminf_jax import Alibi, AttentionProbe, RopeScheme, attention, attention_probe
from lminf_jax.attention_decode import rotates_keys
from lminf_jax.cache import KVCache, cached_attention, needs_full_cache
from lminf_jax.context_parallel import context_parallel_attention
from lminf_jax.probes import RowProbe, num_distance_buckets, probe_rows
from lminf_jax.scores import Positional
from lminf_jax.sharding import ShardingPlan
from models.common import AttentionCall, Params, check_tokens, default_positions

#: ``attend(q, k, v) -> (out, aux)`` on projected ``(B, T, heads * d)`` tensors.
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class Decoder:
    """One family's forward pass, for one config and compute dtype.

    ``embed(params, tokens) -> h``; ``layer(layer_params, h, attend) -> (h, aux)`` passes
    on whatever ``attend`` returned as aux; ``head(params, h) -> float32 logits``;
    ``layer_params(params)`` the stacked per-layer tree. ``positional`` is an `Alibi` or the
    family's `RopeScheme`, which `LanguageModel.decoder` resolves to a `Rotary` for the call's
    frequency method and sequence length.
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
    scale: float | None = None


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """A family's ``decoder`` builder with its config, attention call, compute dtype and
    optional `ShardingPlan` (params then placed by `models.registry.Family.param_shardings`).

    Frozen and hashable, so it is a valid ``jax.jit`` static argument and can be handed
    to `lminf_jax.decoding.generate` / `lminf_jax.streaming.streaming_nll` as the step.
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
        self.decoder()  # a frequency method on an ALiBi model, or over a checkpoint's own scaling, fails here

    def decoder(self) -> Decoder:
        """The family's decoder with its positions resolved: RoPE under the call's frequency method
        (dynamic NTK's follows each call's sequence length, `lminf_jax.rope.LengthRule`)."""
        dec = self.build(self.config, self.dtype)
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
        """Logits ``(B, T, vocab)`` in float32 for a whole sequence (see `models.registry.Family.forward`)."""
        check_tokens(tokens, self.config.vocab_size)
        if self.call.implementation == "pallas" and positions is not None:
            raise ValueError("implementation 'pallas' runs the tokens at positions 0..T-1; positions cannot be given")
        padded, t = self._split_sequence(tokens, positions)
        logits = _jit_forward(self, params, padded, default_positions(padded, positions, self.call.spec))
        return logits if padded.shape[1] == t else logits[:, :t]

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
        check_tokens(tokens, self.config.vocab_size)
        positions = default_positions(tokens, positions, self.call.spec)
        self.check_cache(cache, batch=tokens.shape[0])
        if not any(isinstance(x, jax.core.Tracer) for x in (positions, cache.positions)):
            _check_step_positions(np.asarray(positions), np.asarray(cache.positions), cache)
        return _jit_step(self, params, tokens, positions, cache)

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
            return KVCache.for_spec(self.spec, dec.num_layers, batch, dec.num_kv_heads, dec.head_dim,
                                    capacity=capacity, dtype=self.dtype if dtype is None else dtype,
                                    rotated=rotates_keys(dec.positional))

        if self.sharding is None:
            return make()
        return jax.jit(make, out_shardings=_cache_shardings(self.sharding, dec, jax.eval_shape(make)))()

    def check_cache(self, cache: KVCache, *, batch: int | None = None) -> None:
        """Raise a ValueError naming what does not fit between ``cache`` and this model."""
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache, got {type(cache).__name__}")
        cache.check_spec(self.spec)
        dec = self.decoder()
        expected = (dec.num_layers, cache.keys.shape[1], dec.num_kv_heads, cache.slots, dec.head_dim)
        if cache.keys.shape != expected:
            raise ValueError(f"cache keys have shape {cache.keys.shape}; this model needs {expected} "
                             "(layers, batch, kv_heads, slots, head_dim)")
        if cache.rotated != rotates_keys(dec.positional):
            raise ValueError(f"cache.rotated is {cache.rotated} but this model's positions need "
                             f"{rotates_keys(dec.positional)} (build the cache with init_cache)")
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
    layers = dec.layer_params(params)
    num_layers = jax.tree_util.tree_leaves(layers)[0].shape[0]

    def body(h, xs):
        p, index, *extra = xs
        h, aux = dec.layer(p, _constrain(plan, dec, h, "batch", length, "hidden"), make_attend(index, *extra))
        return _constrain(plan, dec, h, "batch", length, "hidden"), aux

    return lax.scan(body, h, (layers, jnp.arange(num_layers), *extra_xs))


def _split_heads(dec: Decoder, q: jax.Array, k: jax.Array, v: jax.Array, plan: ShardingPlan | None = None,
                 length: str | None = "length") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projected ``(B, T, heads * d)`` tensors as ``(B, T, heads, d)`` (constrained under ``plan``)."""
    return (_constrain(plan, dec, _heads(q, dec.num_heads), "batch", length, "heads", "head_dim"),
            _constrain(plan, dec, _heads(k, dec.num_kv_heads), "batch", length, "kv_heads", "head_dim"),
            _constrain(plan, dec, _heads(v, dec.num_kv_heads), "batch", length, "kv_heads", "head_dim"))


def _self_attention(dec: Decoder, call: AttentionCall, qh, kh, vh, positions: jax.Array, index,
                    plan: ShardingPlan | None = None) -> jax.Array:
    """Attention of a whole sequence over itself, merged back to ``(B, T, heads * dv)``: context
    parallel under a plan with a ``seq`` axis and a bounded spec, else `lminf_jax.attention`."""
    if plan is not None and plan.context_parallel and not needs_full_cache(call.spec):
        heads_split = not isinstance(dec.positional, Alibi) and plan.spec(
            ("kv_heads",), (dec.num_kv_heads,)) == jax.sharding.PartitionSpec("model")
        out = context_parallel_attention(
            qh, kh, vh, mesh=plan.mesh, axis="seq", spec=call.spec, positional=dec.positional, scale=dec.scale,
            block_q=call.block_q, block_k=call.block_k, head_axis="model" if heads_split else None,
            batch_axis="data" if plan.spec(("batch",), qh.shape[:1])[0] else None)
    else:
        out = attention(qh, kh, vh, q_positions=positions, k_positions=positions, spec=call.spec,
                        positional=dec.positional, scale=dec.scale,
                        layer=index if call.spec.top_k is not None else None,
                        implementation=call.implementation, block_q=call.block_q, block_k=call.block_k)
    return out.reshape(*qh.shape[:2], -1)


def _heads(x: jax.Array, n: int) -> jax.Array:
    b, t, _ = x.shape
    return x.reshape(b, t, n, -1)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    dec = model.decoder()
    call, plan = model.call, model.sharding

    def make_attend(index):
        def attend(q, k, v):
            return _self_attention(dec, call, *_split_heads(dec, q, k, v, plan), positions, index, plan), None
        return attend

    h, _ = _layer_scan(dec, params, dec.embed(params, _constrain(plan, dec, tokens, "batch", "length")), make_attend,
                       plan=plan)
    return _constrain(plan, dec, dec.head(params, h), "batch", "length", "vocab")


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
            stats = probe_rows(q_rows, kh, row_positions, positions, spec=call.spec, positional=dec.positional,
                               scale=dec.scale, num_buckets=num_buckets, block_k=call.block_k)
            full = None
            if full_rows:
                full = attention_probe(q_rows, kh, vh, q_positions=row_positions, k_positions=positions,
                                       spec=call.spec, positional=dec.positional, scale=dec.scale)[1]
            return out, (stats, full)
        return attend

    layers = dec.layer_params(params)

    def body(h, xs):
        p, index = xs
        entering = jnp.take(h, rows, axis=1).astype(jnp.float32)
        h, (stats, full) = dec.layer(p, h, make_attend(index))
        return h, (stats, full, entering)

    h0 = dec.embed(params, tokens)
    h, (stats, full, entering) = lax.scan(body, h0, (layers, jnp.arange(dec.num_layers)))
    hidden = jnp.concatenate([entering, jnp.take(h, rows, axis=1).astype(jnp.float32)[None]], axis=0)
    return ModelProbe(stats, hidden, dec.head(params, h), full)


@functools.partial(jax.jit, static_argnums=0)
def _jit_step(model: LanguageModel, params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache
              ) -> tuple[jax.Array, KVCache]:
    dec = model.decoder()
    call, plan = model.call, model.sharding
    update = cache.plan(positions)

    def make_attend(index, layer_keys, layer_values):
        def attend(q, k, v):
            qh, kh, vh = _split_heads(dec, q, k, v, plan, length=None)
            out, stored = cached_attention(
                qh, kh, vh, positions, layer_keys, layer_values, update, spec=call.spec, positional=dec.positional,
                rotated=cache.rotated, scale=dec.scale, layer=index if call.spec.top_k is not None else None,
                implementation=call.implementation, block_q=call.block_q, block_k=call.block_k,
            )
            return out.reshape(*q.shape[:2], -1), (stored, vh)
        return attend

    # the layers read the cache; every layer's new keys and values are written once, after them
    h, (keys, values) = _layer_scan(dec, params, dec.embed(params, tokens), make_attend, (cache.keys, cache.values),
                                    plan=plan, length=None)
    cache = cache.written(keys, values, update)
    if plan is not None:
        cache = jax.lax.with_sharding_constraint(cache, _cache_shardings(plan, dec, cache))
    return _constrain(plan, dec, dec.head(params, h), "batch", None, "vocab"), cache
