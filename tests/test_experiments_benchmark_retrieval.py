"""experiments.benchmark_retrieval: each way of timing a method, side by side at one length, in the table and the JSON."""

from __future__ import annotations

import json

from lminf_jax.experiments import benchmark_retrieval as bench


def test_every_method_is_measured_at_each_length(tmp_path, capsys):
    out = tmp_path / "b.json"
    methods = ["lm_infinite", "sirllm", "xl3m"]  # the three ways of timing (longheads and infllm: lm_infinite's)
    assert bench.main(["--lengths", "1024", "--steps", "2", "--measure", *methods, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == methods
    by = {r["method"]: r for r in rows}
    assert by["sirllm"]["keys_per_query"] == 4 + 128 + 256 and by["xl3m"]["keys_per_query"] <= 512
    assert by["lm_infinite"]["keys_per_query"] == 10 + 512  # G + L
    assert by["lm_infinite"]["device_bytes"] > by["sirllm"]["device_bytes"]
    assert all(r["prefill_s"] > 0 and r["ms_per_token"] > 0 and r["host_bytes"] == 0 for r in rows)
    assert "keys/query" in capsys.readouterr().out
