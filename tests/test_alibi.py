"""Tests for lminf_jax.alibi: slopes vs BLOOM / MPT rules, bias values, errors."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from lminf_jax.alibi import Alibi, alibi_bias, alibi_slopes

HEAD_COUNTS = list(range(1, 41))


def bloom_slopes(num_heads: int) -> np.ndarray:
    """BLOOM's rule: geometric slopes for the largest power of two, then odd powers of the next base."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base**p for p in range(1, closest + 1)]
    extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
    remaining = min(closest, num_heads - closest)
    slopes += [extra_base**p for p in range(1, 2 * remaining, 2)]
    return np.array(slopes)


@pytest.mark.parametrize("num_heads", HEAD_COUNTS)
def test_slopes_match_bloom_rule(num_heads):
    slopes = alibi_slopes(num_heads)
    assert slopes.shape == (num_heads,) and slopes.dtype == np.float64
    np.testing.assert_allclose(slopes, bloom_slopes(num_heads), rtol=1e-12, atol=0)


def test_slopes_match_transformers_bloom():
    torch = pytest.importorskip("torch")
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    for num_heads in HEAD_COUNTS:
        mask = torch.ones((1, 2), dtype=torch.int64)
        alibi = bloom.build_alibi_tensor(mask, num_heads, torch.float32)  # (heads, 1, 2): slope * [0, 1]
        np.testing.assert_allclose(alibi_slopes(num_heads), alibi[:, 0, 1].double().numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bias_max", [8.0, 4.0, 12.0])
def test_slopes_match_transformers_mpt(bias_max):
    mpt = pytest.importorskip("transformers.models.mpt.modeling_mpt")
    for num_heads in HEAD_COUNTS:
        alibi = mpt.build_mpt_alibi_tensor(num_heads, 2, alibi_bias_max=bias_max)  # (heads, 1, 2): slope * [-1, 0]
        expected = -alibi[:, 0, 0].double().numpy()
        np.testing.assert_allclose(alibi_slopes(num_heads, bias_max), expected, rtol=1e-6, atol=0)


def test_alibi_create():
    alibi = Alibi.create(12, bias_max=6.0)
    assert alibi.slopes == tuple(alibi_slopes(12, 6.0).tolist())
    assert hash(alibi) == hash(Alibi(list(alibi.slopes)))


@pytest.mark.parametrize("max_distance", [None, 0, 5, 40])
def test_bias_values(max_distance):
    rng = np.random.default_rng(0)
    slopes = alibi_slopes(6)
    q_pos = rng.integers(0, 10**6, size=(2, 7))
    k_pos = np.concatenate([q_pos[:, :3] - rng.integers(0, 60, size=(2, 3)), rng.integers(0, 10**6, size=(2, 9))], 1)
    bias = alibi_bias(Alibi.create(6).slopes, jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32),
                      max_distance=max_distance)
    distance = q_pos[:, None, :, None] - k_pos[:, None, None, :]
    if max_distance is not None:
        distance = np.minimum(distance, max_distance)
    expected = -slopes[None, :, None, None] * distance
    assert bias.shape == (2, 6, 7, 12) and bias.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bias), expected, rtol=1e-6, atol=0)


def test_bias_broadcasts_shared_positions():
    rng = np.random.default_rng(1)
    slopes = rng.uniform(0.01, 1.0, size=3)
    q_pos, k_pos = rng.integers(-500, 500, size=5), rng.integers(-500, 500, size=8)
    bias = alibi_bias(jnp.asarray(slopes), jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32))
    expected = -slopes[:, None, None] * (q_pos[:, None] - k_pos[None, :])
    np.testing.assert_allclose(np.asarray(bias), expected, rtol=1e-6, atol=0)


def test_errors():
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)
    positions = jnp.arange(4)
    with pytest.raises(ValueError, match="max_distance"):
        alibi_bias(alibi_slopes(2), positions, positions, max_distance=-1)
    with pytest.raises(ValueError, match="q_positions"):
        alibi_bias(alibi_slopes(2), positions.astype(jnp.float32), positions)
    with pytest.raises(ValueError, match="k_positions"):
        alibi_bias(alibi_slopes(2), positions, positions.astype(jnp.float32))
    with pytest.raises(ValueError, match="slopes"):
        Alibi(())
