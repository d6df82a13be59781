"""Key/value caches for incremental decoding: the bounded Λ-cache and a full cache.

A `KVCache` is a pytree of per-layer keys and values, heads first (one head's keys are
contiguous, as a decoding step reads them), plus, per slot, the absolute position of the token it
holds (``-1`` = empty). Masks and ALiBi biases are computed from those stored positions at every
call, so slot order never matters. Under RoPE with fixed frequencies the keys are stored
**rotated** at their own positions (``rotated``; each rotation exact at any int32 position), so a
decoding step reads each key once and rotates only what a method scores elsewhere: the query, per
global key (`lminf_jax.attention_decode`). Under dynamic NTK (frequencies that follow the length),
ALiBi or no positions the keys are stored as projected and rotated at every call.

* **Λ-cache** (`KVCache.lambda_cache`): ``G`` sink slots for positions ``0..G-1`` and an
  ``L``-slot ring; position ``p >= G`` lives in slot ``G + (p - G) mod L``. It holds
  exactly what an LM-Infinite query can still attend (the sinks and the last L
  tokens), so its size does not depend on how many tokens have passed.
* **Full cache** (`KVCache.full`): slot = position, a fixed capacity; for vanilla
  decoding, the distance-limit ablation, the top-k middle-token variant and the retrieval methods
  (`lminf_jax.spec.RetrievalSpec`), whose keys it keeps un-rotated and beside which it carries each
  layer's method state (``state``: `lminf_jax.retrieval.initial_state`, replaced whole by each call).

One model call with T new tokens is `KVCache.update_for` (once, positions only), `cached_attention` in
every layer (which reads its layer of the cache and returns the keys to store) and one
`KVCache.written` after the last layer, which writes every layer's new keys and values into their
slots (in place inside a jitted loop: a step never copies the cache):

* ``T == 1`` (decoding): the query attends the cache as it was, plus its own key, in one softmax
  (`lminf_jax.attention_decode`; the dense reference path for top-k middle tokens or when asked
  for). The slot the token will overwrite holds a position outside every window the cache
  admits, so attending the cache before the write loses nothing.
* ``T > 1`` (chunked prefill): the query chunk attends the cache, linearised in position order
  (and un-rotated), followed by the chunk's own keys, so the blockwise path applies; then the chunk
  is written (in a ring only its last L tokens survive). Chunked prefill therefore leaves the cache
  exactly as token-by-token decoding would.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from lminf_jax.attention import FUSED_IMPLEMENTATIONS, call_attention
from lminf_jax.attention_call import AttentionCall
from lminf_jax.attention_decode import decode_attention, rotates_keys
from lminf_jax.retrieval import SLOT_STATE, initial_state, retrieval_attention
from lminf_jax.rope import apply_rope, unrotate
from lminf_jax.scores import Positional, Scaling, scaling
from lminf_jax.int32 import INT32_MAX, int32_positions, require_int32
from lminf_jax.spec import AttentionSpec

@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values ``(layers, B, Hkv, S, d)``, positions ``(B, S)``; static `sinks`/`ring`/`rotated`.

    ``ring is None`` marks a full cache (slot = position, ``S`` = capacity). ``rotated``: keys are
    stored rotated at their own positions (`lminf_jax.attention_decode.rotates_keys`). ``state``: a
    retrieval method's per-layer state (arrays with a leading layer axis), else None.
    """

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    sinks: int = 0
    ring: int | None = None
    rotated: bool = False
    state: dict[str, jax.Array] | None = None

    # ----- construction ---------------------------------------------------------------
    @classmethod
    def lambda_cache(
        cls, num_layers: int, batch: int, kv_heads: int, head_dim: int, *, sinks: int, window: int,
        dtype=jnp.float32, value_dim: int | None = None, rotated: bool = False,
    ) -> KVCache:
        """An empty Λ-cache: ``sinks`` (G) sink slots plus a ring of ``window`` (L) slots."""
        require_int32("sinks", sinks, 0)
        require_int32("window", window, 1)
        if sinks + window > INT32_MAX:
            raise ValueError(f"sinks + window (the slots of a Λ-cache, int32 indices) must be <= {INT32_MAX}, got "
                             f"{sinks} + {window}")
        driver = "the window L (local_branch)" if window >= sinks else "the sinks G (global_branch)"
        return cls._empty(num_layers, batch, sinks + window, kv_heads, head_dim, value_dim, dtype, sinks, window,
                          rotated, f"Λ-cache of G + L = {sinks} + {window} slots", driver)

    @classmethod
    def full(
        cls, num_layers: int, batch: int, kv_heads: int, head_dim: int, *, capacity: int,
        dtype=jnp.float32, value_dim: int | None = None, rotated: bool = False,
    ) -> KVCache:
        """An empty full cache holding positions ``0..capacity-1``."""
        require_int32("capacity", capacity, 1)
        return cls._empty(num_layers, batch, capacity, kv_heads, head_dim, value_dim, dtype, 0, None, rotated,
                          f"full cache of capacity = {capacity} slots", "capacity (the longest sequence it must hold)")

    @classmethod
    def for_spec(
        cls, spec: AttentionSpec, num_layers: int, batch: int, kv_heads: int, head_dim: int, *,
        capacity: int | None = None, dtype=jnp.float32, value_dim: int | None = None, rotated: bool = False,
        query_heads: int | None = None,
    ) -> KVCache:
        """The smallest cache that serves ``spec``: a Λ-cache when its attended set is bounded
        (``capacity``, the longest sequence to be held, is then not needed), else a full
        cache of ``capacity`` slots (with a retrieval method's state, for ``query_heads`` heads)."""
        return cls.for_specs([spec], num_layers, batch, kv_heads, head_dim, capacity=capacity, dtype=dtype,
                             value_dim=value_dim, rotated=rotated, query_heads=query_heads)

    @classmethod
    def for_specs(
        cls, specs: Sequence[AttentionSpec], num_layers: int, batch: int, kv_heads: int, head_dim: int, *,
        capacity: int | None = None, dtype=jnp.float32, value_dim: int | None = None, rotated: bool = False,
        query_heads: int | None = None,
    ) -> KVCache:
        """The smallest cache that serves every spec of ``specs`` (layers of different kinds, e.g. a
        model's native sliding-window layers beside the method's): a Λ-cache of the most sinks and the
        longest window when all are bounded, else a full cache of ``capacity`` slots, with the state of
        the retrieval method among them (for ``query_heads`` heads, default ``kv_heads``)."""
        unbounded = [spec for spec in specs if not spec.bounded]
        if unbounded:
            if capacity is None:
                raise ValueError(f"capacity is required: {unbounded[0].describe()} attends an unbounded number of "
                                 "keys and needs a full cache")
            cache = cls.full(num_layers, batch, kv_heads, head_dim, capacity=capacity, dtype=dtype,
                             value_dim=value_dim, rotated=rotated)
            retrieving = [spec for spec in specs if spec.retrieves]
            if not retrieving:
                return cache
            if rotated:
                raise ValueError(f"{retrieving[0].describe()} re-positions keys per query: its cache keeps them "
                                 "un-rotated (rotated=False)")
            layer = initial_state(retrieving[0], batch, query_heads or kv_heads, capacity, head_dim, dtype)
            state = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_layers, *x.shape)), layer)
            return dataclasses.replace(cache, state=jax.tree.map(jnp.array, state))
        return cls.lambda_cache(num_layers, batch, kv_heads, head_dim, sinks=max(spec.sinks for spec in specs),
                                window=max(spec.window for spec in specs), dtype=dtype, value_dim=value_dim,
                                rotated=rotated)

    @classmethod
    def _empty(cls, num_layers, batch, slots, kv_heads, head_dim, value_dim, dtype, sinks, ring, rotated: bool,
               what: str, driver: str) -> KVCache:
        """Zeroed keys/values and empty positions, after `check_cache_size`; ``what`` says how the
        slot count arises and ``driver`` what to lower when it is too large."""
        value_dim = head_dim if value_dim is None else value_dim
        for name, n in (("num_layers", num_layers), ("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim),
                        ("value_dim", value_dim)):
            require_int32(name, n, 1)
        check_cache_size(num_layers, batch, slots, kv_heads, head_dim + value_dim, jnp.dtype(dtype).itemsize, what,
                         driver)
        return cls(
            keys=jnp.zeros((num_layers, batch, kv_heads, slots, head_dim), dtype),
            values=jnp.zeros((num_layers, batch, kv_heads, slots, value_dim), dtype),
            positions=jnp.full((batch, slots), -1, jnp.int32),
            sinks=sinks,
            ring=ring,
            rotated=bool(rotated),
        )

    # ----- properties -------------------------------------------------------------------
    @property
    def bounded(self) -> bool:
        """True for a Λ-cache (constant size for any stream length)."""
        return self.ring is not None

    @property
    def slots(self) -> int:
        """Slots per row (``G + L``, or the full cache's capacity)."""
        return self.positions.shape[1]

    @property
    def nbytes(self) -> int:
        """Device bytes held (keys, values, positions and any method state)."""
        leaves = [self.keys, self.values, self.positions, *jax.tree.leaves(self.state)]
        return sum(x.size * x.dtype.itemsize for x in leaves)

    def describe(self) -> str:
        kind = f"lambda(G={self.sinks}, L={self.ring})" if self.bounded else f"full(capacity={self.slots})"
        state = f", state {'/'.join(sorted(self.state))}" if self.state else ""
        return f"{kind}{', rotated keys' if self.rotated else ''}{state}, {self.nbytes / 2**20:.1f} MiB"

    def check_spec(self, spec: AttentionSpec) -> None:
        """Raise a ValueError when this cache cannot hold every key ``spec`` may attend (or, for a retrieval
        method, lacks its state)."""
        if spec.retrieves and self.state is None:
            raise ValueError(f"{spec.describe()} keeps state beside its cache: build the cache for it "
                             "(KVCache.for_spec or the model's init_cache)")
        if not self.bounded:
            return
        if not spec.bounded:
            why = "top-k middle tokens need every key" if spec.top_k is not None else "it attends unboundedly many keys"
            raise ValueError(f"{spec.describe()} needs a full cache ({why}); this is a Λ-cache "
                             f"(G={self.sinks}, L={self.ring})")
        if spec.sinks > self.sinks:
            raise ValueError(f"spec global_branch {spec.sinks} exceeds the cache's {self.sinks} sink slots")
        if spec.window > self.ring:
            raise ValueError(f"spec local_branch {spec.window} exceeds the cache's ring of {self.ring} slots")

    # ----- one model call ---------------------------------------------------------------
    def update_for(self, positions: jax.Array) -> CacheUpdate:
        """Where the tokens at ``positions`` ``(B, T)`` go, and the cache's slot order.

        A token is dropped (slot index ``S``) when its position is negative (padding), when
        a later token of the same call overwrites its ring slot, or when it lies beyond a
        full cache's capacity (callers validate capacity before tracing).
        """
        positions = int32_positions("positions", positions)
        s = self.slots
        valid = positions >= 0
        if self.bounded:
            g, length = self.sinks, self.ring
            newest = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
            in_sinks = positions < g
            slot = jnp.where(in_sinks, positions, g + jnp.mod(positions - g, length))
            keep = valid & (in_sinks | (positions > newest - length))
        else:
            slot = positions
            keep = valid & (positions < s)
        slot = jnp.where(keep, slot, s).astype(jnp.int32)
        rows = jnp.arange(positions.shape[0])[:, None]
        written = self.positions.at[rows, slot].set(positions, mode="drop")
        order = None if positions.shape[1] == 1 else jnp.argsort(self.positions, axis=1, stable=True)
        return CacheUpdate(slot=slot, old_positions=self.positions, new_positions=written, order=order)

    def written(self, keys: jax.Array, values: jax.Array, update: CacheUpdate,
                state: dict[str, jax.Array] | None = None) -> KVCache:
        """This cache with every layer's new tokens written: ``keys``/``values`` ``(layers, B, T, Hkv,
        d|dv)`` as `cached_attention` returns them (keys as stored), at ``update.slot``, and every layer's
        ``state`` as it returns it (its `lminf_jax.retrieval.SLOT_STATE` rows written at the same slots)."""
        rows = jnp.arange(keys.shape[1])[:, None]

        def write(cache: jax.Array, new: jax.Array) -> jax.Array:
            # the two index arrays are apart, so the written block is (B, T, layers, Hkv, d)
            return cache.at[:, rows, :, update.slot].set(jnp.moveaxis(new, 0, 2).astype(cache.dtype), mode="drop")

        if state is not None:  # a row per slot is written as keys are; the rest is replaced whole
            state = {name: write(self.state[name], new) if name in SLOT_STATE else new for name, new in state.items()}
        return dataclasses.replace(self, keys=write(self.keys, keys), values=write(self.values, values),
                                   positions=update.new_positions, state=state)


@dataclasses.dataclass(frozen=True)
class CacheUpdate:
    """What `KVCache.update_for` computes once per call and every layer reuses.

    ``slot (B, T)``: destination slot per new token (``S`` = dropped);
    ``old_positions``/``new_positions (B, S)``: slot positions before/after the write;
    ``order (B, S)``: slots sorted by position, empty first (``None`` for one token).
    """

    slot: jax.Array
    old_positions: jax.Array
    new_positions: jax.Array
    order: jax.Array | None


for _cls, _fields in ((KVCache, ["keys", "values", "positions", "state"]),
                      (CacheUpdate, ["slot", "old_positions", "new_positions", "order"])):
    jax.tree_util.register_dataclass(
        _cls, data_fields=_fields, meta_fields=[f.name for f in dataclasses.fields(_cls) if f.name not in _fields]
    )


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    cache_keys: jax.Array,
    cache_values: jax.Array,
    update: CacheUpdate,
    *,
    call: AttentionCall,
    positional: Positional,
    rotated: bool,
    scale: float | Scaling | None = None,
    layer: int | jax.Array | None = None,
    state: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array] | None]:
    """One layer's attention of new tokens over its cache plus themselves.

    ``q (B, T, Hq, d)``, ``k``/``v (B, T, Hkv, d)`` un-rotated, ``positions (B, T)``;
    ``cache_keys``/``cache_values (B, Hkv, S, d)`` this layer of the cache (not written here),
    ``rotated`` its `KVCache.rotated`, ``update`` from `KVCache.update_for` and ``state`` this layer's
    `KVCache.state`. Returns ``(out (B, T, Hq, dv), keys to store (B, T, Hkv, d), state)`` (keys rotated
    when the cache is; the state after a retrieval method's call, else as given); `KVCache.written`
    stores them. ``call`` and the other arguments as in `lminf_jax.attention.call_attention`.
    """
    spec, stored = call.spec, k
    if spec.retrieves:  # a full cache of un-rotated keys, slot = position: the method's own buffers
        out, state = retrieval_attention(q, k, v, positions.astype(jnp.int32), cache_keys, cache_values, state,
                                         spec=spec, positional=positional, scale=scaling(scale, q.shape[-1]))
        return out, k.astype(cache_keys.dtype), state
    if state is not None:  # a layer of another kind (a native window) beside a retrieval method's: state kept
        b, t = positions.shape
        state = {name: jnp.zeros((b, t, x.shape[1], *x.shape[3:]), x.dtype) if name in SLOT_STATE else x
                 for name, x in state.items()}
    if rotated:
        if not rotates_keys(positional):
            raise ValueError("a cache of rotated keys serves RoPE with fixed frequencies only")
        stored = apply_rope(k, positions, positional).astype(cache_keys.dtype)
    if q.shape[1] == 1 and call.implementation != "reference" and spec.top_k is None:
        # a cache holds position j < G in slot j, so only its first G slots can be global keys
        far = spec.sinks if spec.global_keys_bounded else None
        out = decode_attention(q, positions.astype(jnp.int32), (cache_keys, jnp.swapaxes(stored, 1, 2)),
                               (cache_values, jnp.swapaxes(v.astype(cache_values.dtype), 1, 2)),
                               (update.old_positions, positions.astype(jnp.int32)), spec=spec, positional=positional,
                               scale=scaling(scale, q.shape[-1]), rotated=rotated,
                               far_slots=(far, 0))
        return out, stored, state
    order = update.order if update.order is not None else jnp.argsort(update.old_positions, axis=1, stable=True)
    key_positions = jnp.take_along_axis(update.old_positions, order, axis=1)
    linear = lambda x: jnp.swapaxes(jnp.take_along_axis(x, order[:, None, :, None], axis=2), 1, 2)  # noqa: E731
    cached = linear(cache_keys)
    if rotated:
        cached = unrotate(cached, key_positions, positional)
    keys = jnp.concatenate([cached, k.astype(cache_keys.dtype)], axis=1)
    values = jnp.concatenate([linear(cache_values), v.astype(cache_values.dtype)], axis=1)
    key_positions = jnp.concatenate([key_positions, positions.astype(jnp.int32)], axis=1)
    # the fused kernels serve whole sequences and single_query one query: a chunk runs blockwise
    if call.implementation in (*FUSED_IMPLEMENTATIONS, "single_query"):
        call = dataclasses.replace(call, implementation="blockwise")
    out = call_attention(q, keys, values, call=call, q_positions=positions, k_positions=key_positions,
                         positional=positional, scale=scale, layer=layer)
    return out, stored, state


#: The narrowest float dtype a cache is kept in: a cache's size at this dtype is the least it needs
#: while its dtype is not known yet (e.g. before the weights that set it are read).
NARROWEST_DTYPE = jnp.bfloat16


def host_memory() -> int:
    """Bytes of the host's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory() -> tuple[int, str]:
    """Bytes a cache could occupy at most, and where: the memory of all local devices together
    where the backend reports it (a cache may be sharded over them), else the host's RAM."""
    devices = jax.local_devices()
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    if all(limits):
        return sum(limits), f"{len(devices)} {devices[0].platform} device(s)"
    return host_memory(), "host memory"


def check_cache_size(num_layers: int, batch: int, slots: int, kv_heads: int, key_value_dims: int, itemsize: int,
                     what: str, driver: str) -> None:
    """Raise a ValueError, before anything is allocated, when a cache's keys, values and positions
    (``layers x batch x slots x kv_heads x (head_dim + value_dim) x itemsize`` + int32 positions)
    exceed `available_memory`; it names the size, ``what`` sets the slot count and ``driver`` to lower."""
    needed = num_layers * batch * slots * kv_heads * key_value_dims * itemsize + batch * slots * 4
    available, where = available_memory()
    if needed > available:
        raise ValueError(
            f"a {what} needs {needed:,} bytes ({num_layers} layers x batch {batch} x {slots} slots x "
            f"{kv_heads} kv heads x {key_value_dims} key + value dims x {itemsize} bytes, + positions), more than "
            f"the {available:,} bytes of {where}; lower {driver} or the batch")


def check_cache_fits(init_cache: Callable[[], KVCache], cause: str) -> None:
    """Run ``init_cache`` abstractly (`jax.eval_shape`: nothing is allocated), so that a cache too large
    for memory is refused by `check_cache_size` before any work; its ValueError is prefixed with
    ``cause``, the options that set the cache's size."""
    try:
        jax.eval_shape(init_cache)
    except ValueError as e:
        raise ValueError(f"{cause}: {e}") from None
