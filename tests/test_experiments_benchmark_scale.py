"""experiments.benchmark_scale: plans, prefill and decoding of one checkpoint, each measurement in a fresh process."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
from lminf_jax.experiments import benchmark_scale as cli  # noqa: E402


def test_plans_prefill_and_decoding_are_measured_side_by_side(tmp_path, capsys):
    out, hf = tmp_path / "scale.json", tmp_path / "hf"
    argv = ["--shape", "tiny", "--plan-shape", "tiny", "--hf-dir", str(hf), "--sections", "plan", "prefill", "decode",
            "--lengths", "128", "--plan-lengths", "256", "--positions", "64", "--steps", "2", "--no-transformers",
            "--out", str(out), "--plot", str(tmp_path / "scale.png")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["settings"]["weight_bytes"] == cli.weight_bytes("tiny") and (hf / "config.json").is_file()
    plans = {(r["method"], r["path"]): r for r in record["plan"]}
    assert set(plans) == {(m, p) for m in cli.METHODS for p in ("forward", "score")}
    vocab = cli.SHAPES["tiny"]["vocab_size"]
    assert plans["vanilla", "forward"]["output_bytes"] == 256 * vocab * 4  # float32 logits
    assert plans["vanilla", "score"]["output_bytes"] < 256 * vocab  # one score per token, no logits
    for row in record["prefill"] + record["decode"]:
        assert "error" not in row and row["peak_rss_bytes"] > record["settings"]["weight_bytes"]
    assert [(r["impl"], r["T"]) for r in record["prefill"]] == [("vanilla", 128), ("lm_infinite", 128)]
    assert [(r["impl"], r["position"]) for r in record["decode"]] == [("lm_infinite", 64), ("vanilla", 64)]
    assert all(r["seconds"] > 0 for r in record["prefill"]) and all(r["ms_per_token"] > 0 for r in record["decode"])
    printed = capsys.readouterr().out
    assert "| lm_infinite | 128 |" in printed and "| tiny | 256 | vanilla | score |" in printed
    assert cli.main(["--shape", "tinyllama-1.1b", "--hf-dir", str(hf), "--sections", "prefill", "--out", str(out)]) == 1
    assert "holds another shape" in capsys.readouterr().err  # never measured on the wrong checkpoint


def test_a_folder_of_other_files_is_never_written_into(tmp_path, capsys):
    hf = tmp_path / "mine"
    hf.mkdir()
    (hf / "notes.txt").write_text("a user's file")
    argv = ["--shape", "tiny", "--hf-dir", str(hf), "--sections", "prefill", "--out", str(tmp_path / "s.json")]
    assert cli.main(argv) == 1
    assert "neither empty nor a checkpoint" in capsys.readouterr().err
    assert [p.name for p in hf.iterdir()] == ["notes.txt"]
