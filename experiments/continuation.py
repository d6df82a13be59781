"""Generation quality beyond the pretraining length: continue held-out text and score it.

    python -m experiments.continuation [MODEL_DIR] [--multiples 1 4 16] [--sequences S] [--new-tokens N]
        [-G 10] [--source stdlib|FOLDER|FILE.jsonl | --tokens F.npy | --text FILE ...]
        [--out results/continuation.json] [--plot results/continuation.png]

MODEL_DIR defaults to the shipped LLaMA-style model; L is its pretraining length. S held-out
segments (`experiments.text` options, as in `experiments.perplexity`) of ``16 L + N`` tokens each,
BOS first, are cut at position ``P = m x L`` for each multiple m: the model reads the first P tokens
and greedily generates N more, which are compared with the N tokens that really follow, on
whitespace-separated words of the decoded text (`lminf_jax.metrics`: BLEU-4 with smoothing,
ROUGE-L F1). Methods:

* ``vanilla``: the whole prefix, full KV cache (keys attended per new token: P + t);
* ``lm_infinite``: G sinks + the last L tokens through a Λ-cache (G + L keys, constant);
* ``truncation``: repeated truncation, i.e. every new token re-encodes BOS + the last L - 1 tokens
  from scratch with vanilla attention (L tokens through the model per new token).

Compute per generated token: measured milliseconds per decoding step for the whole batch of S
sequences, after compilation and without the prompt's prefill (reported apart), and the tokens
run through the model and keys attended per new token.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.experiments.loading import (
    load_config, load_model, load_tokenizer_from, method_spec, params_dtype, pretraining_length, run_cli,
    save_result,
)
from lminf_jax.experiments.options import input_path, int_option, output_file, plot_file
from lminf_jax.experiments.perplexity import SHIPPED_MODEL
from lminf_jax.experiments.text import add_text_args, bos_id, check_ids, token_stream
from lminf_jax.metrics import bleu, rouge_l

METHODS = ("vanilla", "lm_infinite", "truncation")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.continuation", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", nargs="?", default=str(SHIPPED_MODEL), type=input_path,
                   help="converted or Hugging Face model directory (default: the shipped LLaMA-style model)")
    add_text_args(p)
    p.add_argument("--multiples", type=int_option(1), nargs="+", default=[1, 4, 16], metavar="M",
                   help="continue from position M x L_train (default 1 4 16)")
    p.add_argument("--sequences", type=int_option(1), default=8, metavar="S", help="held-out segments (default 8)")
    p.add_argument("--new-tokens", type=int_option(1), default=64, metavar="N", help="tokens generated (default 64)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("-G", "--global-branch", type=int_option(0), default=10, metavar="G", help="sinks (default 10)")
    p.add_argument("--out", default="results/continuation.json", type=output_file, metavar="JSON")
    p.add_argument("--plot", default="results/continuation.png", type=plot_file, metavar="PNG")
    p.add_argument("--no-plot", action="store_true")
    return p


@functools.partial(jax.jit, static_argnums=0)
def _next_token(model, params, window: jax.Array) -> jax.Array:
    return jnp.argmax(model.forward(params, window)[:, -1], axis=-1).astype(jnp.int32)


def repeated_truncation(model, params, prompts: np.ndarray, new_tokens: int, l_train: int, bos: int | None
                        ) -> np.ndarray:
    """Greedy tokens ``(S, new_tokens)``: each from a fresh forward over BOS + the last L - 1 tokens."""
    keep = l_train - (bos is not None)
    ids = prompts.astype(np.int32)
    out = []
    for _ in range(new_tokens):
        window = ids[:, -keep:]
        if bos is not None:
            window = np.concatenate([np.full((ids.shape[0], 1), bos, np.int32), window], axis=1)
        token = np.asarray(_next_token(model, params, jnp.asarray(window)))
        out.append(token)
        ids = np.concatenate([ids, token[:, None]], axis=1)
    return np.stack(out, axis=1)


def continue_with(name: str, family, config, params, dtype, prompts: np.ndarray, new_tokens: int, l_train: int,
                  bos: int | None, g: int) -> tuple[np.ndarray, float, float]:
    """``(generated (S, N), ms per generated token, ms of the prompt)`` for one method, timed after a
    compiling run. For cached decoding the per-token time is ``(t(N) - t(1)) / (N - 1)``, so the
    prompt's prefill (``t(1)``) is not spread over the new tokens."""
    from lminf_jax.cache import needs_full_cache
    from lminf_jax.decoding import generate
    from lminf_jax.models.common import AttentionCall

    if name == "truncation":
        model = family.model(config, AttentionCall(method_spec("vanilla", config)), dtype)
        repeated_truncation(model, params, prompts, 1, l_train, bos)  # compile
        t0 = time.perf_counter()
        tokens = repeated_truncation(model, params, prompts, new_tokens, l_train, bos)
        return tokens, 1e3 * (time.perf_counter() - t0) / new_tokens, 0.0
    spec = method_spec(name, config, **({"global_branch": g} if name == "lm_infinite" else {}))
    model = family.model(config, AttentionCall(spec), dtype)
    capacity = prompts.shape[1] + new_tokens if needs_full_cache(spec) else None

    def timed(n: int) -> tuple[np.ndarray, float]:
        cache = model.init_cache(prompts.shape[0], capacity=capacity)
        t0 = time.perf_counter()
        out = generate(model, params, [list(p) for p in prompts], cache, max_new_tokens=n).tokens
        return np.asarray(out), time.perf_counter() - t0

    timed(new_tokens), timed(1)  # compile both
    tokens, whole = timed(new_tokens)
    _, prompt_only = timed(1)
    per_token = (whole - prompt_only) / max(new_tokens - 1, 1)
    return tokens[:, :new_tokens], 1e3 * max(per_token, 0.0), 1e3 * prompt_only


def work_per_token(name: str, position: int, new_tokens: int, l_train: int, g: int) -> dict:
    """Tokens run through the model and keys attended (per layer and head) per generated token."""
    if name == "vanilla":
        return {"tokens_through_model": 1, "keys_attended": position + (new_tokens - 1) / 2}
    if name == "lm_infinite":
        return {"tokens_through_model": 1, "keys_attended": min(position, l_train) + g}
    return {"tokens_through_model": l_train, "keys_attended": l_train * (l_train + 1) / 2}


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    from lminf_jax.evaluation import bos_sequences

    family, config = load_config(args.model_dir)
    l_train = pretraining_length(config)
    positions = [m * l_train for m in sorted(args.multiples)]
    stream, source = token_stream(args)
    check_ids(stream, config.vocab_size)
    bos = bos_id(args.model_dir)
    body = bos_sequences(stream, args.sequences, positions[-1] + args.new_tokens, bos)
    _, config, params = load_model(args.model_dir)
    dtype = params_dtype(params)
    tokenizer = load_tokenizer_from(args.model_dir)
    results = {}
    for name in args.methods:
        rows = {}
        for p in positions:
            generated, per_token, prompt_ms = continue_with(name, family, config, params, dtype, body[:, :p],
                                                            args.new_tokens, l_train, bos, args.global_branch)
            samples = []
            for s in range(body.shape[0]):
                text = tokenizer.decode([int(t) for t in generated[s]])
                truth = tokenizer.decode([int(t) for t in body[s, p:p + args.new_tokens]])
                _, _, f1 = rouge_l(text.split(), truth.split())
                samples.append({"bleu": bleu(text.split(), truth.split()), "rouge_l": f1,
                                "generated": text, "reference": truth})
            rows[str(p)] = {"bleu": float(np.mean([x["bleu"] for x in samples])),
                            "rouge_l": float(np.mean([x["rouge_l"] for x in samples])),
                            "ms_per_token": per_token, "prompt_ms": prompt_ms,
                            **work_per_token(name, p, args.new_tokens, l_train, args.global_branch),
                            "samples": samples}
            print(f"{name} from {p:,}: BLEU {rows[str(p)]['bleu']:.3f}, ROUGE-L {rows[str(p)]['rouge_l']:.3f}, "
                  f"{rows[str(p)]['ms_per_token']:.1f} ms/token", file=sys.stderr)
        results[name] = rows
    record = {"settings": {"model": str(args.model_dir), "family": family.name, "l_train": l_train,
                           "positions": positions, "sequences": int(body.shape[0]), "new_tokens": args.new_tokens,
                           "global_branch": args.global_branch, "source": source, "metric_units": "words"},
              "methods": results}
    print(format_table(record))
    save_result(record, args.out, plot, None if args.no_plot else args.plot)
    return 0


def format_table(record: dict) -> str:
    lines = [f"{'method':<13}{'from':>8}{'BLEU':>8}{'ROUGE-L':>9}{'ms/token':>10}{'tokens/new':>12}{'keys/new':>11}"]
    for name, rows in record["methods"].items():
        for p, r in rows.items():
            lines.append(f"{name:<13}{int(p):>8,}{r['bleu']:>8.3f}{r['rouge_l']:>9.3f}{r['ms_per_token']:>10.2f}"
                         f"{r['tokens_through_model']:>12,}{r['keys_attended']:>11,.0f}")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    """BLEU, ROUGE-L and ms per token against the position generation starts from."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for i, (name, rows) in enumerate(record["methods"].items()):
        x = [int(p) for p in rows]
        for ax, key in zip(axes, ("bleu", "rouge_l", "ms_per_token")):
            ax.plot(x, [rows[p][key] for p in rows], marker="o", color=f"C{i}", label=name)
    for ax, label in zip(axes, ("BLEU-4 (smoothed)", "ROUGE-L F1", "ms per generated token (batch)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("generation starts at position")
        ax.set_ylabel(label)
        ax.axvline(record["settings"]["l_train"], color="gray", linestyle="--", linewidth=0.8)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    raise SystemExit(main())
