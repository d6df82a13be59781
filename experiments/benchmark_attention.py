"""Time and memory of dense vs blockwise attention as the sequence grows.

Prints a table and writes JSON. Memory is XLA's plan for one call (arguments +
outputs + temporaries, from the compiled executable; on GPU also the allocator's
peak). Dense runs are skipped (but still planned) when their plan exceeds
``--max-dense-gib``.

    python -m experiments.benchmark_attention                          # CPU-sized
    python -m experiments.benchmark_attention --heads 32 --kv-heads 32 --head-dim 128 \\
        --window 4096 --dtype bfloat16 --lengths 2048 8192 32768       # Llama-2-7B heads, GPU
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import numpy as np

from lminf_jax.experiments.machine import machine
from lminf_jax.experiments.options import command_parser, int_option, output_file, parse_checked
from lminf_jax.evaluation.resume import write_json_atomic


def _steady_seconds(fn, args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _device_peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("benchmark_attention", __doc__)
    p.add_argument("--lengths", type=int_option(1), nargs="+", default=[2048, 8192, 32768], metavar="T",
                   help="sequence lengths")
    p.add_argument("--window", type=int_option(1), default=2048, help="L = D")
    p.add_argument("--sinks", type=int_option(0), default=10, help="G")
    p.add_argument("--heads", type=int_option(1), default=4, help="query heads")
    p.add_argument("--kv-heads", type=int_option(1), default=4, help="key / value heads")
    p.add_argument("--head-dim", type=int_option(1), default=64, help="head dimension")
    p.add_argument("--block", type=int_option(1), default=512, help="blockwise attention block size")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the inputs")
    p.add_argument("--repeats", type=int_option(1), default=3, help="timed calls (the best is kept)")
    p.add_argument("--max-dense-gib", type=float, default=8.0, help="skip a dense run planned above this many GiB")
    p.add_argument("--out", type=output_file, default="results/benchmark_attention.json", metavar="JSON",
                   help="the result (JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_checked(build_parser(), argv)
    import jax
    import jax.numpy as jnp

    from lminf_jax.attention_blockwise import blockwise_attention
    from lminf_jax.attention_reference import reference_attention
    from lminf_jax.rope import Rotary
    from lminf_jax.spec import LMInfinite, Vanilla

    dtype = jnp.dtype(args.dtype)
    rope = Rotary.create(args.head_dim)
    scale = args.head_dim**-0.5
    lm_inf = LMInfinite(args.sinks, args.window)
    variants = {
        "blockwise lm_infinite": functools.partial(
            blockwise_attention, spec=lm_inf, positional=rope, scale=scale, block_q=args.block, block_k=args.block),
        "blockwise vanilla": functools.partial(
            blockwise_attention, spec=Vanilla(), positional=rope, scale=scale,
            block_q=args.block, block_k=args.block),
        "dense lm_infinite": functools.partial(reference_attention, spec=lm_inf, positional=rope, scale=scale),
    }
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}); heads {args.heads}/{args.kv_heads} x {args.head_dim}, "
          f"{args.dtype}, G={args.sinks} L=D={args.window}, block {args.block}")
    rows = []
    rng = np.random.default_rng(0)
    for t in args.lengths:
        q = jnp.asarray(rng.standard_normal((1, t, args.heads, args.head_dim), np.float32), dtype)
        k, v = (jnp.asarray(rng.standard_normal((1, t, args.kv_heads, args.head_dim), np.float32), dtype)
                for _ in range(2))
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        for name, fn in variants.items():
            jitted = jax.jit(fn)
            stats = jitted.lower(q, k, v, pos, pos).compile().memory_analysis()
            planned = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            row = {"T": t, "variant": name, "planned_bytes": int(planned), "seconds": None, "device_peak_bytes": None}
            if name.startswith("dense") and planned > args.max_dense_gib * 2**30:
                row["skipped"] = f"plan {planned / 2**30:.1f} GiB > --max-dense-gib {args.max_dense_gib}"
            else:
                row["seconds"] = _steady_seconds(jitted, (q, k, v, pos, pos), args.repeats)
                row["device_peak_bytes"] = _device_peak_bytes()
            rows.append(row)
            shown = f"{row['seconds'] * 1e3:10.1f}" if row["seconds"] is not None else "   not run"
            print(f"  T={t:>7}  {name:<22} {shown} ms   plan {planned / 2**20:10.1f} MiB"
                  + (f"   ({row['skipped']})" if "skipped" in row else ""), flush=True)

    print("\n| T | variant | time (ms) | XLA plan (MiB) |\n|---:|---|---:|---:|")
    for r in rows:
        shown = f"{r['seconds'] * 1e3:.1f}" if r["seconds"] is not None else "not run (OOM plan)"
        print(f"| {r['T']} | {r['variant']} | {shown} | {r['planned_bytes'] / 2**20:.1f} |")
    out = pathlib.Path(args.out)
    meta = {**machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    write_json_atomic(out, {"meta": meta, "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
