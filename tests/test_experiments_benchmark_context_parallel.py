"""experiments.benchmark_context_parallel on 4 simulated devices: one row per device count, the
same logits on each, halos of L - 1 tokens and no all-gather."""

from __future__ import annotations

import json

from multidevice import run_on_devices

SCRIPT = r"""
import json, sys
from lminf_jax.experiments import benchmark_context_parallel
code = benchmark_context_parallel.main(sys.argv[1:])
print("RESULT " + json.dumps({"code": code}))
"""


def test_scaling_table_rows(tmp_path):
    out = tmp_path / "cp.json"
    result = run_on_devices(SCRIPT, "--length", "2100", "--repeats", "1", "--out", str(out), devices=4)
    assert result["code"] == 0
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [r["devices"] for r in rows] == [1, 2, 4] and record["settings"]["length"] == 2100
    assert [r["largest_permute_tokens"] for r in rows] == [0, 511, 511]  # L - 1 = 511: the halo only
    assert all(r["all_gathers"] == 0 and r["rel_err"] < 1e-5 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[-1]["memory_per_device_mib"] < rows[0]["memory_per_device_mib"]
