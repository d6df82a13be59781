"""experiments.options: argument types that refuse a bad value when it is parsed."""

from __future__ import annotations

import argparse
import json

import pytest

from lminf_jax.experiments.options import (
    check_outputs_apart, input_path, int_option, output_dir, output_file, parse_checked, plot_file, save_result,
)


def parse(argv: list[str], **types) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="x", exit_on_error=False)
    for name, kind in types.items():
        parser.add_argument(f"--{name}", type=kind)
    return parser.parse_args(argv)


@pytest.mark.parametrize("text", ["0", "5", str(2**31 - 1)])
def test_int_option_takes_its_range(text):
    assert parse(["--n", text], n=int_option(0)).n == int(text)


@pytest.mark.parametrize("text, message", [
    ("-1", "must lie in [0, 2**31 - 1], got -1"),
    (str(2**31), f"got {2**31}"),
    ("4294967808", "got 4294967808"),  # 2**32 + 512 would wrap to 512 in int32
    (str(10**30), f"got {10**30}"),
    ("1.5", "expected an integer, got '1.5'"),
])
def test_int_option_refuses_and_names_the_option(text, message):
    with pytest.raises(argparse.ArgumentError, match=r"argument --n") as e:
        parse(["--n", text], n=int_option(0))
    assert message in str(e.value)


def test_int_option_has_its_own_minimum():
    assert parse(["--n", "264"], n=int_option(264)).n == 264
    with pytest.raises(argparse.ArgumentError, match=r"must lie in \[264, 2\*\*31 - 1\], got 263"):
        parse(["--n", "263"], n=int_option(264))


def test_output_file_takes_a_new_file_in_folders_yet_to_be_made_and_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert parse(["--out", str(target)], out=output_file).out == str(target)
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    assert parse(["--out", str(existing)], out=output_file).out == str(existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]  # the probe file is gone


@pytest.mark.parametrize("where, message", [
    ("{tmp}", "{tmp} is a directory, not a file"),
    ("{tmp}/file/out.json", "cannot create {tmp}/file: {tmp}/file is not a directory"),
    ("/proc/lminf-test/out.json", "cannot write in /proc"),  # no files can be made there, not even by root
])
def test_output_file_refuses_what_cannot_be_written(tmp_path, where, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(argparse.ArgumentError, match="argument --out") as e:
        parse(["--out", where.format(tmp=tmp_path)], out=output_file)
    assert message.format(tmp=tmp_path) in str(e.value)


def test_output_dir_takes_existing_or_new_folders_and_refuses_a_file(tmp_path):
    assert parse(["--d", str(tmp_path)], d=output_dir).d == str(tmp_path)
    assert parse(["--d", str(tmp_path / "new" / "run")], d=output_dir).d == str(tmp_path / "new" / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(argparse.ArgumentError, match=f"argument --d: {tmp_path}/file exists and is not a directory"):
        parse(["--d", str(tmp_path / "file")], d=output_dir)
    with pytest.raises(argparse.ArgumentError, match="cannot write in /proc"):
        parse(["--d", "/proc/lminf-test"], d=output_dir)


# ----- outputs apart from inputs (issue 31: a run never writes where it reads) --------------------


def test_check_outputs_apart_refuses_the_input_itself_and_anything_inside_it(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    inputs = [("MODEL_DIR", str(model))]
    for out, where in [(model / "config.json", "lies inside"), (model, "is"), (model / "new" / "r.json", "lies inside"),
                       (tmp_path / "x" / ".." / "model" / "a.json", "lies inside")]:
        with pytest.raises(ValueError, match=f"--out {out} {where} the input MODEL_DIR {model}"):
            check_outputs_apart([("--out", str(out))], inputs)
    check_outputs_apart([("--out", str(tmp_path / "model.json")), ("--plot", str(tmp_path / "modelx" / "p.png"))],
                        inputs)  # beside it, and a name that merely starts like it: fine


def test_check_outputs_apart_resolves_symlinks_and_ignores_inputs_that_do_not_exist(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(ValueError, match="lies inside the input"):
        check_outputs_apart([("--json", str(tmp_path / "link" / "model.safetensors"))], [("M", str(model))])
    with pytest.raises(ValueError, match="is the input --tokens"):
        tokens = tmp_path / "t.npy"
        tokens.write_bytes(b"x")
        check_outputs_apart([("--out", str(tmp_path / "link" / ".." / "t.npy"))], [("--tokens", str(tokens))])
    check_outputs_apart([("--out", str(tmp_path / "stdlib" / "r.json"))], [("--source", str(tmp_path / "stdlib"))])


def test_parse_checked_finds_marked_options_and_fails_like_argparse(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("model_dir", type=input_path)
    parser.add_argument("--text", nargs="+", type=input_path)
    parser.add_argument("--out", type=output_file)
    parser.add_argument("--other")  # unmarked: never compared
    assert parse_checked(parser, [str(model), "--out", str(tmp_path / "r.json"), "--other", str(model)]).out
    text = tmp_path / "a.txt"
    text.write_text("x")
    for argv in ([str(model), "--out", str(model / "r.json")], [str(model), "--text", str(text), "--out", str(text)]):
        with pytest.raises(SystemExit) as e:
            parse_checked(parser, argv)
        assert e.value.code == 2 and "a run never writes where it reads" in capsys.readouterr().err


def _model_dir(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).write_text("precious")
    return model


#: Each command with an output inside (or equal to) one of its inputs: (module, argv).
COMMANDS = {
    "perplexity": ("lminf_jax.experiments.perplexity", "{m} --out {m}/config.json"),
    "perplexity-plot": ("lminf_jax.experiments.perplexity", "{m} --plot {m}/../model/plot.png"),
    "perplexity-from-json": ("lminf_jax.experiments.perplexity", "{m} --from-json {m}/config.json --plot {m}/plot.png"),
    "perplexity-tokens": ("lminf_jax.experiments.perplexity", "{m} --tokens {m}/model.safetensors --out {m}/model.safetensors"),
    "stream_nll": ("lminf_jax.experiments.stream_nll", "{m} --tokens {m}/x.npy --checkpoint-dir {m}"),
    "continuation": ("lminf_jax.experiments.continuation", "{m} --out {m}/config.json"),
    "factors": ("lminf_jax.experiments.factors", "{m} --out {m}"),
    "factors-tokenizer": ("lminf_jax.experiments.factors", "{m}/../data --tokenizer {m} --out {m}/factors"),
    "benchmark_context_parallel": ("lminf_jax.experiments.benchmark_context_parallel", "{m} --out {m}/config.json"),
    "train": ("lminf_jax.experiments.train", "--data {m} --out {m}/run"),
    "train-init": ("lminf_jax.experiments.train", "--data {m}/../data --init {m} --out {m}"),
    "corpus": ("lminf_jax.experiments.corpus", "--source {m} --out {m}"),
    "generate": ("lminf_jax.experiments.generate", "{m} --prompt abc --out {m}/model.safetensors"),
    "generate-prompt-file": ("lminf_jax.experiments.generate", "{m} --prompt-file {m}/config.json --out {m}/config.json"),
    "generate-tokenizer": ("lminf_jax.experiments.generate", "{m}/../data --prompt abc --tokenizer {m} --out {m}/o.json"),
    "stream_nll-plot": ("lminf_jax.experiments.stream_nll", "{m} --tokens {m}/../x.npy --plot {m}/p.png"),
    "passkey-tokenizer": ("lminf_jax.experiments.passkey", "{m}/../data --tokenizer {m} --out {m}/pk.json"),
    "ruler-tokenizer": ("lminf_jax.experiments.ruler", "{m}/../data --tokenizer {m} --write-instances {m}/i.jsonl"),
    "passkey": ("lminf_jax.experiments.passkey", "{m} --out {m}/config.json"),
    "ruler": ("lminf_jax.experiments.ruler", "{m} --plot {m}/plot.png"),
    "ruler-instances": ("lminf_jax.experiments.ruler", "--instances {m}/config.json --out {m}/../model/config.json"),
}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_refuses_to_write_into_what_it_reads(name, tmp_path, capsys):
    import importlib

    module, argv = COMMANDS[name]
    model = _model_dir(tmp_path)
    (tmp_path / "data").mkdir()
    try:
        code = importlib.import_module(module).main(argv.format(m=model).split())
    except SystemExit as e:  # the commands that use argparse directly exit as argparse does
        code = e.code
    assert code == 2
    assert "a run never writes where it reads" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert all(p.read_text() == "precious" for p in model.iterdir())


def test_lm_eval_refuses_an_output_path_inside_the_model(tmp_path):
    from lminf_jax.experiments import lm_eval_model

    model = _model_dir(tmp_path)
    with pytest.raises(SystemExit, match="--output_path .* the input pretrained="):
        lm_eval_model.main(["--model", "lminf_jax", "--model_args", f"pretrained={model}", "--tasks", "x",
                            "--output_path", str(model)])
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]


def test_plot_file_takes_what_matplotlib_saves_and_refuses_the_rest(tmp_path):
    assert parse(["--plot", str(tmp_path / "p.svg")], plot=plot_file).plot == str(tmp_path / "p.svg")
    for name, message in [("p.xyz", "matplotlib cannot save .xyz files; use one of"),
                          ("p", "matplotlib cannot save a file without an extension")]:
        with pytest.raises(argparse.ArgumentError, match=message):
            parse(["--plot", str(tmp_path / name)], plot=plot_file)


def test_save_result_writes_the_json_atomically_and_draws_it(tmp_path, capsys, monkeypatch):
    from lminf_jax.evaluation import resume

    record = {"settings": {"a": 1}, "scores": [0.5, 1.0]}
    drawn = []
    save_result(record, tmp_path / "new" / "r.json", lambda r, path: drawn.append((r, path)), tmp_path / "p" / "r.png")
    assert (tmp_path / "new" / "r.json").read_text() == json.dumps(record, indent=1)
    assert drawn == [(record, tmp_path / "p" / "r.png")] and (tmp_path / "p").is_dir()
    assert capsys.readouterr().out == f"wrote {tmp_path / 'new' / 'r.json'} and {tmp_path / 'p' / 'r.png'}\n"

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(resume.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_result({"other": 1}, tmp_path / "new" / "r.json")
    assert (tmp_path / "new" / "r.json").read_text() == json.dumps(record, indent=1)  # the old result, whole
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["r.json"]
