"""experiments.machine: the CPU model read from /proc/cpuinfo's text, and the benchmark header."""

from __future__ import annotations

import jax
import pytest

from lminf_jax.experiments.machine import cpu_model, machine

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC 9555 64-Core Processor
stepping\t: 1
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw

processor\t: 1
model name\t: another CPU
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


@pytest.mark.parametrize("text, expected", [
    (X86, "AMD EPYC 9555 64-Core Processor (family 26, model 2, stepping 1; avx512f)"),
    (X86.replace(" avx512f avx512bw", ""), "AMD EPYC 9555 64-Core Processor (family 26, model 2, stepping 1; avx2)"),
    (ARM, "0xd0c (asimd)"),
    ("model name\t: Some CPU\n", "Some CPU"),
])
def test_cpu_model_names_the_first_processor_its_ids_and_widest_vector_extension(text, expected):
    assert cpu_model(text) == expected


def test_machine_names_the_device_host_and_cpu():
    got = machine()
    assert got["device"].startswith(jax.devices()[0].platform) and got["jax"] == jax.__version__
    assert got["cpus"] >= 1 and got["cpu"] and got["host"] is not None


def test_peak_rss_is_the_processs_own_not_its_parents():
    """A child of a large process: ``ru_maxrss`` (as ``os.wait4`` reports it) counts the parent's pages the
    child held before its exec; `peak_rss_bytes` is the child's own."""
    import subprocess
    import sys

    import numpy as np

    ballast = np.ones(2 * 10**8 // 8)  # 200 MB, resident
    child = subprocess.run([sys.executable, "-c", "import resource; from experiments.machine import peak_rss_bytes; "
                            "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"],
                           capture_output=True, text=True, check=True)
    own, inherited = map(int, child.stdout.split())
    assert ballast.sum() > 0 and own < inherited and own >= 10**6
