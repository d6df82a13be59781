"""Validated, memory-mapped reading of one ``.safetensors`` file, and writing one tensor as one.

The header is parsed here rather than through the ``safetensors`` package so that a tensor
is returned as a view of a mapping of its own bytes (bf16 as ``ml_dtypes.bfloat16``) that is
unmapped as soon as the caller drops it (the package's ``get_tensor`` copies). The header is
validated as strictly as the package does: a JSON object without duplicate keys, string
``__metadata__``, and tensors whose ``data_offsets`` tile the data buffer exactly (in
order, no overlap, no gap, nothing after the last), each spanning its shape's bytes.

`TensorWriter` writes a file of one tensor, piece by piece, its data aligned in the file as asked
(the header padded with spaces, as the format allows), e.g. as jax on CPU needs to adopt a mapping
of it without a copy.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from lminf_jax.converters.dtypes import NUMPY_DTYPES, TensorInfo, numpy_dtype
from lminf_jax.converters.json_object import parse_json_object

MAX_HEADER_BYTES = 100_000_000
_CODES = {dtype: code for code, dtype in NUMPY_DTYPES.items()}


class SafetensorsFile:
    """One ``.safetensors`` file: `tensors` (name -> TensorInfo) and `read(name)`.

    Raises ValueError naming the file (and tensor) when the file is truncated or corrupt.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        size = self.path.stat().st_size
        header, self._data_start = self._read_header(size)
        metadata = header.pop("__metadata__", {})
        if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            raise ValueError(f"{self.path}: __metadata__ is not a map of strings to strings")
        for name, entry in header.items():
            self._add(name, entry, size - self._data_start)
        self._check_tiling(size - self._data_start)

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only array mapped from the file."""
        info = self.tensors[name]
        dtype = numpy_dtype(info.dtype, name)
        begin, end = self._offsets[name]
        if begin == end:
            return np.empty(info.shape, dtype)
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start + begin, shape=(end - begin,))
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
            return parse_json_object(raw, f"{self.path}: header", _without_duplicates), 8 + length
        except _DuplicateKey as e:
            raise ValueError(f"{self.path}: header names {e} twice") from None

    def _add(self, name: str, entry: object, buffer_bytes: int) -> None:
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
        if end > buffer_bytes:
            raise ValueError(
                f"{where}: data_offsets {offsets} run past the end of the file "
                f"({self._data_start + buffer_bytes} bytes, {buffer_bytes} of data)"
            )
        info = TensorInfo(dtype, tuple(shape))
        if dtype in NUMPY_DTYPES and info.size * NUMPY_DTYPES[dtype].itemsize != end - begin:
            raise ValueError(
                f"{where}: shape {tuple(shape)} of {dtype} needs "
                f"{info.size * NUMPY_DTYPES[dtype].itemsize} bytes but data_offsets span {end - begin}"
            )
        self.tensors[name] = info
        self._offsets[name] = (begin, end)

    def _check_tiling(self, buffer_bytes: int) -> None:
        """Every data byte belongs to exactly one tensor (as the format requires)."""
        covered, previous = 0, None
        for name, (begin, end) in sorted(self._offsets.items(), key=lambda item: item[1]):
            if begin < covered:
                raise ValueError(
                    f"{self.path}: tensors {previous!r} and {name!r} overlap: data_offsets "
                    f"{list(self._offsets[previous])} and {[begin, end]}"
                )
            if begin > covered:
                raise ValueError(
                    f"{self.path}: data bytes [{covered}, {begin}) before tensor {name!r} belong to no tensor"
                )
            covered, previous = end, name
        if covered != buffer_bytes:
            raise ValueError(
                f"{self.path}: data bytes [{covered}, {buffer_bytes}) at the end belong to no tensor"
            )


class TensorWriter:
    """Writes tensor `name` of `shape` and `dtype` as the ``.safetensors`` file `path` (which must not
    exist), its data starting at a multiple of `alignment` bytes and given in C order by `write`, in
    pieces of any shape; a context manager whose exit checks that every byte was written (ValueError
    naming the file)."""

    def __init__(self, path: str | os.PathLike, name: str, shape: tuple[int, ...], dtype: np.typing.DTypeLike,
                 alignment: int = 8):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        if self.dtype not in _CODES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {self.dtype}, which safetensors cannot hold")
        self.nbytes, self.written = math.prod(shape) * self.dtype.itemsize, 0
        entry = {"dtype": _CODES[self.dtype], "shape": list(shape), "data_offsets": [0, self.nbytes]}
        header = json.dumps({name: entry}, separators=(",", ":")).encode()
        header += b" " * (-(8 + len(header)) % alignment)
        self._file = open(self.path, "xb")
        self._file.write(len(header).to_bytes(8, "little") + header)

    def write(self, piece: np.ndarray) -> None:
        """Append `piece` (of the tensor's dtype) to the data."""
        if piece.dtype != self.dtype:
            raise ValueError(f"{self.path}: got {piece.dtype} data for a tensor of {self.dtype}")
        if self.written + piece.nbytes > self.nbytes:
            raise ValueError(f"{self.path}: more data than the tensor's {self.nbytes} bytes")
        self._file.write(np.ascontiguousarray(piece).reshape(-1).view(np.uint8).data)
        self.written += piece.nbytes

    def __enter__(self) -> TensorWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._file.close()
        if error is None and self.written != self.nbytes:
            raise ValueError(f"{self.path}: {self.written} bytes written of the tensor's {self.nbytes}")


class _DuplicateKey(Exception):
    pass


def _without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict; raises `_DuplicateKey` (the key) if a key repeats."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(repr(key))
        result[key] = value
    return result
