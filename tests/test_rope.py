"""Tests for lminf_jax.rope: closed form, exactness at huge positions, HF parity, errors."""

import dataclasses
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lminf_jax.rope import (FREQUENCY_METHODS, RopeScaling, RopeScheme, Rotary, _turn_constants, apply_rope,
                            frequency_method, rope_angles, rope_frequencies)

# 1 / (2 pi) to 60 digits: an exact-enough rational reference for angle reduction.
INV_2PI = Fraction("0.159154943091895335768883763372514362034459645740456448747667")
LARGE_POSITIONS = [2**31 - 1, 2**31 - 2, 2**30 + 12345, 10**8, 10**9 + 7, -(2**31), -(2**31) + 1, -123456789]
FREQ_SETS = {
    "theta1e4": (10000.0, None),
    "theta5e5": (500000.0, None),
    "llama3": (500000.0, RopeScaling("llama3", 8.0, 8192)),
    "yarn": (10000.0, RopeScaling("yarn", 4.0, 4096)),
}


def wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def exact_angles(positions, inv_freq) -> np.ndarray:
    """2pi * centred-frac(p * f / 2pi) in exact rational arithmetic, for float64 f."""
    out = np.empty((len(positions), len(inv_freq)))
    for i, p in enumerate(positions):
        for j, f in enumerate(inv_freq):
            turns = int(p) * Fraction(float(f)) * INV_2PI
            out[i, j] = 2 * math.pi * float(turns - round(turns))
    return out


def rope_reference(x, positions, inv_freq, layout, scale=1.0) -> np.ndarray:
    """float64 numpy RoPE written from the formula; x (..., T, H, D), positions (..., T)."""
    x = np.asarray(x, np.float64)
    d = 2 * len(inv_freq)
    ang = np.asarray(positions, np.float64)[..., None, None] * np.asarray(inv_freq)  # (..., T, 1, d/2)
    cos, sin = scale * np.cos(ang), scale * np.sin(ang)
    rot = x[..., :d]
    x1, x2 = (rot[..., : d // 2], rot[..., d // 2 :]) if layout == "half" else (rot[..., 0::2], rot[..., 1::2])
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if layout == "half":
        out = np.concatenate([o1, o2], axis=-1)
    else:
        out = np.empty_like(rot)
        out[..., 0::2], out[..., 1::2] = o1, o2
    return np.concatenate([out, x[..., d:]], axis=-1)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [64, 24])
def test_apply_rope_closed_form(layout, rotary_dim):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 3, 64)).astype(np.float32)
    positions = rng.integers(1, 200, size=(2, 9)).astype(np.int32)
    rotary = Rotary.create(64, theta=10000.0, rotary_dim=rotary_dim, layout=layout)
    rotary = Rotary(rotary.inv_freq, layout, attention_scaling=1.37)
    out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), rotary))
    ref = rope_reference(x, positions, rotary.inv_freq, layout, scale=1.37)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=3e-6)
    np.testing.assert_array_equal(out[..., rotary_dim:], x[..., rotary_dim:])


def test_attention_scaling_multiplies_and_dtype_is_kept():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((5, 2, 32)), jnp.bfloat16)
    positions = jnp.asarray(rng.integers(1, 10**6, size=5), jnp.int32)
    base = Rotary.create(32, rotary_dim=16)
    scaled = Rotary(base.inv_freq, attention_scaling=1.25)
    out1 = apply_rope(x.astype(jnp.float32), positions, base)
    out2 = apply_rope(x.astype(jnp.float32), positions, scaled)
    np.testing.assert_allclose(np.asarray(out2[..., :16]), 1.25 * np.asarray(out1[..., :16]), rtol=1e-6, atol=1e-7)
    out_bf16 = apply_rope(x, positions, base)
    assert out_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out_bf16, np.float32), np.asarray(out1), rtol=1e-2, atol=1e-2)


def test_apply_rope_under_jit_at_huge_positions():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 7, 2, 16)).astype(np.float32)
    positions = rng.integers(-(2**31), 2**31 - 1, size=(4, 7))
    rotary = Rotary.create(16, layout="interleaved")
    out = jax.jit(apply_rope, static_argnums=2)(jnp.asarray(x), jnp.asarray(positions, jnp.int32), rotary)
    # float64 angles p * f are within ~5e-7 rad of exact here.
    ref = rope_reference(x, positions, rotary.inv_freq, "interleaved")
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FREQ_SETS))
def test_rope_angles_exact_at_huge_positions(name):
    theta, scaling = FREQ_SETS[name]
    inv_freq, _ = rope_frequencies(128, theta, scaling)
    rng = np.random.default_rng(3)
    positions = np.array(LARGE_POSITIONS + rng.integers(2**30, 2**31, 12).tolist(), dtype=np.int64)
    angles = np.asarray(rope_angles(jnp.asarray(positions, jnp.int32), inv_freq), np.float64)
    ref = exact_angles(positions, inv_freq)
    assert np.abs(angles).max() <= np.float32(np.pi)
    assert np.abs(wrap(angles - ref)).max() <= 3e-6  # rope_angles documents ~3e-6 rad
    naive = positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)
    assert np.abs(wrap(naive.astype(np.float64) - ref))[0].max() > 0.1  # p = 2**31 - 1: naive float32 fails


def test_rope_angles_random_full_int32_range():
    rng = np.random.default_rng(4)
    positions = rng.integers(-(2**31), 2**31, 300)
    inv_freq, _ = rope_frequencies(64, 10000.0, RopeScaling("linear", 3.0))
    angles = np.asarray(rope_angles(jnp.asarray(positions, jnp.int32), inv_freq), np.float64)
    assert np.abs(wrap(angles - exact_angles(positions, inv_freq))).max() <= 3e-6


def test_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 1, 128)).astype(np.float32)
    k = rng.standard_normal((1, 1, 128)).astype(np.float32)
    rotary = Rotary.create(128, theta=10000.0)
    diffs = np.array([0, 1, 17, 1000, 65537], np.int32)

    def scores(i0: int) -> np.ndarray:
        qi = apply_rope(jnp.asarray(q), jnp.full((1,), i0, jnp.int32), rotary)
        kj = apply_rope(jnp.broadcast_to(k, (len(diffs), 1, 128)), jnp.asarray(i0 - diffs), rotary)
        return np.asarray(jnp.sum(qi * kj, axis=(-2, -1)))

    scale = np.linalg.norm(q) * np.linalg.norm(k)
    big, small = scores(10**9 + 4321), scores(70000)
    np.testing.assert_allclose(big, small, atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(scores(2**31 - 1), small, atol=1e-4 * scale, rtol=0)


# ---------------------------------------------------------------- Hugging Face parity

HF_CASES = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, 10000.0, None),
    "linear_legacy_type_partial": ({"type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, 10000.0, None),
    "dynamic_init": ({"rope_type": "dynamic", "factor": 2.0}, 10000.0, None),
    "dynamic_short": ({"rope_type": "dynamic", "factor": 2.0}, 10000.0, 1000),
    "dynamic_long": ({"rope_type": "dynamic", "factor": 3.0}, 10000.0, 5000),
    "dynamic_very_long": ({"rope_type": "dynamic", "factor": 2.0}, 500000.0, 100000),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, 10000.0, None),
    "yarn_mscale": ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 512,
                     "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 24, "beta_slow": 2}, 10000.0, None),
    "yarn_no_truncate": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
                          "truncate": False}, 150000.0, None),
    "yarn_attention_factor_partial": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                       "attention_factor": 0.9, "partial_rotary_factor": 0.5}, 10000.0, None),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 512}, 500000.0, None),
    "llama3_partial": ({"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                        "original_max_position_embeddings": 256, "partial_rotary_factor": 0.25}, 10000.0, None),
}
HF_HEAD_DIM, HF_MAX_POS = 128, 2048


def hf_config(params: dict, theta: float):
    transformers = pytest.importorskip("transformers")
    params = dict(params, rope_theta=theta)
    return transformers.LlamaConfig(hidden_size=2 * HF_HEAD_DIM, num_attention_heads=2, head_dim=HF_HEAD_DIM,
                                    max_position_embeddings=HF_MAX_POS, rope_parameters=params)


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_frequencies_match_hf(case):
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    params, theta, seq_len = HF_CASES[case]
    config = hf_config(params, theta)
    rope_type = params.get("rope_type", params.get("type"))
    hf_inv, hf_att = rope_utils.ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)
    rotary_dim = int(HF_HEAD_DIM * params.get("partial_rotary_factor", 1.0))
    ours, att = rope_frequencies(rotary_dim, theta, RopeScaling.from_hf(dict(params)),
                                 max_position_embeddings=HF_MAX_POS, seq_len=seq_len)
    np.testing.assert_allclose(ours, hf_inv.double().numpy(), rtol=1e-6, atol=0)
    assert att == pytest.approx(hf_att, rel=1e-6)
    assert np.array_equal(ours, ours.astype(np.float32))


def test_default_frequencies_match_hf():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = hf_config({"rope_type": "default"}, 500000.0)
    hf_inv, hf_att = llama.LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    ours, att = rope_frequencies(HF_HEAD_DIM, 500000.0, RopeScaling.from_hf({"rope_type": "default"}))
    np.testing.assert_allclose(ours, hf_inv.double().numpy(), rtol=1e-6, atol=0)
    assert att == hf_att == 1.0


def test_dynamic_frequencies_differ_from_default_only_beyond_max_positions():
    dynamic = RopeScaling("dynamic", 2.0)
    default, _ = rope_frequencies(64)
    short, _ = rope_frequencies(64, scaling=dynamic, max_position_embeddings=2048, seq_len=100)
    long, _ = rope_frequencies(64, scaling=dynamic, max_position_embeddings=2048, seq_len=8192)
    np.testing.assert_array_equal(short, default)
    assert np.all(long[1:] < default[1:])
    single, _ = rope_frequencies(2, scaling=dynamic, max_position_embeddings=2048, seq_len=8192)
    np.testing.assert_array_equal(single, [1.0])


def hf_tolerance(x: np.ndarray, max_pos: int, inv_freq) -> float:
    """Bound on HF's own angle error, acting on two components: its float32 p * f rounds (half an ulp),
    and its float32 `pow` frequencies are up to one ulp off the correctly rounded ones."""
    return 1e-5 + 2 * np.abs(x).max() * max_pos * max(inv_freq) * 3 * 2.0**-24


@pytest.mark.parametrize("params", [{"rope_type": "default"}, HF_CASES["llama3"][0], HF_CASES["yarn_mscale"][0]])
def test_apply_rope_matches_hf_llama(params):
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    theta = 500000.0
    config = hf_config(params, theta)
    rng = np.random.default_rng(6)
    q = torch.from_numpy(rng.standard_normal((2, 3, 11, HF_HEAD_DIM)).astype(np.float32))  # (B, H, T, D)
    positions = torch.from_numpy(rng.integers(0, 4096, size=(2, 11)))
    embedding = llama.LlamaRotaryEmbedding(config)
    hf_q, _ = llama.apply_rotary_pos_emb(q, q, *embedding(q, positions))
    rotary = Rotary.create(HF_HEAD_DIM, theta=theta, scaling=RopeScaling.from_hf(dict(params)))
    # HF's rotation formula with float64 cos/sin at our frequencies (equal to HF's to an ulp, tested above).
    angles = positions[..., None].double() * torch.tensor(rotary.inv_freq, dtype=torch.float64)
    angles = torch.cat([angles, angles], dim=-1)
    cos64, sin64 = (embedding.attention_scaling * f(angles) for f in (torch.cos, torch.sin))
    hf_q64, _ = llama.apply_rotary_pos_emb(q.double(), q.double(), cos64, sin64)
    ours = apply_rope(jnp.asarray(q.numpy().transpose(0, 2, 1, 3)), jnp.asarray(positions.numpy(), jnp.int32), rotary)
    ours = np.asarray(ours).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(ours, hf_q64.numpy(), rtol=0, atol=1e-5)
    atol = hf_tolerance(q.numpy(), 4096, rotary.inv_freq) * rotary.attention_scaling
    np.testing.assert_allclose(ours, hf_q.numpy(), rtol=0, atol=atol)


def test_apply_rope_matches_hf_gptj_interleaved_partial():
    torch = pytest.importorskip("torch")
    gptj = pytest.importorskip("transformers.models.gptj.modeling_gptj")
    head_dim, rotary_dim, num_pos = 64, 16, 4096
    rng = np.random.default_rng(7)
    k = torch.from_numpy(rng.standard_normal((2, 13, 4, head_dim)).astype(np.float32))  # (B, T, H, D)
    positions = torch.from_numpy(rng.integers(0, num_pos, size=(2, 13)))
    table = gptj.create_sinusoidal_positions(num_pos, rotary_dim)  # (num_pos, [sin | cos])

    def hf_rotate(x, sin, cos):
        return torch.cat([gptj.apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos), x[..., rotary_dim:]], dim=-1)

    hf_k = hf_rotate(k, *torch.split(table[positions], rotary_dim // 2, dim=-1))
    rotary = Rotary.create(head_dim, rotary_dim=rotary_dim, layout="interleaved")
    # GPT-J's rotation formula with float64 sin/cos at our frequencies.
    angles = positions[..., None].double() * torch.tensor(rotary.inv_freq, dtype=torch.float64)
    hf_k64 = hf_rotate(k.double(), torch.sin(angles), torch.cos(angles))
    ours = np.asarray(apply_rope(jnp.asarray(k.numpy()), jnp.asarray(positions.numpy(), jnp.int32), rotary))
    np.testing.assert_allclose(ours, hf_k64.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours, hf_k.numpy(), rtol=0, atol=hf_tolerance(k.numpy(), num_pos, rotary.inv_freq))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("rotary_dim", [15, 66, 0])
def test_bad_rotary_dim_in_create(rotary_dim):
    with pytest.raises(ValueError, match="rotary_dim"):
        Rotary.create(64, rotary_dim=rotary_dim)


@pytest.mark.parametrize("rotary_dim", [7, 0])
def test_bad_rotary_dim_in_frequencies(rotary_dim):
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_frequencies(rotary_dim)


def test_rotary_dim_larger_than_head_dim_in_apply():
    x = jnp.asarray(np.random.default_rng(8).standard_normal((3, 1, 8)), jnp.float32)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rope(x, jnp.arange(3), Rotary.create(16))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "longrope", "factor": 2.0}, "kind"),
        ({"kind": "linear", "factor": 0.5}, "factor"),
        ({"kind": "yarn", "factor": 2.0}, "original_max_position_embeddings"),
        ({"kind": "llama3", "factor": 2.0}, "original_max_position_embeddings"),
        ({"kind": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
          "low_freq_factor": 4.0, "high_freq_factor": 1.0}, "low_freq_factor"),
    ],
)
def test_bad_scaling(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RopeScaling(**kwargs)


def test_from_hf():
    assert RopeScaling.from_hf(None) is None
    assert RopeScaling.from_hf({"rope_type": "default", "rope_theta": 1e6}) is None
    legacy = RopeScaling.from_hf({"type": "linear", "factor": 2.0, "rope_theta": 5e5, "partial_rotary_factor": 0.5})
    assert legacy == RopeScaling("linear", 2.0)
    with pytest.raises(ValueError, match="rope_type"):
        RopeScaling.from_hf({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]})
    with pytest.raises(ValueError, match="short_factor"):
        RopeScaling.from_hf({"rope_type": "linear", "factor": 2.0, "short_factor": [1.0]})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RopeScaling.from_hf({"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="factor"):
        RopeScaling.from_hf({"rope_type": "linear"})


def test_other_argument_errors():
    with pytest.raises(ValueError, match="positions"):
        rope_angles(jnp.asarray([1.5, 2.5]), [1.0])
    with pytest.raises(ValueError, match="layout"):
        Rotary((1.0, 0.1), layout="neox")
    with pytest.raises(ValueError, match="theta"):
        rope_frequencies(8, theta=-1.0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        rope_frequencies(8, scaling=RopeScaling("dynamic", 2.0))


# ---------------------------------------------------------------- call-time frequency methods


@pytest.mark.parametrize("rotary_dim", [128, 24, 2])
def test_static_ntk_raises_the_base_by_s_to_the_d_over_d_minus_2(rotary_dim):
    s, theta = 6.0, 10000.0
    ours, att = rope_frequencies(rotary_dim, theta, frequency_method("ntk", s, 512))
    base = theta * s ** (rotary_dim / (rotary_dim - 2)) if rotary_dim > 2 else theta
    want = 1.0 / base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    np.testing.assert_allclose(ours, want.astype(np.float32), rtol=1e-7)
    assert att == 1.0


def test_dynamic_ntk_at_factor_1_is_static_ntk_at_the_length_ratio():
    # Hugging Face's dynamic base uses s * T / L - (s - 1): at s = 1 that is T / L, the static NTK factor.
    dynamic = frequency_method("dynamic_ntk", 1.0, 512)
    for seq_len in (512, 1300, 8192):
        got, _ = rope_frequencies(64, 500.0, dynamic, max_position_embeddings=512, seq_len=seq_len)
        want, _ = rope_frequencies(64, 500.0, frequency_method("ntk", seq_len / 512, 512))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name,hf", [("pi", {"rope_type": "linear", "factor": 4.0}),
                                     ("dynamic_ntk", {"rope_type": "dynamic", "factor": 4.0}),
                                     ("yarn", {"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 512})])
def test_frequency_methods_are_the_hf_kinds_at_the_pretraining_length(name, hf):
    """A call-time method resolves exactly as a checkpoint with that `rope_scaling` (whose HF parity is above)."""
    call_time = RopeScheme(64, 512, theta=500.0).rotary(frequency_method(name, 4.0, 512))
    checkpoint = RopeScheme(64, 512, theta=500.0, scaling=RopeScaling.from_hf(hf)).rotary()
    assert FREQUENCY_METHODS[name] == hf["rope_type"]
    if name != "dynamic_ntk":
        assert call_time == checkpoint and call_time.length_rule is None
        return
    for rotary in (call_time, checkpoint):  # the frequencies follow the length, the same for both
        rule = rotary.length_rule
        got, _ = rope_frequencies(rule.rotary_dim, rule.theta, rule.scaling,
                                  max_position_embeddings=rule.max_position_embeddings, seq_len=3000)
        want, _ = rope_frequencies(64, 500.0, RopeScaling("dynamic", 4.0), max_position_embeddings=512, seq_len=3000)
        np.testing.assert_array_equal(got, want)
        assert rotary.inv_freq == tuple(rope_frequencies(64, 500.0)[0])  # up to L_train: the plain frequencies


@pytest.mark.parametrize("last", [0, 511, 4095, 2**31 - 1])
def test_length_rule_constants_are_the_host_ones_at_the_traced_length(last):
    rule = RopeScheme(24, 512, theta=1e4, rotary_dim=8).rotary(frequency_method("dynamic_ntk", 2.0, 512)).length_rule
    got = jax.jit(rule.turn_constants)(jnp.int32(last))
    inv_freq, _ = rope_frequencies(8, 1e4, RopeScaling("dynamic", 2.0), max_position_embeddings=512,
                                   seq_len=last + 1)  # 2**31 for the last: no int32 wrap
    for g, w in zip(got, _turn_constants(tuple(inv_freq.tolist()))):
        np.testing.assert_array_equal(np.asarray(g), w)
    halved = dataclasses.replace(rule, divisor=2).turn_constants(jnp.int32(last))
    for g, w in zip(halved, _turn_constants(tuple((inv_freq / 2).tolist()))):
        np.testing.assert_array_equal(np.asarray(g), w)


def test_rope_scheme_resolution_and_its_errors():
    plain = RopeScheme(24, 256, theta=1e4, rotary_dim=8, layout="interleaved")
    assert plain.rotary() == Rotary.create(24, theta=1e4, rotary_dim=8, layout="interleaved")
    assert plain.rotary(frequency_method("pi", 2.0, 256)).inv_freq == tuple(f / 2 for f in plain.rotary().inv_freq)
    with pytest.raises(ValueError, match="already scales RoPE"):
        RopeScheme(24, 256, scaling=RopeScaling("linear", 2.0)).rotary(frequency_method("yarn", 2.0, 256))
    assert plain.rotary(frequency_method("dynamic_ntk", 2.0, 256)).length_rule.max_position_embeddings == 256
    with pytest.raises(ValueError, match="length_rule.rotary_dim"):
        Rotary((1.0, 0.1), length_rule=plain.rotary(frequency_method("dynamic_ntk", 2.0, 256)).length_rule)
    with pytest.raises(ValueError, match="RopeScaling"):
        plain.rotary("yarn")
    with pytest.raises(ValueError, match="unknown frequency method 'ntk_by_parts'"):
        frequency_method("ntk_by_parts", 2.0, 256)
    with pytest.raises(ValueError, match="pretraining_length"):
        frequency_method("pi", 2.0, 0)
    with pytest.raises(ValueError, match="factor"):
        frequency_method("pi", 0.5, 256)
