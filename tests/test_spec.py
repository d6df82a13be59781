"""AttentionSpec: legal ranges, the classification table, and hashability."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lminf_jax import AttentionSpec, TopK


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: AttentionSpec.lm_infinite(-1, 8), "global_branch"),
        (lambda: AttentionSpec.lm_infinite(2, 0), "local_branch"),
        (lambda: AttentionSpec.lm_infinite(2, 8, 0), "limit_distance"),
        (lambda: AttentionSpec.distance_limit(0), "limit_distance"),
        (lambda: AttentionSpec.sliding_window(0), "local_branch"),
        (lambda: AttentionSpec("vanilla", global_branch=3), "global_branch"),
        (lambda: AttentionSpec("vanilla", local_branch=3), "local_branch"),
        (lambda: AttentionSpec("sliding_window", local_branch=4, limit_distance=4), "limit_distance"),
        (lambda: AttentionSpec("bogus"), "kind"),
        (lambda: AttentionSpec.lm_infinite(2, 8.0), "local_branch"),
        (lambda: AttentionSpec("vanilla", top_k=TopK()), "top_k"),
        (lambda: AttentionSpec.distance_limit(8).__class__("distance_limit", limit_distance=8, top_k=TopK()), "top_k"),
        (lambda: TopK(k=0), "top_k.k"),
        (lambda: TopK(insert_distance=-1), "top_k.insert_distance"),
        (lambda: TopK(from_layer=4, to_layer=4), "top_k.to_layer"),
        # every integer that reaches int32 arithmetic fits it (a wider one would wrap silently)
        (lambda: AttentionSpec.lm_infinite(10, 512, 2**32 + 512), "limit_distance"),
        (lambda: AttentionSpec.lm_infinite(10, 512, 10**30), "limit_distance"),
        (lambda: AttentionSpec.distance_limit(2**31), "limit_distance"),
        (lambda: AttentionSpec.lm_infinite(2, 2**40), "local_branch"),
        (lambda: AttentionSpec.lm_infinite(2**31, 8), "global_branch"),
        (lambda: AttentionSpec.streaming_llm(2**30, 2**30 + 1), "global_branch \\+ local_branch - 1"),
        (lambda: TopK(insert_distance=2**31), "top_k.insert_distance"),
        (lambda: TopK(from_layer=2**31), "top_k.from_layer"),
        (lambda: TopK(to_layer=2**31), "top_k.to_layer"),
        (lambda: TopK(k=2**31), "top_k.k"),
    ],
)
def test_invalid_specs_name_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_int32_extremes_are_accepted():
    big = 2**31 - 1
    assert AttentionSpec.lm_infinite(big, big, big).limit_distance == big
    assert AttentionSpec.streaming_llm(2**30, 2**30).local_branch == 2**30
    assert TopK(k=big, insert_distance=big, from_layer=big - 1, to_layer=big).to_layer == big


def test_default_limit_distance_is_local_branch_and_specs_hash():
    spec = AttentionSpec.lm_infinite(10, 4096)
    assert spec.limit_distance == 4096
    assert hash(spec) == hash(AttentionSpec.lm_infinite(10, 4096, 4096))
    assert spec.describe() == "lm_infinite(G=10, L=4096, D=4096)"


def _classes(spec: AttentionSpec, i: int, n: int):
    local, far = spec.classify(jnp.int32(i), jnp.arange(n))
    return np.flatnonzero(np.asarray(local)).tolist(), np.flatnonzero(np.asarray(far)).tolist()


def test_classification_table():
    # query at 12, keys 0..14; G=3, L=4, D=4
    assert _classes(AttentionSpec.lm_infinite(3, 4), 12, 15) == ([9, 10, 11, 12], [0, 1, 2])
    assert _classes(AttentionSpec.lambda_mask(3, 4), 12, 15) == ([9, 10, 11, 12], [0, 1, 2])
    assert _classes(AttentionSpec.streaming_llm(3, 4), 12, 15) == ([9, 10, 11, 12], [0, 1, 2])
    assert _classes(AttentionSpec.sliding_window(4), 12, 15) == ([9, 10, 11, 12], [])
    assert _classes(AttentionSpec.distance_limit(4), 12, 15) == ([9, 10, 11, 12], list(range(9)))
    assert _classes(AttentionSpec.vanilla(), 12, 15) == (list(range(13)), [])
    # a sink inside the window is counted once, as local
    assert _classes(AttentionSpec.lm_infinite(3, 4), 4, 6) == ([1, 2, 3, 4], [0])
    # empty query / key slots
    assert _classes(AttentionSpec.vanilla(), -1, 4) == ([], [])


def test_global_query_positions():
    i = jnp.arange(0, 40, 7)
    np.testing.assert_array_equal(AttentionSpec.lm_infinite(3, 8, 6).global_query_position(i), 6)
    np.testing.assert_array_equal(AttentionSpec.streaming_llm(3, 8).global_query_position(i), np.minimum(i, 10))
    np.testing.assert_array_equal(AttentionSpec.lambda_mask(3, 8).global_query_position(i), i)
