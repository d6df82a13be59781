"""experiments.ruler: RULER's synthetic tasks at an exact token length and depth, jsonl, scoring."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lminf_jax.converters.tokenizer import load_tokenizer
from lminf_jax.experiments import ruler
from lminf_jax.experiments.loading import load_tokenizer_from

TOKENIZER = load_tokenizer(Path(__file__).resolve().parents[1] / "experiments" / "shipped" / "llama-small-stdlib")
TEXT = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text(encoding="utf-8")
#: Lengths per task: the shortest prompts of vt (its one-shot example), niah_multiquery (four keys
#: asked twice) and cwe (60 list entries and an example) do not fit in 256 tokens.
LENGTHS = {**{t: (256, 1000, 4096) for t in ruler.TASKS}, "vt": (512, 1000, 4096),
           "niah_multiquery": (512, 1000, 4096), "cwe": (1500, 4096)}
NEEDLE = re.compile(r"One of the special magic \w+ for \S+ is: \S+\.\n?")
VT_LINE = re.compile(r"VAR [A-Z]+ = (?:VAR [A-Z]+|\d+)")


def make(task: str, length: int, depth: float | None = 0.5, seed: int = 0) -> ruler.Instance:
    return ruler.generate(task, TOKENIZER, length, None if task in ("cwe", "fwe") else depth, seed, TEXT)


def ids(inst: ruler.Instance) -> list[int]:
    return ruler.prompt_tokens(TOKENIZER, inst.prompt, inst.answer_prefix)


def n_tokens(text: str) -> int:
    return len(TOKENIZER.encode(text))


@pytest.mark.parametrize("task", ruler.TASKS)
def test_prompts_have_the_requested_token_length(task):
    for length in LENGTHS[task]:
        inst = make(task, length)
        assert length - ruler.SLACK[task] <= len(ids(inst)) == inst.tokens <= length
        assert inst.prompt.startswith(("Some special", "A special", "Memorize", "Below is", "Read the"))
        assert inst.max_new_tokens == ruler.MAX_NEW_TOKENS[task]


@pytest.mark.parametrize("task", [t for t in ruler.TASKS if t not in ("cwe", "fwe")])
def test_needles_sit_at_the_requested_depth_of_the_haystack(task):
    for length in (1000, 4096):
        for depth in (0.0, 0.3, 1.0):
            inst = make(task, length, depth)
            tokens = ids(inst)
            start, end = inst.haystack
            assert 0 < start <= inst.needle_positions[0] < end < len(tokens)
            context = TOKENIZER.decode(tokens[start:end])
            if task == "vt":
                inserted, unit = VT_LINE.findall(context), 0
            elif ruler.NIAH[task].haystack == "needle":
                inserted = [m for m in NEEDLE.findall(context) if inst.outputs[0] in m]
                unit = n_tokens(inserted[0])  # the haystack's units are needles as long as this one
            else:
                inserted, unit = NEEDLE.findall(context), 0
            cfg = ruler.NIAH.get(task)
            expected = (ruler.VT_HOPS + 1 if cfg is None else 1 if cfg.haystack == "needle"
                        else max(cfg.keys, cfg.queries) * cfg.values)
            assert len(inserted) == expected
            target = next(s for s in inserted if inst.outputs[0] in s)
            before_target = context[:context.index(target)]
            before = sum(n_tokens(s) for s in inserted if context.index(s) < context.index(target))
            own = end - start - sum(n_tokens(s) for s in inserted)
            at = n_tokens(before_target) - before
            assert abs(at - depth * own) <= 0.01 * own + unit / 2 + 4, (length, depth, at, own)
            assert abs(inst.needle_positions[0] - start - n_tokens(before_target)) <= 1


@pytest.mark.parametrize("task", [t for t in ruler.TASKS if t not in ("cwe", "fwe")])
def test_each_needle_position_points_at_its_output(task):
    inst = make(task, 1000, None, seed=3)
    tokens = ids(inst)
    assert len(inst.needle_positions) == len(inst.outputs)
    for pos, out in zip(inst.needle_positions, inst.outputs):
        piece = TOKENIZER.decode(tokens[pos:pos + 100])
        needle = f"VAR {out} = " if task == "vt" else "One of the special magic"
        assert 0 <= piece.find(needle) <= 2 and pos > 0 and needle not in TOKENIZER.decode(tokens[pos - 1:pos + 1])
        assert task == "vt" or out in piece[piece.find(needle):].split("\n")[0]


def test_niah_questions_and_answers_follow_ruler():
    single = make("niah_single_1", 1000)
    key = re.search(r"for (\S+) mentioned", single.prompt).group(1)
    assert single.prompt.startswith("A special magic number is hidden within the following text.")
    assert single.prompt.endswith(f"What is the special magic number for {key} mentioned in the provided text?")
    assert single.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    assert f"One of the special magic numbers for {key} is: {single.outputs[0]}." in single.prompt
    assert re.fullmatch(r"\d{7}", single.outputs[0]) and "The grass is green. The sky is blue." in single.prompt
    uuids = make("niah_multikey_3", 1000)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuids.outputs[0])
    assert len(NEEDLE.findall(uuids.prompt)) >= 8  # a haystack of distractor needles
    query = make("niah_multiquery", 1000)
    keys = re.search(r"numbers for (.+) mentioned in the provided text\?$", query.prompt).group(1)
    assert query.prompt.startswith("Some special magic numbers are hidden") and keys.count(", ") == 3
    assert ", and " in keys and query.answer_prefix.endswith("text are") and len(set(query.outputs)) == 4
    values = make("niah_multivalue", 1000)
    key = re.search(r"numbers for (\S+) mentioned", values.prompt).group(1)
    assert sorted(values.outputs) == sorted(re.findall(rf"for {key} is: (\d+)\.", values.prompt))


def test_vt_chain_resolves_to_the_expected_variables():
    inst = make("vt", 1000)
    main = inst.prompt[inst.prompt.rindex("Memorize and track"):]
    value = re.search(r"assigned the value (\d+) in", main).group(1)
    found = [re.search(rf"VAR (\w+) = {value} ", main).group(1)]
    while m := re.search(rf"VAR (\w+) = VAR {found[-1]}\b", main):
        found.append(m.group(1))
    assert found == list(inst.outputs) and len(found) == ruler.VT_HOPS + 1
    assert f"{ruler.VT_HOPS + 1} variables are assgined the value {value}, they are: " in inst.answer_prefix
    assert inst.prompt.count("Memorize and track") == 2  # the one-shot example first


def test_cwe_answer_is_the_ten_most_common_words_of_the_list():
    for length in (1500, 8192):
        inst = make("cwe", length)
        main = inst.prompt[inst.prompt.rindex("most often.\n") + len("most often.\n"):inst.prompt.rindex("\nQuestion")]
        counts = collections.Counter(re.findall(r"\d+\. (\w+)", main))
        top = sorted(counts.values(), reverse=True)
        assert set(inst.outputs) == {w for w, _ in counts.most_common(10)} and top[9] > top[10]
        assert top[0] == (30 if length >= 4096 else 6)  # RULER's repeats
        assert inst.answer_prefix == ruler.CWE_ANSWER


def test_fwe_answer_is_the_three_most_frequent_coded_words():
    inst = make("fwe", 1000)
    context = inst.prompt[len("Read the following coded text"):inst.prompt.rindex("\nQuestion")]
    counts = collections.Counter(w for w in context.split()[13:] if w != "...")
    assert [w for w, _ in counts.most_common(3)] == list(inst.outputs)
    assert sorted(counts.values(), reverse=True)[2] > sorted(counts.values(), reverse=True)[3]
    assert context.split().count("...") > counts.most_common(1)[0][1]  # rank 1 is the noise


def test_generation_is_reproducible_and_differs_across_seeds():
    for task in ruler.TASKS:
        length = LENGTHS[task][0]
        a, b, c = make(task, length, seed=5), make(task, length, seed=5), make(task, length, seed=6)
        assert a == b and a.seed == 5
        assert a.prompt != c.prompt and a.outputs != c.outputs


def test_too_short_lengths_and_bad_arguments_fail_clearly():
    for task, length in (("vt", 256), ("cwe", 256), ("niah_multiquery", 128), ("fwe", 100)):
        with pytest.raises(ValueError, match="too short"):
            make(task, length)
    with pytest.raises(ValueError, match="depth must be None"):
        ruler.generate("cwe", TOKENIZER, 2000, 0.5, 0)
    with pytest.raises(ValueError, match=r"depth must lie in \[0, 1\]"):
        ruler.generate("niah_single_1", TOKENIZER, 1000, 1.5, 0)
    with pytest.raises(ValueError, match="needs a text haystack"):
        ruler.generate("niah_single_2", TOKENIZER, 1000, 0.5, 0)
    with pytest.raises(ValueError, match="ran out"):
        ruler.generate("niah_single_2", TOKENIZER, 1000, 0.5, 0, TEXT[:2000])
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.generate("qa_1", TOKENIZER, 1000, 0.5, 0)


def test_a_task_too_short_for_a_length_is_skipped_there_and_said_so(capsys):
    args = argparse.Namespace(instances=None, tasks=["fwe", "cwe"], lengths=[300, 1500], multiples=None,
                              depths=None, samples=1, seed=0)
    instances, source = ruler.make_instances(args, TOKENIZER, 512)
    assert sorted((i.task, i.length) for i in instances) == [("cwe", 1500), ("fwe", 300), ("fwe", 1500)]
    assert list(source["generated"]["skipped"]) == ["cwe@300"]
    assert "length 300 is too short for cwe" in source["generated"]["skipped"]["cwe@300"]
    assert "skipping cwe at 300 tokens: length 300 is too short for cwe" in capsys.readouterr().err
    record = {"settings": {"lengths": [300, 1500], "tasks": ["fwe", "cwe"]},
              "instances": [{"task": i.task, "length": i.length} for i in instances],
              "methods": {"vanilla": {"cells": {}}},
              "scores": {"vanilla": {"fwe": {"300": {"all": 0.5}, "1500": {"all": 0.25}}, "cwe": {"1500": {"all": 1.0}}}}}
    lines = ruler.format_table(record).splitlines()
    assert lines[-2:] == ["average of fwe", "  vanilla" + " " * 15 + "     50.0     25.0"]
    assert lines[lines.index("cwe") + 1].split() == ["vanilla", "-", "100.0"]
    with pytest.raises(ValueError, match="no task can be made at 300 tokens: cwe@300: length 300 is too short"):
        ruler.make_instances(argparse.Namespace(**{**vars(args), "tasks": ["cwe"], "lengths": [300]}), TOKENIZER, 512)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_the_trained_answer_of_every_task_scores_full_marks(task):
    inst = make(task, LENGTHS[task][0])
    assert ruler.score(inst, ruler.answer_text(inst)) == 1.0
    assert ruler.score(inst, ruler.answer_text(dataclasses.replace(inst, outputs=inst.outputs[1:]))) < 1.0 or (
        len(inst.outputs) == 1)


def test_training_mix_windows_hold_an_instance_its_answer_eos_then_training_tokens():
    stream = np.asarray(TOKENIZER.encode(TEXT), np.int32)
    mix = ruler.TrainingMix(TOKENIZER, 512, stream)
    assert mix.included == tuple(t for t in ruler.TASKS if t != "cwe") and list(mix.excluded) == ["cwe"]
    windows = mix.windows(8, np.random.default_rng(7), 1)
    assert windows.shape == (8, 512) and windows.dtype == np.int32
    assert np.array_equal(windows, mix.windows(8, np.random.default_rng(7), 1))  # seeded
    replay = np.random.default_rng(7)
    for row in windows:
        inst = mix.instance(replay)
        replay.integers(0, stream.shape[0] - 512)  # the row's offset in the stream
        assert inst.length <= 512 and inst.task in mix.included
        head = (ruler.prompt_tokens(TOKENIZER, inst.prompt, inst.answer_prefix)
                + TOKENIZER.encode(ruler.answer_text(inst)) + [TOKENIZER.eos_id, 1])
        assert row[:len(head)].tolist() == head
        tail = row[len(head):]
        starts = np.flatnonzero(stream[:stream.shape[0] - len(tail) + 1] == tail[0])
        assert any(np.array_equal(stream[s:s + len(tail)], tail) for s in starts)  # a slice of the stream
    assert len({ruler.TrainingMix.instance(mix, np.random.default_rng(s)).task for s in range(40)}) > 5


def test_training_mix_refuses_what_cannot_work():
    stream = np.asarray(TOKENIZER.encode(TEXT), np.int32)
    with pytest.raises(ValueError, match="unknown RULER task 'qa_1'"):
        ruler.TrainingMix(TOKENIZER, 512, stream, ["niah_single_1", "qa_1"])
    with pytest.raises(ValueError, match="no RULER task of vt, cwe fits in 256 tokens: vt: its shortest"):
        ruler.TrainingMix(TOKENIZER, 256, stream, ["vt", "cwe"])

    class NoEos:
        eos_id = None

    with pytest.raises(ValueError, match="ends each answer with EOS: the tokenizer has none"):
        ruler.TrainingMix(NoEos(), 512, stream)


def test_needles_visible_follows_the_mask_and_truncation():
    from lminf_jax.spec import LMInfinite, Vanilla

    early, late = make("niah_single_1", 1000, depth=0.0), make("niah_single_1", 1000, depth=1.0)
    window = LMInfinite(global_branch=4, local_branch=256)
    assert ruler.needles_visible(Vanilla(), early) and ruler.needles_visible(Vanilla(), late)
    assert not ruler.needles_visible(window, early) and ruler.needles_visible(window, late)
    assert ruler.needles_visible(window, dataclasses.replace(early, needle_positions=(3,)))  # a sink
    keep = late.tokens - late.needle_positions[0]
    assert ruler.needles_visible(Vanilla(), late, keep) and not ruler.needles_visible(Vanilla(), late, keep - 1)
    assert ruler.needles_visible(window, make("fwe", 300)) is None


def test_jsonl_round_trips_and_checks_the_version(tmp_path):
    instances = ruler.generate_grid(["niah_single_1", "vt", "fwe"], TOKENIZER, [600], [0.0, None], samples=2, seed=7)
    assert len(instances) == 2 * 2 + 2 * 2 + 2 and {i.seed for i in instances} == {7, 8}
    path = tmp_path / "ruler.jsonl"
    ruler.write_jsonl(instances, path)
    lines = path.read_text().splitlines()
    assert len(lines) == len(instances) and all(json.loads(line)["version"] == ruler.VERSION for line in lines)
    assert ruler.read_jsonl(path) == instances
    record = json.loads(lines[0])
    path.write_text(json.dumps({**record, "version": ruler.VERSION + 1}) + "\n")
    with pytest.raises(ValueError, match="not a version"):
        ruler.read_jsonl(path)


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
    ruler.write_jsonl([inst], path)
    good = path.read_text()
    if isinstance(line, dict):
        line = json.dumps({k: v for k, v in {**json.loads(good), **line}.items() if v is not ...})  # ...: left out
    path.write_text(good + line + "\n")
    with pytest.raises(ValueError) as error:
        ruler.read_jsonl(path)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)


def test_instances_without_needles_must_say_so(tmp_path):
    inst = make("fwe", 300)
    path = tmp_path / "i.jsonl"
    for change, message in (({"depth": 0.5}, "fwe has no needle: depth must be null, got 0.5"),
                            ({"needle_positions": (3,)}, "needle_positions must be [] (fwe has no needle), got [3]")):
        ruler.write_jsonl([dataclasses.replace(inst, **change)], path)
        with pytest.raises(ValueError, match=re.escape(f"{path}:1: {message}")):
            ruler.read_jsonl(path)


def test_string_match_scores_follow_ruler():
    outputs = ["5532642", "Abc-Def", "1234567"]
    assert ruler.string_match_all(" 5532642, abc-def and 1234567.", outputs) == 1.0
    assert ruler.string_match_all("5532642 and ABC-DEF", outputs) == pytest.approx(2 / 3)
    assert ruler.string_match_all("", outputs) == 0.0
    assert ruler.string_match_part("the answer is ABC-def", outputs) == 1.0
    assert ruler.string_match_part("", outputs) == 0.0
    inst = make("niah_multivalue", 1000)
    assert ruler.score(inst, " " + ", ".join(inst.outputs).upper()) == 1.0
    assert ruler.score(inst, inst.outputs[1]) == 0.25


def test_aggregate_averages_per_task_length_and_depth():
    base = make("niah_single_1", 300)
    insts = [dataclasses.replace(base, depth=d, outputs=(o,)) for d, o in ((0.0, "a"), (0.0, "b"), (1.0, "a"))]
    insts.append(dataclasses.replace(make("fwe", 300), outputs=("x", "y")))
    table = ruler.aggregate(insts, ["A", "nothing", "no", "X"])
    assert table == {("niah_single_1", 300, 0.0): {"score": 0.5, "n": 2},
                     ("niah_single_1", 300, 1.0): {"score": 0.0, "n": 1},
                     ("fwe", 300, None): {"score": 0.5, "n": 1}}
    with pytest.raises(ValueError, match="predictions"):
        ruler.aggregate(insts, ["A"])


# ----- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tiny_checkpoint import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("ruler") / "m")


def test_a_resume_refuses_other_weights_of_the_same_config(model_dir, tmp_path, capsys, monkeypatch):
    import jax

    load_model, ran = ruler.load_model, []

    def fake_predict(model, prefill, params, tokenizer, prompts, *args):
        ran.append(len(prompts))
        return [{"prediction": "", "new_tokens": 0, "stopped": False} for _ in prompts]

    def other_weights(*args, **kwargs):
        family, config, params = load_model(*args, **kwargs)
        return family, config, jax.tree.map(lambda x: x * 1.01, params)

    monkeypatch.setattr(ruler, "predict", fake_predict)
    out = tmp_path / "r.json"
    argv = [str(model_dir), "--tasks", "niah_single_1", "--lengths", "480", "--depths", "0.5",
            "--samples", "1", "--out", str(out), "--no-plot", "--methods", "vanilla"]
    assert ruler.main(argv) == 0 and ran == [1]
    first = out.read_text()
    monkeypatch.setattr(ruler, "load_model", other_weights)
    capsys.readouterr()
    assert ruler.main([*argv, "lm_infinite"]) == 1 and ran == [1] and out.read_text() == first
    err = capsys.readouterr().err
    saved = json.loads(first)["settings"]["params"]
    assert f"--out {out} holds a RULER run of other weights (settings.params: {saved} there, sha256:" in err
    assert "here): pass another --out or remove it" in err
    monkeypatch.setattr(ruler, "load_model", load_model)
    assert ruler.main([*argv, "lm_infinite"]) == 0 and ran == [1, 1]  # only the new method ran
    assert f"resuming {out}" in capsys.readouterr().err
    methods = json.loads(out.read_text())["methods"]
    assert list(methods) == ["vanilla", "lm_infinite"] and methods["vanilla"] == json.loads(first)["methods"]["vanilla"]


@pytest.mark.parametrize("option", ["--lengths", "--multiples"])
def test_lengths_beyond_host_memory_fail_before_any_instance_is_made(option, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ruler, "generate", lambda *a, **k: pytest.fail("an instance was made"))
    assert ruler.main([option, "2147483647", "--out", str(tmp_path / "r.json"), "--no-plot"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: 94 instances of up to [\d,]+ tokens need about [\d,]+ bytes of host memory \(1,200 per "
                     r"token to make the longest, 40 per token to hold them all\), more than its [\d,]+: lower "
                     r"--lengths, --multiples or --samples", err), err


def test_the_cli_evaluates_every_method_on_the_same_instances_and_resumes(model_dir, tmp_path, capsys, monkeypatch):
    import lminf_jax.decoding

    seen: dict[str, list[tuple[int, ...]]] = collections.defaultdict(list)
    generate = lminf_jax.decoding.generate

    def spy(model, params, prompts, *args, **kwargs):
        seen[model.spec.describe()] += [tuple(p) for p in prompts]
        return generate(model, params, prompts, *args, **kwargs)

    monkeypatch.setattr(lminf_jax.decoding, "generate", spy)
    methods = ["vanilla", "lm_infinite"]
    common = [str(model_dir), "--methods", *methods, "-G", "2"]
    argv = [*common, "--tasks", "niah_single_1", "fwe", "--lengths", "480", "560", "--depths", "0.5",
            "--samples", "1", "--write-instances", str(tmp_path / "i.jsonl")]
    assert ruler.main([*argv, "--out", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")]) == 0
    table = capsys.readouterr().out
    record = json.loads((tmp_path / "a.json").read_text())
    instances = ruler.read_jsonl(tmp_path / "i.jsonl")
    tokenizer = load_tokenizer_from(model_dir)
    prompts = sorted(tuple(ruler.prompt_tokens(tokenizer, i.prompt, i.answer_prefix)) for i in instances)
    assert len(instances) == 4 and {(i.task, i.length) for i in instances} == {
        (t, n) for t in ("niah_single_1", "fwe") for n in (480, 560)}
    assert [sorted(p) for p in seen.values()] == [prompts, prompts]  # one spec per method, the same prompts
    assert record["settings"]["lengths"] == [480, 560] and list(record["methods"]) == methods
    assert [r["prompt_sha256"] for r in record["instances"]] == [
        ruler.instance_record(i, ruler.prompt_tokens(tokenizer, i.prompt, i.answer_prefix))["prompt_sha256"]
        for i in instances]
    predictions = {}
    for name, res in record["methods"].items():
        rows = sorted((r for cell in res["cells"].values() for r in cell["predictions"]), key=lambda r: r["instance"])
        assert [r["instance"] for r in rows] == [0, 1, 2, 3]
        for r in rows:
            assert r["score"] == ruler.score(instances[r["instance"]], r["prediction"])
            assert 1 <= r["new_tokens"] <= instances[r["instance"]].max_new_tokens
            # the needle (depth 0.5 of 480 or 560 tokens) is hidden by LM-Infinite's window, seen by vanilla
            assert r["needles_visible"] == (None if instances[r["instance"]].task == "fwe" else name == "vanilla")
        for (task, n, depth), cell in ruler.aggregate(instances, [r["prediction"] for r in rows]).items():
            assert record["scores"][name][task][str(n)][ruler.depth_label(depth)] == cell["score"]
        predictions[name] = [r["prediction"] for r in rows]
    assert table.splitlines()[0].split() == ["task", "/", "method", "480", "560"]
    assert record["needles_visible"] == {"vanilla": {"480": 1.0, "560": 1.0}, "lm_infinite": {"480": 0.0, "560": 0.0}}
    lines = table.splitlines()
    at = lines.index("needles visible to the prompt's last token (% of niah and vt instances)")
    assert lines[at:at + 3] == ["needles visible to the prompt's last token (% of niah and vt instances)",
                                       "  vanilla" + " " * 15 + "    100.0    100.0",
                                       "  lm_infinite" + " " * 11 + "      0.0      0.0"]
    assert (tmp_path / "a.png").stat().st_size > 0

    # the instances file gives the same predictions; a rerun on a finished --out loads no model
    assert ruler.main([*common, "--instances", str(tmp_path / "i.jsonl"), "--out", str(tmp_path / "b.json"),
                       "--no-plot"]) == 0
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["settings"] == record["settings"] and again["methods"].keys() == record["methods"].keys()
    for name, res in again["methods"].items():
        assert {k: c["predictions"] for k, c in res["cells"].items()} == {
            k: c["predictions"] for k, c in record["methods"][name]["cells"].items()}
    monkeypatch.setattr(ruler, "predict", lambda *a, **k: pytest.fail("a finished cell was run again"))
    assert ruler.main([*argv, "--out", str(tmp_path / "a.json"), "--no-plot"]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["methods"] == record["methods"]
    capsys.readouterr()
    assert ruler.main([*argv, "--seed", "1", "--out", str(tmp_path / "a.json"), "--no-plot"]) == 1
    assert "holds a RULER run with other settings (instances_sha256 differ)" in capsys.readouterr().err


def test_bad_arguments_fail_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ruler, "load_model", lambda *a, **k: pytest.fail("the weights were read"))
    inst = make("niah_single_1", 300)
    ruler.write_jsonl([dataclasses.replace(inst, tokens=inst.tokens - 1)], tmp_path / "other.jsonl")
    record = json.loads((tmp_path / "other.jsonl").read_text())
    for name, change in (("missing", {"outputs": ...}), ("extra", {"colour": "red"}), ("empty", {"outputs": []})):
        changed = {k: v for k, v in {**record, **change}.items() if v is not ...}  # ...: left out
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(changed))
    out = ["--out", str(tmp_path / "r.json"), "--top-k-from-layer", "1"]  # the shipped model has 4 layers
    for argv, code, message in (
        (["--tasks", "qa_1"], 2, "argument --tasks: invalid choice: 'qa_1'"),
        (["--depths", "1.5"], 2, "argument --depths: must lie in [0, 1], got 1.5"),
        (["--lengths", "1000", "--multiples", "2"], 2, "argument --multiples: not allowed with argument --lengths"),
        (["--tasks", "cwe", "--lengths", "512"], 1,
         "no task can be made at 512 tokens: cwe@512: length 512 is too short for cwe"),
        (["--tasks", "vt", "--lengths", "300"], 1, "no task can be made at 300 tokens: vt@300: length 300 is too short"),
        (["--methods", "vanilla", "nope"], 2, "argument --methods: method 'nope': 'nope' is not a mask method"),
        (["--methods", "yarn", "yarn"], 1, "listed twice"),
        (["--instances", str(tmp_path / "other.jsonl"), "--tasks", "vt"], 1, "drop --tasks"),
        (["--instances", str(tmp_path / "other.jsonl")], 1, "other.jsonl:1: the prompt does not make 299 tokens"),
        (["--instances", str(tmp_path / "missing.jsonl")], 1, "missing.jsonl:1: missing key(s): outputs"),
        (["--instances", str(tmp_path / "extra.jsonl")], 1, "extra.jsonl:1: unknown key(s): colour"),
        (["--instances", str(tmp_path / "empty.jsonl")], 1, "empty.jsonl:1: outputs must be a non-empty list"),
        (["--plot", str(tmp_path / "r.xyz")], 2,
         "argument --plot: {0}/r.xyz: matplotlib cannot save .xyz files; use one of "),
        (["--plot", str(tmp_path / "r")], 2,
         "argument --plot: {0}/r: matplotlib cannot save a file without an extension"),
    ):
        assert ruler.main([*argv, *out]) == code
        assert message.format(tmp_path) in capsys.readouterr().err
    (tmp_path / "r.json").write_text("[]")
    assert ruler.main(["--tasks", "niah_single_1", "--lengths", "300", "--samples", "1", *out]) == 1
    assert "r.json exists and is not a RULER result" in capsys.readouterr().err
