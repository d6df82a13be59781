"""lminf_jax.evaluation.fingerprint: content digests computed on the device, JSON digests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import run_on_devices

from lminf_jax.evaluation.fingerprint import json_digest, leaf_digests, tree_fingerprint

DTYPES = [np.float32, jnp.bfloat16, np.float16, np.int8, np.uint8, np.int16, np.int32, np.uint32]


def random_bits(dtype, shape, seed=0) -> np.ndarray:
    """Random bit patterns (NaNs included) of ``dtype``."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).view(dtype).reshape(shape)


def flip(x: np.ndarray, index: int, bit: int) -> np.ndarray:
    out = x.copy()
    words = out.reshape(-1).view(f"u{x.dtype.itemsize}")
    words[index] ^= np.array(1 << bit, words.dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_one_flipped_bit_anywhere_changes_it(dtype):
    x = random_bits(dtype, (3, 5, 7))
    base = tree_fingerprint({"w": jnp.asarray(x)})
    assert tree_fingerprint({"w": jnp.asarray(x.copy())}) == base  # equal content, another buffer
    for index in (0, 52, x.size - 1):
        for bit in range(8 * x.dtype.itemsize):
            assert tree_fingerprint({"w": jnp.asarray(flip(x, index, bit))}) != base, (index, bit)


def test_bool_and_host_64_bit_values():
    mask = np.random.default_rng(1).random(40) < 0.5
    changed = mask.copy()
    changed[17] = ~changed[17]
    assert tree_fingerprint(jnp.asarray(mask)) != tree_fingerprint(jnp.asarray(changed))
    # 64-bit host values are hashed in full: jax without x64 would truncate them to 32 bits
    for x in (np.array([2**40, 7], np.int64), np.array([0.1, 1e300])):
        base = tree_fingerprint(x)
        for bit in (0, 31, 32, 40, 63):
            assert tree_fingerprint(flip(x, 0, bit)) != base, (x.dtype, bit)
    assert tree_fingerprint({"step": 3}) == tree_fingerprint({"step": np.int64(3)})


def test_moved_elements_change_it():
    x = random_bits(np.float32, (64,), seed=2)
    base = tree_fingerprint(jnp.asarray(x))
    swapped = x.copy()
    swapped[[3, 40]] = swapped[[40, 3]]
    square = random_bits(np.float32, (8, 8), seed=3)
    for other in (swapped, x[::-1], np.roll(x, 1)):
        assert tree_fingerprint(jnp.asarray(other)) != base
    assert tree_fingerprint(jnp.asarray(square.T.copy())) != tree_fingerprint(jnp.asarray(square))


def test_paths_dtypes_and_shapes_are_part_of_it():
    x = random_bits(np.float32, (4, 6), seed=4)
    y = random_bits(np.float32, (4, 6), seed=5)
    base = tree_fingerprint({"a": x, "b": y})
    assert tree_fingerprint({"a": jnp.asarray(x), "b": jnp.asarray(y)}) == base  # host or device: the same
    assert tree_fingerprint({"a": y, "b": x}) != base
    assert tree_fingerprint({"a": x, "c": y}) != base
    assert tree_fingerprint({"a": x.view(np.int32), "b": y}) != base  # same bits, other dtype
    assert tree_fingerprint({"a": x.reshape(6, 4), "b": y}) != base
    with pytest.raises(ValueError, match="cannot fingerprint an array of dtype complex64"):
        tree_fingerprint(np.zeros(3, np.complex64))


def test_computed_on_the_device_only_the_digests_come_back():
    params = {"w": jnp.ones((256, 256), jnp.bfloat16), "b": jnp.arange(1000, dtype=jnp.float32)}
    want = tree_fingerprint(params)
    with jax.transfer_guard_device_to_host("disallow"):  # an implicit copy of the data would raise
        assert tree_fingerprint(params) == want
        digests = leaf_digests(jax.tree.leaves(params))
    assert digests.shape == (2, 4) and digests.dtype == np.uint32


SHARDED_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from lminf_jax.evaluation.fingerprint import tree_fingerprint
x = np.random.default_rng(0).normal(size=(16, 24)).astype(np.float32)
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
prints = [tree_fingerprint({"x": jax.device_put(x, NamedSharding(mesh, spec))})
          for spec in (P(), P("a"), P(None, "b"), P("b", "a"))]
print("RESULT " + json.dumps(prints))
"""


def test_the_same_content_in_any_sharding_gives_the_same_value():
    x = np.random.default_rng(0).normal(size=(16, 24)).astype(np.float32)
    assert run_on_devices(SHARDED_SCRIPT) == [tree_fingerprint({"x": x})] * 4


def test_json_digest_is_canonical():
    assert json_digest({"b": [1, 2.5], "a": None}) == json_digest({"a": None, "b": (1, 2.5)})


@pytest.mark.parametrize("shape", [(3, 5, 7), (100,), (2, 1, 40), (4, 3)])
def test_large_leaves_are_digested_in_bounded_blocks_with_the_same_result(shape, monkeypatch):
    import lminf_jax.evaluation.fingerprint as fp

    leaves = [jnp.asarray(random_bits(np.float32, shape, seed=6)), jnp.asarray(random_bits(np.int8, (9,), seed=7))]
    whole = leaf_digests(leaves)
    sizes = []
    digest_block = fp._digest_block
    monkeypatch.setattr(fp, "BLOCK_WORDS", 10)
    monkeypatch.setattr(fp, "_digest_block", lambda block, start: (sizes.append(block.size),
                                                                   digest_block(block, start))[1])
    np.testing.assert_array_equal(leaf_digests(leaves), whole)
    assert max(sizes) <= 10 and sum(sizes) == sum(x.size for x in leaves)
