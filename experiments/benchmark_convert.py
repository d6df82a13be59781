"""Time and peak host memory of converting a sharded Hugging Face checkpoint.

Saves a random transformers LlamaForCausalLM (fp32, a few hundred MB) as sharded
safetensors in a temporary directory, then runs ``python -m converters`` on it in a
subprocess, so the peak RSS measured (``os.wait4``) is the conversion's own. A second
subprocess that only imports the converter gives the interpreter + jax + orbax baseline.
The checkpoint is written by a subprocess too: Linux carries the peak RSS across exec,
so this process stays small for the measured ones. Reports the median time and the
largest peak RSS over ``--repeats`` conversions; prints a table and writes JSON.

    python -m experiments.benchmark_convert                       # ~600 MB fp32, 100 MB shards
    python -m experiments.benchmark_convert --layers 4 --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from lminf_jax.experiments.options import command_parser, int_option, output_file, parse_checked
from lminf_jax.evaluation.resume import write_json_atomic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_child(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of a Python subprocess run from the repo root."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}:\n{out}")
    return seconds, usage.ru_maxrss * 1024 / 1e6, out


def save_checkpoint(d: pathlib.Path, args: argparse.Namespace) -> int:
    """Write the random model to `d`; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(d, max_shard_size=args.shard_size)
    return sum(p.numel() for p in model.parameters())


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("benchmark_convert", __doc__)
    p.add_argument("--hidden", type=int_option(1), default=1024, help="hidden size of the random LLaMA")
    p.add_argument("--intermediate", type=int_option(1), default=2048, help="its MLP size")
    p.add_argument("--layers", type=int_option(1), default=8, help="its layers")
    p.add_argument("--heads", type=int_option(1), default=16, help="its attention heads")
    p.add_argument("--vocab", type=int_option(1), default=32000, help="its vocabulary size")
    p.add_argument("--shard-size", default="100MB", help="the Hugging Face checkpoint's shard size")
    p.add_argument("--repeats", type=int_option(1), default=3, help="conversions to run (peak RSS varies with orbax's threads)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="passed to the converter (default: keep)")
    p.add_argument("--out", type=output_file, default=str(ROOT / "results" / "benchmark_convert.json"), metavar="JSON",
                   help="the result (JSON)")
    p.add_argument("--write-checkpoint", type=pathlib.Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_checked(build_parser(), argv)
    if args.write_checkpoint:
        print(save_checkpoint(args.write_checkpoint, args))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, out_dir = pathlib.Path(tmp, "hf"), pathlib.Path(tmp, "converted")
        sizes = [
            "--hidden",
            args.hidden,
            "--intermediate",
            args.intermediate,
            "--layers",
            args.layers,
            "--heads",
            args.heads,
            "--vocab",
            args.vocab,
            "--shard-size",
            args.shard_size,
        ]
        writer = ["-m", "lminf_jax.experiments.benchmark_convert", "--write-checkpoint", str(hf_dir), *map(str, sizes)]
        num_params = int(run_child(writer)[2].split()[-1])
        shards = sorted(hf_dir.glob("*.safetensors"))
        ckpt_mb = sum(f.stat().st_size for f in shards) / 1e6
        print(f"checkpoint: {num_params:,} parameters, {ckpt_mb:.0f} MB in {len(shards)} shards", flush=True)
        _, base_mb, _ = run_child(["-c", "import converters.__main__, converters.families"])
        runs = []
        for k in range(args.repeats):
            cli = ["-m", "lminf_jax.converters", str(hf_dir), str(out_dir / str(k)), "--no-progress"]
            seconds, rss_mb, cli_output = run_child(cli + (["--dtype", args.dtype] if args.dtype else []))
            runs.append({"seconds": round(seconds, 2), "peak_rss_mb": round(rss_mb, 1)})
            print(cli_output.strip(), flush=True)
        out_mb = sum(f.stat().st_size for f in (out_dir / "0").rglob("*") if f.is_file()) / 1e6

    peak_mb = max(r["peak_rss_mb"] for r in runs)
    row = {
        "parameters": num_params,
        "checkpoint_mb": round(ckpt_mb, 1),
        "shards": len(shards),
        "converted_mb": round(out_mb, 1),
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak_rss_mb": peak_mb,
        "baseline_rss_mb": round(base_mb, 1),
        "peak_rss_over_checkpoint": round(peak_mb / ckpt_mb, 3),
        "above_baseline_over_checkpoint": round((peak_mb - base_mb) / ckpt_mb, 3),
    }
    print(f"\nmedian time and largest peak RSS of {args.repeats} conversions (each a fresh process)")
    print(
        "| checkpoint MB | shards | conversion s | peak RSS MB | peak RSS / checkpoint "
        "| import-only RSS MB | (peak - import-only) / checkpoint |\n|---:|---:|---:|---:|---:|---:|---:|"
    )
    print(
        f"| {row['checkpoint_mb']:.0f} | {row['shards']} | {row['seconds']:.1f} | {row['peak_rss_mb']:.0f} "
        f"| {row['peak_rss_over_checkpoint']:.2f} | {row['baseline_rss_mb']:.0f} "
        f"| {row['above_baseline_over_checkpoint']:.2f} |"
    )
    out = pathlib.Path(args.out)
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "cpu_count": os.cpu_count(), "cli_output": cli_output.strip()}
    write_json_atomic(out, {"meta": meta, "rows": [row], "runs": runs})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
