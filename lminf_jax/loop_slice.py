"""Slices taken inside a loop that keep XLA from converting the whole array before it.

XLA:CPU computes bfloat16 in float32: its float-normalization pass converts the *operand* of a
slice taken in a loop body (the whole array), and its while-loop-invariant code motion then hoists
that conversion out of the loop, so a float32 copy of the whole array (every layer's weights, all
of a sequence's hidden states) exists at once. Taking the slice behind an optimisation barrier on
``(array, index)`` makes the array vary with the loop index: only the slice is converted, inside
the loop (the barrier itself is removed before code generation; other backends are unaffected).
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax


def loop_slice(tree: Any, start: jax.Array, size: int | None = None, *, axis: int = 0) -> Any:
    """Each leaf of ``tree`` sliced at traced ``start`` along ``axis``: ``size`` entries, or with
    ``size=None`` the single entry ``start`` with that axis dropped (see the module docstring)."""
    tree, start = lax.optimization_barrier((tree, start))
    if size is None:
        return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, start, axis, keepdims=False), tree)
    return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, size, axis), tree)
