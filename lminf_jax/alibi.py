"""ALiBi: per-head linear attention biases on query-key distance, with an optional distance cap."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


def alibi_slopes(num_heads: int, bias_max: float = 8.0) -> np.ndarray:
    """float64 slopes (num_heads,) by MPT's rule (equal to BLOOM's for bias_max = 8)."""
    if num_heads < 1:
        raise ValueError(f"`num_heads` must be >= 1, got {num_heads}")
    n2 = 1 << (num_heads - 1).bit_length()  # next power of two >= num_heads
    slopes = 2.0 ** -(np.arange(1, n2 + 1, dtype=np.float64) * bias_max / n2)
    if n2 != num_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


@dataclass(frozen=True)
class Alibi:
    """ALiBi slopes, one per query head. Hashable (usable as a jit static arg)."""

    slopes: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "slopes", tuple(float(s) for s in self.slopes))
        if not self.slopes:
            raise ValueError("`slopes` must be non-empty")

    @classmethod
    def create(cls, num_heads: int, bias_max: float = 8.0) -> Alibi:
        """Slopes for `num_heads` heads by alibi_slopes."""
        return cls(tuple(alibi_slopes(num_heads, bias_max).tolist()))


def _integer_positions(positions: jax.Array, name: str) -> jax.Array:
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"`{name}` must be an integer array, got dtype {positions.dtype}")
    return positions.astype(jnp.int32)


def alibi_bias(slopes: Sequence[float] | np.ndarray | jax.Array, q_positions: jax.Array,
               k_positions: jax.Array, max_distance: int | None = None) -> jax.Array:
    """float32 bias (..., H, Tq, Tk) = -slope * min(i - j, max_distance); no causal masking."""
    if max_distance is not None and max_distance < 0:
        raise ValueError(f"`max_distance` must be >= 0, got {max_distance}")
    q = _integer_positions(q_positions, "q_positions")
    k = _integer_positions(k_positions, "k_positions")
    distance = q[..., :, None] - k[..., None, :]  # int32 (..., Tq, Tk)
    if max_distance is not None:
        distance = jnp.minimum(distance, max_distance)
    per_head = jnp.asarray(slopes, jnp.float32).reshape(-1, 1, 1)
    return -per_head * distance[..., None, :, :].astype(jnp.float32)
