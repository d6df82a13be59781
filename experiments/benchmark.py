"""The speed suite: attention kernels, full-model encoding and decoding against the hardware, and its targets.

    python -m experiments.benchmark [--preset llama2-7b|tiny] [--sections attention encode decode]
        [--attention-lengths T ...] [--encode-lengths T ...] [--positions P ...] [--batches B ...]
        [--repeats 3] [--out results/benchmark.json] [--plot results/benchmark.png]

A LLaMA-shaped model with random weights (``llama2-7b``: Llama-2-7B's shapes in bf16, L = 4096,
G = 10, for a GPU; ``tiny``: 4 layers of 4 heads x 64 in float32, L = 2048, for a CPU):

(a) **attention**: one layer's heads at each length (self-attention at positions 0..T-1). LM-Infinite
    through the window route (`lminf_jax.attention_vendor`: cuDNN's fused sliding window plus the sink
    branch on GPU, its ``"window_xla"`` twin elsewhere; the row records what ``"auto"`` picks for the
    call, `attention_route`), the Pallas kernel (GPU only: off GPU it would be interpreted) and the
    blockwise XLA path, against causal and sliding-window attention from `jax.nn.dot_product_attention`
    (cuDNN on GPU, XLA elsewhere). ms and TFLOP/s, FLOPs counted on the attended (query, key) pairs of
    each mask (4 d per pair).
(b) **encode**: the whole model at each length, LM-Infinite then vanilla, both ``"auto"`` (each row
    records its attention's route). Timed: `LanguageModel.score`, each next token's log-probability
    with the head run on chunks, so the ``(T, vocab)`` float32 logits (16.8 GB at 128K tokens of a 32K
    vocabulary) are never built. ms and tokens/s.
(c) **decode**: ms per token at each position and batch, Λ-cache vs full cache, against the
    roofline: the bytes a step must read (weights + the cache slots it attends) over the memory
    bandwidth measured here (a large read-only reduction).
(d) **targets** (`targets`, computed from the rows alone): the cuDNN route at 32K against cuDNN's
    sliding window (window ms / route ms >= 0.8) and causal attention (causal ms / route ms >= 3);
    whole-model LM-Infinite encoding at 128K against vanilla (>= 2.5x) with memory linear in T (the
    planned bytes per added token grow at most 1.5x from the first interval of lengths to the last;
    the plan and the peak per token at each length beside it); Λ-cache decoding at 32K, batch 1,
    within 1.3x of the roofline. Each: the figure, the threshold, met or not, or why it was not
    measured.

Every timed row also records its compile time, XLA's memory plan (arguments + outputs + temporaries)
and, where the device counts it (GPU), the process's peak device memory after it (a high-water mark
jax cannot reset): ``peak_own`` says whether the row raised it (then the figure is its own peak; else its own is at most
that). Prints each row as measured and the targets at the end; writes the JSON after every row (a
run stopped by a time limit keeps what it measured) and a three-panel PNG after every section. A
variant that fails (out of memory, unsupported shape) is reported as failed with its error, never
dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.experiments.benchmark_decode import PRESETS, measure
from lminf_jax.experiments.options import int_option, output_file, plot_file, run_cli
from lminf_jax.experiments.machine import machine
from lminf_jax import LMInfinite, Rotary, Vanilla, attention
from lminf_jax.attention import attention_route
from lminf_jax.rope import apply_rope
from lminf_jax.models import llama
from lminf_jax import AttentionCall
from lminf_jax.models.decoder import LanguageModel
from lminf_jax.models.registry import FAMILIES
from lminf_jax.evaluation.resume import write_json_atomic

SIZES = {  # (attention lengths, encode lengths, decode positions) per preset
    "llama2-7b": ([8192, 32768, 131072], [4096, 8192, 16384, 32768, 65536, 131072], [4096, 32768, 131072]),
    "tiny": ([2048, 4096, 8192], [2048, 4096, 8192], [2048, 8192, 32768]),
}
#: The variants the targets compare (GPU rows: on CPU the library baselines are XLA's, so no target is measured).
CUDNN_ROUTE, CUDNN_CAUSAL, CUDNN_WINDOW = "Λ-attention, cuDNN route", "causal, cudnn", "sliding window L, cudnn"
LM_INFINITE, VANILLA, LAMBDA_CACHE = "LM-Infinite", "vanilla", "Λ-cache"
#: Where the targets are read: attention length, encode length, decode position (batch 1).
ATTENTION_AT, ENCODE_AT, DECODE_AT = 32768, 131072, 32768
#: Memory counts as linear in T when the planned bytes per added token grow by at most this factor from
#: the first interval of encode lengths to the last (a T^2 term makes it the ratio of the intervals'
#: mean lengths: 4 for 8K, 32K, 128K).
LINEAR_SLACK = 1.5


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


def failure(e: Exception) -> str:
    """A failed row's error: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:500]}"


def device_peak_bytes() -> int | None:
    """The process's high-water mark of device memory in use (None where the backend keeps no count)."""
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else stats.get("peak_bytes_in_use")


def run_variant(name: str, fn: Callable, args: tuple, repeats: int, flops: float | None = None) -> dict:
    """Compile and time one variant: ms, compile seconds, TFLOP/s of ``flops``, XLA's memory plan and the
    device's peak after it (`device_peak_bytes`); a failure is recorded with its error."""
    before = device_peak_bytes()
    try:
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - start
        seconds = best_seconds(compiled, args, repeats)
    except Exception as e:  # noqa: BLE001 - OOM and unsupported shapes are results to report
        return {"variant": name, "failed": failure(e)}
    row = {"variant": name, "ms": 1e3 * seconds, "compile_s": compile_s}
    if flops is not None:
        row["tflops"] = flops / seconds / 1e12
    mem = compiled.memory_analysis()
    if mem is not None:
        row["plan_mib"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**20
    peak = device_peak_bytes()
    if peak is not None:
        row.update(peak_mib=peak / 2**20, peak_own=peak > before)
    return row


def attention_rows(cfg, dtype, window: int, sinks: int, lengths: list[int], repeats: int) -> Iterator[dict]:
    """(a) one layer's attention at each length."""
    gpu = jax.default_backend() == "gpu"
    library = "cudnn" if gpu else "xla"
    route, route_name = ("cudnn", CUDNN_ROUTE) if gpu else ("window_xla", "Λ-attention, XLA window route")
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rope = Rotary.create(d, theta=cfg.rope_theta)
    spec = LMInfinite(sinks, window)
    rng = np.random.default_rng(0)
    for t in lengths:
        q = jnp.asarray(rng.standard_normal((1, t, hq, d), np.float32), dtype)
        k, v = (jnp.asarray(rng.standard_normal((1, t, hkv, d), np.float32), dtype) for _ in range(2))
        pos = jnp.arange(t, dtype=jnp.int32)
        lam = 4 * hq * d * attended_pairs(t, window, sinks)

        def lm_infinite(implementation):
            return lambda q, k, v: attention(q, k, v, spec=spec, positional=rope, implementation=implementation)

        def baseline(window_size):
            def fn(q, k, v):
                qr, kr = apply_rope(q, pos, rope), apply_rope(k, pos, rope)
                return jax.nn.dot_product_attention(qr, kr, v, is_causal=True, local_window_size=window_size,
                                                    implementation=library)
            return fn

        auto = {"route": attention_route(q, k, v, spec=spec, positional=rope)._asdict()}
        variants = [(route_name, lm_infinite(route), lam, auto),
                    *([("Λ-attention, Pallas kernel", lm_infinite("pallas"), lam, {})] if gpu else []),
                    ("Λ-attention, blockwise XLA", lm_infinite("blockwise"), lam, {}),
                    (f"causal, {library}", baseline(None), 4 * hq * d * attended_pairs(t, None), {}),
                    (f"sliding window L, {library}", baseline((window - 1, 0)), 4 * hq * d * attended_pairs(t, window),
                     {})]
        for name, fn, flops, extra in variants:
            yield {"T": t, **run_variant(name, fn, (q, k, v), repeats, flops), **extra}


def layer_route(model: LanguageModel, t: int) -> dict:
    """The implementation (and why) of the model's attention over one sequence of ``t`` tokens."""
    dec = model.decoder()
    q = jax.ShapeDtypeStruct((1, t, dec.num_heads, dec.head_dim), model.dtype)
    kv = jax.ShapeDtypeStruct((1, t, dec.num_kv_heads, dec.head_dim), model.dtype)
    return attention_route(q, kv, kv, spec=model.spec, positional=dec.positional, scale=dec.scale,
                           implementation=model.call.implementation)._asdict()


def encode_rows(cfg, dtype, params, window: int, sinks: int, lengths: list[int], repeats: int) -> Iterator[dict]:
    """(b) the whole model scoring every next token at each length; LM-Infinite first, so that its device
    peak is its own when memory grows with T."""
    calls = {LM_INFINITE: AttentionCall(LMInfinite(sinks, window), "auto"), VANILLA: AttentionCall(Vanilla(), "auto")}
    for t in lengths:
        tokens = jnp.asarray(np.random.default_rng(t).integers(0, cfg.vocab_size, (1, t)), jnp.int32)
        for name, call in calls.items():
            model = LanguageModel(llama.decoder, cfg, call, dtype)
            row = {"T": t, **run_variant(name, model.score, (params, tokens), repeats), "route": layer_route(model, t)}
            if "ms" in row:
                row["tokens_per_s"] = t / row["ms"] * 1e3
            yield row


def read_bandwidth(repeats: int) -> float:
    """Bytes per second of a read-only reduction over a buffer far larger than any cache."""
    size = (1 << 30) if jax.default_backend() == "gpu" else (1 << 27)
    x = jnp.ones((size // 2,), jnp.bfloat16)
    return size / best_seconds(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), (x,), repeats)


def decode_rows(cfg, dtype, params, window: int, sinks: int, positions: list[int], batches: list[int],
                steps: int, repeats: int, bandwidth: float) -> Iterator[dict]:
    """(c) ms per token against the roofline at ``bandwidth`` bytes/s, Λ-cache vs full cache."""
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    slot_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    methods = {LAMBDA_CACHE: LMInfinite(sinks, window), "full cache": Vanilla()}
    for batch in batches:
        for position in positions:
            for name, spec in methods.items():
                model = LanguageModel(llama.decoder, cfg, AttentionCall(spec), dtype)
                attended = min(position, sinks + window) if name == LAMBDA_CACHE else position
                roofline = (weight_bytes + batch * attended * slot_bytes) / bandwidth * 1e3
                row = {"variant": name, "position": position, "batch": batch, "roofline_ms": roofline}
                try:
                    got = measure(model, params, position, steps, repeats, batch)
                    row.update(ms=got["ms_per_token"], cache_mib=got["cache_bytes"] / 2**20,
                               of_roofline=got["ms_per_token"] / roofline)
                except Exception as e:  # noqa: BLE001 - OOM is a result to report
                    row["failed"] = failure(e)
                yield row


def targets(record: dict) -> list[dict]:
    """The speed targets from a record's rows alone: each with the ``measured`` figure, its ``bound`` and
    ``threshold`` and whether it is ``met``; or ``measured`` and ``met`` None and ``why`` not measured."""
    attn, enc, dec = (record.get(section, []) for section in ("attention", "encode", "decode"))
    route = {"variant": CUDNN_ROUTE, "T": ATTENTION_AT}
    return [
        target(f"Λ-attention, cuDNN route vs cuDNN sliding window alone at T = {ATTENTION_AT:,}: window ms / route ms",
               ratio(attn, {"variant": CUDNN_WINDOW, "T": ATTENTION_AT}, route), ">=", 0.8),
        target(f"Λ-attention, cuDNN route vs cuDNN causal at T = {ATTENTION_AT:,}: causal ms / route ms",
               ratio(attn, {"variant": CUDNN_CAUSAL, "T": ATTENTION_AT}, route), ">=", 3.0),
        target(f"whole-model encoding at T = {ENCODE_AT:,}: vanilla ms / LM-Infinite ms",
               ratio(enc, {"variant": VANILLA, "T": ENCODE_AT}, {"variant": LM_INFINITE, "T": ENCODE_AT}), ">=", 2.5),
        memory_target(enc),
        target(f"Λ-cache decoding at position {DECODE_AT:,}, batch 1: ms per token / roofline",
               measured(dec, {"variant": LAMBDA_CACHE, "position": DECODE_AT, "batch": 1}, "of_roofline"), "<=", 1.3),
    ]


def target(text: str, figure: float | str, bound: str, threshold: float) -> dict:
    """One target: ``figure`` is the measured number, or (a string) why it was not measured."""
    entry = {"target": text, "bound": bound, "threshold": threshold}
    if isinstance(figure, str):
        return {**entry, "measured": None, "met": None, "why": figure}
    return {**entry, "measured": figure, "met": bool(figure >= threshold if bound == ">=" else figure <= threshold)}


def measured(rows: list[dict], keys: dict, field: str) -> float | str:
    """``field`` of the first row matching ``keys``, or why there is none."""
    where = f"{keys['variant']!r} at " + ", ".join(f"{k} {v:,}" for k, v in keys.items() if k != "variant")
    row = next((r for r in rows if all(r.get(k) == v for k, v in keys.items())), None)
    if row is None:
        return f"no row {where}"
    return f"{where} failed: {row['failed'][:200]}" if "failed" in row else row[field]


def ratio(rows: list[dict], numerator: dict, denominator: dict) -> float | str:
    """The ms of the row matching ``numerator`` over that of ``denominator``, or why there is none."""
    top, bottom = measured(rows, numerator, "ms"), measured(rows, denominator, "ms")
    return top if isinstance(top, str) else bottom if isinstance(bottom, str) else top / bottom


def memory_target(rows: list[dict]) -> dict:
    """LM-Infinite's encoding memory linear in T: XLA's planned bytes per added token over the last interval of
    lengths against the first (`LINEAR_SLACK`), with the plan and the device peak per token at each length."""
    by_length = {r["T"]: r for r in rows if r["variant"] == LM_INFINITE and "plan_mib" in r}
    points = [by_length[t] for t in sorted(by_length)]
    figure: float | str = f"needs XLA's plan at three lengths or more, has {len(points)}"
    if len(points) >= 3:
        slopes = [(b["plan_mib"] - a["plan_mib"]) / (b["T"] - a["T"]) for a, b in zip(points, points[1:])]
        figure = slopes[-1] / slopes[0] if slopes[0] > 0 else (
            f"the plan did not grow from T = {points[0]['T']:,} to {points[1]['T']:,}")
    per_token = [{"T": r["T"], "plan_bytes_per_token": r["plan_mib"] * 2**20 / r["T"],
                  **({"peak_bytes_per_token": r["peak_mib"] * 2**20 / r["T"]} if "peak_mib" in r else {})}
                 for r in points]
    return {**target("LM-Infinite encoding memory linear in T: planned bytes per added token, last interval of "
                     "lengths / first", figure, "<=", LINEAR_SLACK), "per_token": per_token}


def format_row(row: dict, key: str) -> str:
    if "failed" in row:
        return f"| {row[key]:,} | {row['variant']} | failed: {row['failed'][:120]} |"
    extra = ", ".join(f"{k} {shown(v)}" for k, v in row.items() if k not in (key, "variant", "ms"))
    return f"| {row[key]:,} | {row['variant']} | {row['ms']:,.2f} ms | {extra} |"


def shown(value) -> str:
    """A row's value in the printed table: floats to 2 decimals, a route as "implementation: reason"."""
    if isinstance(value, float):
        return f"{value:,.2f}"
    return ": ".join(value.values()) if isinstance(value, dict) else str(value)


def format_target(entry: dict) -> str:
    figure = (f"not measured: {entry['why']}" if entry["measured"] is None
              else f"{entry['measured']:,.2f}: {'met' if entry['met'] else 'missed'}")
    return f"| {entry['target']} | {entry['bound']} {entry['threshold']} | {figure} |"


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
                             if r["batch"] == batch and r["variant"] == LAMBDA_CACHE)
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
    out, plot_path = Path(args.out), Path(args.plot)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """The JSON with the targets of the rows so far, replaced whole (a run stopped by a time limit keeps
        every row it measured and a readable file)."""
        record["targets"] = targets(record)
        write_json_atomic(out, record)

    def section(name: str, rows: Iterator[dict]) -> bool:
        """Measure a section's rows, printing and saving each; then plot. Whether a plot was drawn."""
        record[name] = []
        for row in rows:
            record[name].append(row)
            print(format_row(row, "position" if name == "decode" else "T"), file=sys.stderr, flush=True)
            save()
        print(f"({name} saved in {out})", file=sys.stderr)
        return plot(record, plot_path)

    drawn = False
    if "attention" in args.sections:
        drawn = section("attention", attention_rows(cfg, dtype, window, sinks,
                                                    args.attention_lengths or attention_lengths, args.repeats))
    if {"encode", "decode"} & set(args.sections):
        params = FAMILIES["llama"].init_params(cfg, jax.random.key(0), dtype)
        if "encode" in args.sections:
            drawn = section("encode", encode_rows(cfg, dtype, params, window, sinks,
                                                  args.encode_lengths or encode_lengths, args.repeats))
        if "decode" in args.sections:
            bandwidth = read_bandwidth(args.repeats)
            record["read_bandwidth_gb_s"] = bandwidth / 1e9
            drawn = section("decode", decode_rows(cfg, dtype, params, window, sinks, args.positions or positions,
                                                  args.batches, args.steps, args.repeats, bandwidth))
    print("targets:\n" + "\n".join(format_target(entry) for entry in targets(record)))
    print(f"wrote {out}" + (f" and {plot_path}" if drawn else " (no plot: matplotlib is not installed)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
