"""tasks.ruler_scoring: RULER's string-match metrics and the mean per task, length and depth."""

from __future__ import annotations

import dataclasses

import pytest
from ruler_examples import make

from lminf_jax.tasks import ruler_scoring


def test_string_match_scores_follow_ruler():
    outputs = ["5532642", "Abc-Def", "1234567"]
    assert ruler_scoring.string_match_all(" 5532642, abc-def and 1234567.", outputs) == 1.0
    assert ruler_scoring.string_match_all("5532642 and ABC-DEF", outputs) == pytest.approx(2 / 3)
    assert ruler_scoring.string_match_all("", outputs) == 0.0
    assert ruler_scoring.string_match_part("the answer is ABC-def", outputs) == 1.0
    assert ruler_scoring.string_match_part("", outputs) == 0.0
    inst = make("niah_multivalue", 1000)
    assert ruler_scoring.score(inst, " " + ", ".join(inst.outputs).upper()) == 1.0
    assert ruler_scoring.score(inst, inst.outputs[1]) == 0.25


def test_aggregate_averages_per_task_length_and_depth():
    base = make("niah_single_1", 300)
    insts = [dataclasses.replace(base, depth=d, outputs=(o,)) for d, o in ((0.0, "a"), (0.0, "b"), (1.0, "a"))]
    insts.append(dataclasses.replace(make("fwe", 300), outputs=("x", "y")))
    table = ruler_scoring.aggregate(insts, ["A", "nothing", "no", "X"])
    assert table == {("niah_single_1", 300, 0.0): {"score": 0.5, "n": 2},
                     ("niah_single_1", 300, 1.0): {"score": 0.0, "n": 1},
                     ("fwe", 300, None): {"score": 0.5, "n": 1}}
    with pytest.raises(ValueError, match="predictions"):
        ruler_scoring.aggregate(insts, ["A"])

