"""Speed and memory at a real model's size, side by side with `transformers` in one run.

    python -m experiments.benchmark_scale [--shape tinyllama-1.1b] [--plan-shape llama2-7b]
        [--hf-dir DIR] [--sections plan load prefill decode] [--lengths 4096 8192 16384]
        [--plan-lengths 4096 32768 131072] [--window 2048] [--positions 4096 32768] [--steps 8]
        [--no-transformers] [--out results/benchmark_scale.json] [--plot results/benchmark_scale.png]

A LLaMA of ``--shape`` (default TinyLlama-1.1B's: hidden 2048, 22 layers, 32 heads, 4 KV heads,
vocabulary 32000) with random bf16 weights, made by `transformers` (seeded) and saved with
``save_pretrained`` as a user's checkpoint would be (``--hf-dir``: made there once and reused),
then:

1. **plan**: XLA's memory plan (``compiled.memory_analysis()``: arguments, output, temporaries) of
   the bf16 forward at each ``--plan-lengths`` for vanilla and LM-Infinite (G = 10, L = the shape's
   ``--window``), and of the scoring path (`models.decoder.LanguageModel.score`: one log-probability
   per token, no logits), at ``--shape`` and at ``--plan-shape`` (default Llama-2-7B's, L = 4096):
   abstract weights, nothing is allocated.
2. **load**: peak RSS and time of loading the checkpoint (the Hugging Face directory, its converted
   directory, the converter, transformers' ``from_pretrained``), each in a fresh process
   (`experiments.benchmark_load`).
3. **prefill**: one bf16 forward over ``--lengths`` tokens, vanilla and LM-Infinite against
   transformers (sdpa), each in a fresh process: seconds (compiled ahead of the timed call) and the
   process's peak RSS beside the weights' bytes and XLA's plan.
4. **decode**: ms per greedy token (``--steps`` per call, `experiments.benchmark_decode.measure`:
   a cache filled as decoding would have left it) with the Λ-cache at each of ``--positions`` and the
   full cache at the last, against transformers' greedy steps on its own cache (``past_key_values``)
   after a prompt of the first position (the prompt untimed).

Prints a table per section, writes JSON (with the machine: `experiments.machine`) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from lminf_jax.experiments.options import input_path, int_option, output_file, plot_file
from lminf_jax.evaluation.resume import write_json_atomic

#: Model shapes (Hugging Face LlamaConfig fields) and their LM-Infinite window L.
SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, window=64),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, window=2048),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, window=4096),
}
SINKS = 10
SECTIONS = ("plan", "load", "prefill", "decode")
METHODS = ("vanilla", "lm_infinite")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark_scale", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b", help="the materialised model")
    p.add_argument("--plan-shape", choices=sorted(SHAPES), default="llama2-7b", help="also planned (abstract)")
    p.add_argument("--hf-dir", type=input_path, metavar="DIR",
                   help="the checkpoint of --shape: made here when missing (default: a temporary folder)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--lengths", type=int_option(2), nargs="+", default=[4096, 8192, 16384], metavar="T",
                   help="prefill lengths (materialised)")
    p.add_argument("--plan-lengths", type=int_option(2), nargs="+", default=[4096, 32768, 131072], metavar="T",
                   help="lengths of the memory plans")
    p.add_argument("--positions", type=int_option(1), nargs="+", default=[4096, 32768], metavar="P",
                   help="decoding positions (Λ-cache at each, full cache at the last)")
    p.add_argument("--steps", type=int_option(1), default=8, help="greedy tokens per timed decoding call")
    p.add_argument("--no-transformers", action="store_true", help="prefill and decode: this project only")
    p.add_argument("--out", type=output_file, default="results/benchmark_scale.json", metavar="JSON")
    p.add_argument("--plot", type=plot_file, default="results/benchmark_scale.png", metavar="PNG")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one measurement, in a fresh process (JSON)
    return p


def main(argv: list[str] | None = None) -> int:
    from lminf_jax.experiments.options import run_cli

    return run_cli(build_parser(), run, argv)


# ----- the checkpoint and the models --------------------------------------------------------------


def hf_config(shape: str) -> dict:
    """The Hugging Face config dict of a shape (bf16, RoPE base 10000, pretrained at its window)."""
    fields = {k: v for k, v in SHAPES[shape].items() if k != "window"}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **fields,
            "head_dim": fields["hidden_size"] // fields["num_attention_heads"], "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": SHAPES[shape]["window"],
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def make_checkpoint(shape: str, directory: Path) -> Path:
    """A seeded random bf16 LLaMA of ``shape`` saved by transformers in ``directory`` (kept when
    it already holds one of that shape; a non-empty directory without config.json is refused)."""
    if (directory / "config.json").is_file():
        held = json.loads((directory / "config.json").read_text())
        differ = sorted(k for k, v in hf_config(shape).items() if k in SHAPES[shape] and held.get(k) != v)
        if differ:
            raise ValueError(f"--hf-dir {directory} holds another shape than {shape} ({', '.join(differ)} differ)")
        return directory
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"--hf-dir {directory} is neither empty nor a checkpoint this script made "
                         "(no config.json): refusing to write the checkpoint among other files")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in hf_config(shape).items() if k not in ("model_type", "architectures")})
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(directory, max_shard_size="500MB")
    return directory


def weight_bytes(shape: str) -> int:
    """Bytes of the shape's bf16 weights."""
    import jax

    family, config = _family(shape)
    return sum(x.size * 2 for x in jax.tree.leaves(jax.eval_shape(lambda: family.init_params(config, jax.random.key(0)))))


def _family(shape: str):
    from lminf_jax.models.registry import family_for_config

    family = family_for_config(hf_config(shape))
    return family, family.config_from_hf(hf_config(shape))


def _model(shape: str, method: str, family=None, config=None):
    import jax.numpy as jnp

    from lminf_jax import LMInfinite, Vanilla
    from lminf_jax import AttentionCall

    if family is None:
        family, config = _family(shape)
    spec = Vanilla() if method == "vanilla" else LMInfinite(SINKS, SHAPES[shape]["window"])
    return family.model(config, AttentionCall(spec), jnp.bfloat16)


# ----- 1. plans -----------------------------------------------------------------------------------


def plan_rows(shape: str, lengths: list[int]) -> list[dict]:
    """XLA's plan of the forward and of the scoring path per method and length (abstract weights)."""
    import jax
    import jax.numpy as jnp

    family, config = _family(shape)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                          jax.eval_shape(lambda: family.init_params(config, jax.random.key(0))))
    weights = sum(x.size * 2 for x in jax.tree.leaves(params))
    rows = []
    for t in lengths:
        tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
        for method in METHODS:
            model = _model(shape, method, family, config)
            for path, fn in (("forward", model.forward), ("score", model.score)):
                began = time.perf_counter()
                memory = jax.jit(fn).lower(params, tokens).compile().memory_analysis()
                rows.append({"shape": shape, "T": t, "method": method, "path": path, "weight_bytes": weights,
                             "argument_bytes": memory.argument_size_in_bytes,
                             "output_bytes": memory.output_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
                             "compile_s": time.perf_counter() - began})
                print(f"plan {shape} {method} {path} @ {t:,}: temp {_gb(rows[-1]['temp_bytes'])}, output "
                      f"{_gb(rows[-1]['output_bytes'])}", file=sys.stderr, flush=True)
    return rows


# ----- 3. prefill and 4. decode, each in a fresh process ---------------------------------------------


def in_child(task: dict) -> dict:
    """Run one measurement (`child`) in a fresh Python process: its result with the process's peak RSS,
    or the error it ended with (out of memory, say), recorded rather than dropped."""
    from lminf_jax.experiments.benchmark_convert import run_child

    try:
        stdout = run_child(["-m", "lminf_jax.experiments.benchmark_scale", "--child", json.dumps(task)])[2]
    except RuntimeError as e:
        return {**task, "error": str(e).splitlines()[0]}
    return json.loads(stdout.strip().splitlines()[-1])


def child(task: dict) -> dict:
    """One measurement (``task["kind"]``: prefill or decode, ours or transformers') in this process."""
    import numpy as np

    rng = np.random.default_rng(0)
    kind, shape, directory = task["kind"], task["shape"], Path(task["hf_dir"])
    tokens = rng.integers(0, SHAPES[shape]["vocab_size"], (1, task["T"] if kind == "prefill" else task["position"]))
    from lminf_jax.experiments.machine import peak_rss_bytes

    run = _torch_child if task["impl"] == "transformers" else _jax_child
    return {**task, **run(kind, shape, directory, task, tokens), "peak_rss_bytes": peak_rss_bytes()}


def _jax_child(kind: str, shape: str, directory: Path, task: dict, tokens) -> dict:
    import jax
    import jax.numpy as jnp

    from lminf_jax.experiments.benchmark_decode import measure
    from lminf_jax.experiments.loading import load_model

    family, config, params = load_model(directory, "bf16")
    model = _model(shape, task["impl"], family, config)
    if kind == "decode":
        row = measure(model, params, task["position"], task["steps"], repeats=1)
        return {"ms_per_token": row["ms_per_token"], "cache": row["cache"], "cache_bytes": row["cache_bytes"],
                "planned_bytes": row["planned_bytes"]}
    x = jnp.asarray(tokens, jnp.int32)
    compiled = jax.jit(model.forward).lower(params, x).compile()
    memory = compiled.memory_analysis()
    began = time.perf_counter()
    jax.block_until_ready(compiled(params, x))
    return {"seconds": time.perf_counter() - began, "temp_bytes": memory.temp_size_in_bytes,
            "output_bytes": memory.output_size_in_bytes}


def _torch_child(kind: str, shape: str, directory: Path, task: dict, tokens) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # positions past max_position_embeddings, on purpose
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ids = torch.from_numpy(tokens)
    with torch.no_grad():
        if kind == "prefill":
            began = time.perf_counter()
            model(ids)
            return {"seconds": time.perf_counter() - began}

        out = model(ids, use_cache=True)  # the prompt, then greedy steps on its cache, timed alone
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        began = time.perf_counter()
        for _ in range(task["steps"]):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return {"ms_per_token": 1e3 * (time.perf_counter() - began) / task["steps"]}


def prefill_rows(args: argparse.Namespace, directory: Path) -> list[dict]:
    impls = [*METHODS, *(() if args.no_transformers else ("transformers",))]
    rows = []
    for t in args.lengths:
        for impl in impls:
            rows.append(in_child({"kind": "prefill", "impl": impl, "shape": args.shape, "hf_dir": str(directory),
                                  "T": t}))
            _progress("prefill", rows[-1], f"{rows[-1].get('seconds', 0):.1f} s")
    return rows


def decode_rows(args: argparse.Namespace, directory: Path) -> list[dict]:
    base = {"kind": "decode", "shape": args.shape, "hf_dir": str(directory), "steps": args.steps}
    tasks = [{**base, "impl": "lm_infinite", "position": p} for p in args.positions]
    tasks.append({**base, "impl": "vanilla", "position": max(args.positions)})
    if not args.no_transformers:
        tasks.append({**base, "impl": "transformers", "position": min(args.positions)})
    rows = []
    for task in tasks:
        rows.append(in_child(task))
        _progress("decode", rows[-1], f"{rows[-1].get('ms_per_token', 0):.1f} ms/token")
    return rows


def _progress(section: str, row: dict, what: str) -> None:
    where = row.get("T", row.get("position"))
    told = f"error: {row['error']}" if "error" in row else f"{what}, peak RSS {_gb(row['peak_rss_bytes'])}"
    print(f"{section} {row['impl']} @ {where:,}: {told}", file=sys.stderr, flush=True)


# ----- the command --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from lminf_jax.experiments.machine import machine

    record = {"settings": {**{k: v for k, v in vars(args).items() if k != "child"}, **machine(),
                           "weight_bytes": weight_bytes(args.shape)}}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.hf_dir) if args.hf_dir else Path(tmp) / "hf"
        if {"load", "prefill", "decode"} & set(args.sections):
            make_checkpoint(args.shape, directory)
        if "plan" in args.sections:
            record["plan"] = [*plan_rows(args.shape, args.plan_lengths),
                              *(plan_rows(args.plan_shape, args.plan_lengths) if args.plan_shape != args.shape else [])]
        if "load" in args.sections:
            from lminf_jax.experiments.benchmark_load import benchmark

            record["load"] = benchmark(directory, repeats=1, work=tmp)
        if "prefill" in args.sections:
            record["prefill"] = prefill_rows(args, directory)
        if "decode" in args.sections:
            record["decode"] = decode_rows(args, directory)
    out = Path(args.out)
    write_json_atomic(out, record)
    print(format_tables(record))
    plot(record, Path(args.plot))
    print(f"wrote {out} and {args.plot}")
    return 0


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:,.2f} GB"


def format_tables(record: dict) -> str:
    """Each measured section as a markdown table."""
    weights = record["settings"]["weight_bytes"]
    lines = []
    if "plan" in record:
        lines += ["| plan | T | method | path | weights | output | temp | temp / weights |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['T']:,} | {r['method']} | {r['path']} | {_gb(r['weight_bytes'])} | "
                  f"{_gb(r['output_bytes'])} | {_gb(r['temp_bytes'])} | {r['temp_bytes'] / r['weight_bytes']:.2f} |"
                  for r in record["plan"]]
    if "prefill" in record:
        lines += ["", "| prefill | T | seconds | tokens/s | peak RSS | RSS / weights |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['impl']} | {r['T']:,} | " + (f"failed: {r['error']} | | | |" if "error" in r else
                  f"{r['seconds']:,.1f} | {r['T'] / r['seconds']:,.0f} | {_gb(r['peak_rss_bytes'])} | "
                  f"{r['peak_rss_bytes'] / weights:.2f} |") for r in record["prefill"]]
    if "decode" in record:
        lines += ["", "| decode | position | cache | ms/token | peak RSS |", "|---|---|---|---|---|"]
        lines += [f"| {r['impl']} | {r['position']:,} | {r.get('cache', 'dynamic')} | " +
                  (f"failed: {r['error']} | |" if "error" in r else
                   f"{r['ms_per_token']:,.1f} | {_gb(r['peak_rss_bytes'])} |") for r in record["decode"]]
    if "load" in record:
        from lminf_jax.experiments.benchmark_load import table

        lines += ["", table(record["load"])]
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    """Planned temp vs T (left) and prefill seconds vs T (right), one line per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    for shape in sorted({r["shape"] for r in record.get("plan", [])}):
        for method in METHODS:
            rows = [r for r in record["plan"] if r["shape"] == shape and r["method"] == method and r["path"] == "forward"]
            left.plot([r["T"] for r in rows], [r["temp_bytes"] / 1e9 for r in rows], marker="o",
                      label=f"{shape} {method}")
    left.set(xscale="log", xlabel="tokens", ylabel="XLA's planned temp (GB), forward", title="memory plan")
    for impl in [*METHODS, "transformers"]:
        rows = [r for r in record.get("prefill", []) if r["impl"] == impl and "error" not in r]
        if rows:
            right.plot([r["T"] for r in rows], [r["seconds"] for r in rows], marker="o", label=impl)
    right.set(xscale="log", yscale="log", xlabel="tokens", ylabel="seconds", title=f"prefill, {record['settings']['shape']}")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    raise SystemExit(main())
