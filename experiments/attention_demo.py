"""Main job (until the reproduction lands): LM-Infinite attention at 8x its window.

Runs the jitted blockwise Λ-attention on random inputs at T = multiple * L, checks it
against the dense float32 reference, and reports timings and XLA's planned memory:

    python -m experiments.attention_demo            # embedded default, CPU-sized
    python -m experiments.attention_demo --window 4096 --heads 32 --kv-heads 32 --head-dim 128
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import numpy as np

from lminf_jax.experiments.options import command_parser, int_option, output_file, parse_checked
from lminf_jax.evaluation.resume import write_json_atomic


def _timed(fn, *args, repeats: int = 3) -> tuple[float, float, object]:
    """(first call incl. compile, best steady-state call) in seconds, and the result."""
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return first, best, out


def planned_bytes(fn, *args) -> int:
    """XLA's planned peak for one call: arguments + outputs + temporaries."""
    stats = fn.lower(*args).compile().memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("attention_demo", __doc__)
    p.add_argument("--window", type=int_option(1), default=512, help="local branch L (and distance limit D)")
    p.add_argument("--sinks", type=int_option(0), default=10, help="global branch G")
    p.add_argument("--multiple", type=int_option(1), default=8, help="sequence length T = multiple * L")
    p.add_argument("--heads", type=int_option(1), default=8, help="query heads")
    p.add_argument("--kv-heads", type=int_option(1), default=2, help="key / value heads")
    p.add_argument("--head-dim", type=int_option(1), default=64, help="head dimension")
    p.add_argument("--block", type=int_option(1), default=512, help="query block and key chunk size")
    p.add_argument("--seed", type=int_option(0), default=0, help="seed of the random inputs")
    p.add_argument("--out", type=output_file, default="results/attention_demo.json", metavar="JSON",
                   help="the result (JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_checked(build_parser(), argv)
    import jax
    import jax.numpy as jnp

    from lminf_jax.attention_blockwise import blockwise_attention
    from lminf_jax.attention_reference import reference_attention
    from lminf_jax.rope import Rotary
    from lminf_jax.spec import LMInfinite

    t = args.multiple * args.window
    spec = LMInfinite(args.sinks, args.window)
    rope = Rotary.create(args.head_dim)
    rng = np.random.default_rng(args.seed)
    q = jnp.asarray(rng.standard_normal((1, t, args.heads, args.head_dim), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((1, t, args.kv_heads, args.head_dim), np.float32)) for _ in range(2))
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    scale = args.head_dim**-0.5
    print(f"LM-Infinite attention {spec.describe()} with RoPE at T={t} ({args.multiple}x the window), "
          f"{args.heads} query / {args.kv_heads} kv heads of dim {args.head_dim}, float32, on {jax.devices()[0].platform}")

    common = dict(spec=spec, positional=rope, scale=scale)
    blockwise = jax.jit(functools.partial(blockwise_attention, block_q=args.block, block_k=args.block, **common))
    dense = jax.jit(functools.partial(reference_attention, **common))
    run_blockwise = lambda *a: blockwise(*a)[0]  # noqa: E731
    b_first, b_best, out = _timed(run_blockwise, q, k, v, pos, pos)
    d_first, d_best, ref = _timed(dense, q, k, v, pos, pos)
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    result = {
        "spec": spec.describe(),
        "T": t,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "platform": jax.devices()[0].platform,
        "relative_error_vs_dense": err,
        "blockwise_s": {"first_call_with_compile": b_first, "steady": b_best},
        "dense_s": {"first_call_with_compile": d_first, "steady": d_best},
        "blockwise_planned_bytes": planned_bytes(blockwise, q, k, v, pos, pos),
        "dense_planned_bytes": planned_bytes(dense, q, k, v, pos, pos),
        "keys_scored_per_query": {"blockwise_at_most": args.sinks + args.window + args.block, "dense": t},
    }
    print(f"  relative error blockwise vs dense reference: {err:.2e} (limit 1e-5)")
    print(f"  blockwise: {b_best * 1e3:9.1f} ms per call ({b_first:.2f} s first call incl. compile), "
          f"XLA plan {result['blockwise_planned_bytes'] / 2**20:8.1f} MiB")
    print(f"  dense    : {d_best * 1e3:9.1f} ms per call ({d_first:.2f} s first call incl. compile), "
          f"XLA plan {result['dense_planned_bytes'] / 2**20:8.1f} MiB")
    out = pathlib.Path(args.out)
    write_json_atomic(out, result)
    print(f"  wrote {out}")
    if not err <= 1e-5:
        print("FAILED: blockwise and dense disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
