"""Sampling: greedy/temperature/top-k/top-p against numpy references and draw frequencies."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lminf_jax import Sampling, filter_logits, sample


def random_logits(seed: int, b: int, v: int, scale: float = 2.0) -> np.ndarray:
    """float32 (b, v) logits with distinct values (continuous draws)."""
    return (np.random.default_rng(seed).standard_normal((b, v)) * scale).astype(np.float32)


def batch_keys(seed: int, b: int) -> jax.Array:
    return jax.random.split(jax.random.key(seed), b)


def softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference_kept(logits: np.ndarray, temperature: float, top_k: int | None = None, top_p: float | None = None,
                   margin: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """(kept mask, ambiguous rows) by HF's order, in float64; logits must be distinct per row.

    A row is ambiguous when a nucleus boundary sits within `margin` of top_p (float32
    rounding in the implementation may then legitimately decide either way).
    """
    x = (np.asarray(logits, np.float32) / np.float32(temperature)).astype(np.float64)
    kept = np.isfinite(x)
    ambiguous = np.zeros(x.shape[0], bool)
    for r in range(x.shape[0]):
        order = np.argsort(-x[r], kind="stable")
        order = order[np.isfinite(x[r, order])]
        if top_k is not None:
            kept[r, order[top_k:]] = False
            order = order[:top_k]
        if top_p is not None:
            probs = softmax64(x[r, order])
            before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
            kept[r, order[before >= top_p]] = False
            ambiguous[r] = np.any(np.abs(before - top_p) < margin)
            # The reference nucleus is minimal: it reaches top_p and the last kept token is needed.
            n = int(np.sum(before < top_p))
            assert probs[:n].sum() >= top_p - margin and probs[: n - 1].sum() < top_p + margin
    return kept, ambiguous


def kept_set(logits, sampling: Sampling) -> np.ndarray:
    out = filter_logits(jnp.asarray(logits), sampling)
    assert out.dtype == jnp.float32
    return np.isfinite(np.asarray(out))


# ----- Sampling: validation, hashing, describe ----------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": "1.0"}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -3}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": True}, "top_p"),
    ],
)
def test_invalid_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        Sampling(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_sampling_hashes_normalises_and_describes():
    assert Sampling(1, 40, 1) == Sampling(1.0, 40, 1.0)
    assert hash(Sampling(1, 40, 1)) == hash(Sampling(1.0, 40, 1.0))
    assert isinstance(Sampling(temperature=2).temperature, float)
    assert isinstance(Sampling(top_k=np.int64(3)).top_k, int)
    assert Sampling().greedy and Sampling(top_k=5, top_p=0.5).greedy
    assert not Sampling(temperature=1e-3).greedy
    assert Sampling().describe() == "greedy"
    assert Sampling(top_k=5).describe() == "greedy"
    assert Sampling(0.8, 40, 0.95).describe() == "temperature=0.8, top_k=40, top_p=0.95"
    assert Sampling(0.8, top_p=0.9).describe() == "temperature=0.8, top_p=0.9"


def test_sample_rejects_mismatched_keys_and_non_float_logits():
    logits = jnp.asarray(random_logits(0, 4, 10))
    with pytest.raises(ValueError, match="keys"):
        sample(logits, batch_keys(0, 3), Sampling(1.0))
    with pytest.raises(ValueError, match="keys"):
        sample(logits, jax.random.key(0), Sampling(1.0))
    with pytest.raises(ValueError, match="logits"):
        sample(jnp.arange(40).reshape(4, 10), batch_keys(0, 4), Sampling(1.0))
    with pytest.raises(TypeError, match="Sampling"):
        sample(logits, batch_keys(0, 4), None)


# ----- shared inputs (one shape, so compilations are reused across tests) --------------------

B, V = 128, 60
LOGITS = random_logits(100, B, V)
KEYS = batch_keys(100, B)
COMBINED = Sampling(0.9, top_k=20, top_p=0.95)


def draws_in(kept: np.ndarray, draws) -> bool:
    return bool(kept[np.arange(kept.shape[0]), np.asarray(draws)].all())


# ----- greedy limits ------------------------------------------------------------------------


def test_greedy_is_argmax_lowest_index_on_ties():
    logits = LOGITS.copy()
    logits[0, [3, 20]] = 100.0  # tie: lowest index wins
    got = np.asarray(sample(jnp.asarray(logits), KEYS, Sampling()))
    assert got.dtype == np.int32 and got.shape == (B,)
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    assert got[0] == 3
    np.testing.assert_array_equal(kept_set(logits, Sampling()), np.eye(V, dtype=bool)[np.argmax(logits, axis=-1)])


@pytest.mark.parametrize("sampling", [Sampling(0.3, top_k=1), Sampling(5.0, top_k=1), Sampling(5.0, top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_equal_greedy(sampling):
    for seed in (0, 1):
        logits = random_logits(seed, B, V)
        got = np.asarray(sample(jnp.asarray(logits), batch_keys(seed, B), sampling))
        np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))


# ----- keys ---------------------------------------------------------------------------------


def test_fixed_keys_repeat_and_different_keys_differ():
    logits = jnp.asarray(LOGITS / 3)  # flatter, so most rows keep many tokens
    first = np.asarray(sample(logits, KEYS, COMBINED))
    np.testing.assert_array_equal(first, np.asarray(sample(logits, batch_keys(100, B), COMBINED)))
    other = np.asarray(sample(logits, batch_keys(101, B), COMBINED))
    assert np.mean(first != other) > 0.5
    assert np.mean(first != np.argmax(LOGITS, axis=-1)) > 0.5  # not collapsed to the argmax


def test_raw_and_typed_keys_agree():
    raw = jax.random.key_data(KEYS)
    assert raw.shape == (B, 2) and raw.dtype == jnp.uint32
    logits = jnp.asarray(LOGITS)
    np.testing.assert_array_equal(np.asarray(sample(logits, raw, COMBINED)), np.asarray(sample(logits, KEYS, COMBINED)))


def test_row_independence():
    logits = jnp.asarray(LOGITS / 3)
    batch = np.asarray(sample(logits, KEYS, COMBINED))
    for b in range(0, B, 16):
        assert int(sample(logits[b : b + 1], KEYS[b : b + 1], COMBINED)[0]) == batch[b]
    perm = np.random.default_rng(6).permutation(B)
    np.testing.assert_array_equal(np.asarray(sample(logits[perm], KEYS[perm], COMBINED)), batch[perm])
    # Replacing the other rows' logits leaves a row's sample unchanged.
    others = jnp.asarray(random_logits(7, B, V)).at[5].set(logits[5])
    assert int(sample(others, KEYS, COMBINED)[5]) == batch[5]


# ----- frequencies --------------------------------------------------------------------------

SMALL = np.array([1.2, -0.4, 0.3, 2.0, -1.5, 0.8], np.float32)
N_DRAWS = 20000
SIGMAS = 4.5


def draw_frequencies(logits: np.ndarray, sampling: Sampling, seed: int) -> np.ndarray:
    """Token frequencies of N_DRAWS draws from one row, vmapped over keys."""
    row = jnp.asarray(logits)[None]
    draws = jax.vmap(lambda key: sample(row, key[None], sampling)[0])(batch_keys(seed, N_DRAWS))
    return np.bincount(np.asarray(draws), minlength=logits.shape[-1]) / N_DRAWS


def deviation(freq: np.ndarray, expected: np.ndarray) -> float:
    """Largest |freq - expected| in binomial standard deviations (infinite for impossible draws)."""
    sd = np.sqrt(expected * (1 - expected) / N_DRAWS)
    dev = np.where(sd > 0, np.abs(freq - expected) / np.where(sd > 0, sd, 1.0), np.where(freq > 0, np.inf, 0.0))
    return float(dev.max())


def test_frequencies_match_tempered_softmax():
    temperature = 0.6
    expected = softmax64(SMALL / temperature)
    freq = draw_frequencies(SMALL, Sampling(temperature), seed=7)
    assert deviation(freq, expected) < SIGMAS
    assert np.sum((freq - expected) ** 2 / expected) * N_DRAWS < 25.7  # chi-square, 5 dof, p = 1e-4
    # The bound is tight enough to reject a missing or inverted temperature.
    assert deviation(freq, softmax64(SMALL)) > 3 * SIGMAS
    assert deviation(freq, softmax64(SMALL * temperature)) > 3 * SIGMAS


def test_frequencies_renormalised_over_kept_set():
    s = Sampling(1.4, top_k=4, top_p=0.7)
    kept, ambiguous = reference_kept(SMALL[None], 1.4, 4, 0.7)
    assert not ambiguous[0] and 1 < kept.sum() < 4  # both filters bite
    np.testing.assert_array_equal(kept_set(SMALL[None], s), kept)
    expected = np.where(kept[0], softmax64(np.where(kept[0], SMALL / 1.4, -np.inf)), 0.0)
    freq = draw_frequencies(SMALL, s, seed=8)
    assert deviation(freq, expected) < SIGMAS
    # Rejects the kept tokens' un-renormalised probabilities with the excess on the argmax.
    unnormalised = np.where(kept[0], softmax64(SMALL / 1.4), 0.0)
    unnormalised[np.argmax(SMALL)] += 1 - unnormalised.sum()
    assert deviation(freq, unnormalised) > 3 * SIGMAS


# ----- kept sets against numpy --------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 17, 60, 100])
def test_top_k_keeps_exactly_the_k_largest(top_k):
    s = Sampling(0.3, top_k=top_k)
    kept = kept_set(LOGITS, s)
    expected, _ = reference_kept(LOGITS, 0.3, top_k)
    np.testing.assert_array_equal(kept, expected)
    assert (kept.sum(axis=-1) == min(top_k, V)).all()
    out = np.asarray(filter_logits(jnp.asarray(LOGITS), s))
    np.testing.assert_allclose(out[kept], (LOGITS / np.float32(0.3))[kept], rtol=1e-6)
    if top_k in (1, 17):
        assert draws_in(kept, sample(jnp.asarray(LOGITS), KEYS, s))


def test_filters_keep_ties_at_the_boundary():
    logits = jnp.asarray([[3.0, 2.0, 2.0, 1.0, 0.5]])
    np.testing.assert_array_equal(kept_set(logits, Sampling(1.0, top_k=2)), [[True, True, True, False, False]])
    flat = jnp.zeros((1, 5)) + 0.25
    assert kept_set(flat, Sampling(1.0, top_p=0.1)).all()


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_minimal_nucleus(top_p):
    temperature = 1.5
    logits = LOGITS.copy()
    logits[:16, 7] = logits[:16].max(axis=-1) + 25.0  # a token holding more than top_p alone
    s = Sampling(temperature, top_p=top_p)
    kept = kept_set(logits, s)
    expected, ambiguous = reference_kept(logits, temperature, None, top_p)
    assert ambiguous.sum() < 4
    np.testing.assert_array_equal(kept[~ambiguous], expected[~ambiguous])
    assert (kept[:16].sum(axis=-1) == 1).all() and kept[:16, 7].all()
    if top_p >= 0.5:
        assert kept[16:].sum(axis=-1).max() > 1
    if top_p == 0.9:
        assert draws_in(kept, sample(jnp.asarray(logits), KEYS, s))


@pytest.mark.parametrize("sampling", [Sampling(0.7, top_k=10, top_p=0.8), Sampling(2.0, top_k=5, top_p=0.5), COMBINED])
def test_combined_filters_match_reference(sampling):
    kept = kept_set(LOGITS, sampling)
    expected, ambiguous = reference_kept(LOGITS, sampling.temperature, sampling.top_k, sampling.top_p)
    assert ambiguous.sum() < 4
    np.testing.assert_array_equal(kept[~ambiguous], expected[~ambiguous])
    # The data tells the orders apart: a nucleus of the full softmax, cut to the top k, is
    # larger in some rows than the nucleus of the renormalised top-k distribution.
    full, _ = reference_kept(LOGITS, sampling.temperature, None, sampling.top_p)
    top_k_only, _ = reference_kept(LOGITS, sampling.temperature, sampling.top_k)
    assert ((full & top_k_only).sum(axis=-1) > expected.sum(axis=-1)).any()
    if sampling == COMBINED:
        assert draws_in(kept, sample(jnp.asarray(LOGITS), KEYS, sampling))


def test_neg_inf_logits_never_sampled():
    logits = LOGITS.copy()
    masked = np.random.default_rng(12).random((B, V)) < 0.7
    masked[:, 0] = False
    logits[:, 1] = 50.0  # the most likely raw token is masked everywhere
    masked[:, 1] = True
    logits[masked] = -np.inf
    for s in (Sampling(), Sampling(1e4), COMBINED):
        assert not (kept_set(logits, s) & masked).any(), s
        assert draws_in(~masked, sample(jnp.asarray(logits), KEYS, s)), s
    # top_k above the finite count and top_p near 1 put the thresholds at -inf.
    kept = kept_set(logits, Sampling(10.0, top_k=V - 1, top_p=0.999999))
    np.testing.assert_array_equal(kept, ~masked)


# ----- transformations and dtypes -----------------------------------------------------------


def test_jit_static_sampling_scan_while_loop_and_vmap():
    steps = 3
    step_logits = jnp.asarray(random_logits(13, steps * B, V, scale=0.7)).reshape(steps, B, V)
    step_keys = jax.random.split(jax.random.key(14), (steps, B))
    looped = np.stack([np.asarray(sample(step_logits[t], step_keys[t], COMBINED)) for t in range(steps)])

    @functools.partial(jax.jit, static_argnames="sampling")
    def transformed(xs, keys, sampling):
        _, scanned = jax.lax.scan(lambda c, x: (c, sample(x[0], x[1], sampling)), 0, (xs, keys))

        def body(state):
            t, out = state
            return t + 1, out.at[t].set(sample(xs[t], keys[t], sampling))

        _, looped_ = jax.lax.while_loop(lambda st: st[0] < steps, body, (0, jnp.zeros((steps, B), jnp.int32)))
        return scanned, looped_, jax.vmap(lambda x, k: sample(x, k, sampling))(xs, keys)

    # An equal Sampling built separately is an equal static argument.
    for sampling in (COMBINED, Sampling(0.9, top_k=20, top_p=0.95)):
        for got in transformed(step_logits, step_keys, sampling=sampling):
            np.testing.assert_array_equal(np.asarray(got), looped)


@pytest.mark.parametrize("sampling", [Sampling(), COMBINED])
def test_bf16_logits_match_their_float32_values(sampling):
    logits = jnp.asarray(LOGITS).astype(jnp.bfloat16)
    got = sample(logits, KEYS, sampling)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(sample(logits.astype(jnp.float32), KEYS, sampling)))
    assert filter_logits(logits, sampling).dtype == jnp.float32
