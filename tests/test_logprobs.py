"""token_scores against float64 numpy; head_scores chunk by chunk equals the head on every position, and
never holds the (T, vocab) logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lminf_jax.logprobs import head_scores, token_scores


def numpy_scores(logits: np.ndarray, targets: np.ndarray):
    """(log-probabilities, entropy, top-1) of ``targets`` under ``logits``, in float64."""
    x = np.asarray(logits, np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    p = np.exp(logp)
    entropy = -np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0).sum(-1)
    return np.take_along_axis(logp, targets[..., None], -1)[..., 0], entropy, x.argmax(-1) == targets


def test_token_scores_match_float64_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 50)).astype(np.float32) * 4
    logits[0, 0, 7] = -np.inf  # a token the model rules out: no NaN in the entropy
    targets = rng.integers(0, 50, (3, 5))
    targets[1, 2] = logits[1, 2].argmax()
    got = token_scores(jnp.asarray(logits), jnp.asarray(targets))
    want = numpy_scores(logits, targets)
    np.testing.assert_allclose(got.logprobs, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.entropy, want[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.top1, want[2])
    assert got.top1[1, 2] and got.logprobs.dtype == jnp.float32


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_head_scores_in_chunks_equal_the_head_on_every_position(chunk):
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 37, 6)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(6, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 37)), jnp.int32)
    head = lambda h: jnp.tanh(h @ weight) * 3  # noqa: E731  (a soft cap: the head is applied as given)
    got = head_scores(head, hidden, targets, chunk=chunk)
    want = token_scores(head(hidden), targets)
    for name in ("logprobs", "entropy", "top1"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        head_scores(head, hidden, targets, chunk=0)


def test_head_scores_plan_holds_one_chunk_of_logits():
    t, d, v, chunk = 16384, 256, 32000, 512
    weight = jax.ShapeDtypeStruct((d, v), jnp.bfloat16)
    hidden = jax.ShapeDtypeStruct((1, t, d), jnp.bfloat16)
    targets = jax.ShapeDtypeStruct((1, t), jnp.int32)
    fn = lambda w, h, y: head_scores(  # noqa: E731
        lambda x: jnp.einsum("bth,hv->btv", x, w, preferred_element_type=jnp.float32), h, y, chunk=chunk)
    plan = jax.jit(fn).lower(weight, hidden, targets).compile().memory_analysis()
    logits_bytes = t * v * 4  # 2.1 GB
    assert plan.output_size_in_bytes + plan.temp_size_in_bytes < logits_bytes / 8, plan
