"""The jitted blockwise implementation against the dense reference."""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (POSITIONALS, SPEC_FACTORIES, case_seed, grid, in_turn, make_positional, naive_spec_kwargs,
                      product, random_qkv, rel_err)
from naive_attention import allowed_keys

from lminf_jax import LMInfinite, SlidingWindow, TopK, Vanilla, attention
from lminf_jax.attention_blockwise import blockwise_attention


def _pair(q, k, v, q_pos, k_pos, spec, positional, layer=None, block_q=16, block_k=8):
    kw = dict(q_positions=q_pos, k_positions=k_pos, spec=spec, positional=positional, layer=layer)
    fast = attention(q, k, v, implementation="blockwise", block_q=block_q, block_k=block_k, **kw)
    ref = attention(q, k, v, implementation="reference", **kw)
    return np.asarray(fast), np.asarray(ref)


# (name, B, Tq, Tk, Hq, Hkv, G, L, pads, q_offset)
GRID = [
    ("T<L", 1, 40, 40, 2, 2, 4, 64, [0], 0),
    ("T=L", 1, 48, 48, 2, 2, 4, 48, [0], 0),
    ("T not multiple of block", 1, 101, 101, 2, 2, 4, 20, [0], 0),
    ("G=0", 1, 90, 90, 2, 2, 0, 17, [0], 0),
    ("G>=T", 1, 50, 50, 2, 2, 64, 9, [0], 0),
    ("L=1", 1, 45, 45, 2, 2, 3, 1, [0], 0),
    ("GQA", 1, 70, 70, 6, 2, 3, 12, [0], 0),
    ("MQA", 1, 70, 70, 4, 1, 3, 12, [0], 0),
    ("batch, left padding", 3, 77, 77, 2, 2, 3, 13, [0, 5, 30], 0),
    ("chunked prefill", 2, 33, 120, 2, 2, 4, 25, [0, 7], 0),
    ("positions near 1e8", 1, 60, 60, 2, 2, 0, 16, [0], 10**8),
]


# Each layout case runs under two of the four encodings, so every case meets RoPE or ALiBi and every
# encoding meets five or six cases (the encodings themselves are checked against the float64 oracle in
# test_attention_reference.py; here they only ride along the index logic). The full cross product
# compiled 88 programs for no case the pairs miss.
# The core runs each case under one encoding (each encoding meets two or three cases).
GRID_RUNS = [(case, POSITIONALS[(i + j) % 4]) for i, case in enumerate(GRID) for j in (0, 2)]


@pytest.mark.parametrize("case,positional_name", grid(GRID_RUNS, core=GRID_RUNS[::2]),
                         ids=[f"{c[0]}-{p}" for c, p in GRID_RUNS])
def test_blockwise_matches_reference_grid(case, positional_name):
    name, b, tq, tk, hq, hkv, g, l, pads, offset = case
    d = 16
    q, k, v = random_qkv(case_seed(name, positional_name), b, tq, tk, hq, hkv, d)
    k_pos = np.stack([np.arange(tk) - p for p in pads]).astype(np.int32)
    k_pos = np.where(k_pos < 0, -1, k_pos + offset).astype(np.int32)
    q_pos = k_pos[:, tk - tq :]
    spec = LMInfinite(g, l) if g else SlidingWindow(l)
    positional = make_positional(positional_name, d, hq)
    fast, ref = _pair(q, k, v, q_pos, k_pos, spec, positional)
    assert rel_err(fast, ref) <= 1e-5


# core: each kind under one encoding, RoPE and ALiBi in turn
@pytest.mark.parametrize("spec_name,positional_name", grid(product(sorted(SPEC_FACTORIES), ("rope_half", "alibi")),
                                                           core=in_turn(sorted(SPEC_FACTORIES),
                                                                        ("rope_half", "alibi"))))
def test_blockwise_matches_reference_every_kind(spec_name, positional_name):
    b, t, hq, hkv, d = 2, 83, 4, 2, 16
    q, k, v = random_qkv(case_seed(spec_name, positional_name, 2), b, t, t, hq, hkv, d)
    pos = np.stack([np.arange(t), np.arange(t) - 9]).astype(np.int32)
    pos[pos < 0] = -1
    spec = SPEC_FACTORIES[spec_name](4, 19)
    fast, ref = _pair(q, k, v, pos, pos, spec, make_positional(positional_name, d, hq))
    assert rel_err(fast, ref) <= 1e-5


@pytest.mark.parametrize("spec_name", sorted(SPEC_FACTORIES))
def test_chunks_wholly_inside_every_window_skip_the_mask_and_no_other(spec_name):
    """One unpadded row, window 15, blocks of 8: many key chunks lie inside every query's window and
    are scored without a mask, and some end exactly at the window's edge (last query - first key ==
    15), which must keep it."""
    t, hq, hkv, d = 64, 2, 1, 16
    q, k, v = random_qkv(case_seed(spec_name, "mask-free"), 1, t, t, hq, hkv, d)
    pos = np.arange(t, dtype=np.int32)[None]
    spec = SPEC_FACTORIES[spec_name](4, 15)
    fast, ref = _pair(q, k, v, pos, pos, spec, make_positional("alibi", d, hq), block_q=8, block_k=8)
    assert rel_err(fast, ref) <= 1e-5


@pytest.mark.parametrize("spec", [LMInfinite(4, 16, top_k=TopK(3, 8, from_layer=2)),
                                  SlidingWindow(16, top_k=TopK(2, 8, from_layer=0, to_layer=3))])
def test_blockwise_top_k_matches_reference_with_traced_layer(spec):
    b, t, hq, hkv, d = 2, 70, 4, 2, 16
    q, k, v = random_qkv(11, b, t, t, hq, hkv, d)
    pos = np.arange(t, dtype=np.int32)
    positional = make_positional("rope_half", d, hq)
    run = {
        impl: jax.jit(functools.partial(attention, q_positions=pos, k_positions=pos, spec=spec,
                                        positional=positional, implementation=impl, block_q=16, block_k=8))
        for impl in ("blockwise", "reference")
    }
    for layer in (0, 1, 2, 5):
        fast = run["blockwise"](q, k, v, layer=jnp.int32(layer))
        ref = run["reference"](q, k, v, layer=jnp.int32(layer))
        assert rel_err(fast, ref) <= 1e-5


@pytest.mark.parametrize("implementation,positional_name", grid(
    product(("blockwise", "reference"), ("rope_half", "alibi")),
    core=in_turn(("blockwise", "reference"), ("rope_half", "alibi"))))
def test_lm_infinite_equals_vanilla_when_t_le_l(implementation, positional_name):
    t, d = 64, 16
    q, k, v = random_qkv(13, 2, t, t, 4, 2, d)
    pos = np.arange(t, dtype=np.int32)
    positional = make_positional(positional_name, d, 4)
    outs = [attention(q, k, v, q_positions=pos, k_positions=pos, spec=spec, positional=positional,
                      implementation=implementation, block_q=16, block_k=16)
            for spec in (Vanilla(), LMInfinite(5, t), LMInfinite(5, 100))]
    assert rel_err(outs[1], outs[0]) <= 1e-6 and rel_err(outs[2], outs[0]) <= 1e-6
    shorter = attention(q, k, v, q_positions=pos, k_positions=pos, spec=LMInfinite(5, t - 8),
                        positional=positional, implementation=implementation, block_q=16, block_k=16)
    assert rel_err(shorter, outs[0]) > 1e-3  # the comparison can fail


GRADIENT_SPECS = ["lm_infinite", "streaming_llm", "sliding_window", "vanilla", "distance_limit"]


# core: each kind through one implementation, the two in turn
@pytest.mark.parametrize("spec_name,implementation", grid(product(GRADIENT_SPECS, ("blockwise", "reference")),
                                                           core=in_turn(GRADIENT_SPECS, ("blockwise", "reference"))))
def test_gradient_is_zero_exactly_outside_the_attended_set(spec_name, implementation):
    t, hq, d = 48, 2, 8
    q, k, v = random_qkv(17, 1, t, t, hq, hq, d)
    pos = np.arange(t, dtype=np.int32)
    spec = SPEC_FACTORIES[spec_name](3, 10)
    positional = make_positional("rope_half", d, hq)
    cot = np.random.default_rng(0).standard_normal((hq, d)).astype(np.float32)
    for i in (2, 9, 10, 31, 47):
        def loss(k_, v_):
            out = attention(q, k_, v_, q_positions=pos, k_positions=pos, spec=spec, positional=positional,
                            implementation=implementation, block_q=8, block_k=8)
            return jnp.sum(out[0, i] * cot)

        gk, gv = jax.grad(loss, argnums=(0, 1))(k, v)
        allowed = allowed_keys(i, pos, **naive_spec_kwargs(spec))
        for g in (np.asarray(gk)[0], np.asarray(gv)[0]):
            per_key = np.abs(g).sum(axis=(1, 2))
            assert np.all(per_key[~allowed] == 0.0), (i, np.flatnonzero(per_key[~allowed]))
            # Key i's own k-gradient can vanish only by accident; every allowed key must get some.
            assert np.all(per_key[allowed] > 0.0), (i, np.flatnonzero(per_key[allowed] == 0))


def _largest_intermediate(fn, *args) -> int:
    """Largest number of elements of any value in the jaxpr of fn (sub-jaxprs included)."""
    def walk(jaxpr) -> int:
        biggest = 0
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                biggest = max(biggest, int(np.prod(var.aval.shape)))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                biggest = max(biggest, walk(sub))
        return biggest

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("spec", [LMInfinite(10, 256), Vanilla()])
def test_blockwise_never_builds_a_t_by_t_array(spec):
    t, h, d = 4096, 2, 16
    shape = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, t), jnp.int32)
    positional = make_positional("rope_half", d, h)
    fn = functools.partial(blockwise_attention, spec=spec, positional=positional, scale=0.25, block_q=128, block_k=128)
    biggest = _largest_intermediate(fn, shape, shape, shape, pos, pos)
    # q/k/v themselves are t*h*d = 131072 elements; scores per block are h*128*128.
    assert biggest <= t * h * d
    assert biggest < t * t // 8


def test_lm_infinite_plans_no_more_memory_than_vanilla():
    # LM-Infinite attends fewer keys: no array of every query or key beyond vanilla's (rotated for the
    # global class, or gathered per window) may be planned; its G sinks' rows take a few KiB
    t, h, d = 4096, 2, 64
    qkv = jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def temp(spec) -> int:
        lowered = blockwise_attention.lower(qkv, qkv, qkv, pos, pos, spec=spec, positional=make_positional(
            "rope_half", d, h), scale=0.125, block_q=128, block_k=128)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    assert temp(LMInfinite(10, 256)) <= temp(Vanilla()) + 64 * 1024


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("spec_name,positional_name", [("lm_infinite", "rope_half"), ("vanilla", "alibi"),
                                                       ("self_extend", "rope_interleaved_partial")])
def test_blockwise_lowers_for_gpu_and_tpu(platform, spec_name, positional_name):
    """No accelerator needed: lowering for another platform runs that platform's lowering rules over
    the whole program (bf16, GQA, every branch of the key-chunk switch)."""
    spec, positional = SPEC_FACTORIES[spec_name](10, 64), make_positional(positional_name, 64, 4)
    q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    pos = jnp.arange(256, dtype=jnp.int32)
    run = jax.jit(lambda q, k, v: attention(q, k, v, q_positions=pos, k_positions=pos, spec=spec,
                                            positional=positional, implementation="blockwise", block_q=64, block_k=64))
    lowered = run.trace(q, kv, kv).lower(lowering_platforms=(platform,)).as_text()
    assert "stablehlo.while" in lowered and "bf16" in lowered
