"""tasks.ruler_jsonl: RULER instances written as jsonl and read back, every line checked."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from ruler_examples import TOKENIZER, make

from lminf_jax.tasks import ruler, ruler_jsonl


def test_jsonl_round_trips_and_checks_the_version(tmp_path):
    instances = ruler.generate_grid(["niah_single_1", "vt", "fwe"], TOKENIZER, [600], [0.0, None], samples=2, seed=7)
    assert len(instances) == 2 * 2 + 2 * 2 + 2 and {i.seed for i in instances} == {7, 8}
    path = tmp_path / "ruler.jsonl"
    ruler_jsonl.write_jsonl(instances, path)
    lines = path.read_text().splitlines()
    assert len(lines) == len(instances) and all(json.loads(line)["version"] == ruler_jsonl.VERSION for line in lines)
    assert ruler_jsonl.read_jsonl(path) == instances
    record = json.loads(lines[0])
    path.write_text(json.dumps({**record, "version": ruler_jsonl.VERSION + 1}) + "\n")
    with pytest.raises(ValueError, match="not a version"):
        ruler_jsonl.read_jsonl(path)


@pytest.mark.parametrize("line, message", [
    ({"length": 10**6}, "length 1000000 and tokens 300 disagree: niah_single_1 prompts have length - 4 <= tokens"),
    ({"tokens": 302}, "length 300 and tokens 302 disagree"),
    ({"needle_positions": [10**9]},
     "needle_positions must be 1 integer(s) in [0, 299] (one per output), got [1000000000]"),
    ({"needle_positions": [-1]}, "needle_positions must be 1 integer(s) in [0, 299]"),
    ({"needle_positions": [1.5]}, "needle_positions must be 1 integer(s) in [0, 299]"),
    ({"needle_positions": [3, 4]}, "needle_positions must be 1 integer(s)"),
    ({"outputs": []}, "outputs must be a non-empty list of non-empty strings, got []"),
    ({"outputs": [""]}, "outputs must be a non-empty list of non-empty strings"),
    ({"outputs": "1234567"}, "outputs must be a non-empty list of non-empty strings"),
    ({"depth": 1.5}, "depth must be a number in [0, 1] or null, got 1.5"),
    ({"depth": "0.5"}, "depth must be a number in [0, 1] or null, got '0.5'"),
    ({"task": "qa_1"}, "task 'qa_1' is not a RULER task; known: niah_single_1"),
    ({"length": "300"}, "length must be a positive integer, got '300'"),
    ({"seed": -1}, "seed must be a non-negative integer, got -1"),
    ({"prompt": ""}, "prompt must be a non-empty string"),
    ({"answer_prefix": None}, "answer_prefix must be a string"),
    ({"haystack": [0, 301]}, "haystack must be [start, end] with 0 <= start <= end <= tokens = 300, got [0, 301]"),
    ({"haystack": [5]}, "haystack must be [start, end]"),
    ({"max_new_tokens": 5}, "max_new_tokens must be 128 (RULER's for niah_single_1), got 5"),
    ({"colour": "red"}, "unknown key(s): colour"),
    ({"outputs": ..., "tokens": ...}, "missing key(s): outputs, tokens"),
    ({"version": True}, "not a version 1 RULER instance"),
    ("{", "not JSON"),
    ("[1]", "not a version 1 RULER instance"),
])
def test_instances_files_are_checked_line_by_line(tmp_path, line, message):
    inst = dataclasses.replace(make("niah_single_1", 300), tokens=300, haystack=(3, 290), needle_positions=(100,))
    path = tmp_path / "i.jsonl"
    ruler_jsonl.write_jsonl([inst], path)
    good = path.read_text()
    if isinstance(line, dict):
        line = json.dumps({k: v for k, v in {**json.loads(good), **line}.items() if v is not ...})  # ...: left out
    path.write_text(good + line + "\n")
    with pytest.raises(ValueError) as error:
        ruler_jsonl.read_jsonl(path)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)


def test_instances_without_needles_must_say_so(tmp_path):
    inst = make("fwe", 300)
    path = tmp_path / "i.jsonl"
    for change, message in (({"depth": 0.5}, "fwe has no needle: depth must be null, got 0.5"),
                            ({"needle_positions": (3,)}, "needle_positions must be [] (fwe has no needle), got [3]")):
        ruler_jsonl.write_jsonl([dataclasses.replace(inst, **change)], path)
        with pytest.raises(ValueError, match=re.escape(f"{path}:1: {message}")):
            ruler_jsonl.read_jsonl(path)

