"""Checkpoint dtype codes (safetensors spelling) and per-tensor metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp
import ml_dtypes
import numpy as np

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}


def numpy_dtype(code: str, tensor: str) -> np.dtype:
    """The numpy dtype for a checkpoint dtype code; ValueError naming `tensor` if unsupported."""
    try:
        return NUMPY_DTYPES[code]
    except KeyError:
        raise ValueError(
            f"tensor {tensor!r} has unsupported dtype {code} (supported: {', '.join(NUMPY_DTYPES)})"
        ) from None


def dtype_kind(dtype: np.typing.DTypeLike) -> str:
    """"float" (bf16 and float8 included), "integer" or "bool": the kind of values a dtype holds."""
    for kind, base in (("bool", jnp.bool_), ("integer", jnp.integer), ("float", jnp.floating)):
        if jnp.issubdtype(dtype, base):
            return kind
    raise ValueError(f"no parameter can have dtype {np.dtype(dtype)}")


@dataclass(frozen=True)
class TensorInfo:
    """A stored tensor's dtype code and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)
