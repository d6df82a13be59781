"""Generation quality beyond the pretraining length: continue held-out text and score it.

    python -m experiments.continuation [MODEL_DIR] [--multiples 1 4 16] [--sequences S] [--new-tokens N]
        [--methods vanilla lm_infinite truncation] [-G G] [-L L] [-D D] [--group-size g] [--leak k]
        [--source stdlib|FOLDER|FILE.jsonl | --tokens F.npy | --text FILE ...] [--tokenizer DIR]
        [--out results/continuation.json] [--plot PNG (default: --out with .png) | --no-plot]

MODEL_DIR defaults to the shipped LLaMA-style model; L is its pretraining length. S held-out
segments (`experiments.text` options, as in `experiments.perplexity`) of ``16 L + N`` tokens each,
BOS first, are cut at position ``P = m x L`` for each multiple m: the model reads the first P tokens
and greedily generates N more, which are compared with the N tokens that really follow, on
whitespace-separated words of the decoded text (`lminf_jax.evaluation.metrics`: BLEU-4 with smoothing,
ROUGE-L F1); the decoded text needs the model's tokenizer (``--tokenizer DIR``: another
directory's). Methods (default: these three):

* ``vanilla``: the whole prefix, full KV cache (keys attended per new token: P + t);
* ``lm_infinite``: G sinks + the last L tokens through a Λ-cache (G + L keys once the cache is full);
* ``truncation``: repeated truncation, i.e. every new token re-encodes BOS + the last L - 1 tokens
  from scratch with vanilla attention (L tokens through the model per new token);
* any other method of the grammar ``MASK[@cover][+FREQ[@FACTOR]]`` (`experiments.methods.MethodChoice`),
  at the length ``P + N`` (a frequency method without ``@``: factor ``(P + N) / L``).

The method parameters (-G, -L, -D, --group-size, --leak) apply to every method that takes them.
Compute per generated token: measured milliseconds per decoding step for the whole batch of S
sequences, after compilation and without the prompt's prefill (reported apart), and the tokens
run through the model and keys attended per new token (the mask's, mean over the new tokens).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np

from lminf_jax.experiments.methods import add_methods_arg, checked_methods, method_options, method_spec, MethodChoice
from lminf_jax.experiments.loading import load_config, load_model, open_tokenizer, params_dtype, pretraining_length
from lminf_jax.experiments.options import add_output_args, command_parser, int_option, run_cli, save_result
from lminf_jax.experiments.shipped import add_model_arg
from lminf_jax.experiments.text import add_text_args, bos_id, check_ids, token_stream
from lminf_jax.evaluation.metrics import bleu, rouge_l

METHODS = ("vanilla", "lm_infinite", "truncation")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("continuation", __doc__)
    add_model_arg(p)
    add_text_args(p)
    p.add_argument("--multiples", type=int_option(1), nargs="+", default=[1, 4, 16], metavar="M",
                   help="continue from position M x L_train")
    p.add_argument("--sequences", type=int_option(1), default=8, metavar="S", help="held-out segments")
    p.add_argument("--new-tokens", type=int_option(1), default=64, metavar="N", help="tokens generated")
    add_methods_arg(p, METHODS, {"truncation": "vanilla on BOS + the last L_train - 1 tokens, re-encoded for "
                                               "every new token"})
    add_output_args(p, "results/continuation.json", "the result (JSON: every continuation and its scores)",
                    plot="plot of BLEU, ROUGE-L and ms per token")
    return p


@functools.cache
def _greedy_step():
    """The jitted greedy next token of a forward pass (built on first use: jax is imported then)."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda model, params, window: jnp.argmax(model.forward(params, window)[:, -1], axis=-1)
                   .astype(jnp.int32), static_argnums=0)


def _next_token(model, params, window):
    return _greedy_step()(model, params, window)


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
        token = np.asarray(_next_token(model, params, window))
        out.append(token)
        ids = np.concatenate([ids, token[:, None]], axis=1)
    return np.stack(out, axis=1)


def attention(name: str, config, options: dict[str, int | None], length: int, l_train: int):
    """The `AttentionCall` of method ``name`` (not truncation) with the method parameters ``options`` for
    sequences of ``length`` tokens."""
    from lminf_jax import AttentionCall

    choice = MethodChoice.parse(name)
    spec = choice.spec(method_spec(choice.mask, config, **options), length, l_train)
    return AttentionCall(spec, frequencies=choice.frequencies(length, l_train))


def continue_with(name: str, family, config, params, dtype, prompts: np.ndarray, new_tokens: int, l_train: int,
                  bos: int | None, options: dict[str, int | None]) -> tuple[np.ndarray, float, float]:
    """``(generated (S, N), ms per generated token, ms of the prompt)`` for one method (its parameters
    ``options``), timed after a compiling run. For cached decoding the per-token time is
    ``(t(N) - t(1)) / (N - 1)``, so the prompt's prefill (``t(1)``) is not spread over the new tokens."""
    from lminf_jax.decoding import generate
    from lminf_jax import AttentionCall

    if name == "truncation":
        model = family.model(config, AttentionCall(method_spec("vanilla", config)), dtype)
        repeated_truncation(model, params, prompts, 1, l_train, bos)  # compile
        t0 = time.perf_counter()
        tokens = repeated_truncation(model, params, prompts, new_tokens, l_train, bos)
        return tokens, 1e3 * (time.perf_counter() - t0) / new_tokens, 0.0
    model = family.model(config, attention(name, config, options, prompts.shape[1] + new_tokens, l_train), dtype)
    capacity = None if model.spec.bounded else prompts.shape[1] + new_tokens

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


def work_per_token(name: str, position: int, new_tokens: int, l_train: int, spec=None) -> dict:
    """Tokens run through the model and keys attended (per layer and head) per generated token: for
    truncation L_train and its windows' keys, else one and the keys the mask of ``spec`` (an
    `AttentionSpec`) lets the queries at ``position - 1 ... position + new_tokens - 2`` see, on average."""
    if name == "truncation":
        return {"tokens_through_model": l_train, "keys_attended": l_train * (l_train + 1) / 2}
    keys = spec.attended_keys(np.arange(position - 1, position - 1 + new_tokens))
    return {"tokens_through_model": 1, "keys_attended": float(np.mean(keys))}


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    from lminf_jax.evaluation.perplexity import bos_sequences

    methods = checked_methods(args.methods, everything=None)
    family, config = load_config(args.model_dir)
    l_train = pretraining_length(config)
    positions = [m * l_train for m in sorted(args.multiples)]
    options = method_options(args)
    specs = {name: {p: attention(name, config, options, p + args.new_tokens, l_train).spec for p in positions}
             for name in methods if name != "truncation"}  # a method that cannot apply fails here
    tokenizer = open_tokenizer(args.model_dir, args.tokenizer)
    stream, source = token_stream(args)
    check_ids(stream, config.vocab_size)
    bos = bos_id(args.model_dir, args.tokenizer)
    body = bos_sequences(stream, args.sequences, positions[-1] + args.new_tokens, bos)
    _, config, params = load_model(args.model_dir)
    dtype = params_dtype(params)
    results = {}
    for name in methods:
        rows = {}
        for p in positions:
            generated, per_token, prompt_ms = continue_with(name, family, config, params, dtype, body[:, :p],
                                                            args.new_tokens, l_train, bos, options)
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
                            **work_per_token(name, p, args.new_tokens, l_train, specs.get(name, {}).get(p)),
                            "samples": samples}
            print(f"{name} from {p:,}: BLEU {rows[str(p)]['bleu']:.3f}, ROUGE-L {rows[str(p)]['rouge_l']:.3f}, "
                  f"{rows[str(p)]['ms_per_token']:.1f} ms/token", file=sys.stderr)
        results[name] = rows
    record = {"settings": {"model": str(args.model_dir), "family": family.name, "l_train": l_train,
                           "positions": positions, "sequences": int(body.shape[0]), "new_tokens": args.new_tokens,
                           "method_options": options, "source": source, "metric_units": "words",
                           "attention": {name: {str(p): spec.describe() for p, spec in by_position.items()}
                                         for name, by_position in specs.items()}},
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
