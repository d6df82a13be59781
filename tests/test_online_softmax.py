"""The online softmax against a float64 softmax: pieces folded one by one, merged, and finished
results merged again give the one-pass result; empty and poisoned rows."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lminf_jax.online_softmax import (
    SoftmaxState,
    softmax_finish,
    softmax_init,
    softmax_merge,
    softmax_state_of,
    softmax_update,
)


def _scores_and_values(seed: int, rows: int = 5, keys: int = 24, dv: int = 3):
    rng = np.random.default_rng(seed)
    scores = (4 * rng.standard_normal((rows, keys))).astype(np.float32)
    scores[rng.random((rows, keys)) < 0.3] = -np.inf  # keys a row does not attend
    scores[0] = -np.inf  # a row that attends nothing
    return scores, rng.standard_normal((keys, dv)).astype(np.float32)


def _want(scores: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = scores.astype(np.float64)
    top = np.max(s, axis=1, keepdims=True)
    w = np.exp(s - np.where(np.isfinite(top), top, 0.0))
    total = w.sum(1)
    out = np.where(total[:, None] > 0, (w @ values) / np.where(total > 0, total, 1)[:, None], 0.0)
    with np.errstate(divide="ignore"):
        return out, np.where(total > 0, top[:, 0] + np.log(total), -np.inf)


def _fold(state: SoftmaxState, scores, values) -> SoftmaxState:
    return softmax_update(state, jnp.asarray(scores), lambda p: p @ jnp.asarray(values))


@pytest.mark.parametrize("cuts", [(24,), (5, 24), (1, 7, 8, 20, 24)])
def test_pieces_folded_in_turn_give_the_one_pass_softmax(cuts):
    scores, values = _scores_and_values(1)
    state, start = softmax_init((5,), 3), 0
    for end in cuts:
        state = _fold(state, scores[:, start:end], values[start:end])
        start = end
    out, lse = softmax_finish(state)
    want_out, want_lse = _want(scores, values)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6)
    assert np.all(np.asarray(out)[0] == 0) and lse[0] == -np.inf


def test_merged_states_and_merged_results_equal_one_pass():
    scores, values = _scores_and_values(2)
    a = _fold(softmax_init((5,), 3), scores[:, :10], values[:10])
    b = _fold(softmax_init((5,), 3), scores[:, 10:], values[10:])
    want_out, want_lse = _want(scores, values)
    for merged in (softmax_merge(a, b), softmax_merge(softmax_state_of(*softmax_finish(a)), b),
                   softmax_merge(softmax_state_of(*softmax_finish(a)), softmax_state_of(*softmax_finish(b)))):
        out, lse = softmax_finish(merged)
        np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-6)


def test_a_poisoned_row_finishes_as_nan_and_stays_so_through_a_merge():
    scores, values = _scores_and_values(3)
    rows = np.array([False, True, False, False, True])
    for dtype in (bool, jnp.float32):
        state = softmax_update(softmax_init((5,), 3, poisoned_dtype=dtype), jnp.asarray(scores),
                               lambda p: p @ jnp.asarray(values), jnp.asarray(rows))
        out, lse = softmax_finish(state)
        assert np.isnan(np.asarray(out)[rows]).all() and np.isfinite(np.asarray(out)[~rows]).all()
        assert np.isfinite(np.asarray(lse)[rows]).all()  # the scores themselves were fine
        again, _ = softmax_finish(softmax_merge(softmax_state_of(out, lse), softmax_init((5,), 3)))
        np.testing.assert_array_equal(np.isnan(np.asarray(again)).any(1), rows)
