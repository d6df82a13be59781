"""experiments.benchmark_load: every loader measured side by side, the converted one on the converter's output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_converters_convert import hf_tensors, write_hf_checkpoint

from lminf_jax.experiments import benchmark_load as cli

RECORD = {"seconds", "read_seconds", "import_rss_mb", "load_rss_mb", "peak_rss_mb"}


def test_the_loaders_load_and_the_converted_one_reads_the_converters_output(tmp_path):
    hf = write_hf_checkpoint(tmp_path / "hf")
    records = [cli.run_loader("hf", str(hf)), cli.run_loader("convert", str(hf), str(tmp_path / "out")),
               cli.run_loader("converted", str(tmp_path / "out"))]
    for record in records:
        assert record.keys() == RECORD and 0 < record["import_rss_mb"] <= record["load_rss_mb"] <= record["peak_rss_mb"]
    measured = cli.measure("converted", tmp_path / "out")  # a fresh process
    assert measured.keys() == RECORD and measured["load_rss_mb"] <= measured["peak_rss_mb"]


def test_every_loader_is_measured_side_by_side(tmp_path, monkeypatch, capsys):
    hf = write_hf_checkpoint(tmp_path / "hf")
    calls = []

    def measure(loader, source, out=None):
        calls.append((loader, source, out))
        return {"seconds": len(calls), "read_seconds": 0.5, "import_rss_mb": 100.0, "load_rss_mb": 150.0,
                "peak_rss_mb": 200.0 + len(calls)}

    monkeypatch.setattr(cli, "measure", measure)
    assert cli.main([str(hf), "--repeats", "2", "--out", str(tmp_path / "r.json")]) == 0
    assert [c[0] for c in calls] == list(cli.LOADERS) * 2
    for k in (0, 4):  # the converted loader reads what the converter wrote in the same repeat
        assert calls[k + 1][2] == calls[k + 2][1] and calls[k][1] == calls[k + 3][1] == hf
    assert calls[1][2] != calls[5][2]
    record = json.loads((tmp_path / "r.json").read_text())
    weights_mb = sum(t.nbytes for t in hf_tensors("llama_gqa").values()) / 1e6
    rows = {r["loader"]: r for r in record["rows"]}
    assert list(rows) == list(cli.LOADERS)
    hf_row = rows["hf"]  # runs 1 and 5: the median time, the largest peak
    assert (hf_row["seconds"], hf_row["peak_rss_mb"], hf_row["weights_mb"]) == (3, 205, round(weights_mb, 1))
    assert hf_row["peak_over_weights"] == pytest.approx(205 / weights_mb, abs=1e-3)
    assert hf_row["above_imports_over_weights"] == pytest.approx(105 / weights_mb, abs=1e-3)
    assert {"cpu", "device", "jax"} <= record["meta"].keys()
    printed = capsys.readouterr().out
    assert "| loader | weights MB | load s |" in printed
    assert all(f"| {loader} | {weights_mb:.0f} |" in printed for loader in cli.LOADERS)
    assert np.isclose(cli.weight_bytes(hf), weights_mb * 1e6)
