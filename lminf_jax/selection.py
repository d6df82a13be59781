"""Selection: keys a method chooses from scores when attention runs, declared in one place.

Three methods attend keys that no static mask names: LM-Infinite's top-k middle tokens
(`lminf_jax.spec.TopK`), LongHeads and InfLLM (`lminf_jax.spec.RetrievalSpec`). Each is one
`Selection`, what a method's ``selection`` property returns, and every implementation chooses through
`Selection.choose`:

* **top-k middle tokens**: 1-token units from the keys the mask hides, by the scaled score of the query
  at distance ``insert_distance`` with the raw key, per query head, for a call's last query; scored at
  that distance.
* **LongHeads**: ``w``-token chunks from the complete chunks 1 .. before the previous, by the raw query's
  dot product with each chunk's representation, per query head and query; re-numbered contiguously.
* **InfLLM**: ``bs``-token memory blocks from the formed ones, by the step's mean query at ``D = n_local -
  1`` against each block's representation, summed over the heads (one choice per layer), per step of
  queries; scored at distance ``D``.

What each method attends besides its choice (the top-k's Λ-mask, LongHeads' chunk 0, previous and own
chunks, InfLLM's initial tokens, window and tail) and how the scores are computed stay with the method;
which candidates win, in which order and with which validity is decided here only.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

from lminf_jax.int32 import require_int32
from lminf_jax.lazy import LazyModule

jax, jnp = LazyModule("jax"), LazyModule("jax.numpy")  # imported on first use: the declarations need neither

Scope = Literal["head", "layer"]
Every = Literal["last query", "query", "step"]


class Chosen(NamedTuple):
    """The winners of `Selection.choose` along the candidates' axis, best first (ties: lower index first):
    ``index`` (int32), ``valid`` (False where fewer candidates than `Selection.count` exist; its index is
    then meaningless) and ``scores`` (the winners' scores, ``-inf`` where not valid)."""

    index: jax.Array
    valid: jax.Array
    scores: jax.Array


@dataclasses.dataclass(frozen=True)
class Selection:
    """``count`` units of ``unit`` consecutive keys, chosen by score from a method's candidates (the module
    docstring's table).

    ``scope`` "head": each query head chooses its own; "layer": one choice for all heads of a layer, by
    the scores summed over heads. ``every``: a new choice per query, for the last query of a call only, or
    once per step of queries. ``distance``: the one query-key distance every chosen key is scored at, or
    None when the method re-numbers its chosen keys (LongHeads' contiguous frame). ``candidates`` and
    ``score`` say in words what competes and how it is scored (`describe`).
    """

    unit: int
    count: int
    scope: Scope
    every: Every
    distance: int | None
    candidates: str
    score: str

    def __post_init__(self) -> None:
        require_int32("selection.unit", self.unit, 1)
        require_int32("selection.count", self.count, 1)
        if self.distance is not None:
            require_int32("selection.distance", self.distance, 0)
        if self.scope not in ("head", "layer"):
            raise ValueError(f"selection.scope must be 'head' or 'layer', got {self.scope!r}")
        if self.every not in ("last query", "query", "step"):
            raise ValueError(f"selection.every must be 'last query', 'query' or 'step', got {self.every!r}")

    @property
    def keys(self) -> int:
        """The most keys one choice adds: ``count x unit``."""
        return self.count * self.unit

    def describe(self) -> str:
        """One line, e.g. ``"top 5 of 1-key units (the keys the mask hides) per query head and last query, by
        ..., scored at distance 32"``."""
        where = "re-numbered contiguously" if self.distance is None else f"scored at distance {self.distance}"
        per = "query head" if self.scope == "head" else "layer (scores summed over heads)"
        return (f"top {self.count} of {self.unit}-key units ({self.candidates}) per {per} and {self.every}, "
                f"by {self.score}, {where}")

    def choose(self, scores: jax.Array, candidates: jax.Array, head_axis: int | None = None) -> Chosen:
        """The best ``count`` candidates along the last axis of ``scores (..., n)`` (float32).

        ``candidates`` (bool, broadcastable to ``scores``; after the head sum for a layer scope) marks the
        units that compete. A "layer" scope sums ``scores`` over ``head_axis`` first (required then; it must
        not be the last axis). Best first, ties to the lower index (`jax.lax.top_k`): a method that needs
        another order sorts (LongHeads' chronological frame). At most ``n`` are returned.
        """
        if self.scope == "layer":
            if head_axis is None:
                raise ValueError("a selection per layer sums the heads' scores: head_axis must be given")
            scores = jnp.sum(scores, axis=head_axis)
        elif head_axis is not None:
            raise ValueError("a selection per head takes no head_axis")
        masked = jnp.where(candidates, scores, float("-inf"))
        values, index = jax.lax.top_k(masked, min(self.count, masked.shape[-1]))
        return Chosen(index.astype(jnp.int32), values > float("-inf"), values)
