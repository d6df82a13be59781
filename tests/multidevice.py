"""Run a script on simulated CPU devices: jax fixes its device count when it starts, so tests
that need a mesh run their checks in a subprocess and read back one ``RESULT {json}`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_on_devices(script: str, *args: str, devices: int = 8, timeout: int = 900) -> dict:
    """Run ``script`` (Python source that prints ``RESULT <json>``) with ``devices`` CPU devices
    and the repository on the path; return the parsed JSON (a failed run fails the test)."""
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, f"no RESULT line in the output:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    return json.loads(line[len("RESULT "):])
