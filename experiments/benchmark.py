"""The speed suite: attention kernels, full-model encoding and decoding against the hardware.

    python -m experiments.benchmark [--preset llama2-7b|tiny] [--sections attention encode decode]
        [--attention-lengths T ...] [--encode-lengths T ...] [--positions P ...] [--batches B ...]
        [--repeats 3] [--out results/benchmark.json] [--plot results/benchmark.png]

A LLaMA-shaped model with random weights (``llama2-7b``: Llama-2-7B's shapes in bf16, L = 4096,
G = 10, for a GPU; ``tiny``: 4 layers of 4 heads x 64 in float32, L = 2048, for a CPU):

(a) **attention**: one layer's heads at each length, LM-Infinite through the Pallas kernel (GPU
    only: off GPU it would be interpreted) and the blockwise XLA path, against causal and
    sliding-window attention from `jax.nn.dot_product_attention` (cuDNN on GPU, XLA elsewhere).
    ms and TFLOP/s, FLOPs counted on the attended (query, key) pairs of each mask (4 d per pair).
(b) **encode**: the whole model's forward pass at each length, vanilla (blockwise, flash-style)
    vs LM-Infinite (the kernel on GPU, blockwise elsewhere): ms, tokens/s and XLA's memory plan.
(c) **decode**: ms per token at each position and batch, Λ-cache vs full cache, against the
    roofline: the bytes a step must read (weights + the cache slots it attends) over the memory
    bandwidth measured here (a large read-only reduction).

Prints a table per section, writes JSON and a three-panel PNG. A variant that fails (out of
memory, unsupported shape) is reported as failed with its error, never dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmark_decode import PRESETS, measure
from experiments.loading import run_cli
from experiments.machine import machine
from experiments.options import int_option, output_file, plot_file
from lminf_jax import LMInfinite, Rotary, Vanilla, attention
from lminf_jax.rope import apply_rope
from models import llama
from models.common import AttentionCall
from models.decoder import LanguageModel
from models.registry import FAMILIES

SIZES = {  # (attention lengths, encode lengths, decode positions) per preset
    "llama2-7b": ([8192, 32768, 131072], [4096, 8192, 16384, 32768, 65536, 131072], [4096, 32768, 131072]),
    "tiny": ([2048, 4096, 8192], [2048, 4096, 8192], [2048, 8192, 32768]),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama2-7b" if jax.default_backend() == "gpu" else "tiny")
    p.add_argument("--sections", nargs="+", choices=["attention", "encode", "decode"],
                   default=["attention", "encode", "decode"])
    p.add_argument("--attention-lengths", type=int_option(1), nargs="+", metavar="T")
    p.add_argument("--encode-lengths", type=int_option(1), nargs="+", metavar="T")
    p.add_argument("--positions", type=int_option(0), nargs="+", metavar="P", help="decode positions")
    p.add_argument("--batches", type=int_option(1), nargs="+", default=[1, 8], metavar="B", help="decode batch sizes")
    p.add_argument("--steps", type=int_option(1), default=16, help="tokens per timed decoding call")
    p.add_argument("--repeats", type=int_option(1), default=3, help="timed calls (the best is kept)")
    p.add_argument("--out", default="results/benchmark.json", type=output_file, metavar="JSON")
    p.add_argument("--plot", default="results/benchmark.png", type=plot_file, metavar="PNG")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


def best_of(run, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``run()`` (which waits for its result) after a
    warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def best_seconds(fn, args, repeats: int) -> float:
    """The fastest of ``repeats`` calls of the JAX function ``fn(*args)`` after a warm-up call."""
    return best_of(lambda: jax.block_until_ready(fn(*args)), repeats)


def attended_pairs(t: int, window: int | None, sinks: int = 0) -> int:
    """(query, key) pairs a causal mask (window None), a sliding window of ``window`` keys, or a
    Λ-mask (window plus ``sinks`` sinks beyond it) attends over positions 0..t-1."""
    q = np.arange(t, dtype=np.int64)
    local = q + 1 if window is None else np.minimum(q + 1, window)
    far = 0 if window is None else np.clip(q - window + 1, 0, sinks)
    return int(np.sum(local + far))


def run_variant(name: str, fn, args, repeats: int, flops: float | None = None) -> dict:
    """Time one variant; a failure is recorded with its error."""
    try:
        seconds = best_seconds(jax.jit(fn), args, repeats)
    except Exception as e:  # noqa: BLE001 - OOM and unsupported shapes are results to report
        print(f"  {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        return {"variant": name, "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:500]}"}
    row = {"variant": name, "ms": 1e3 * seconds}
    if flops is not None:
        row["tflops"] = flops / seconds / 1e12
    return row


def attention_section(cfg, dtype, window: int, sinks: int, lengths: list[int], repeats: int) -> list[dict]:
    """(a) one layer's attention at each length."""
    gpu = jax.default_backend() == "gpu"
    baseline = "cudnn" if gpu else "xla"
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rope = Rotary.create(d, theta=cfg.rope_theta)
    spec = LMInfinite(sinks, window)
    rows = []
    rng = np.random.default_rng(0)
    for t in lengths:
        q = jnp.asarray(rng.standard_normal((1, t, hq, d), np.float32), dtype)
        k, v = (jnp.asarray(rng.standard_normal((1, t, hkv, d), np.float32), dtype) for _ in range(2))
        pos = jnp.arange(t, dtype=jnp.int32)
        lam = 4 * hq * d * attended_pairs(t, window, sinks)
        causal = 4 * hq * d * attended_pairs(t, None)
        sliding = 4 * hq * d * attended_pairs(t, window)

        def lm_infinite(implementation):
            return lambda q, k, v: attention(q, k, v, q_positions=pos, k_positions=pos, spec=spec, positional=rope,
                                             implementation=implementation)

        def library(window_size):
            def fn(q, k, v):
                qr, kr = apply_rope(q, pos, rope), apply_rope(k, pos, rope)
                return jax.nn.dot_product_attention(qr, kr, v, is_causal=True, local_window_size=window_size,
                                                    implementation=None if baseline == "xla" else baseline)
            return fn

        variants = [("Λ-attention, blockwise XLA", lm_infinite("blockwise"), lam),
                    (f"causal, {baseline}", library(None), causal),
                    (f"sliding window L, {baseline}", library((window - 1, 0)), sliding)]
        if gpu:
            variants.insert(0, ("Λ-attention, Pallas kernel", lm_infinite("pallas"), lam))
        for name, fn, flops in variants:
            rows.append({"T": t, **run_variant(name, fn, (q, k, v), repeats, flops)})
            print(format_row(rows[-1], "T"), file=sys.stderr, flush=True)
    return rows


def encode_section(cfg, dtype, params, window: int, sinks: int, lengths: list[int], repeats: int) -> list[dict]:
    """(b) the model's forward pass (last token's logits) at each length."""
    lam = "pallas" if jax.default_backend() == "gpu" else "blockwise"
    methods = {"vanilla": AttentionCall(Vanilla(), "blockwise"),
               "LM-Infinite": AttentionCall(LMInfinite(sinks, window), lam)}
    rows = []
    for t in lengths:
        tokens = jnp.asarray(np.random.default_rng(t).integers(0, cfg.vocab_size, (1, t)), jnp.int32)
        for name, call in methods.items():
            model = LanguageModel(llama.decoder, cfg, call, dtype)
            fn = lambda p, x, model=model: model.forward(p, x)[:, -1]  # noqa: E731
            row = {"T": t, **run_variant(f"{name} ({call.implementation})", fn, (params, tokens), repeats)}
            if "ms" in row:
                row["tokens_per_s"] = t / row["ms"] * 1e3
                mem = jax.jit(fn).lower(params, tokens).compile().memory_analysis()
                if mem is not None:
                    row["plan_mib"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                       + mem.temp_size_in_bytes) / 2**20
            rows.append(row)
            print(format_row(rows[-1], "T"), file=sys.stderr, flush=True)
    return rows


def read_bandwidth(repeats: int) -> float:
    """Bytes per second of a read-only reduction over a buffer far larger than any cache."""
    size = (1 << 30) if jax.default_backend() == "gpu" else (1 << 27)
    x = jnp.ones((size // 2,), jnp.bfloat16)
    return size / best_seconds(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), (x,), repeats)


def decode_section(cfg, dtype, params, window: int, sinks: int, positions: list[int], batches: list[int],
                   steps: int, repeats: int) -> tuple[list[dict], float]:
    """(c) ms per token against the roofline, Λ-cache vs full cache."""
    bandwidth = read_bandwidth(repeats)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    slot_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    methods = {"Λ-cache": LMInfinite(sinks, window), "full cache": Vanilla()}
    rows = []
    for batch in batches:
        for position in positions:
            for name, spec in methods.items():
                model = LanguageModel(llama.decoder, cfg, AttentionCall(spec), dtype)
                attended = min(position, sinks + window) if name == "Λ-cache" else position
                roofline = (weight_bytes + batch * attended * slot_bytes) / bandwidth * 1e3
                row = {"variant": name, "position": position, "batch": batch, "roofline_ms": roofline}
                try:
                    got = measure(model, params, position, steps, repeats, batch)
                    row.update(ms=got["ms_per_token"], cache_mib=got["cache_bytes"] / 2**20,
                               of_roofline=got["ms_per_token"] / roofline)
                except Exception as e:  # noqa: BLE001 - OOM is a result to report
                    row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:500]}"
                rows.append(row)
                print(format_row(row, "position"), file=sys.stderr, flush=True)
    return rows, bandwidth


def format_row(row: dict, key: str) -> str:
    if "failed" in row:
        return f"| {row[key]:,} | {row['variant']} | failed: {row['failed'][:120]} |"
    extra = ", ".join(f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                      if k not in (key, "variant", "ms"))
    return f"| {row[key]:,} | {row['variant']} | {row['ms']:,.2f} ms | {extra} |"


def plot(record: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sections = [s for s in ("attention", "encode", "decode") if record.get(s)]
    fig, axes = plt.subplots(1, len(sections), figsize=(5.5 * len(sections), 4.2), squeeze=False)
    for ax, section in zip(axes[0], sections):
        rows = [r for r in record[section] if "ms" in r]
        key = "position" if section == "decode" else "T"
        labels = sorted({(r["variant"], r.get("batch")) for r in rows}, key=str)
        for variant, batch in labels:
            pts = sorted((r[key], r["ms"]) for r in rows if r["variant"] == variant and r.get("batch") == batch)
            ax.plot(*zip(*pts), marker="o", label=variant + ("" if batch is None else f", batch {batch}"))
        if section == "decode":
            for batch in sorted({r["batch"] for r in record[section]}):
                pts = sorted((r["position"], r["roofline_ms"]) for r in record[section]
                             if r["batch"] == batch and r["variant"] == "Λ-cache")
                ax.plot(*zip(*pts), ls=":", color="grey", label=f"roofline Λ-cache, batch {batch}")
        ax.set(xscale="log", yscale="log", xlabel="position" if section == "decode" else "tokens",
               ylabel="ms per token" if section == "decode" else "ms", title=section)
        ax.legend(fontsize=7)
    fig.suptitle(f"{record['settings']['preset']} on {record['settings']['device']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    cfg, dtype, sinks = preset["config"], preset["dtype"], preset["global_branch"]
    window = cfg.max_position_embeddings
    attention_lengths, encode_lengths, positions = SIZES[args.preset]
    record = {"settings": {"preset": args.preset, "config": dataclasses.asdict(cfg), "dtype": jnp.dtype(dtype).name,
                           "window": window, "sinks": sinks, **machine(), "repeats": args.repeats}}
    print(f"benchmark: preset {args.preset}, {record['settings']['dtype']}, {record['settings']['device']}",
          file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def finish(section: str) -> None:
        """Save the JSON after each section (its rows are printed as measured): a run stopped by a time
        limit keeps what it measured."""
        print(f"({section} saved in {out})", file=sys.stderr)
        out.write_text(json.dumps(record, indent=1))

    if "attention" in args.sections:
        record["attention"] = attention_section(cfg, dtype, window, sinks, args.attention_lengths or attention_lengths,
                                                args.repeats)
        finish("attention")
    if {"encode", "decode"} & set(args.sections):
        params = FAMILIES["llama"].init_params(cfg, jax.random.key(0), dtype)
        if "encode" in args.sections:
            record["encode"] = encode_section(cfg, dtype, params, window, sinks, args.encode_lengths or encode_lengths,
                                              args.repeats)
            finish("encode")
        if "decode" in args.sections:
            record["decode"], record["read_bandwidth_gb_s"] = decode_section(
                cfg, dtype, params, window, sinks, args.positions or positions, args.batches, args.steps, args.repeats)
            record["read_bandwidth_gb_s"] /= 1e9
            finish("decode")
    drawn = plot(record, Path(args.plot))
    print(f"wrote {out}" + (f" and {args.plot}" if drawn else " (no plot: matplotlib is not installed)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
