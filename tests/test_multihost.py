"""Two processes on localhost joined by `jax.distributed.initialize` (CPU collectives over gloo),
two CPU devices each (`tests/multihost_worker.py`): a sharded forward (data x model across the
processes) and a context-parallel forward (the sequence split over all four devices, halos crossing
the process boundary) give the single-process logits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from conftest import rel_err
from multidevice import ROOT
from multihost_worker import CALL, HF, MESHES, inputs

from lminf_jax.models import registry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_single_process_logits(tmp_path):
    port = str(_free_port())
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    # output to files, not pipes: a process blocked on a full pipe would never reach the shutdown
    # barrier the other one waits at
    logs = [(tmp_path / f"{pid}.out", tmp_path / f"{pid}.err") for pid in (0, 1)]
    workers = []
    for pid, (out, err) in enumerate(logs):
        with out.open("w") as stdout, err.open("w") as stderr:
            workers.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "multihost_worker.py"), port,
                                             str(pid)], env=env, stdout=stdout, stderr=stderr))
    try:
        codes = [worker.wait(timeout=600) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    results = []
    for code, (out, err) in zip(codes, logs):
        assert code == 0, err.read_text()[-3000:]
        line = next((x for x in out.read_text().splitlines() if x.startswith("RESULT ")), None)
        assert line is not None, err.read_text()[-3000:]
        results.append(json.loads(line[len("RESULT "):]))

    family = registry.family_for_config(HF)
    config = family.config_from_hf(HF)
    params, tokens = inputs(family, config)
    want = family.model(config, CALL).forward(params, jnp.asarray(tokens))
    assert [(r["process"], r["devices"], r["local_devices"]) for r in results] == [(0, 4, 2), (1, 4, 2)]
    for name in MESHES:
        for r in results:  # every process gathers the whole result
            assert rel_err(np.asarray(r[name]["logits"]), want) < 1e-5, name
    assert results[0]["seq4"]["collective_permute"]  # the halos moved between devices, across processes
