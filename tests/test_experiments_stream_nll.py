"""experiments.stream_nll: the CLI in-process on a tiny random LLaMA with a tiny sentencepiece tokenizer."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import run_on_devices
from tiny_checkpoint import PRETRAIN, make_model_dir, random_text

from lminf_jax.experiments import stream_nll as cli
from lminf_jax.experiments.loading import load_model, load_tokenizer_from
from lminf_jax import AttentionSpec, LMInfinite, SlidingWindow, frequency_method
from lminf_jax.evaluation.buckets import PositionBuckets
from lminf_jax import AttentionCall

G, L = 4, 16
NUMBERS = ("tokens", "nll", "ppl", "buckets", "stream_nll", "complete", "positions", "length", "streams")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("stream_nll"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "book.txt"
    path.write_text(random_text(11, 30))
    return path


def direct_nll(model_dir: Path, tokens: np.ndarray, spec: AttentionSpec, frequencies=None) -> np.ndarray:
    """Per-position NLL ``(B, N - 1)`` from one full forward pass and a float64 log-softmax."""
    family, cfg, params = load_model(model_dir)
    model = family.model(cfg, AttentionCall(spec, frequencies=frequencies))
    logits = np.asarray(model.forward(params, jnp.asarray(np.atleast_2d(tokens), jnp.int32)), np.float64)
    top = logits.max(axis=-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    targets = np.atleast_2d(tokens)[:, 1:]
    return -np.take_along_axis(logp[:, :-1], targets[..., None], axis=-1)[..., 0]


def bucket_means(nll: np.ndarray) -> list[tuple[int, int, int, float]]:
    buckets = PositionBuckets()
    ids = buckets.index(np.arange(nll.shape[1]))
    out = []
    for i in np.unique(ids):
        lo, hi = buckets.bounds(i)
        part = nll[:, ids == i]
        out.append((int(lo), int(hi), part.size, float(part.mean())))
    return out


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_stream_matches_one_forward_pass(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "res" / "nll.json"
    code, stdout, stderr = run([str(model_dir), "--text", str(text_file), "--max-tokens", "300", "-L", str(L),
                                "-G", str(G), "--chunk", "32", "--out", str(out), "--plot", str(tmp_path / "p.png"),
                                "--no-progress"], capsys)
    assert code == 0, stderr
    record = json.loads(out.read_text())
    tok = load_tokenizer_from(model_dir)
    (cached,) = (tmp_path / "res").glob("tokens-*.npy")  # the tokenized text, next to the output
    ids = np.load(cached)
    assert ids.dtype == np.int32 and ids.tolist() == [tok.bos_id, *tok.encode(text_file.read_text())]
    assert len(ids) > 300 and record["settings"]["source"] == {"text": [str(text_file)], "token_file": str(cached)}

    nll = direct_nll(model_dir, ids[:300], LMInfinite(G, L))
    assert record["tokens"] == 299 and record["complete"] and record["length"] == 300
    assert record["nll"] == pytest.approx(nll.mean(), abs=2e-5)
    got = [(b["lo"], b["hi"], b["count"], b["nll"]) for b in record["buckets"]]
    want = bucket_means(nll)
    assert [g[:3] for g in got] == [w[:3] for w in want]
    np.testing.assert_allclose([g[3] for g in got], [w[3] for w in want], atol=1e-4)
    settings = record["settings"]
    assert settings["attention"]["describe"] == f"lm_infinite(G={G}, L={L}, D={L})"
    assert settings["chunk"] == 32 and settings["streams"] == 1 and settings["stream_length"] == 300

    lines = stdout.splitlines()
    assert lines[0].split() == ["query", "positions", "tokens", "mean", "NLL", "ppl"]
    assert lines[1].split()[:2] == ["0", "1"] and lines[-1].split()[:2] == ["all", "299"]
    assert any(line.split()[0] == "16-19" for line in lines)
    if _has_matplotlib():
        assert (tmp_path / "p.png").stat().st_size > 0
    else:
        assert "plot skipped: matplotlib is missing" in stderr


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def test_side_by_side_streams_from_a_npy(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, 203).astype(np.uint16)
    np.save(tmp_path / "t.npy", tokens)
    out = tmp_path / "out.json"
    code, stdout, stderr = run([str(model_dir), "--tokens", str(tmp_path / "t.npy"), "--streams", "2",
                                "--max-tokens", "201", "--method", "sliding_window", "-L", "8", "--chunk", "16",
                                "--out", str(out), "--no-plot", "--no-progress"], capsys)
    assert code == 0, stderr
    record = json.loads(out.read_text())
    streams = tokens[:200].reshape(2, 100)
    nll = direct_nll(model_dir, streams, SlidingWindow(8))
    assert record["streams"] == 2 and record["length"] == 100 and record["settings"]["dropped_tokens"] == 1
    np.testing.assert_allclose(record["stream_nll"], nll.mean(axis=1), atol=2e-5)
    assert record["nll"] == pytest.approx(nll.mean(), abs=2e-5)
    assert "per stream: " in stdout and "plot" not in stderr


def test_resume_from_a_checkpoint_gives_the_same_numbers(model_dir, text_file, tmp_path, capsys):
    common = [str(model_dir), "--text", str(text_file), "--max-tokens", "300", "-L", str(L), "-G", str(G),
              "--chunk", "32", "--no-plot", "--no-progress"]
    assert run(common + ["--out", str(tmp_path / "whole.json")], capsys)[0] == 0
    ckpt = tmp_path / "ckpt"
    resumable = common + ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", "--out", str(tmp_path / "r.json")]
    code, stdout, stderr = run(resumable + ["--max-chunks", "3"], capsys)
    assert code == 0, stderr
    part = json.loads((tmp_path / "r.json").read_text())
    assert not part["complete"] and part["positions"] == 96 and "rerun with --checkpoint-dir" in stdout
    assert len(list(ckpt.glob("tokens-*.npy"))) == 1 and len(list(ckpt.glob("state-*"))) == 2
    code, stdout, stderr = run(resumable, capsys)
    assert code == 0, stderr
    assert "reusing " in stderr
    resumed = json.loads((tmp_path / "r.json").read_text())
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert resumed["resumed_tokens"] == 96 and whole["resumed_tokens"] == 0
    assert {k: resumed[k] for k in NUMBERS} == {k: whole[k] for k in NUMBERS}


@pytest.mark.parametrize("extra, message", [
    (["--method", "vanilla", "--capacity", "100"], "--method vanilla needs a full cache holding the whole stream: "
                                                   "300 tokens per stream exceed --capacity 100"),
    (["--top-k-middle", "3"], "--top-k-middle applies to the last query"),
    (["-D", "4", "--method", "sliding_window"], "-D/--limit-distance is not used by --method sliding_window"),
    (["--streams", "200"], "300 tokens cannot make 200 streams"),
    (["--method", "yarn"], "--method yarn: give the extension factor, e.g. yarn@4"),
    (["--method", "lm_infinite+pi"], "--method lm_infinite+pi: give the extension factor, e.g. lm_infinite+pi@4"),
    (["--method", "self_extend@cover"], "--method self_extend@cover: @cover chooses --group-size per length"),
    (["--tokenizer", "{model}"], "--tokenizer applies to --text"),
])
def test_bad_arguments_say_what_is_wrong(model_dir, tmp_path, capsys, extra, message):
    np.save(tmp_path / "t.npy", np.arange(300) % 97)
    extra = [a.format(model=model_dir) for a in extra]
    code, _, err = run([str(model_dir), "--tokens", str(tmp_path / "t.npy"), "--out", str(tmp_path / "o.json"),
                        "--no-plot", *extra], capsys)
    assert code == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("extra, message", [
    (["--method", "longrope@2"], "argument --method: method 'longrope@2': 'longrope' is not a frequency method"),
    (["--method", "lm_infinite@cover"], "argument --method: method 'lm_infinite@cover': lm_infinite has no parameter"),
])
def test_a_method_outside_the_grammar_fails_while_parsing(tmp_path, capsys, extra, message):
    code, _, err = run([str(tmp_path / "no-model"), "--tokens", str(tmp_path / "t.npy"), *extra], capsys)
    assert code == 2 and f"error: {message}" in err, err
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--chunk", "0"], "argument --chunk: must lie in [1, 2**31 - 1], got 0"),
    (["-D", "4294967808"], "argument -D/--limit-distance: must lie in [1, 2**31 - 1], got 4294967808"),
    (["--out", "/proc/lminf-test/o.json"], "argument --out: cannot write in /proc"),
    (["--checkpoint-dir", "{tmp}/file"], "argument --checkpoint-dir: {tmp}/file exists and is not a directory"),
])
def test_bad_values_fail_while_parsing_before_any_work(tmp_path, capsys, extra, message):
    (tmp_path / "file").write_text("x")
    extra = [a.format(tmp=tmp_path) for a in extra]
    code, _, err = run([str(tmp_path / "no-model"), "--tokens", "t.npy", "--no-plot", *extra], capsys)
    assert code == 2 and f"error: {message.format(tmp=tmp_path)}" in err, err


def test_bad_inputs_say_what_is_wrong(model_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o.json"), "--no-plot"]
    assert run([str(tmp_path / "nope"), "--tokens", "x.npy", *out], capsys)[2] == \
        f"error: model directory not found: {tmp_path / 'nope'}\n"
    assert f"error: --tokens: no such file: {tmp_path / 'x.npy'}" in run(
        [str(model_dir), "--tokens", str(tmp_path / "x.npy"), *out], capsys)[2]
    np.save(tmp_path / "2d.npy", np.zeros((2, 5), np.int32))
    assert "expected a 1-D integer array" in run(
        [str(model_dir), "--tokens", str(tmp_path / "2d.npy"), *out], capsys)[2]
    np.save(tmp_path / "big.npy", np.asarray([1, 2, 97, 3]))
    assert "token 97 at index 2 is outside the model's vocabulary [0, 97)" in run(
        [str(model_dir), "--tokens", str(tmp_path / "big.npy"), *out], capsys)[2]
    assert f"error: --text: no such file: {tmp_path / 'x.txt'}" in run(
        [str(model_dir), "--text", str(tmp_path / "x.txt"), *out], capsys)[2]
    (tmp_path / "latin1.txt").write_bytes("na\u00efve text".encode("latin-1"))
    assert f"error: --text {tmp_path / 'latin1.txt'}: not UTF-8 text (byte 2: invalid continuation byte)" in run(
        [str(model_dir), "--text", str(tmp_path / "latin1.txt"), *out], capsys)[2]
    code, _, err = run([str(model_dir), *out], capsys)  # argparse: one of --tokens / --text is required
    assert code == 2 and "error: one of the arguments --tokens --text is required" in err


def test_plot_is_skipped_without_matplotlib(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    np.save(tmp_path / "t.npy", np.arange(40) % 97)
    code, _, err = run([str(model_dir), "--tokens", str(tmp_path / "t.npy"), "--chunk", "16", "-L", "8",
                        "--out", str(tmp_path / "o.json"), "--plot", str(tmp_path / "p.png"), "--no-progress"], capsys)
    assert code == 0 and "plot skipped: matplotlib is missing" in err and not (tmp_path / "p.png").exists()


SHARDED_SCRIPT = r"""
import json, sys
from lminf_jax.experiments import stream_nll
code = stream_nll.main(sys.argv[1:])
print("RESULT " + json.dumps({"code": code}))
"""


def test_streams_split_over_8_devices_give_the_one_device_numbers(model_dir, tmp_path, capsys):
    """Two streams on 8 devices: by default streams over data=2 and heads over model=4."""
    np.save(tmp_path / "t.npy", np.random.default_rng(1).integers(0, 97, 400).astype(np.int32))
    common = [str(model_dir), "--tokens", str(tmp_path / "t.npy"), "--streams", "2", "-L", "16", "-G", "2",
              "--chunk", "24", "--no-plot", "--no-progress"]
    code, _, stderr = run([*common, "--out", str(tmp_path / "one.json")], capsys)
    assert code == 0, stderr
    assert run_on_devices(SHARDED_SCRIPT, *common, "--out", str(tmp_path / "eight.json"))["code"] == 0
    one, eight = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "eight"))
    assert eight["settings"]["devices"].startswith("mesh data=2 x seq=1 x model=4 (8 cpu devices)")
    np.testing.assert_allclose(eight["stream_nll"], one["stream_nll"], rtol=1e-5)
    code, _, stderr = run([*common, "--mesh", "seq=1,data=1", "--out", str(tmp_path / "x.json")], capsys)
    assert code == 0  # an explicit one-device mesh is allowed


def other_model(model_dir: Path, root: Path) -> Path:
    """The same model with other params (same shapes, same tokenizer)."""
    import jax

    from lminf_jax.converters.store import load_converted, save_converted

    params, config, family = load_converted(model_dir)
    out = save_converted(root / "other", jax.tree.map(lambda x: x * 1.5, params), config, family)
    (out / "tokenizer.model").write_bytes((model_dir / "tokenizer.model").read_bytes())
    return out


def test_a_checkpoint_of_another_run_is_refused_naming_the_field(model_dir, tmp_path, capsys):
    tokens = np.random.default_rng(2).integers(0, 97, 300).astype(np.int32)
    np.save(tmp_path / "t.npy", tokens)
    ckpt = tmp_path / "ckpt"
    common = ["--chunk", "32", "-L", str(L), "-G", str(G), "--checkpoint-dir", str(ckpt), "--no-plot", "--no-progress",
              "--out", str(tmp_path / "o.json")]
    code, _, stderr = run([str(model_dir), "--tokens", str(tmp_path / "t.npy"), *common, "--max-chunks", "2"], capsys)
    assert code == 0, stderr
    changed = tokens.copy()
    changed[40] = (changed[40] + 1) % 97
    np.save(tmp_path / "changed.npy", changed)
    cases = [
        ([str(other_model(model_dir, tmp_path)), "--tokens", str(tmp_path / "t.npy")],
         r"model\.params: checkpoint has sha256:\w+, run asks sha256:\w+$"),
        ([str(model_dir), "--tokens", str(tmp_path / "t.npy"), "-D", "8"],
         r"model\.attention\.spec\.limit_distance: checkpoint has 16, run asks 8$"),
        ([str(model_dir), "--tokens", str(tmp_path / "t.npy"), "--method", "lambda_mask"],
         r"model\.attention\.spec\.kind: checkpoint has lm_infinite, run asks lambda_mask; "
         r"model\.attention\.spec\.limit_distance: checkpoint has 16, run asks nothing$"),
        ([str(model_dir), "--tokens", str(tmp_path / "changed.npy")],
         r"stream \(its first 65 tokens\): checkpoint has sha256:\w+, run asks sha256:\w+$"),
    ]
    for argv, message in cases:
        code, _, stderr = run(argv + common, capsys)
        last = stderr.splitlines()[-1]
        assert code == 1 and last.startswith(f"error: checkpoint {ckpt}/state-000000000002 does not match this run: ")
        assert re.search(message, last), last
    assert [p.name for p in ckpt.iterdir()] == ["state-000000000002"]  # untouched


def test_damaged_checkpoints_give_one_error_line(model_dir, tmp_path, capsys):
    np.save(tmp_path / "t.npy", np.arange(300) % 97)
    ckpt = tmp_path / "ckpt"
    argv = [str(model_dir), "--tokens", str(tmp_path / "t.npy"), "--chunk", "32", "-L", str(L), "-G", str(G),
            "--checkpoint-dir", str(ckpt), "--no-plot", "--no-progress", "--out", str(tmp_path / "o.json")]
    assert run(argv + ["--checkpoint-every", "1", "--max-chunks", "2"], capsys)[0] == 0
    (ckpt / "state-000000000002" / "stats" / "metadata").unlink()  # a missing file
    for path in (ckpt / "state-000000000001" / "cache").rglob("*"):  # unreadable array data
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[:20])
    code, _, stderr = run(argv, capsys)
    assert code == 1 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "state-" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: no intact saved state: {ckpt}/state-000000000002: "
                                                     "FileNotFoundError: "), stderr
    assert f"{ckpt}/state-000000000001: " in errors[0] and errors[0].endswith("to start afresh)")


def test_rope_scaling_streams_as_one_forward_and_is_part_of_the_checkpoint(model_dir, tmp_path, capsys):
    tokens = np.random.default_rng(3).integers(0, 97, 300).astype(np.int32)
    np.save(tmp_path / "t.npy", tokens)
    ckpt = tmp_path / "ckpt"
    common = [str(model_dir), "--tokens", str(tmp_path / "t.npy"), "--chunk", "32", "-L", str(L), "-G", str(G),
              "--checkpoint-dir", str(ckpt), "--no-plot", "--no-progress", "--out", str(tmp_path / "o.json")]
    code, _, stderr = run(common + ["--method", "lm_infinite+yarn@4", "--max-chunks", "2"], capsys)
    assert code == 0, stderr
    code, _, stderr = run(common + ["--method", "lm_infinite+pi@4"], capsys)  # another frequency method: refused
    assert code == 1 and "model.attention.frequencies.kind: checkpoint has yarn, run asks linear" in stderr, stderr
    code, _, stderr = run(common + ["--method", "lm_infinite+yarn@4"], capsys)  # resumed
    assert code == 0, stderr
    record = json.loads((tmp_path / "o.json").read_text())
    yarn = frequency_method("yarn", 4.0, PRETRAIN)
    assert record["complete"] and record["settings"]["rope_scaling"] == dataclasses.asdict(yarn)
    assert record["nll"] == pytest.approx(direct_nll(model_dir, tokens, LMInfinite(G, L), yarn).mean(), abs=2e-5)
    assert abs(record["nll"] - direct_nll(model_dir, tokens, LMInfinite(G, L)).mean()) > 1e-3
