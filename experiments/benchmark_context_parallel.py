"""Encoding throughput of context-parallel LM-Infinite against the number of devices.

    python -m experiments.benchmark_context_parallel [MODEL_DIR] [--devices 1 2 4 8] [--length 65536]
        [--repeats 2] [--dtype fp32|bf16] [--out results/benchmark_context_parallel.json]

For each device count n, a model (default: the shipped LLaMA-style model, L = 512, G = 10) encodes
one sequence of ``--length`` random tokens with the sequence split over the first n devices
(`lminf_jax.context_parallel` inside `models.decoder.LanguageModel.forward`), jitted; after a
warm-up call the best of ``--repeats`` calls is kept. Reported per n: seconds, tokens/s, speed-up
over one device, XLA's per-device memory plan (arguments + outputs + temporaries) and the largest
array a collective-permute moves (the halo: L - 1 tokens, whatever the length). The logits of every
n are checked against the first run's (relative error).

On a CPU host, simulate devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``:
they share the host's cores, so the table shows the per-device memory and the communication
pattern, not a speed-up; on a multi-GPU host the same command measures real scaling.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

from lminf_jax.experiments.loading import DTYPES, load_model, pretraining_length
from lminf_jax.experiments.methods import method_spec
from lminf_jax.experiments.options import command_parser, int_option, output_file, run_cli
from lminf_jax.experiments.machine import machine
from lminf_jax.experiments.shipped import add_model_arg
from lminf_jax.evaluation.resume import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("benchmark_context_parallel", __doc__)
    add_model_arg(p)
    p.add_argument("--devices", type=int_option(1), nargs="+", metavar="N", help="device counts (default: 1, 2, 4, ... all)")
    p.add_argument("--length", type=int_option(2), default=65536, metavar="T", help="tokens per sequence (default 65536)")
    p.add_argument("--repeats", type=int_option(1), default=2, metavar="R", help="timed calls per device count (default 2)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--block", type=int_option(1), default=512, metavar="N", help="attention block size (default 512)")
    p.add_argument("--out", default="results/benchmark_context_parallel.json", type=output_file, metavar="JSON", help="result file")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from lminf_jax import AttentionCall
    from lminf_jax.sharding import ShardingPlan, make_mesh

    available = jax.device_count()
    counts = args.devices or [2**i for i in range(available.bit_length()) if 2**i <= available]
    if any(n < 1 or n > available for n in counts):
        raise ValueError(f"--devices must lie in [1, {available}] (devices present), got {counts}")
    if args.length < 2 or args.repeats < 1:
        raise ValueError(f"--length must be >= 2 and --repeats >= 1, got {args.length} and {args.repeats}")
    tokens = None
    rows, reference = [], None
    for n in counts:
        plan = ShardingPlan(make_mesh(seq=n, devices=jax.devices()[:n]))
        family, config, params = load_model(args.model_dir, args.dtype, plan=plan)
        spec = method_spec("lm_infinite", config)
        model = family.model(config, AttentionCall(spec, block_q=args.block, block_k=args.block), params_dtype(args),
                             plan)
        if tokens is None:
            tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, args.length)), jnp.int32)
        forward = jax.jit(model.forward)
        compiled = forward.lower(params, tokens).compile()
        logits = forward(params, tokens).block_until_ready()
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            forward(params, tokens).block_until_ready()
            times.append(time.perf_counter() - began)
        if reference is None:
            reference = np.asarray(logits, np.float64)
        err = float(np.linalg.norm(np.asarray(logits, np.float64) - reference) / np.linalg.norm(reference))
        rows.append(row(n, min(times), args.length, compiled, err))
        print(format_row(rows[-1], rows[0]["seconds"]), file=sys.stderr, flush=True)
    record = {"settings": {"model": args.model_dir, "length": args.length, "dtype": args.dtype,
                           "attention": spec.describe(), "l_train": pretraining_length(config), "block": args.block,
                           "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
                           **machine()},
              "rows": rows}
    print(format_table(record))
    out = Path(args.out)
    write_json_atomic(out, record)
    print(f"wrote {out}")
    return 0


def params_dtype(args: argparse.Namespace):
    """The `jnp.dtype` of ``--dtype``."""
    import jax.numpy as jnp

    return jnp.dtype(DTYPES[args.dtype])


def row(devices: int, seconds: float, length: int, compiled, rel_err: float) -> dict:
    """One table row: time, throughput, XLA's per-device memory plan and the largest permute."""
    memory = compiled.memory_analysis()
    planned = None if memory is None else int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                              + memory.temp_size_in_bytes)
    hlo = compiled.as_text()
    permuted = [max(map(int, m.group(1).split(",")))
                for m in re.finditer(r"= \w+\[([\d,]+)\][^=]*collective-permute\(", hlo)]
    gathers = len(re.findall(r"\ball-gather\(", hlo))
    return {"devices": devices, "seconds": seconds, "tokens_per_s": length / seconds,
            "memory_per_device_mib": None if planned is None else planned / 2**20,
            "largest_permute_tokens": max(permuted, default=0), "all_gathers": gathers, "rel_err": rel_err}


def format_row(r: dict, base_seconds: float) -> str:
    memory = "-" if r["memory_per_device_mib"] is None else f"{r['memory_per_device_mib']:.0f}"
    return (f"| {r['devices']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | {base_seconds / r['seconds']:.2f}x | "
            f"{memory} | {r['largest_permute_tokens']} | {r['all_gathers']} | {r['rel_err']:.1e} |")


def format_table(record: dict) -> str:
    s = record["settings"]
    lines = [f"context-parallel encoding, T = {s['length']:,}, {s['attention']}, {s['dtype']}, "
             f"{s['platform']} ({s['device_kind']})",
             "| devices | seconds | tokens/s | speed-up | MiB per device | halo permute (tokens) | all-gathers "
             "| rel. err |", "|---|---|---|---|---|---|---|---|"]
    base = record["rows"][0]["seconds"]
    return "\n".join(lines + [format_row(r, base) for r in record["rows"]])


if __name__ == "__main__":
    raise SystemExit(main())
