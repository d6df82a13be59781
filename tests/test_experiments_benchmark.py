"""experiments.benchmark at CPU sizes: every section writes its rows, FLOPs count the attended
pairs of each mask exactly, the route-based rows carry their route, the decode rows their roofline,
and the targets table is computed from rows alone (met, missed, not measured)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lminf_jax.experiments import benchmark
from lminf_jax import LMInfinite, SlidingWindow, Vanilla
from lminf_jax import attention_vendor as vendor


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
    assert set(attention) == {"Λ-attention, XLA window route", "Λ-attention, blockwise XLA", "causal, xla",
                              "sliding window L, xla"}
    assert all(r["ms"] > 0 and r["tflops"] > 0 and r["plan_mib"] > 0 and r["compile_s"] > 0
               for r in attention.values())
    assert [name for name, r in attention.items() if "route" in r] == ["Λ-attention, XLA window route"]
    assert attention["Λ-attention, XLA window route"]["route"] == {
        "implementation": "reference", "reason": "at most 262,144 scores per head: dense"}  # what "auto" picks here
    assert [r["variant"] for r in record["encode"]] == ["LM-Infinite", "vanilla"]
    assert all(r["tokens_per_s"] > 0 and r["plan_mib"] > 0 and r["route"]["implementation"] == "reference"
               for r in record["encode"])
    assert not any("peak_mib" in r for r in record["attention"] + record["encode"])  # the CPU keeps no count
    assert {r["variant"] for r in record["decode"]} == {"Λ-cache", "full cache"}
    assert all(r["ms"] > 0 and r["roofline_ms"] > 0 and r["of_roofline"] == pytest.approx(r["ms"] / r["roofline_ms"])
               for r in record["decode"])
    assert record["read_bandwidth_gb_s"] > 0
    assert record["targets"] == benchmark.targets(record)
    assert [t["met"] for t in record["targets"]] == [None] * 5  # no cuDNN rows, no 32K or 128K here
    assert not out.with_name(out.name + ".partial").exists()
    printed = capsys.readouterr().out
    assert "targets:" in printed and "wrote" in printed


def test_the_model_route_reads_the_layer_shapes(monkeypatch):
    """An encode row's route is `attention_route` of one layer's q, k, v: on a GPU with cuDNN, the cuDNN
    route in bfloat16 and the blockwise path in float32."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(vendor, "cudnn_head_dim_limit", lambda: 256)
    cfg = benchmark.PRESETS["llama2-7b"]["config"]
    call = benchmark.AttentionCall(LMInfinite(10, cfg.max_position_embeddings), "auto")
    route = {dtype: benchmark.layer_route(benchmark.LanguageModel(benchmark.llama.decoder, cfg, call, dtype), 32768)
             for dtype in (jnp.bfloat16, jnp.float32)}
    assert route[jnp.bfloat16] == {"implementation": "cudnn",
                                   "reason": "cudnn's fused window kernel plus the sink branch"}
    assert route[jnp.float32] == {"implementation": "blockwise", "reason": "float32 inputs: full-precision products"}


def test_run_variant_records_the_device_peak_and_failures(monkeypatch):
    peaks = iter([100 * 2**20] + [300 * 2**20] * 4)
    monkeypatch.setattr(benchmark, "device_peak_bytes", lambda: next(peaks))
    x = jnp.ones((8, 8))
    raised = benchmark.run_variant("raised", lambda x: x @ x, (x,), repeats=1)
    assert raised["peak_mib"] == 300 and raised["peak_own"] is True
    held = benchmark.run_variant("held", lambda x: x + 1, (x,), repeats=1)
    assert held["peak_mib"] == 300 and held["peak_own"] is False

    def fails(x):
        raise MemoryError()

    assert benchmark.run_variant("oom", fails, (x,), repeats=1) == {"variant": "oom", "failed": "MemoryError: "}


def rows(route=10.0, window=9.0, causal=40.0, vanilla=300.0, lm=100.0, plans=(14_000, 14_100, 14_500), decode=1.2):
    """A synthetic GPU record (ms, MiB, ratio to the roofline)."""
    at = benchmark.ATTENTION_AT
    return {
        "attention": [{"T": at, "variant": benchmark.CUDNN_ROUTE, "ms": route},
                      {"T": at, "variant": benchmark.CUDNN_WINDOW, "ms": window},
                      {"T": at, "variant": benchmark.CUDNN_CAUSAL, "ms": causal}],
        "encode": [{"T": benchmark.ENCODE_AT, "variant": "vanilla", "ms": vanilla},
                   *({"T": t, "variant": "LM-Infinite", "ms": lm, "plan_mib": plan, "peak_mib": plan + 10}
                     for t, plan in zip([8192, 32768, benchmark.ENCODE_AT], plans))],
        "decode": [{"variant": "Λ-cache", "position": benchmark.DECODE_AT, "batch": 8, "of_roofline": 9.0},
                   {"variant": "Λ-cache", "position": benchmark.DECODE_AT, "batch": 1, "of_roofline": decode}],
    }


def test_targets_met_missed_and_not_measured():
    met = benchmark.targets(rows())
    assert [t["met"] for t in met] == [True] * 5
    assert [t["measured"] for t in met[:3]] == pytest.approx([0.9, 4.0, 3.0])
    assert met[3]["measured"] == pytest.approx((400 / 98304) / (100 / 24576))
    assert [p["T"] for p in met[3]["per_token"]] == [8192, 32768, benchmark.ENCODE_AT]
    assert met[3]["per_token"][0] == {"T": 8192, "plan_bytes_per_token": 14_000 * 2**20 / 8192,
                                      "peak_bytes_per_token": 14_010 * 2**20 / 8192}
    assert met[4]["measured"] == 1.2  # batch 1, not 8

    missed = benchmark.targets(rows(route=20.0, vanilla=200.0, plans=(14_000, 14_100, 15_600), decode=1.5))
    assert [t["met"] for t in missed] == [False, False, False, False, False]  # a T^2 term: the slope grows 4x
    assert json.loads(json.dumps(missed)) == missed

    record = rows()
    record["attention"][1] = {"T": benchmark.ATTENTION_AT, "variant": benchmark.CUDNN_WINDOW,
                              "failed": "XlaRuntimeError: OOM"}
    del record["encode"][1:3], record["decode"]
    absent = benchmark.targets(record)
    assert [t["met"] for t in absent] == [None, True, True, None, None]
    assert absent[0]["measured"] is None and "failed: XlaRuntimeError: OOM" in absent[0]["why"]
    assert absent[3]["why"] == "needs XLA's plan at three lengths or more, has 1"
    assert absent[4]["why"] == "no row 'Λ-cache' at position 32,768, batch 1"
    assert all(benchmark.format_target(t).startswith("| ") for t in absent)
