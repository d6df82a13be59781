"""Placing host arrays of parameters on devices, as `load_params` and `load_converted` do, and
checking the per-parameter shardings they place them in."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

#: The alignment of host memory that jax on CPU adopts without a copy.
ALIGNMENT = 64


def check_shardings(names: Iterable[str], shardings: Mapping[str, jax.sharding.Sharding], where: str) -> None:
    """Raise a ValueError naming every parameter of `names` without a sharding and every
    sharding for a parameter not in `names` (`where`: the checkpoint, for the message)."""
    names = set(names)
    missing = sorted(names - shardings.keys())
    unknown = sorted(shardings.keys() - names)
    if missing or unknown:
        problems = [f"no sharding for parameter {name}" for name in missing]
        problems += [f"sharding for unknown parameter {name}" for name in unknown]
        raise ValueError(f"shardings do not match the parameters of {where}: " + "; ".join(problems))


def loaded_dtype(stored: np.dtype, dtype: jax.typing.DTypeLike | None) -> np.dtype:
    """The dtype a parameter stored as `stored` is loaded in: `dtype` for a floating-point one when
    given, else `stored`."""
    return np.dtype(dtype) if dtype is not None and jnp.issubdtype(stored, jnp.floating) else np.dtype(stored)


def place(host: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """``host`` on the default device, or each device's shard of it under ``sharding``. On CPU, jax
    adopts a C-contiguous `ALIGNMENT`-aligned ``host`` (or shard of it) without copying it, even a
    read-only mapping of a file (it never writes into it: a donated one is copied)."""
    if sharding is None:
        return jax.device_put(host).block_until_ready()
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index]).block_until_ready()


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array with `ALIGNMENT`-byte aligned data, which `place` adopts on CPU."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)
