"""int32, the width of every position, distance and count on the device: its range, and the checks that
refuse a wider integer (a ValueError naming it) instead of letting it wrap silently."""

from __future__ import annotations

import numpy as np

from lminf_jax.lazy import LazyModule

jax, jnp = LazyModule("jax"), LazyModule("jax.numpy")  # imported on first use: the scalar check needs neither

#: Positions, distances and every integer that reaches them are int32.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def require_int32(name: str, value: object, minimum: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int in ``[minimum, INT32_MAX]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= INT32_MAX:
        raise ValueError(f"{name} must be an integer >= {minimum} and <= {INT32_MAX} (int32), got {value!r}")


def int32_positions(name: str, positions: jax.Array | np.ndarray) -> jax.Array:
    """Integer ``positions`` as an int32 array; concrete values of a wider type are first checked
    to lie in int32's range (a ValueError naming ``name``) instead of wrapping silently. Traced
    values are cast as they are (under jit, positions are int32 already)."""
    dtype = getattr(positions, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        got = dtype if dtype is not None else type(positions).__name__
        raise ValueError(f"{name} must be an integer array, got {got}")
    info = jnp.iinfo(dtype)
    if (info.min < INT32_MIN or info.max > INT32_MAX) and not isinstance(positions, jax.core.Tracer):
        values = np.asarray(positions)
        if values.size and (values.min() < INT32_MIN or values.max() > INT32_MAX):
            raise ValueError(f"{name} must lie in int32's range [{INT32_MIN}, {INT32_MAX}], got values in "
                             f"[{values.min()}, {values.max()}]")
    return jnp.asarray(positions, jnp.int32)
