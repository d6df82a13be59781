"""TensorWriter: one tensor per file, written in pieces, aligned, read back here and by the safetensors package."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from lminf_jax.converters.safetensors_file import SafetensorsFile, TensorWriter


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int64, np.bool_])
def test_pieces_make_one_aligned_tensor_that_reads_back(tmp_path, dtype):
    want = (np.random.default_rng(0).standard_normal((3, 5, 7)) * 4).astype(dtype)
    path = tmp_path / "t.safetensors"
    with TensorWriter(path, "a.weight", want.shape, want.dtype, alignment=64) as file:
        file.write(want[0])  # one row, then two rows in Fortran order: written in C order all the same
        file.write(np.asfortranarray(want[1:]))
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 64 == 0
    got = SafetensorsFile(path).read("a.weight")
    assert got.dtype == want.dtype and got.ctypes.data % 64 == 0
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    if dtype != ml_dtypes.bfloat16:  # numpy has no bf16 for the package to give
        np.testing.assert_array_equal(load_file(path)["a.weight"], want)


def test_the_writer_refuses_wrong_data_naming_the_file(tmp_path):
    path = tmp_path / "t.safetensors"
    where = re.escape(str(path))
    with pytest.raises(ValueError, match=f"^{where}: 8 bytes written of the tensor's 24$"):
        with TensorWriter(path, "x", (2, 3), np.float32) as file:
            file.write(np.zeros(2, np.float32))
    path.unlink()
    with TensorWriter(path, "x", (2, 3), np.float32) as file:
        with pytest.raises(ValueError, match=f"^{where}: got float64 data for a tensor of float32$"):
            file.write(np.zeros(6))
        with pytest.raises(ValueError, match=f"^{where}: more data than the tensor's 24 bytes$"):
            file.write(np.zeros(7, np.float32))
        file.write(np.zeros((2, 3), np.float32))
    with pytest.raises(FileExistsError):
        TensorWriter(path, "x", (2, 3), np.float32)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'c'))}: tensor 'x' has dtype complex64"):
        TensorWriter(tmp_path / "c", "x", (2,), np.complex64)
