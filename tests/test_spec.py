"""Attention methods: legal ranges, the classification table, global positions, hashability."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SPEC_FACTORIES, attended_slots, naive_spec_kwargs
from naive_attention import placement

from lminf_jax import (
    METHODS,
    AttentionSpec,
    DistanceLimit,
    InfLLM,
    LambdaMask,
    LeakyReRoPE,
    LMInfinite,
    LongHeads,
    SelfExtend,
    SlidingWindow,
    StreamingLLM,
    TopK,
    Vanilla,
)
from lminf_jax.method_parameters import ASSUMED_PRETRAINING_LENGTH


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: LMInfinite(-1, 8), "global_branch"),
        (lambda: LMInfinite(2, 0), "local_branch"),
        (lambda: LMInfinite(2, 8, 0), "limit_distance"),
        (lambda: DistanceLimit(0), "limit_distance"),
        (lambda: SlidingWindow(0), "local_branch"),
        (lambda: LMInfinite(2, 8.0), "local_branch"),
        (lambda: Vanilla(top_k=TopK()), "top_k"),
        (lambda: DistanceLimit(8, top_k=TopK()), "top_k"),
        (lambda: SelfExtend(4, 16, top_k=TopK()), "top_k"),
        (lambda: LeakyReRoPE(8, 4, top_k=TopK()), "top_k"),
        (lambda: SelfExtend(0, 16), "group_size"),
        (lambda: SelfExtend(4, 0), "local_branch"),
        (lambda: LeakyReRoPE(8, 0), "leak"),
        (lambda: LeakyReRoPE(0, 4), "limit_distance"),
        (lambda: TopK(k=0), "top_k.k"),
        (lambda: TopK(insert_distance=-1), "top_k.insert_distance"),
        (lambda: TopK(from_layer=4, to_layer=4), "top_k.to_layer"),
        # every integer that reaches int32 arithmetic fits it (a wider one would wrap silently)
        (lambda: LMInfinite(10, 512, 2**32 + 512), "limit_distance"),
        (lambda: LMInfinite(10, 512, 10**30), "limit_distance"),
        (lambda: DistanceLimit(2**31), "limit_distance"),
        (lambda: LMInfinite(2, 2**40), "local_branch"),
        (lambda: LMInfinite(2**31, 8), "global_branch"),
        (lambda: StreamingLLM(2**30, 2**30 + 1), "global_branch \\+ local_branch - 1"),
        (lambda: SelfExtend(3, 2**30), "grouped query offset"),
        (lambda: LeakyReRoPE(2**16, 2**16), "limit_distance \\* \\(leak - 1\\)"),
        (lambda: TopK(insert_distance=2**31), "top_k.insert_distance"),
        (lambda: TopK(from_layer=2**31), "top_k.from_layer"),
        (lambda: TopK(to_layer=2**31), "top_k.to_layer"),
        (lambda: TopK(k=2**31), "top_k.k"),
    ],
)
def test_invalid_specs_name_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_the_base_class_is_not_a_method():
    with pytest.raises(TypeError, match="base of the methods"):
        AttentionSpec()


def test_int32_extremes_are_accepted():
    big = 2**31 - 1
    assert LMInfinite(big, big, big).limit_distance == big
    assert StreamingLLM(2**30, 2**30).local_branch == 2**30
    assert TopK(k=big, insert_distance=big, from_layer=big - 1, to_layer=big).to_layer == big


def test_default_limit_distance_is_local_branch_and_specs_hash():
    spec = LMInfinite(10, 4096)
    assert spec.limit_distance == 4096
    assert hash(spec) == hash(LMInfinite(10, 4096, 4096))
    assert spec.describe() == "lm_infinite(G=10, L=4096, D=4096)"
    # the method is part of its identity: equal parameters of two methods are two specs
    assert LambdaMask(3, 4) != StreamingLLM(3, 4) and dataclasses.asdict(LambdaMask(3, 4))["kind"] == "lambda_mask"
    assert set(METHODS) == {"vanilla", "lm_infinite", "lambda_mask", "distance_limit", "sliding_window",
                            "streaming_llm", "self_extend", "leaky_rerope", "longheads", "infllm"}
    assert all(METHODS[name]().kind == name for name in METHODS)


def _classes(spec: AttentionSpec, i: int, n: int):
    local, far = spec.classify(jnp.int32(i), jnp.arange(n))
    return np.flatnonzero(np.asarray(local)).tolist(), np.flatnonzero(np.asarray(far)).tolist()


def test_classification_table():
    # query at 12, keys 0..14; G=3, L=4, D=4
    assert _classes(LMInfinite(3, 4), 12, 15) == ([9, 10, 11, 12], [0, 1, 2])
    assert _classes(LambdaMask(3, 4), 12, 15) == ([9, 10, 11, 12], [0, 1, 2])
    assert _classes(StreamingLLM(3, 4), 12, 15) == ([9, 10, 11, 12], [0, 1, 2])
    assert _classes(SlidingWindow(4), 12, 15) == ([9, 10, 11, 12], [])
    assert _classes(DistanceLimit(4), 12, 15) == ([9, 10, 11, 12], list(range(9)))
    assert _classes(Vanilla(), 12, 15) == (list(range(13)), [])
    assert _classes(SelfExtend(2, 4), 12, 15) == ([9, 10, 11, 12], list(range(9)))
    assert _classes(LeakyReRoPE(4, 3), 12, 15) == ([9, 10, 11, 12], list(range(9)))
    # a sink inside the window is counted once, as local
    assert _classes(LMInfinite(3, 4), 4, 6) == ([1, 2, 3, 4], [0])
    # empty query / key slots
    assert _classes(Vanilla(), -1, 4) == ([], [])


@pytest.mark.parametrize("spec_name", sorted(SPEC_FACTORIES))
@pytest.mark.parametrize("G,L", [(3, 5), (7, 4), (0, 6)])
def test_attended_keys_count_the_oracles_mask(spec_name, G, L):
    spec = SPEC_FACTORIES[spec_name](G, L)
    positions = np.arange(41)
    want = attended_slots(positions[None], positions[None], spec)[0].sum(axis=-1)
    np.testing.assert_array_equal(spec.attended_keys(positions), want)
    with pytest.raises(ValueError, match="positions >= 0"):
        spec.attended_keys(np.array([-1]))


def test_global_query_positions():
    i = jnp.arange(0, 40, 7)
    np.testing.assert_array_equal(LMInfinite(3, 8, 6).global_query_position(i), 6)
    np.testing.assert_array_equal(StreamingLLM(3, 8).global_query_position(i), np.minimum(i, 10))
    np.testing.assert_array_equal(LambdaMask(3, 8).global_query_position(i), i)


@pytest.mark.parametrize("g,w", [(4, 8), (4, 10), (3, 7), (8, 1)])
def test_self_extend_positions_are_the_official_formula(g, w):
    """Grouped positions as numerators over `position_scale`: the official code's query position
    ``i // g + W - W / g`` (a true division) and key position ``j // g``, exactly."""
    spec = SelfExtend(g, w)
    i = np.arange(0, 200)
    scale = spec.position_scale
    assert np.array_equal(np.asarray(spec.global_query_position(jnp.asarray(i))) * g,
                          (i // g + w) * g * scale - w * scale)  # (i // g + w - w / g) * g * scale
    assert np.array_equal(np.asarray(spec.global_key_position(jnp.asarray(i))), i // g * scale)
    assert scale == g // np.gcd(g, w)


def test_leaky_rerope_positions():
    spec = LeakyReRoPE(6, 4)
    i = np.arange(0, 50)
    # distance beyond w: w + (delta - w) / k
    gq, gk = np.asarray(spec.global_query_position(jnp.asarray(i))), np.asarray(spec.global_key_position(jnp.asarray(i)))
    assert spec.position_scale == 4
    np.testing.assert_array_equal((gq[:, None] - gk[None, :]) / 4, 6 + (i[:, None] - i[None, :] - 6) / 4)
    assert spec.max_query_position == 2**31 - 1 - 18


def test_every_method_builds_from_its_options_with_defaults():
    l_train = lambda parameter: 64  # noqa: E731
    assert METHODS["lm_infinite"].from_options(l_train) == LMInfinite(10, 64, 64)
    assert METHODS["streaming_llm"].from_options(l_train, local_branch=8) == StreamingLLM(4, 8)
    assert METHODS["self_extend"].from_options(l_train) == SelfExtend(8, 16)
    assert METHODS["leaky_rerope"].from_options(l_train, leak=2) == LeakyReRoPE(32, 2)
    assert METHODS["distance_limit"].from_options(l_train) == DistanceLimit(64)
    assert METHODS["infllm"].from_options(lambda parameter: 4096) == InfLLM(128, 2048, 128, 16, 4, 512)  # vicuna's
    assert METHODS["longheads"].from_options(lambda parameter: 4096) == LongHeads(256, 4096)  # the README's
    assert METHODS["infllm"].from_options(l_train).representatives == 2  # at 64: blocks of 2 tokens, both
    for name, cls in METHODS.items():
        spec = cls.from_options(lambda parameter: 128)
        fields = {f.name for f in dataclasses.fields(spec)} - {"kind", "top_k", *cls.CODE_FLAGS}
        assert set(cls.OPTIONS) == fields, name
        # built directly, a method takes the defaults of a model pretrained at the assumed length
        assert cls.from_options(lambda parameter: ASSUMED_PRETRAINING_LENGTH) == cls(), name
    with pytest.raises(TypeError, match="leak"):
        METHODS["lm_infinite"].from_options(l_train, leak=2)


def test_top_k_inserts_at_half_the_window_unless_told():
    assert TopK().insert_distance is None  # set by the method that takes it
    assert LMInfinite(10, 4096, top_k=TopK()).top_k == TopK(5, 2048, 4)
    assert SlidingWindow(17, top_k=TopK(2)).top_k.insert_distance == 8
    assert LMInfinite(2, 8, top_k=TopK(3, 1)).top_k.insert_distance == 1
    assert LMInfinite(10, 64, top_k=TopK()).describe() == "lm_infinite(G=10, L=64, D=64, top_k=5@32 layers[4,None))"


@pytest.mark.parametrize("spec_name", sorted(SPEC_FACTORIES))
@pytest.mark.parametrize("G,L", [(3, 5), (2, 12)])
def test_farthest_distance_is_the_oracles_largest_scored_distance(spec_name, G, L):
    spec = SPEC_FACTORIES[spec_name](G, L)
    kwargs = naive_spec_kwargs(spec)
    for n in (1, 4, L, L + 1, 3 * L + 2, 60):
        placed = [placement(i, j, **kwargs) for i in range(n) for j in range(i + 1)]
        want = max(qp - (0 if kp is None else kp) for qp, kp in (p for p in placed if p is not None))
        assert float(spec.farthest_distance(n)) == pytest.approx(want, rel=1e-12), n
    with pytest.raises(ValueError, match="length"):
        spec.farthest_distance(0)


@pytest.mark.parametrize("spec", [SelfExtend(8, 32), SelfExtend(3, 10), LeakyReRoPE(64, 16), LeakyReRoPE(5, 1)],
                         ids=str)
@pytest.mark.parametrize("length", [100, 128, 129, 1000, 16_384])
def test_covering_picks_the_smallest_stretch_that_keeps_distances_below_l_train(spec, length):
    l_train = 128
    name = spec.STRETCH
    covered = spec.covering(length, l_train)
    assert {f: getattr(covered, f) for f in spec.OPTIONS if f != name} == {
        f: getattr(spec, f) for f in spec.OPTIONS if f != name}
    assert covered.farthest_distance(length) <= l_train - 1
    for smaller in range(1, getattr(covered, name)):  # every smaller value reaches l_train or beyond
        assert dataclasses.replace(spec, **{name: smaller}).farthest_distance(length) > l_train - 1


def test_covering_fails_clearly():
    with pytest.raises(ValueError, match="lm_infinite has no parameter"):
        LMInfinite(4, 64).covering(1000, 64)
    # neighbours alone reach the pretraining length: no group size can help
    with pytest.raises(ValueError, match="no group_size keeps every distance of 1,000 tokens below 64"):
        SelfExtend(4, 64).covering(1000, 64)
    with pytest.raises(ValueError, match="no leak keeps"):
        LeakyReRoPE(64, 4).covering(1000, 64)
    assert SelfExtend(4, 16).covering(64, 64) == SelfExtend(1, 16)  # within L_train: no grouping needed


def test_code_flags_are_booleans_and_named_by_describe():
    """A method's code flags (`AttentionSpec.CODE_FLAGS`) switch to its official code's behaviour: each must be a
    bool, and a set one is part of the method's description (so results say which rule ran)."""
    assert LongHeads.CODE_FLAGS == ("prefill_code_quirks",) and InfLLM.CODE_FLAGS == ("main_double_count",)
    assert LongHeads(4, 16).describe() == "longheads(w=4, span=16)"
    assert LongHeads(4, 16, prefill_code_quirks=True).describe() == "longheads(w=4, span=16, prefill_code_quirks)"
    assert InfLLM(main_double_count=True).describe().endswith(", main_double_count)")
    assert LongHeads(4, 16, prefill_code_quirks=True) != LongHeads(4, 16)  # a different method to every cache
    with pytest.raises(ValueError, match="prefill_code_quirks must be True or False, got 1"):
        LongHeads(4, 16, prefill_code_quirks=1)
    with pytest.raises(ValueError, match="main_double_count must be True or False, got 'yes'"):
        InfLLM(main_double_count="yes")
