"""Attention statistics for chosen query rows, computed blockwise over the keys.

`probe_rows` scores R chosen queries against all T keys of one attention call, one key chunk at
a time, and keeps per head and row only running statistics: the log-sum-exp of the attended
logits, the attention entropy, the number of attended keys, the largest logit, and per
relative-distance bucket the largest logit and the probability mass. Memory is
O(R x chunk x heads x buckets); no T x T (nor R x T) array exists, so rows of 10^5-token inputs
can be probed. For the full probability rows of a few queries use `lminf_jax.attention_probe`.

Distances ``i - j`` fall in half-octave buckets computed exactly with integer operations
(`distance_bucket`): ``{0} {1} {2} {3} [4,6) [6,8) [8,12) [12,16) ...``. A key is bucketed at its
true distance whatever class scored it, so under LM-Infinite the buckets beyond L hold only the
sinks (scored at distance D).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lminf_jax.online_softmax import softmax_finish, softmax_init, softmax_update
from lminf_jax.scores import (Positional, Scaling, last_key_position, masked_scores, prepare_keys, prepare_queries,
                              scaling)
from lminf_jax.int32 import int32_positions, require_int32
from lminf_jax.spec import AttentionSpec

__all__ = ["RowProbe", "bucket_table", "distance_bucket", "distance_bucket_bounds", "num_distance_buckets", "probe_rows"]


def distance_bucket(distance: jax.Array) -> jax.Array:
    """Half-octave bucket (int32) of non-negative integer distances: 0 -> 0, 1 -> 1, and for
    ``d >= 2`` with ``m = floor(log2 d)``: ``2m`` if ``d < 1.5 * 2**m`` else ``2m + 1``."""
    d = jnp.maximum(jnp.asarray(distance, jnp.int32), 0)
    m = 31 - lax.clz(jnp.maximum(d, 1))  # floor(log2 d), exact
    half = (d >> jnp.maximum(m - 1, 0)) & 1
    return jnp.where(d < 2, d, 2 * m + half).astype(jnp.int32)


def distance_bucket_bounds(bucket: int) -> tuple[int, int]:
    """``(lo, hi)``: bucket `bucket` holds the distances ``lo <= d < hi``."""
    if bucket < 2:
        return bucket, bucket + 1
    m, half = divmod(bucket, 2)
    lo = 2**m + half * 2 ** (m - 1)
    return lo, lo + 2 ** (m - 1)


def num_distance_buckets(max_distance: int) -> int:
    """Buckets needed for distances ``0..max_distance`` (an int32)."""
    require_int32("max_distance", max_distance, 0)
    return int(distance_bucket(jnp.asarray(max_distance, jnp.int32))) + 1


@dataclasses.dataclass(frozen=True)
class RowProbe:
    """Per head and probed row, shaped ``(B, Hq, R)`` (buckets: ``(B, Hq, R, nb)``).

    ``lse``: log-sum-exp of the attended logits (scaled scores incl. ALiBi bias);
    ``entropy``: of the attention distribution, nats; ``attended``: keys attended (float32);
    ``max_logit``: the largest attended logit; ``bucket_max``: the largest attended logit per
    distance bucket (``-inf`` where none); ``bucket_mass``: attention probability per bucket.
    Rows that attend nothing have ``lse = -inf`` and ``entropy = nan``.
    """

    lse: jax.Array
    entropy: jax.Array
    attended: jax.Array
    max_logit: jax.Array
    bucket_max: jax.Array
    bucket_mass: jax.Array


jax.tree_util.register_dataclass(
    RowProbe, data_fields=["lse", "entropy", "attended", "max_logit", "bucket_max", "bucket_mass"], meta_fields=[])


def probe_rows(
    q: jax.Array,
    k: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    spec: AttentionSpec,
    positional: Positional = None,
    scale: float | Scaling | None = None,
    num_buckets: int,
    block_k: int = 512,
) -> RowProbe:
    """Statistics of the attention of queries ``q (B, R, Hq, d)`` (un-rotated, at integer
    ``q_positions (B, R)``) over keys ``k (B, T, Hkv, d)`` at ``k_positions (B, T)`` (negative:
    empty) under ``spec`` (no top-k). ``num_buckets``: distance buckets to keep (see
    `num_distance_buckets`); distances beyond the last bucket are counted in it."""
    if spec.top_k is not None:
        raise ValueError("probe_rows does not support top-k middle tokens (spec.top_k must be None)")
    b, r, hq, d = q.shape
    t, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key heads ({hkv})")
    if q_positions.shape != (b, r) or k_positions.shape != (b, t):
        raise ValueError(f"positions must be (B, R) = {(b, r)} and (B, T) = {(b, t)}, got "
                         f"{q_positions.shape} and {k_positions.shape}")
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    scale = scaling(scale, d)
    g = hq // hkv
    chunk = min(block_k, t)
    padded = -(-t // chunk) * chunk
    qpos = int32_positions("q_positions", q_positions)
    kpos = jnp.pad(int32_positions("k_positions", k_positions), ((0, 0), (0, padded - t)), constant_values=-1)
    kf = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, padded - t), (0, 0), (0, 0)))
    last = last_key_position(kpos, positional)
    q_local, q_global = prepare_queries(q.astype(jnp.float32).reshape(b, r, hkv, g, d), qpos, spec, positional, last)
    k_local, k_global = prepare_keys(kf, kpos, spec, positional, last)

    neg = jnp.float32(-jnp.inf)
    # the softmax state's weighted sums: column 0 sum(p * logit) (for the entropy), then the mass per bucket
    init = (softmax_init((b, hkv, g, r), 1 + num_buckets), jnp.zeros((b, hkv, g, r)),
            jnp.full((b, hkv, g, r, num_buckets), neg))

    def fold(state, c):
        soft, count, bmax = state
        kl, kg = (lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=1) for x in (k_local, k_global))
        kp = lax.dynamic_slice_in_dim(kpos, c * chunk, chunk, axis=1)
        scores, attended = masked_scores(q_local, q_global, kl, kg, qpos, kp, spec=spec, positional=positional,
                                         scale=scale)
        logit = jnp.where(attended, scores, 0.0)
        bucket = jnp.minimum(distance_bucket(qpos[:, :, None] - kp[:, None, :]), num_buckets - 1)
        onehot = jax.nn.one_hot(bucket, num_buckets, dtype=bool)[:, None, None] & attended[..., None]

        def weighted(p: jax.Array) -> jax.Array:
            return jnp.concatenate([jnp.sum(p * logit, axis=-1, keepdims=True),
                                    jnp.where(onehot, p[..., None], 0.0).sum(axis=-2)], axis=-1)

        soft = softmax_update(soft, scores, weighted)
        bmax = jnp.maximum(bmax, jnp.where(onehot, scores[..., None], neg).max(axis=-2))
        return (soft, count + attended.sum(-1), bmax), None

    (soft, count, bmax), _ = lax.scan(fold, init, jnp.arange(padded // chunk))
    means, lse = softmax_finish(soft)
    seen = soft.total > 0
    entropy = jnp.where(seen, lse - means[..., 0], jnp.nan)

    return RowProbe(lse=_ungroup(lse), entropy=_ungroup(entropy), attended=_ungroup(count.astype(jnp.float32)),
                    max_logit=_ungroup(soft.m), bucket_max=_ungroup(bmax), bucket_mass=_ungroup(means[..., 1:]))


def _ungroup(x: jax.Array) -> jax.Array:
    """``(B, Hkv, Hg, ...) -> (B, Hq, ...)``."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def bucket_table(max_distance: int) -> np.ndarray:
    """``(nb, 2)`` int64 bounds ``[lo, hi)`` of the buckets of distances ``0..max_distance``."""
    return np.asarray([distance_bucket_bounds(i) for i in range(num_distance_buckets(max_distance))], np.int64)
