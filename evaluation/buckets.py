"""Log-spaced buckets of query positions (`PositionBuckets`) and what is measured in one (`BucketRow`): NLL by
position over one long run, as in the paper's NLL-vs-position curves."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

__all__ = ["BucketRow", "PositionBuckets", "require_int"]


def require_int(name: str, value: object, minimum: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an integer (numpy's too, not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class PositionBuckets:
    """Log-spaced buckets of non-negative integer positions, `per_octave` buckets per doubling.

    Geometric bucket ``j`` holds the integers ``p`` with ``j <= per_octave * log2(p) < j + 1``,
    that is ``[ceil(2**(j/k)), ceil(2**((j+1)/k)))``. Where those would be narrower than one
    integer (small positions) every position gets its own bucket instead: positions
    ``0..linear_below-1`` are buckets ``0..linear_below-1``. With ``per_octave=4``:
    ``{0} {1} {2} {3} {4} {5} [6,7) [7,8) [8,10) [10,12) [12,14) [14,16) [16,20) ...``.
    Bucket indices and bounds are computed in closed form (no table), exact for positions
    up to 2**53 at least.
    """

    per_octave: int = 4

    def __post_init__(self) -> None:
        require_int("per_octave", self.per_octave, 1)

    @functools.cached_property
    def _first_geometric(self) -> int:
        """The first geometric bucket index j0 whose width 2**(j/k) * (2**(1/k) - 1) is >= 1."""
        k, j = self.per_octave, 0
        growth = math.expm1(math.log(2.0) / k)
        while 2.0 ** (j / k) * growth < 1.0:
            j += 1
        return j

    @property
    def linear_below(self) -> int:
        """Positions below this each have their own bucket."""
        return int(self._edge(np.int64(self._first_geometric)))

    def _edge(self, j: np.ndarray) -> np.ndarray:
        """Lower bound ``ceil(2**(j/k))`` of geometric bucket ``j`` (int64)."""
        return np.ceil(np.exp2(np.asarray(j, np.float64) / self.per_octave)).astype(np.int64)

    def index(self, positions) -> np.ndarray:
        """Bucket index (int64) of each position (an int or integer array, all >= 0)."""
        p = np.asarray(positions)
        if p.dtype.kind not in "iu":
            raise ValueError(f"positions must be integers, got dtype {p.dtype}")
        p = p.astype(np.int64)
        if p.size and p.min() < 0:
            raise ValueError(f"positions must be >= 0, got {p.min()}")
        lin, j0 = self.linear_below, self._first_geometric
        out = p.copy()
        big = p >= lin
        if big.any():
            q = p[big]
            j = np.maximum(np.floor(np.log2(q.astype(np.float64)) * self.per_octave).astype(np.int64), j0)
            while True:  # exact correction of the float estimate (at most a step or two)
                up = self._edge(j + 1) <= q
                down = self._edge(j) > q
                if not (up.any() or down.any()):
                    break
                j = j + up - down
            out[big] = lin + (j - j0)
        return out

    def bounds(self, index) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)`` (int64 arrays, or 0-d for a scalar index): bucket ``i`` is ``[lo, hi)``."""
        i = np.asarray(index, np.int64)
        if i.size and i.min() < 0:
            raise ValueError(f"bucket indices must be >= 0, got {i.min()}")
        lin, j0 = self.linear_below, self._first_geometric
        j = np.maximum(i - lin, 0) + j0
        lo = np.where(i < lin, i, self._edge(j))
        hi = np.where(i < lin, i + 1, self._edge(j + 1))
        return lo, hi

    def count(self, max_position: int) -> int:
        """How many buckets cover positions ``0..max_position``."""
        return int(self.index(np.int64(max_position))) + 1

    def to_json(self) -> dict:
        return {"per_octave": self.per_octave}


@dataclasses.dataclass(frozen=True)
class BucketRow:
    """Scores at query positions ``[lo, hi)``, summed over streams."""

    lo: int
    hi: int
    count: int
    nll: float
    ppl: float
