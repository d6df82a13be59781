"""lminf_jax.int32: an integer that would wrap in int32 arithmetic is refused, naming it."""

from __future__ import annotations

import numpy as np
import pytest

from lminf_jax.int32 import INT32_MAX, INT32_MIN, int32_positions, require_int32


def test_the_range_is_int32s():
    info = np.iinfo(np.int32)
    assert (INT32_MIN, INT32_MAX) == (info.min, info.max)


@pytest.mark.parametrize("value", [INT32_MAX + 1, -1, True, 3.0, "3", None])
def test_require_int32_names_the_value_it_refuses(value):
    with pytest.raises(ValueError, match=r"^block_q must be an integer >= 0 and <= 2147483647 \(int32\)"):
        require_int32("block_q", value, 0)


@pytest.mark.parametrize("value", [0, 7, INT32_MAX])
def test_require_int32_accepts_the_range(value):
    require_int32("block_q", value, 0)


def test_positions_of_a_wider_type_are_checked_before_the_cast():
    wide = np.array([0, INT32_MAX], np.int64)
    assert int32_positions("q_positions", wide).dtype == np.int32
    np.testing.assert_array_equal(int32_positions("q_positions", wide), wide)
    with pytest.raises(ValueError, match=r"q_positions must lie in int32's range .* \[-1, 2147483648\]"):
        int32_positions("q_positions", np.array([-1, INT32_MAX + 1], np.int64))


def test_positions_must_be_integers():
    with pytest.raises(ValueError, match="k_positions must be an integer array, got float32"):
        int32_positions("k_positions", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="k_positions must be an integer array, got list"):
        int32_positions("k_positions", [0, 1])
