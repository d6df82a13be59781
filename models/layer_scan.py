"""The one layer-scan driver (`LayerScan`) and the three passes that run on it: a whole sequence
(`sequence_hidden`), the same with probes of some query rows (`probed_hidden`), and the cached step
(`step_hidden`).

Each scans the stacked layers once (the step scans the cache's layer axis alongside), so compile time does
not grow with depth; under a `lminf_jax.sharding.ShardingPlan` every pass keeps the residual stream, the
heads and the cache at their sharding, and a whole sequence split over ``seq`` runs context-parallel
attention (`lminf_jax.context_parallel`) for bounded specs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax

from lminf_jax import Alibi, AttentionCall, attention_probe
from lminf_jax.attention import call_attention
from lminf_jax.cache import KVCache, cached_attention
from lminf_jax.context_parallel import context_parallel_attention
from lminf_jax.loop_slice import loop_slice
from lminf_jax.probes import RowProbe, probe_rows
from lminf_jax.scores import Positional
from lminf_jax.sharding import ShardingPlan
from lminf_jax.models.common import Params

if TYPE_CHECKING:
    from lminf_jax.models.decoder import Decoder


@dataclasses.dataclass(frozen=True)
class LayerScan:
    """What every layer of one pass reads: the decoder, the model's `AttentionCall`, its sharding plan
    (None: one device) and the logical name of the time axis (``"length"`` for a whole sequence, split over
    ``seq``; None for a step, whose few new tokens stay whole)."""

    dec: Decoder
    call: AttentionCall
    plan: ShardingPlan | None = None
    length: str | None = "length"

    def constrain(self, x: jax.Array, *logical: str | None) -> jax.Array:
        """``x`` constrained to its logical axes under the plan (unchanged without one)."""
        return x if self.plan is None else self.plan.constrain(x, logical, _units(self.dec))

    def embed(self, params: Params, tokens: jax.Array) -> jax.Array:
        """The residual stream entering the first layer."""
        return self.dec.embed(params, self.constrain(tokens, "batch", self.length))

    def heads(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projected ``(B, T, heads * d)`` tensors as ``(B, T, heads, d)``, constrained under the plan."""
        dec = self.dec
        return (self.constrain(_split(q, dec.num_heads), "batch", self.length, "heads", "head_dim"),
                self.constrain(_split(k, dec.num_kv_heads), "batch", self.length, "kv_heads", "head_dim"),
                self.constrain(_split(v, dec.num_kv_heads), "batch", self.length, "kv_heads", "head_dim"))

    def run(self, params: Params, h: jax.Array, attend: Callable[..., tuple[jax.Array, Any]], stacked: tuple = (),
            observe: Callable[[jax.Array], Any] | None = None) -> tuple[jax.Array, Any, Any]:
        """Scan the decoder's layers over the residual stream ``h``: layer ``i``'s attention is
        ``attend(i, *stacked_i, q, k, v) -> (out, aux)`` (``stacked``: trees with a leading layer axis, such as
        the cache's keys). Returns the last hidden states, each layer's aux and each layer's ``observe(h)`` of
        the stream entering it (None without ``observe``), the last two stacked over layers."""

        def body(h, index, xs):
            layer_params, *extra = xs
            h = self.constrain(h, "batch", self.length, "hidden")
            seen = None if observe is None else observe(h)
            h, aux = self.dec.layer(layer_params, h, functools.partial(attend, index, *extra))
            return self.constrain(h, "batch", self.length, "hidden"), (aux, seen)

        h, (aux, seen) = _scan_stacked(body, h, (self.dec.layer_params(params), *stacked))
        return h, aux, seen


def cache_shardings(plan: ShardingPlan, dec: Decoder, cache: KVCache) -> KVCache:
    """The cache's shardings: keys/values ``(layers, batch, kv_heads, slots, d)``, positions ``(batch, slots)``."""
    kv = ("layers", "batch", "kv_heads", None, "head_dim")
    state = jax.tree.map(lambda x: plan.named(("layers", "batch", "heads", *[None] * (x.ndim - 3)), x.shape,
                                              _units(dec)), cache.state)
    return dataclasses.replace(cache, keys=plan.named(kv, cache.keys.shape, _units(dec)),
                               values=plan.named(kv, cache.values.shape, _units(dec)),
                               positions=plan.named(("batch", None), cache.positions.shape), state=state)


def sequence_hidden(scan: LayerScan, params: Params, tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
    """The hidden states ``(B, T, hidden)`` after the last layer of a whole-sequence pass (the head's input);
    ``positions`` None: every row at 0..T-1."""

    def attend(index, q, k, v):
        return _sequence_attention(scan, index, *scan.heads(q, k, v), positions), None

    return scan.run(params, scan.embed(params, tokens), attend)[0]


def probed_hidden(scan: LayerScan, params: Params, tokens: jax.Array, positions: jax.Array, rows: jax.Array,
                  num_buckets: int, full_rows: bool) -> tuple[jax.Array, RowProbe, Any, jax.Array]:
    """A whole-sequence pass that probes the query rows ``rows``: the last hidden states, each layer's
    `RowProbe` (and `lminf_jax.AttentionProbe` of the rows with ``full_rows``, else None) and the residual
    stream at the rows entering each layer and after the last, ``(layers + 1, B, R, width)`` float32."""
    row_positions = jnp.take(positions, rows, axis=1)

    def attend(index, q, k, v):
        qh, kh, vh = scan.heads(q, k, v)
        probe = _probe_rows(scan, index, jnp.take(qh, rows, axis=1), kh, vh, row_positions, positions, num_buckets,
                            full_rows)
        return _sequence_attention(scan, index, qh, kh, vh, positions), probe

    at_rows = lambda h: jnp.take(h, rows, axis=1).astype(jnp.float32)  # noqa: E731
    h, (stats, full), entering = scan.run(params, scan.embed(params, tokens), attend, observe=at_rows)
    return h, stats, full, jnp.concatenate([entering, at_rows(h)[None]], axis=0)


def step_hidden(scan: LayerScan, params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache
                ) -> tuple[jax.Array, KVCache]:
    """The step's hidden states ``(B, T, hidden)`` after the last layer (the head's input) and the cache
    with the new tokens written; ``scan`` of a step (``length`` None)."""
    update = cache.update_for(positions)

    def attend(index, layer_keys, layer_values, layer_state, q, k, v):
        qh, kh, vh = scan.heads(q, k, v)

        def step(call: AttentionCall, positional: Positional) -> tuple[jax.Array, jax.Array, Any]:
            return cached_attention(qh, kh, vh, positions, layer_keys, layer_values, update, call=call,
                                    positional=positional, rotated=cache.rotated, scale=scan.dec.scale,
                                    layer=_top_k_layer(call, index), state=layer_state)

        out, stored, state = scan.dec.per_layer(scan.call, index, step)
        return out.reshape(*q.shape[:2], -1), (stored, vh, state)

    # the layers read the cache; every layer's new keys and values (and state) are written once, after them
    h, (keys, values, state), _ = scan.run(params, scan.embed(params, tokens), attend,
                                           (cache.keys, cache.values, cache.state))
    cache = cache.written(keys, values, update, state)
    if scan.plan is not None:
        cache = lax.with_sharding_constraint(cache, cache_shardings(scan.plan, scan.dec, cache))
    return h, cache


def _sequence_attention(scan: LayerScan, index: jax.Array, qh: jax.Array, kh: jax.Array, vh: jax.Array,
                        positions: jax.Array | None) -> jax.Array:
    """Attention of a whole sequence over itself in layer ``index``, merged back to ``(B, T, heads * dv)``:
    context parallel under a plan with a ``seq`` axis and a bounded spec, else `call_attention`."""
    plan, dec = scan.plan, scan.dec

    def attend(call: AttentionCall, positional: Positional) -> jax.Array:
        if plan is not None and plan.context_parallel and call.spec.bounded:
            heads_split = not isinstance(positional, Alibi) and plan.partition_spec(
                ("kv_heads",), (dec.num_kv_heads,)) == jax.sharding.PartitionSpec("model")
            return context_parallel_attention(
                qh, kh, vh, mesh=plan.mesh, axis="seq", spec=call.spec, positional=positional, scale=dec.scale,
                block_q=call.block_q, block_k=call.block_k, head_axis="model" if heads_split else None,
                batch_axis="data" if plan.partition_spec(("batch",), qh.shape[:1])[0] else None)
        return call_attention(qh, kh, vh, call=call, q_positions=positions, k_positions=positions,
                              positional=positional, scale=dec.scale, layer=_top_k_layer(call, index))

    return dec.per_layer(scan.call, index, attend).reshape(*qh.shape[:2], -1)


def _probe_rows(scan: LayerScan, index: jax.Array, q_rows: jax.Array, kh: jax.Array, vh: jax.Array,
                row_positions: jax.Array, positions: jax.Array, num_buckets: int, full_rows: bool
                ) -> tuple[RowProbe, Any]:
    """Layer ``index``'s `RowProbe` of the query rows ``q_rows`` over every key, and their full
    `lminf_jax.AttentionProbe` when ``full_rows`` (else None)."""

    def probe(call: AttentionCall, positional: Positional) -> tuple[RowProbe, Any]:
        stats = probe_rows(q_rows, kh, row_positions, positions, spec=call.spec, positional=positional,
                           scale=scan.dec.scale, num_buckets=num_buckets, block_k=call.block_k)
        full = None
        if full_rows:
            full = attention_probe(q_rows, kh, vh, q_positions=row_positions, k_positions=positions,
                                   spec=call.spec, positional=positional, scale=scan.dec.scale)[1]
        return stats, full

    return scan.dec.per_layer(scan.call, index, probe)


def _top_k_layer(call: AttentionCall, index: jax.Array) -> jax.Array | None:
    """The layer index attention needs for the call's top-k (None without top-k: no traced layer)."""
    return index if call.spec.top_k is not None else None


def _units(dec: Decoder) -> dict[str, int]:
    return {"heads": dec.num_heads, "kv_heads": dec.num_kv_heads}


def _split(x: jax.Array, n: int) -> jax.Array:
    b, t, _ = x.shape
    return x.reshape(b, t, n, -1)


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
