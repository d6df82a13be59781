"""Validated, memory-mapped reading of one ``.safetensors`` file.

The header is parsed here rather than through the ``safetensors`` package so that every
tensor's byte span is checked against the file before anything is read, and so that a
tensor is returned as a view of a mapping of its own bytes (bf16 as ``ml_dtypes.bfloat16``)
that is unmapped as soon as the caller drops it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from converters.dtypes import NUMPY_DTYPES, TensorInfo, numpy_dtype

MAX_HEADER_BYTES = 100_000_000


class SafetensorsFile:
    """One ``.safetensors`` file: `tensors` (name -> TensorInfo) and `read(name)`.

    Raises ValueError naming the file (and tensor) when the file is truncated or corrupt.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self._spans: dict[str, tuple[int, int]] = {}
        size = self.path.stat().st_size
        header, data_start = self._read_header(size)
        for name, entry in header.items():
            if name != "__metadata__":
                self._add(name, entry, data_start, size)

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only array mapped from the file."""
        info = self.tensors[name]
        dtype = numpy_dtype(info.dtype, name)
        start, nbytes = self._spans[name]
        if nbytes == 0:
            return np.empty(info.shape, dtype)
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=start, shape=(nbytes,))
        return raw.view(dtype).reshape(info.shape)

    def _read_header(self, size: int) -> tuple[dict, int]:
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes, no header length)")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"{self.path}: bad header length {length} for a file of {size} bytes")
            raw = f.read(length)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: header is not a JSON object")
        return header, 8 + length

    def _add(self, name: str, entry: object, data_start: int, size: int) -> None:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise ValueError(f"{where}: missing or invalid dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{where}: invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(f"{where}: invalid data_offsets {offsets!r}")
        begin, end = offsets
        if data_start + end > size:
            raise ValueError(f"{where}: data_offsets {offsets} run past the end of the file ({size} bytes)")
        info = TensorInfo(dtype, tuple(shape))
        if dtype in NUMPY_DTYPES and info.size * NUMPY_DTYPES[dtype].itemsize != end - begin:
            raise ValueError(
                f"{where}: shape {tuple(shape)} of {dtype} needs "
                f"{info.size * NUMPY_DTYPES[dtype].itemsize} bytes but data_offsets span {end - begin}"
            )
        self.tensors[name] = info
        self._spans[name] = (data_start + begin, end - begin)
