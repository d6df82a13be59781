"""experiments.ruler: the command that runs every method on the same RULER instances."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
from pathlib import Path

import pytest
from ruler_examples import TOKENIZER, make

from lminf_jax.experiments import ruler
from lminf_jax.experiments.loading import load_tokenizer_from
from lminf_jax.tasks import ruler as tasks_ruler
from lminf_jax.tasks.ruler_jsonl import read_jsonl, write_jsonl
from lminf_jax.tasks.ruler_scoring import aggregate, score


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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tiny_checkpoint import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("ruler") / "m")


def test_a_resume_refuses_other_weights_of_the_same_config(model_dir, tmp_path, capsys, monkeypatch):
    import jax

    load_model, ran = ruler.load_model, []

    def fake_predict(name, model, prefill, params, tokenizer, prompts, *args):
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
    monkeypatch.setattr(tasks_ruler, "generate", lambda *a, **k: pytest.fail("an instance was made"))
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
    instances = read_jsonl(tmp_path / "i.jsonl")
    tokenizer = load_tokenizer_from(model_dir)
    prompts = sorted(tuple(tasks_ruler.prompt_tokens(tokenizer, i.prompt, i.answer_prefix)) for i in instances)
    assert len(instances) == 4 and {(i.task, i.length) for i in instances} == {
        (t, n) for t in ("niah_single_1", "fwe") for n in (480, 560)}
    assert [sorted(p) for p in seen.values()] == [prompts, prompts]  # one spec per method, the same prompts
    assert record["settings"]["lengths"] == [480, 560] and list(record["methods"]) == methods
    assert [r["prompt_sha256"] for r in record["instances"]] == [
        ruler.instance_record(i, tasks_ruler.prompt_tokens(tokenizer, i.prompt, i.answer_prefix))["prompt_sha256"]
        for i in instances]
    predictions = {}
    for name, res in record["methods"].items():
        rows = sorted((r for cell in res["cells"].values() for r in cell["predictions"]), key=lambda r: r["instance"])
        assert [r["instance"] for r in rows] == [0, 1, 2, 3]
        for r in rows:
            assert r["score"] == score(instances[r["instance"]], r["prediction"])
            assert 1 <= r["new_tokens"] <= instances[r["instance"]].max_new_tokens
            # the needle (depth 0.5 of 480 or 560 tokens) is hidden by LM-Infinite's window, seen by vanilla
            assert r["needles_visible"] == (None if instances[r["instance"]].task == "fwe" else name == "vanilla")
        for (task, n, depth), cell in aggregate(instances, [r["prediction"] for r in rows]).items():
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
    write_jsonl([dataclasses.replace(inst, tokens=inst.tokens - 1)], tmp_path / "other.jsonl")
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
