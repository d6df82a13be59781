"""Reading one PyTorch ``.bin`` state dict (needs torch)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from lminf_jax.converters.dtypes import TensorInfo, numpy_dtype

_CODES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
}


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError(
            "torch is needed to read PyTorch .bin checkpoints (pip install torch), "
            "or convert the checkpoint to safetensors"
        ) from None
    return torch


class TorchFile:
    """One ``pytorch_model*.bin`` file: `tensors` (name -> TensorInfo) and `read(name)`.

    The file is memory-mapped afresh for every read, so no tensor stays resident after
    the caller drops it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._torch = _import_torch()
        self.tensors = {
            name: TensorInfo(_CODES.get(str(t.dtype).removeprefix("torch."), str(t.dtype)), tuple(t.shape))
            for name, t in self._load().items()
        }

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a numpy array (bf16 as ``ml_dtypes.bfloat16``)."""
        dtype = numpy_dtype(self.tensors[name].dtype, name)
        tensor = self._load()[name]
        raw = tensor.reshape(-1).view(self._torch.uint8).numpy()
        return raw.view(dtype).reshape(tensor.shape)

    def _load(self) -> dict:
        try:
            state = self._torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # torch names no file
            raise ValueError(f"{self.path}: not a readable PyTorch checkpoint ({e})") from e
        if not isinstance(state, dict) or not all(isinstance(t, self._torch.Tensor) for t in state.values()):
            raise ValueError(f"{self.path}: not a state dict of tensors")
        return state
