"""lminf_jax.evaluation.buckets: log-spaced position buckets against brute force, exact at huge positions."""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest

from lminf_jax.evaluation.buckets import PositionBuckets


def brute_edges(k, limit):
    """Bucket lower bounds: singletons while geometric buckets are narrower than 1, then ceil(2**(j/k))."""
    j = 0
    while 2 ** (j / k) * (2 ** (1 / k) - 1) < 1:
        j += 1
    first = math.ceil(2 ** (j / k))
    edges = list(range(first))
    while edges[-1] <= limit:
        edges.append(math.ceil(2 ** (j / k)))
        j += 1
    return edges


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_bucket_index_matches_brute_force(k):
    b = PositionBuckets(k)
    positions = np.arange(5001)
    edges = brute_edges(k, 5001)
    assert all(x < y for x, y in zip(edges, edges[1:]))
    want = np.array([bisect.bisect_right(edges, p) - 1 for p in positions])
    got = b.index(positions)
    np.testing.assert_array_equal(got, want)
    lo, hi = b.bounds(got)
    assert (lo <= positions).all() and (positions < hi).all()
    assert edges[b.linear_below] == b.linear_below and edges[:b.linear_below] == list(range(b.linear_below))
    assert b.count(5000) == want[-1] + 1
    if k == 4:
        assert edges[:13] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16]


@pytest.mark.parametrize("k", [1, 4, 7])
def test_bucket_index_of_huge_positions(k):
    b = PositionBuckets(k)
    huge = np.array([2**33, 2**33 - 1, 2**33 + 1, 3 * 2**33 + 5, 2**40, 2**40 - 1, 2**31 - 1], np.int64)
    i = b.index(huge)
    lo, hi = b.bounds(i)
    assert (lo <= huge).all() and (huge < hi).all()
    np.testing.assert_array_equal(b.index(lo), i)
    np.testing.assert_array_equal(b.index(hi - 1), i)
    np.testing.assert_array_equal(b.index(hi), i + 1)
    np.testing.assert_allclose(hi / lo, 2 ** (1 / k), rtol=1e-6)  # geometric widths
    assert b.count(2**40) < 42 * k + 50  # no table sized by the position
    assert int(b.index(2**33)) == b.linear_below + 33 * k - b._first_geometric
