"""models.common: the linear product's float32 accumulation and its one-row case."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lminf_jax.models.common import linear, unembed


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    return {"weight": jnp.asarray(rng.standard_normal((48, 32)), jnp.bfloat16),
            "bias": jnp.asarray(rng.standard_normal(48), jnp.bfloat16)}


@pytest.mark.parametrize("shape", [(1, 32), (1, 1, 32), (3, 5, 32)])
def test_linear_is_the_float32_product_rounded_once(weights, shape):
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.bfloat16)
    want = (np.asarray(x, np.float64) @ np.asarray(weights["weight"], np.float64).T
            + np.asarray(weights["bias"], np.float64))
    got = linear(x, weights, jnp.bfloat16)
    assert got.shape == (*shape[:-1], 48) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-8, atol=2**-8 * np.abs(want).max())
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16)))
    np.testing.assert_allclose(unembed(x, weights), want, rtol=1e-5, atol=1e-4)


def test_a_single_bfloat16_row_is_multiplied_as_two(weights):
    """XLA:CPU's one-row bfloat16 product runs ~14x slower than a two-row one (a decoding step's)."""
    def dots(shape, dtype):
        x = jax.ShapeDtypeStruct(shape, dtype)
        text = jax.jit(lambda x, p: linear(x, p, dtype)).lower(x, weights).as_text()
        return re.findall(r"dot_general[^\n]*\(tensor<([0-9x]+)x(?:bf16|f32)>", text)

    assert dots((1, 1, 32), jnp.bfloat16) == ["2x32"]
    assert dots((1, 32), jnp.float32) == ["1x32"]  # float32 keeps its one-row product
    assert dots((4, 32), jnp.bfloat16) == ["4x32"]
