"""experiments.benchmark at CPU sizes: every section writes its rows, FLOPs count the attended
pairs of each mask exactly, and the decode rows carry their roofline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import benchmark
from lminf_jax import LMInfinite, SlidingWindow, Vanilla


@pytest.mark.parametrize("window,sinks", [(None, 0), (7, 0), (7, 3), (40, 3)])
def test_attended_pairs_count_the_mask(window, sinks):
    t = 30
    spec = (Vanilla() if window is None else SlidingWindow(window) if not sinks
            else LMInfinite(sinks, window))
    local, far = spec.classify(np.arange(t)[:, None], np.arange(t)[None, :])
    assert benchmark.attended_pairs(t, window, sinks) == int(np.sum(np.asarray(local | far)))


def test_suite_writes_every_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = benchmark.main(["--preset", "tiny", "--attention-lengths", "256", "--encode-lengths", "256",
                           "--positions", "300", "--batches", "1", "--steps", "2", "--repeats", "1",
                           "--out", str(out), "--plot", str(tmp_path / "bench.png")])
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    attention = {r["variant"]: r for r in record["attention"]}
    assert set(attention) == {"Λ-attention, blockwise XLA", "causal, xla", "sliding window L, xla"}
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in attention.values())
    assert [r["variant"] for r in record["encode"]] == ["vanilla (blockwise)", "LM-Infinite (blockwise)"]
    assert all(r["tokens_per_s"] > 0 and r["plan_mib"] > 0 for r in record["encode"])
    assert {r["variant"] for r in record["decode"]} == {"Λ-cache", "full cache"}
    assert all(r["ms"] > 0 and r["roofline_ms"] > 0 and r["of_roofline"] == pytest.approx(r["ms"] / r["roofline_ms"])
               for r in record["decode"])
    assert record["read_bandwidth_gb_s"] > 0
    assert "wrote" in capsys.readouterr().out
