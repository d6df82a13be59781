"""Content fingerprints of arrays, computed where they live, and of JSON records.

* `tree_fingerprint(tree)`: ``sha256:`` + hex over each leaf's key path, dtype, shape and a
  128-bit digest of its contents, computed on the leaves' devices (sharded arrays stay sharded)
  in calls of at most `BLOCK_WORDS` words; only 16 bytes per leaf reach the host. Each
  element's bits, as 32-bit words (8/16-bit values widened, 64-bit ones split in two), are mixed
  with the word's flat index through a bijective 32-bit mixer (murmur3's ``fmix32``) and summed
  modulo 2**32 in 4 lanes with independent index keys. Integer arithmetic only: the digest is
  the same on every backend and in every reduction order. A change of one element always
  changes every lane (the mixer is a bijection of the word); other changes (moved elements,
  several changed) go unseen only if four independently keyed 32-bit sums all collide. Flat
  indices wrap beyond 2**32 elements per leaf.
* `json_digest(record)`: ``sha256:`` of a JSON record in canonical form.

What a resume does with them (compare, fall back to an intact state): `lminf_jax.evaluation.resume`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["json_digest", "leaf_digests", "tree_fingerprint"]

#: Index keys of the 4 lanes (any distinct constants).
_SEEDS = (0x9E3779B9, 0x7F4A7C15, 0x2545F491, 0x68E31DA4)
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
#: Most 32-bit words digested in one device call (bounds XLA's temporaries to ~64 MiB).
BLOCK_WORDS = 1 << 22


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32: one word per element, or ``(..., 2)`` for 64-bit elements."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitcast_convert_type(x, _UNSIGNED[size]).astype(jnp.uint32)


def _lanes(words: jax.Array, start: jax.Array) -> jax.Array:
    """uint32 ``(4,)``: per lane, the wrapping sum of ``fmix32(word ^ fmix32(index ^ seed))`` over
    ``words``, whose first word has flat index ``start``."""
    index = jnp.broadcast_to(start, words.shape)
    stride = 1
    for axis in reversed(range(words.ndim)):  # the flat index, without reshaping a sharded array
        index = index + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.stack([jnp.sum(_fmix32(words ^ _fmix32(index ^ jnp.uint32(seed))), dtype=jnp.uint32)
                      for seed in _SEEDS])


@jax.jit
def _digest_block(block: jax.Array, start: jax.Array) -> jax.Array:
    """uint32 ``(4,)``: the lanes of one block, given its first flat index (compiled once per block
    shape, dtype and sharding: a model's layers and its optimiser moments share programs)."""
    return _lanes(_words(block), start)


def _blocks(x: jax.Array, start: int = 0) -> list[tuple[jax.Array, int]]:
    """``x`` cut along its leading axes into ``(block, flat index of its first word)`` pieces of at
    most `BLOCK_WORDS` words (one piece when it is small enough)."""
    words = x.size * (2 if jnp.dtype(x.dtype).itemsize == 8 else 1)
    if words <= BLOCK_WORDS or x.ndim == 0:
        return [(x, start)]
    row = words // x.shape[0]
    if row > BLOCK_WORDS:  # one row is too large: cut each row further
        return [piece for r in range(x.shape[0]) for piece in _blocks(x[r], start + r * row)]
    rows = BLOCK_WORDS // row
    return [(x[r:r + rows], start + r * row) for r in range(0, x.shape[0], rows)]


def _on_device(leaf: jax.Array | np.ndarray) -> jax.Array:
    """A jax.Array as it is; a host array copied to the device as is, or, for 64-bit values (which
    jax without x64 would truncate), as uint32 ``(..., 2)`` split on the host."""
    dtype = jnp.dtype(leaf.dtype)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(f"cannot fingerprint an array of dtype {dtype}")
    if isinstance(leaf, jax.Array):
        return leaf
    if dtype.itemsize == 8:
        return jnp.asarray(leaf.reshape(-1).view(np.uint32).reshape(*leaf.shape, 2))
    return jnp.asarray(leaf)


def leaf_digests(leaves: Sequence[Any]) -> np.ndarray:
    """uint32 ``(len(leaves), 4)``: each leaf's content digest (module docstring), computed on its
    device; only the digests are copied to the host.

    A leaf goes to the device in blocks of at most `BLOCK_WORDS` words (cut along its leading
    axes), one call each: XLA may keep ~16 bytes of temporaries per word, and the digest of a 7B
    model must not need 100 GB of them."""
    lanes = [(i, _digest_block(block, np.uint32(start % 2**32)))
             for i, leaf in enumerate(leaves)
             for block, start in _blocks(_on_device(leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)))]
    digests = np.zeros((len(leaves), 4), np.uint32)
    for (i, _), lane in zip(lanes, jax.device_get([lane for _, lane in lanes]), strict=True):
        digests[i] += lane  # wrapping uint32 sums: the blocks add up to the leaf's digest
    return digests


def tree_fingerprint(tree: Any) -> str:
    """``sha256:`` + hex of a pytree of arrays: key paths, dtypes, shapes and content digests."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = [leaf if isinstance(leaf, jax.Array) else np.asarray(leaf) for _, leaf in flat]
    h = hashlib.sha256(b"lminf_jax.tree_fingerprint v1\n")
    for (path, _), leaf, digest in zip(flat, leaves, leaf_digests(leaves)):
        h.update(f"{jax.tree_util.keystr(path)}|{jnp.dtype(leaf.dtype).name}|{list(leaf.shape)}|".encode())
        h.update(digest.astype("<u4").tobytes())
    return "sha256:" + h.hexdigest()


def json_digest(record: Any) -> str:
    """``sha256:`` + hex of a JSON-serialisable record in canonical form (sorted keys)."""
    return "sha256:" + hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
