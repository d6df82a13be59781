"""The entry point: input validation, dispatch, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (assert_nan_stays_in_its_rows, attended_slots, case_seed, grid, in_turn, make_positional,
                      product, naive_positional_kwargs,
                      naive_spec_kwargs, random_qkv, rel_err)
from naive_attention import naive_attention

from lminf_jax import (
    Alibi,
    DistanceLimit,
    LMInfinite,
    RopeScaling,
    RopeScheme,
    Rotary,
    Scaling,
    SelfExtend,
    TopK,
    Vanilla,
    apply_rope,
    attention,
    attention_probe,
    frequency_method,
)

Q, K, V = random_qkv(0, 2, 8, 8, 4, 2, 16)
POS = np.arange(8, dtype=np.int32)


def _call(**overrides):
    kw = dict(q_positions=POS, k_positions=POS, spec=LMInfinite(2, 4))
    args = [overrides.pop(n, x) for n, x in (("q", Q), ("k", K), ("v", V))]
    kw.update(overrides)
    return attention(*args, **kw)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"q": Q[0]}, "q must have shape"),
        ({"k": K[:1]}, "batch sizes differ"),
        ({"v": V[:, :5]}, "v must match k"),
        ({"k": K[..., :8], "v": V[..., :8]}, "k head_dim"),
        ({"q": Q[:, :, :3]}, "multiple of k/v heads"),
        ({"q": Q.astype(np.int32)}, "q must be a floating-point"),
        ({"q_positions": POS.astype(np.float32)}, "q_positions must be an integer"),
        ({"k_positions": POS[:5]}, "k_positions must have shape"),
        ({"positional": Rotary.create(32)}, "rotary_dim"),
        ({"positional": Alibi.create(3)}, "slopes for 4 query heads"),
        ({"positional": "rope"}, "positional must be"),
        ({"scale": -1.0}, "scale factor must be"),
        ({"implementation": "flash"}, "implementation must be"),
        ({"block_q": 0, "implementation": "blockwise"}, "block_q"),
        ({"spec": "lm_infinite"}, "spec must be"),
        ({"spec": LMInfinite(2, 4, top_k=TopK(2, 2))}, "layer must be given"),
        ({"k_positions": POS[::-1].copy(), "implementation": "blockwise"}, "k_positions: the blockwise"),
        ({"q_positions": POS * 2, "k_positions": POS * 2, "implementation": "blockwise"}, "q_positions: the blockwise"),
    ],
)
def test_bad_input_raises_value_error_naming_it(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        _call(**overrides)


def test_auto_picks_a_path_that_agrees_and_runs_under_jit():
    t = 600  # 600 * 600 scores > DENSE_MAX_SCORES -> blockwise
    q, k, v = random_qkv(1, 1, t, t, 2, 2, 16)
    pos = jnp.arange(t, dtype=jnp.int32)
    spec = LMInfinite(4, 64)
    rope = Rotary.create(16)

    @jax.jit
    def run(q, k, v, pos):
        return attention(q, k, v, q_positions=pos, k_positions=pos, spec=spec, positional=rope, block_q=128, block_k=64)

    ref = attention(q, k, v, q_positions=pos, k_positions=pos, spec=spec, positional=rope, implementation="reference")
    assert rel_err(run(q, k, v, pos), ref) <= 1e-5
    # a single query (decode) over keys in ring-buffer order goes to the dense path
    ring = np.roll(np.arange(t, dtype=np.int32), 17)
    one = attention(q[:, -1:], k, v, q_positions=np.array([t - 1], np.int32), k_positions=ring, spec=spec,
                    positional=rope)
    sorted_keys = np.argsort(ring)
    want = attention(q[:, -1:], k[:, sorted_keys], v[:, sorted_keys], q_positions=np.array([t - 1], np.int32),
                     k_positions=ring[sorted_keys], spec=spec, positional=rope, implementation="reference")
    assert rel_err(one, want) <= 1e-6


@pytest.mark.parametrize("name,value", [("q_positions", 2**31), ("k_positions", 2**32 + 3),
                                        ("k_positions", -(2**31) - 1)])
def test_positions_beyond_int32_raise_instead_of_wrapping(name, value):
    wide = POS.astype(np.int64)
    bad = wide.copy()
    bad[-1] = value
    for call in (attention, attention_probe):
        kw = dict(q_positions=wide, k_positions=wide, spec=LMInfinite(2, 4))
        with pytest.raises(ValueError, match=f"{name} must lie in int32's range"):
            call(Q, K, V, **{**kw, name: bad})
    np.testing.assert_array_equal(_call(q_positions=wide, k_positions=wide), _call())  # in range: as int32


@pytest.mark.parametrize("implementation,top_k", [("reference", False), ("blockwise", False), ("pallas", False),
                                                  ("reference", True), ("blockwise", True)])
def test_a_nan_reaches_only_the_rows_that_attend_it(implementation, top_k):
    """NaN keys and values in the window, a sink and empty slots: rows that do not attend them
    (causally masked, out of the window, before the sink; blocks and chunks of 4) are unchanged."""
    t = 16
    pos = np.stack([np.arange(t), np.arange(t), np.r_[[-1] * 3, np.arange(t - 3)],
                    np.r_[[-1] * 5, np.arange(t - 5)]]).astype(np.int32)
    # row 1: a NaN sink value; row 2: NaNs in empty slots; row 3: a NaN value at position 4
    nan_key, nan_value = [9, 12, 2, 1], [6, 1, 0, 9]
    if implementation == "pallas":  # the kernel takes positions 0..T-1 only
        pos, nan_key, nan_value = pos[:2], nan_key[:2], nan_value[:2]
    q, k, v = random_qkv(3, len(pos), t, t, 4, 2, 8)
    # top-k: k = 8 exceeds the 7 and 5 middle keys of rows 2 and 3: some picks find none (and must not take
    # an empty slot's value); row 3's last query picks position 4 and must see its NaN
    spec = LMInfinite(2, 4, top_k=TopK(8, 3, 0) if top_k else None)
    sees, unsure = attended_slots(pos, pos, spec), None
    if top_k:  # the last query also sees every middle key (whether its NaN score is picked is left open)
        sees[:, -1] |= (pos >= 0) & (pos <= pos[:, -1:])
        unsure = np.zeros(pos.shape, bool)
        unsure[:2, -1] = True

    def run(q, k, v):
        return attention(q, k, v, q_positions=pos, k_positions=pos, spec=spec, positional=Rotary.create(8), layer=0,
                         implementation=implementation, block_q=4, block_k=4)

    assert_nan_stays_in_its_rows(run, q, k, v, sees, nan_key=nan_key, nan_value=nan_value, unsure=unsure)


@pytest.mark.parametrize("implementation", ["single_query", "reference"])
def test_a_nan_in_an_empty_or_masked_cache_slot_reaches_no_decoding_query(implementation):
    rng = np.random.default_rng(0)
    k_pos = np.stack([rng.permutation([0, 1, 17, 18, 19, 20, 12, 5, -1, -1]) for _ in range(3)]).astype(np.int32)
    q_pos = np.full((3, 1), 20, np.int32)
    spec = LMInfinite(2, 4)

    def slot(b: int, p: int) -> int:
        return int(np.flatnonzero(k_pos[b] == p)[0])

    q, k, v = random_qkv(4, 3, 1, 10, 4, 2, 8)

    def run(q, k, v):
        return attention(q, k, v, q_positions=q_pos, k_positions=k_pos, spec=spec, positional=Rotary.create(8),
                         implementation=implementation)

    # row 0: NaN value in an empty slot, NaN key masked; row 1: the reverse; row 2: an attended NaN value
    assert_nan_stays_in_its_rows(run, q, k, v, attended_slots(q_pos, k_pos, spec),
                                 nan_key=[slot(0, 12), slot(1, -1), -1],
                                 nan_value=[slot(0, -1), slot(1, 5), slot(2, 19)])


@pytest.mark.parametrize("implementation", ["reference", "blockwise", "pallas", "single_query"])
def test_huge_g_and_l_allocate_nothing_beyond_the_sequence(implementation):
    """G = 10^8 sinks and an L = 10^9 window over 24 tokens: no array is sized by G or L."""
    t = 24
    tq = 1 if implementation == "single_query" else t
    q, k, v = random_qkv(2, 1, tq, t, 2, 1, 16)
    spec, pos = LMInfinite(10**8, 10**9), np.arange(t, dtype=np.int32)

    @jax.jit
    def run(q, k, v):
        return attention(q, k, v, q_positions=pos[-tq:], k_positions=pos, spec=spec, positional=Rotary.create(16),
                         implementation=implementation, block_q=8, block_k=8)

    assert run.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes < 2**20
    want = attention(q, k, v, q_positions=pos[-tq:], k_positions=pos, spec=Vanilla(),
                     positional=Rotary.create(16), implementation="reference")
    assert rel_err(run(q, k, v), want) < 1e-5


@pytest.mark.parametrize("spec", [LMInfinite(3, 8), DistanceLimit(8), SelfExtend(3, 8)], ids=lambda s: s.kind)
def test_a_key_scored_at_position_zero_gets_the_rotary_scaling_in_every_path(spec):
    """YaRN folds its attention factor into cos and sin, so a key scored at position 0 (LM-Infinite's
    sinks, the distance limit's far keys) or at a fractional position (Self-Extend with g not dividing
    W) is scaled like every other key, in every implementation, as in the float64 oracle."""
    rotary = Rotary.create(16, theta=100.0, scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=16))
    assert rotary.attention_scaling > 1.1
    t = 40
    q, k, v = random_qkv(case_seed("scaled sinks", spec.kind), 1, t, t, 4, 2, 16)
    pos = np.arange(t, dtype=np.int32)
    want = naive_attention(q, k, v, pos[None], pos[None], scale=0.25, **naive_spec_kwargs(spec),
                           **naive_positional_kwargs(rotary))
    run = lambda qs, impl: attention(q[:, qs], k, v, q_positions=pos[qs], k_positions=pos, spec=spec,  # noqa: E731
                                     positional=rotary, implementation=impl, block_q=8, block_k=8)
    for impl in ("reference", "blockwise") + (("pallas",) if spec.bounded else ()):
        assert rel_err(run(slice(None), impl), want) < 1e-5, impl
    assert rel_err(run(slice(t - 1, t), "single_query"), want[:, -1:]) < 1e-5


FOLLOWING_SPECS, FOLLOWING_LAYOUTS = [Vanilla(), LMInfinite(3, 8), SelfExtend(3, 8)], [("half", 16), ("interleaved", 6)]
FOLLOWING_RUNS = [(spec, *layout) for spec, layout in product(FOLLOWING_SPECS, FOLLOWING_LAYOUTS)]


# core: each kind under one layout, the layouts in turn
@pytest.mark.parametrize("spec,layout,rotary_dim", grid(FOLLOWING_RUNS, core=[
    (spec, *layout) for spec, layout in in_turn(FOLLOWING_SPECS, FOLLOWING_LAYOUTS)]),
                         ids=[f"{spec.kind}-{layout}" for spec, layout, _ in FOLLOWING_RUNS])
def test_rope_that_follows_the_length_takes_it_from_the_keys_in_every_path(spec, layout, rotary_dim):
    """Dynamic NTK (a `Rotary` with a `LengthRule`) rotates queries and keys with the frequencies of
    T = the call's largest key position + 1 (over the batch), whatever the queries: the oracle with
    the frequencies resolved for that T, in every implementation."""
    scheme = RopeScheme(16, 4, theta=100.0, rotary_dim=rotary_dim, layout=layout)
    dynamic = scheme.rotary(frequency_method("dynamic_ntk", 2.0, 4))
    t = 40
    q, k, v = random_qkv(case_seed("length rule", spec.kind, layout), 2, t, t, 4, 2, 16)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t)).copy()
    pos[1] = np.arange(t) - 3  # the second row left-padded: T comes from the first
    static = Rotary.create(16, theta=100.0, rotary_dim=rotary_dim, layout=layout, scaling=RopeScaling("dynamic", 2.0),
                           max_position_embeddings=4, seq_len=t)
    assert static.inv_freq != dynamic.inv_freq  # what a length of 4 gives
    want = naive_attention(q, k, v, pos, pos, scale=0.25, **naive_spec_kwargs(spec), **naive_positional_kwargs(static))
    run = lambda qs, impl: attention(q[:, qs], k, v, q_positions=pos[:, qs], k_positions=pos, spec=spec,  # noqa: E731
                                     positional=dynamic, implementation=impl, block_q=8, block_k=8)
    valid = pos >= 0
    for impl in ("reference", "blockwise") + (("pallas",) if spec.bounded else ()):
        rows = slice(t - 10, t - 5)  # queries short of the last key: T comes from the keys
        if impl == "pallas":
            got = attention(q[:1], k[:1], v[:1], q_positions=pos[0], k_positions=pos[0], spec=spec,
                            positional=dynamic, implementation="pallas", block_q=8, block_k=8)
            assert rel_err(got, want[:1]) < 1e-5
            continue
        assert rel_err(np.asarray(run(rows, impl))[valid[:, rows]], want[:, rows][valid[:, rows]]) < 1e-5, impl
    assert rel_err(run(slice(t - 1, t), "single_query"), want[:, -1:]) < 1e-5
    with pytest.raises(ValueError, match="last_key_position"):
        apply_rope(q, pos, dynamic)


def _self_extend_official(q, k, v, inv_freq, g, w, decode):
    """Self-Extend as LongLM's ``self_extend_patch/Llama.py`` (github.com/datamllab/LongLM) computes it,
    transcribed to float64 numpy for one head: ``q (Tq, d)``, ``k, v (T, d)`` at 0..T-1; the prefill
    (``q_len == kv_seq_len``) or the decoding step of the last token (``q_len == 1``), each with that
    code's own masks, its true division ``W / g`` and its switch ``_re_group_size_2 = 0`` while the
    largest query position is below W."""
    t, d = k.shape
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))

    def rotate(x, positions):  # transformers' apply_rotary_pos_emb ("half" layout)
        angles = np.asarray(positions, np.float64)[:, None] * np.asarray(inv_freq)[None]
        cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
        return x * cos + np.concatenate([-x[:, d // 2:], x[:, :d // 2]], -1) * sin

    query_position = np.array([t - 1]) if decode else np.arange(t)
    key_position = np.arange(t)
    re_w = 0 if query_position.max() < w else w
    group_query_position = query_position // g + re_w - re_w / g
    group_key_position = key_position // g
    neighbor = rotate(q, query_position) @ rotate(k, key_position).T / np.sqrt(d)
    group = rotate(q, group_query_position) @ rotate(k, group_key_position).T / np.sqrt(d)
    if decode:
        neighbor_mask = np.zeros((1, t))
        neighbor_mask[:, -w:] = 1
        causal = np.zeros((1, t))
    else:
        neighbor_mask = np.tril(np.ones((t, t)))
        if t - w > 0:
            neighbor_mask[w:, :-w] -= np.tril(np.ones((t - w, t - w)))
        causal = np.where(np.tril(np.ones((t, t))) > 0, 0.0, -np.inf)
    merged = np.where(neighbor_mask.astype(bool), neighbor, group) + causal
    p = np.exp(merged - merged.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("g,w", [(4, 8), (3, 8), (4, 48)], ids=["g-divides-W", "true-division", "below-W"])
def test_self_extend_equals_its_official_code(g, w):
    """Prefill (blockwise and dense) and one decoding step equal the official formula, including a group
    size that does not divide W and a sequence that stays below W."""
    t, heads, d = 40, 2, 8
    rotary = Rotary.create(d)
    q, k, v = random_qkv(case_seed("self-extend official", g, w), 1, t, t, heads, heads, d)
    pos = np.arange(t, dtype=np.int32)
    run = lambda qs, impl: np.asarray(attention(  # noqa: E731
        q[:, qs], k, v, q_positions=pos[qs], k_positions=pos, spec=SelfExtend(g, w), positional=rotary,
        implementation=impl, block_q=8, block_k=8), np.float64)
    for decode, qs, impls in ((False, slice(None), ("reference", "blockwise")), (True, slice(t - 1, t), ("single_query",))):
        want = np.stack([_self_extend_official(q[0, qs, h], k[0, :, h], v[0, :, h], rotary.inv_freq, g, w, decode)
                         for h in range(heads)], axis=1)
        for impl in impls:
            assert rel_err(run(qs, impl)[0], want) < 1e-5, (impl, decode)


def test_methods_refuse_positions_whose_global_position_would_wrap():
    spec = SelfExtend(3, 2**29)
    big = np.array([spec.max_query_position + 1], np.int32)
    with pytest.raises(ValueError, match="q_positions: self_extend.*serves positions up to"):
        attention(Q[:, :1], K[:, :1], V[:, :1], q_positions=big, k_positions=big, spec=spec)


CAPPED_SPECS = [Vanilla(), LMInfinite(3, 8), SelfExtend(3, 8), DistanceLimit(8)]


# core: each kind under one encoding, RoPE and ALiBi in turn
@pytest.mark.parametrize("spec,positional", grid(product(CAPPED_SPECS, ("rope_half", "alibi")),
                                                 core=in_turn(CAPPED_SPECS, ("rope_half", "alibi"))),
                         ids=[f"{spec.kind}-{name}" for spec, name in product(CAPPED_SPECS, ("rope_half", "alibi"))])
def test_soft_capped_scores_match_the_oracle_in_every_path(spec, positional):
    """Gemma-2's attention-logit soft-capping (`Scaling` with a cap: c * tanh(score / c), before any
    ALiBi bias) in the dense, blockwise, Pallas, single-query and probe paths, against the oracle; the
    cap binds (sharp inputs), so a path that skipped it would fail."""
    t, cap = 40, 2.0
    q, k, v = random_qkv(case_seed("softcap", spec.kind, positional), 1, t, t, 4, 2, 16)
    q, k = 3 * q, 3 * k
    pos = make_positional(positional, 16, 4)
    p = np.arange(t, dtype=np.int32)
    scale = Scaling(0.25, softcap=cap)
    want = naive_attention(q, k, v, p[None], p[None], scale=0.25, softcap=cap, **naive_spec_kwargs(spec),
                           **naive_positional_kwargs(pos))
    uncapped = naive_attention(q, k, v, p[None], p[None], scale=0.25, **naive_spec_kwargs(spec),
                               **naive_positional_kwargs(pos))
    assert rel_err(uncapped, want) > 0.05
    run = lambda qs, impl: attention(q[:, qs], k, v, q_positions=p[qs], k_positions=p, spec=spec,  # noqa: E731
                                     positional=pos, scale=scale, implementation=impl, block_q=8, block_k=8)
    for impl in ("reference", "blockwise") + (("pallas",) if spec.bounded else ()):
        assert rel_err(run(slice(None), impl), want) < 1e-5, impl
    assert rel_err(run(slice(t - 1, t), "single_query"), want[:, -1:]) < 1e-5
    out, probe = attention_probe(q, k, v, q_positions=p, k_positions=p, spec=spec, positional=pos, scale=scale)
    assert rel_err(out, want) < 1e-5
    if positional == "rope_half":  # no bias: every logit is a capped score
        logits = np.asarray(probe.logits)
        assert np.abs(logits[np.isfinite(logits)]).max() <= cap


def test_a_scale_must_be_a_finite_positive_factor_and_cap():
    for bad in (dict(factor=0.0), dict(factor=float("nan")), dict(factor=1.0, softcap=-1.0),
                dict(factor=1.0, softcap=float("inf"))):
        with pytest.raises(ValueError, match="scale (factor|softcap) must be a finite number > 0"):
            Scaling(**bad)
    with pytest.raises(ValueError, match="scale must be a number, a Scaling or None"):
        _call(scale="0.25")
