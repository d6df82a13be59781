"""Time and peak host memory of loading one Hugging Face checkpoint four ways, side by side.

Each loader runs in a fresh subprocess (`measure`), which times the load alone, then reads every
weight once (a max over each), as a first use does: a loader that maps the files without reading
them (``converted`` on CPU, transformers) has its weights' pages resident only once they are read.
The peak RSS of the whole process (after that read) is its ``VmHWM`` (`experiments.machine.peak_rss_bytes`):

* ``hf``: `experiments.loading.load_model` of the Hugging Face directory (converted in memory);
* ``convert``: the converter, ``python -m converters HF_DIR OUT_DIR`` (in-process `converters.__main__.main`);
* ``converted``: `load_model` of the directory that conversion wrote;
* ``transformers``: ``AutoModelForCausalLM.from_pretrained(HF_DIR, dtype="auto")``, for reference.

Reports the median times and the largest peak RSS over ``--repeats`` runs of each, against the
checkpoint's weight bytes; prints a table and writes JSON. Every file is read from the page cache
(the checkpoint is read once before the first loader).

    python -m experiments.benchmark_load /tmp/scale/tinyllama-hf
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import pathlib
import statistics
import sys
import tempfile
import time

from lminf_jax.evaluation.resume import write_json_atomic

LOADERS = ("hf", "convert", "converted", "transformers")
#: What each loader imports before it is timed (its import-only RSS).
_IMPORTS = {
    "hf": ("jax", "experiments.loading", "converters.convert", "converters.families", "models.registry"),
    "converted": ("jax", "experiments.loading", "converters.store", "converters.families", "models.registry"),
    "convert": ("jax", "converters.__main__", "converters.families", "models.registry"),
    "transformers": ("torch", "transformers"),
}


def _peak_rss_mb() -> float:
    from lminf_jax.experiments.machine import peak_rss_bytes

    return peak_rss_bytes() / 1e6


def _load(loader: str, source: str, out: str | None) -> object:
    """What `loader` loads from `source`: params, a torch model, or None (the converter)."""
    if loader in ("hf", "converted"):
        import jax

        from lminf_jax.experiments.loading import load_model

        return jax.block_until_ready(load_model(source)[2])
    if loader == "convert":
        from lminf_jax.converters.__main__ import main

        if main([source, out, "--no-progress"]):
            raise RuntimeError(f"converting {source} failed")
        return None
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype="auto")


def _read_every_weight(loaded: object) -> None:
    if loaded is None:
        return
    if isinstance(loaded, dict):
        import jax
        import jax.numpy as jnp

        jax.block_until_ready([jnp.max(x) for x in jax.tree.leaves(loaded)])
        return
    for tensor in loaded.state_dict().values():
        tensor.max()


def run_loader(loader: str, source: str, out: str | None = None) -> dict:
    """In this process: `loader`'s imports, then its load of `source` (`out`: the converter's
    output), then a read of every weight. Their seconds, and the peak RSS (MB) after the imports
    and after the load."""
    for module in _IMPORTS[loader]:
        importlib.import_module(module)
    import_mb = _peak_rss_mb()
    start = time.perf_counter()
    loaded = _load(loader, source, out)
    loaded_at, load_mb = time.perf_counter(), _peak_rss_mb()
    _read_every_weight(loaded)
    return {"seconds": loaded_at - start, "read_seconds": time.perf_counter() - loaded_at,
            "import_rss_mb": import_mb, "load_rss_mb": load_mb, "peak_rss_mb": _peak_rss_mb()}


#: A measured subprocess: this module imports nothing but the standard library before `run_loader`.
_CHILD = ("import json, sys; from experiments.benchmark_load import run_loader; "
          "print(json.dumps(run_loader(*sys.argv[1:])))")


def measure(loader: str, source: str | pathlib.Path, out: str | pathlib.Path | None = None) -> dict:
    """`run_loader`'s record, from a fresh subprocess (its own peak RSS, `experiments.machine.peak_rss_bytes`:
    the rusage ``os.wait4`` reports would count this process's pages the child held before its exec)."""
    from lminf_jax.experiments.benchmark_convert import run_child

    stdout = run_child(["-c", _CHILD, loader, str(source)] + ([str(out)] if out else []))[2]
    return json.loads(stdout.strip().splitlines()[-1])


def weight_bytes(hf_dir: str | pathlib.Path) -> int:
    """The bytes of every tensor of a Hugging Face checkpoint (from its headers)."""
    from lminf_jax.converters.dtypes import numpy_dtype
    from lminf_jax.converters.reader import CheckpointReader

    reader = CheckpointReader(hf_dir)
    return sum(math.prod(reader.shape(n)) * numpy_dtype(reader.dtype(n), n).itemsize for n in reader.names())


def _read_files(directory: pathlib.Path) -> None:
    """Read every file in `directory` once (into the page cache), 64 MiB at a time."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as stream:
                while stream.read(1 << 26):
                    pass


def benchmark(hf_dir: pathlib.Path, repeats: int, work: str | None = None) -> list[dict]:
    """One row per loader of `LOADERS`: median seconds and largest RSS (MB) over `repeats` runs, and
    the peak over the weight bytes. The conversion writes into a temporary directory (in `work`),
    which ``converted`` then loads."""
    weights_mb = weight_bytes(hf_dir) / 1e6
    _read_files(hf_dir)
    runs: dict[str, list[dict]] = {loader: [] for loader in LOADERS}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for k in range(repeats):
            out = pathlib.Path(tmp, f"converted-{k}")
            for loader in LOADERS:
                result = measure(loader, out if loader == "converted" else hf_dir, out if loader == "convert" else None)
                runs[loader].append(result)
                print(f"{loader}: {result}", file=sys.stderr, flush=True)
    rows = []
    for loader, results in runs.items():
        peak = max(r["peak_rss_mb"] for r in results)
        imports = max(r["import_rss_mb"] for r in results)
        rows.append({"loader": loader, "weights_mb": round(weights_mb, 1),
                     "seconds": round(statistics.median(r["seconds"] for r in results), 2),
                     "read_seconds": round(statistics.median(r["read_seconds"] for r in results), 2),
                     "import_rss_mb": round(imports, 1),
                     "load_rss_mb": round(max(r["load_rss_mb"] for r in results), 1),
                     "peak_rss_mb": round(peak, 1),
                     "peak_over_weights": round(peak / weights_mb, 3),
                     "above_imports_over_weights": round((peak - imports) / weights_mb, 3)})
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| loader | weights MB | load s | then read s | import-only RSS MB | RSS after load MB | peak RSS MB "
             "| peak / weights | (peak - imports) / weights |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['loader']} | {r['weights_mb']:.0f} | {r['seconds']:.2f} | {r['read_seconds']:.2f} "
              f"| {r['import_rss_mb']:.0f} | {r['load_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} "
              f"| {r['peak_over_weights']:.2f} | {r['above_imports_over_weights']:.2f} |" for r in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from lminf_jax.experiments.options import command_parser, input_path, int_option, output_dir, output_file

    p = command_parser("benchmark_load", __doc__)
    p.add_argument("hf_dir", type=input_path, help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("--repeats", type=int_option(1), default=1, help="runs of each loader (default 1)")
    p.add_argument("--work", type=output_dir,
                   help="folder for the converted directory (default: the system's temporary folder)")
    p.add_argument("--out", default="results/benchmark_load.json", type=output_file, metavar="JSON",
                   help="the result (JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    from lminf_jax.experiments.machine import machine
    from lminf_jax.experiments.options import parse_checked

    args = parse_checked(build_parser(), argv)

    rows = benchmark(pathlib.Path(args.hf_dir), args.repeats, args.work)
    print(f"median times and largest RSS of {args.repeats} run(s) of each loader, each a fresh process")
    print(table(rows))
    out = pathlib.Path(args.out)
    meta = {**machine(), "hf_dir": str(pathlib.Path(args.hf_dir).absolute()), "repeats": args.repeats}
    write_json_atomic(out, {"meta": meta, "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
