"""experiments.benchmark_peers: the same weights in transformers and here, checked before timing."""

from __future__ import annotations

import json

import jax
import pytest

pytest.importorskip("transformers")
from lminf_jax.experiments import benchmark_peers as cli  # noqa: E402

TINY = ["--hidden", "64", "--heads", "1", "--layers", "1", "--vocab", "256", "--forward-length", "128",
        "--window", "32", "--prompt", "64", "--positions", "64", "256", "--steps", "2", "--attention-lengths", "128",
        "--attention-window", "64", "--repeats", "1"]


def test_every_section_is_measured_side_by_side(tmp_path, capsys):
    out = tmp_path / "peers.json"
    assert cli.main([*TINY, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["parity_max_abs"] < cli.PARITY_TOLERANCE
    forward = record["forward"]
    assert [r["variant"].split(",")[0] for r in forward] == ["transformers", "this project", "this project"]
    for rows in (forward, record["decode"]):
        reference = rows[0]["ms"]
        assert all(r["speedup"] == pytest.approx(reference / r["ms"]) for r in rows)
    assert [r["position"] for r in record["decode"]] == [64, 64, 64, 256]
    assert record["decode"][-1]["cache_bytes"] == record["decode"][-2]["cache_bytes"]  # the Λ-cache stays put
    attention = record["attention"]
    assert [r["variant"].split(",")[0] for r in attention] == ["torch sdpa", "this project", "this project"]
    # attended pairs at T = 128, counted by hand: causal 128 * 129 / 2; the window of 64 keys gives
    # 64 * 65 / 2 + 64 * 64, the 10 sinks 1 + ... + 9 + 55 * 10 for the queries beyond the window
    for row, pairs in zip(attention, (128 * 129 // 2, 128 * 129 // 2, 64 * 65 // 2 + 64 * 64 + 45 + 550)):
        assert row["gflops"] == pytest.approx(4 * 64 * pairs / row["ms"] / 1e6)
    assert attention[1]["of_torch_rate"] == pytest.approx(attention[1]["gflops"] / attention[0]["gflops"])
    printed = capsys.readouterr().out
    assert "| this project, full cache | 64 |" in printed and "of torch's rate" in printed


def test_models_that_disagree_are_not_timed(tmp_path, monkeypatch, capsys):
    real = cli.load_model

    def perturbed(path):
        family, config, params = real(path)
        return family, config, jax.tree.map(lambda x: x * 1.01, params)

    monkeypatch.setattr(cli, "load_model", perturbed)
    monkeypatch.setattr(cli, "forward_section", lambda *a: pytest.fail("timed models that disagree"))
    assert cli.main([*TINY, "--out", str(tmp_path / "peers.json")]) == 1
    assert "the two models disagree" in capsys.readouterr().err
    assert not (tmp_path / "peers.json").exists()
