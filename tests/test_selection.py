"""Selection: the one choice (`Selection.choose`) that top-k middle tokens, LongHeads and InfLLM declare,
judged against a float64 numpy ranking, and each method's declaration."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lminf_jax import InfLLM, LMInfinite, LongHeads, Selection, SlidingWindow, TopK, Vanilla


def _selection(count: int, scope: str = "head") -> Selection:
    return Selection(unit=1, count=count, scope=scope, every="query", distance=3, candidates="c", score="s")


def _numpy_choice(scores: np.ndarray, candidates: np.ndarray, count: int) -> list[list[int]]:
    """Per row: the candidates of the ``count`` largest scores, best first (ties: lower index first)."""
    rows = []
    for s, c in zip(scores.reshape(-1, scores.shape[-1]), np.broadcast_to(candidates, scores.shape).reshape(
            -1, scores.shape[-1])):
        ranked = sorted(np.flatnonzero(c), key=lambda j: (-s[j], j))
        rows.append(ranked[:count])
    return rows


@pytest.mark.parametrize("count", [1, 3, 9])
def test_choose_takes_the_best_candidates_best_first(count):
    rng = np.random.default_rng(count)
    scores = rng.standard_normal((4, 3, 9))
    candidates = rng.random((4, 3, 9)) < 0.6
    chosen = _selection(count).choose(jnp.asarray(scores, jnp.float32), jnp.asarray(candidates))
    want = _numpy_choice(scores, candidates, count)
    index = np.asarray(chosen.index).reshape(-1, min(count, 9))
    valid = np.asarray(chosen.valid).reshape(index.shape)
    for row, (i, v, w) in enumerate(zip(index, valid, want)):
        assert i[v].tolist() == w, row  # the winners, best first
        assert v.sum() == len(w)  # fewer candidates than count: the rest are marked invalid
    picked = np.take_along_axis(scores, np.asarray(chosen.index), -1)
    np.testing.assert_allclose(np.asarray(chosen.scores)[np.asarray(chosen.valid)],
                               picked[np.asarray(chosen.valid)], rtol=1e-6)
    assert np.all(np.isneginf(np.asarray(chosen.scores)[~np.asarray(chosen.valid)]))


def test_a_layer_scope_chooses_once_by_the_heads_summed_scores():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((5, 12))  # (heads, units)
    candidates = np.arange(12) < 10
    chosen = _selection(4, "layer").choose(jnp.asarray(scores, jnp.float32), jnp.asarray(candidates), head_axis=0)
    assert np.asarray(chosen.index).tolist() == _numpy_choice(scores.sum(0), candidates, 4)[0]
    # per head, the same scores choose differently
    per_head = _selection(4).choose(jnp.asarray(scores, jnp.float32), jnp.asarray(candidates))
    assert len({tuple(r) for r in np.asarray(per_head.index).tolist()}) > 1
    with pytest.raises(ValueError, match="head_axis must be given"):
        _selection(4, "layer").choose(jnp.asarray(scores), jnp.asarray(candidates))
    with pytest.raises(ValueError, match="takes no head_axis"):
        _selection(4).choose(jnp.asarray(scores), jnp.asarray(candidates), head_axis=0)


@pytest.mark.parametrize("make,field", [
    (lambda: _selection(0), "selection.count"),
    (lambda: Selection(0, 1, "head", "query", None, "c", "s"), "selection.unit"),
    (lambda: Selection(1, 1, "head", "query", -1, "c", "s"), "selection.distance"),
    (lambda: Selection(1, 1, "heads", "query", None, "c", "s"), "selection.scope"),
    (lambda: Selection(1, 1, "head", "token", None, "c", "s"), "selection.every"),
])
def test_bad_declarations_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_the_three_methods_declare_one_selection_each():
    top_k = LMInfinite(2, 64, top_k=TopK(5, from_layer=1)).selection
    assert (top_k.unit, top_k.count, top_k.scope, top_k.every, top_k.distance) == (1, 5, "head", "last query", 32)
    longheads = LongHeads(chunk_size=16, span=128).selection
    assert (longheads.unit, longheads.count, longheads.scope, longheads.every, longheads.distance) == (
        16, 128 // 16 - 3, "head", "query", None)
    infllm = InfLLM(global_branch=4, local_branch=32, block_size=8, blocks_retrieved=3, step_size=16).selection
    assert (infllm.unit, infllm.count, infllm.scope, infllm.every, infllm.distance) == (8, 3, "layer", "step", 31)
    assert infllm.keys == 24
    assert Vanilla().selection is None and LMInfinite(2, 64).selection is None
    assert SlidingWindow(16, top_k=TopK(2)).selection.distance == 8
    assert "re-numbered contiguously" in longheads.describe() and "scored at distance 31" in infllm.describe()
    with pytest.raises(ValueError, match="insert_distance"):
        _ = TopK().selection  # unset until a method places it
