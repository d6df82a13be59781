"""Where a benchmark ran, for its JSON: the device, the host and the CPU model.

Speed ratios between this project and its peers differ from one CPU model to another (XLA's and
PyTorch's CPU kernels use the vector units differently), so every benchmark records the CPU.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
#: Vector extensions worth naming, widest first.
VECTOR_FLAGS = ("amx_tile", "avx512f", "avx2", "asimd", "neon")


def cpu_model(cpuinfo: str | None = None) -> str:
    """The first processor of ``cpuinfo`` (default: this host's /proc/cpuinfo) as
    ``"NAME (family F, model M, stepping S; EXT)"``, with the widest vector extension its flags
    name; the `platform` module's guess where there is no cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or platform.machine()
    ids = ", ".join(f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"),
                                                                ("stepping", "stepping")) if key in fields)
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    widest = next((f for f in VECTOR_FLAGS if f in flags), None)
    details = "; ".join(x for x in (ids, widest) if x)
    return f"{name} ({details})" if details else name


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started: Linux's ``VmHWM`` (reset by ``exec``), else
    ``getrusage``'s ``ru_maxrss``, which on Linux also counts the parent's pages a forked child held
    before its ``exec`` (so a child of a large process would report at least the parent's size)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def machine() -> dict:
    """The first JAX device, the host name, its CPU count and model, and the jax version."""
    import jax

    device = jax.devices()[0]
    return {"device": f"{device.platform} {device.device_kind}", "host": platform.node(), "cpus": os.cpu_count(),
            "cpu": cpu_model(), "jax": jax.__version__}
