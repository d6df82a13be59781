"""Passkey retrieval (the paper's downstream test): data at any length and depth, and evaluation.

    python -m experiments.passkey [MODEL_DIR] [--tokenizer DIR] [--multiples 1 2 4 8 16]
        [--depths 0 0.25 0.5 0.75 1] [--samples 4] [--methods vanilla truncation lm_infinite lm_infinite_top_k]
        [-G G] [-L L] [-D D] [--group-size g] [--leak k] [--top-k-middle 5] [--top-k-from-layer 4]
        [--top-k-to-layer H] [--top-k-insert-at N] [--seed 0] [--out results/passkey.json]
        [--plot PNG (default: --out with .png) | --no-plot]

The prompts (`lminf_jax.tasks.passkey`: the key sentence at a depth in [0, 1] of filler text, exactly
n tokens) are tokenized with the model directory's tokenizer (``--tokenizer DIR``: another's). The
model continues greedily for `NEW_TOKENS` tokens; the answer is the first run of digits.

Methods: ``vanilla`` (full cache), ``truncation`` (BOS + the last L_train - 1 - new-tokens prompt
tokens, vanilla), ``lm_infinite`` (Λ-cache, G sinks, L = D = L_train), ``lm_infinite_top_k``
(LM-Infinite plus ``--top-k-middle`` middle tokens, default 5, for the last query of each call in
layers ``--top-k-from-layer`` <= layer < ``--top-k-to-layer``, scored at ``--top-k-insert-at``;
full cache; the paper: k = 5, layers >= 4, distance L/2, the defaults); and every method of the
grammar ``MASK[@cover][+FREQ[@FACTOR]]`` (`experiments.methods.MethodChoice`; a frequency method
without ``@`` at the factor each length needs, n / L_train; ``dynamic_ntk`` follows the length by
itself; ``self_extend@cover`` / ``leaky_rerope@cover``: the group size / leak each length needs), the
retrieval methods ``longheads`` and ``infllm`` among them; ``sirllm`` (SirLLM's token-entropy cache) and
``xl3m`` (vanilla on XL3M's key context), with their defaults for L_train or the fields ``--sirllm`` /
``--xl3m FIELD=VALUE ...`` set (`experiments.task_generation`).
``all``: `experiments.methods.ALL_TASK_METHODS`. The method parameters (-G, -L, -D, --group-size,
--leak) apply to every method that takes them, with the methods' own defaults otherwise (G = 10,
streaming_llm's 4).

MODEL_DIR defaults to `SHIPPED_PASSKEY_MODEL`, the shipped LLaMA-style model fine-tuned on passkey
windows (`lminf_jax.tasks.passkey.training_windows`; its model card and training log are beside it).

Output: accuracy per method, length and depth (a table on stdout), ``--out`` JSON with every
answer, and a heat map per method (length x depth) at ``--plot`` (default: ``--out`` with ``.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from lminf_jax.experiments.loading import (
    add_tokenizer_arg, load_config, load_model, open_tokenizer, params_dtype, pretraining_length,
)
from lminf_jax.experiments.methods import (
    add_task_methods_arg, prompt_settings, task_attention_call, task_method_names, task_method_specs)
from lminf_jax.experiments.options import add_output_args, command_parser, int_option, run_cli, save_result
from lminf_jax.experiments.shipped import SHIPPED_PASSKEY_MODEL, add_model_arg
from lminf_jax.experiments.task_generation import PromptSettings, check_prompt_methods, generate_answers
from lminf_jax.spec import AttentionSpec
from lminf_jax.tasks.passkey import PasskeyBuilder, Prompt, accuracy_by_depth, parse_answer, random_key

NEW_TOKENS = 8
#: Host bytes per prompt token: one pointer in its prompt's tuple of ids (every length is built up front)
#: and, for the length being evaluated, one in its list plus its int32 token and position.
HELD_TOKEN_BYTES, BATCH_TOKEN_BYTES = 8, 16


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("passkey", __doc__)
    add_model_arg(p, SHIPPED_PASSKEY_MODEL, "the shipped model fine-tuned on passkeys")
    add_tokenizer_arg(p)
    p.add_argument("--multiples", type=int_option(1), nargs="+", default=[1, 2, 4, 8, 16], metavar="M",
                   help="prompt lengths as multiples of L_train")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="F",
                   help="depths of the key in the filler, in [0, 1]")
    p.add_argument("--samples", type=int_option(1), default=4, metavar="N", help="prompts per length and depth")
    add_task_methods_arg(p)
    p.add_argument("--seed", type=int_option(0), default=0, metavar="S", help="seed of the random keys")
    add_output_args(p, "results/passkey.json", "the result (JSON: every answer)",
                    plot="heat maps of accuracy by length and depth")
    return p


def evaluate_cell(model, prefill, params, prompts: list[Prompt], name: str, l_train: int, tokenizer,
                  settings: PromptSettings = PromptSettings()) -> list[dict]:
    """Greedy answers of one method for prompts of one length (``settings``: SirLLM's and XL3M's)."""
    out = generate_answers(name, model, prefill, params, [p.tokens for p in prompts], l_train=l_train,
                           new_tokens=NEW_TOKENS, settings=settings)
    rows = []
    for b, p in enumerate(prompts):
        text = tokenizer.decode(out.row(b))
        got = parse_answer(text)
        rows.append({"depth": p.depth, "key": p.key, "answer": got, "continuation": text, "correct": got == p.key})
    return rows


def check_memory(family, config, specs: dict[str, tuple[AttentionSpec, AttentionSpec | None]], lengths: list[int],
                 l_train: int, batch: int) -> None:
    """Refuse, before any prompt is built or weight read, a longest length that cannot run: its prompts'
    token ids must fit in host memory, its positions in int32 and each method's cache (at least 16-bit,
    `lminf_jax.cache.check_cache_fits`) in memory; the ValueError names ``--multiples`` and the bytes."""
    from lminf_jax.cache import NARROWEST_DTYPE, check_cache_fits, host_memory
    from lminf_jax.decoding import check_positions

    n = max(lengths)
    cause = f"--multiples {n // l_train} (prompts of {n:,} tokens)"
    needed, memory = batch * (HELD_TOKEN_BYTES * sum(set(lengths)) + BATCH_TOKEN_BYTES * n), host_memory()
    if needed > memory:
        raise ValueError(f"{cause}: the prompts' token ids need at least {needed:,} bytes ({batch} prompts per length, "
                         f"{HELD_TOKEN_BYTES} bytes per token of every length and {BATCH_TOKEN_BYTES} more per token "
                         f"of the longest), more than the {memory:,} bytes of host memory; lower --multiples, "
                         "--samples or the number of --depths")
    try:
        check_positions(n, NEW_TOKENS)
        for name, (spec, _) in specs.items():
            if name not in ("truncation", "xl3m"):  # these feed the model at most L_train tokens
                model = family.model(config, task_attention_call(name, spec, n, l_train))
                check_cache_fits(lambda: model.init_cache(batch, capacity=n + NEW_TOKENS, dtype=NARROWEST_DTYPE),
                                 f"method {name}")
    except ValueError as e:
        raise ValueError(f"{cause}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    family, config = load_config(args.model_dir)
    l_train = pretraining_length(config)
    tokenizer = open_tokenizer(args.model_dir, args.tokenizer)
    builder = PasskeyBuilder(tokenizer)
    lengths = [m * l_train for m in sorted(args.multiples)]
    if lengths[0] < builder.minimum_length:
        raise ValueError(f"prompts need at least {builder.minimum_length} tokens; L_train x "
                         f"{min(args.multiples)} = {lengths[0]}")
    specs = {name: task_method_specs(config, name, args) for name in task_method_names(args.methods)}
    settings = prompt_settings(args, list(specs))
    check_prompt_methods(specs, l_train, NEW_TOKENS, "the answer's new tokens", settings)
    for name, (spec, _) in specs.items():  # a method that cannot apply to this model fails here
        for n in lengths:
            family.model(config, task_attention_call(name, spec, n, l_train))
    check_memory(family, config, specs, lengths, l_train, len(args.depths) * args.samples)
    rng = np.random.default_rng(args.seed)
    prompts = {n: [builder.prompt(n, d, random_key(rng)) for d in args.depths for _ in range(args.samples)]
               for n in lengths}
    _, config, params = load_model(args.model_dir)
    dtype = params_dtype(params)
    results = {}
    for name, (spec, prefill_spec) in specs.items():
        t0 = time.perf_counter()
        cells, scaling, attention = {}, {}, {}
        for n in lengths:
            call = task_attention_call(name, spec, n, l_train)
            model = family.model(config, call, dtype)
            prefill = None if prefill_spec is None else family.model(
                config, dataclasses.replace(call, spec=prefill_spec), dtype)
            cells[str(n)] = evaluate_cell(model, prefill, params, prompts[n], name, l_train, tokenizer, settings)
            scaling[str(n)] = None if call.frequencies is None else dataclasses.asdict(call.frequencies)
            attention[str(n)] = call.spec.describe()
            acc = np.mean([r["correct"] for r in cells[str(n)]])
            print(f"{name} at {n:,}: accuracy {acc:.2f}", file=sys.stderr)
        policy = settings.describe(name, l_train, NEW_TOKENS)
        results[name] = {"attention": attention, "rope_scaling": scaling, "seconds": time.perf_counter() - t0,
                         **({} if policy is None else {"settings": policy}), "cells": cells}
    record = {"settings": {"model": str(args.model_dir), "family": family.name, "l_train": l_train,
                           **({} if args.tokenizer is None else {"tokenizer": str(args.tokenizer)}),
                           "lengths": lengths, "depths": list(args.depths), "samples": args.samples,
                           "seed": args.seed, "new_tokens": NEW_TOKENS},
              "accuracy": {name: {n: accuracy_by_depth(res["cells"][n], args.depths) for n in res["cells"]}
                           for name, res in results.items()},
              "methods": results}
    print(format_table(record))
    save_result(record, args.out, plot, None if args.no_plot else args.plot)
    return 0


def format_table(record: dict) -> str:
    """Accuracy per method (rows) and length (columns)."""
    lengths = record["settings"]["lengths"]
    lines = [f"{'method':<20}" + "".join(f"{n:>9,}" for n in lengths)]
    for name, by_length in record["accuracy"].items():
        lines.append(f"{name:<20}" + "".join(f"{by_length[str(n)]['all']:>9.2f}" for n in lengths))
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    """One heat map (length x depth) of accuracy per method."""
    from matplotlib.figure import Figure

    lengths, depths = record["settings"]["lengths"], record["settings"]["depths"]
    methods = list(record["accuracy"])
    cols = min(len(methods), 4)
    rows = -(-len(methods) // cols)
    fig = Figure(figsize=(3.4 * cols, 3.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    for ax, name in zip(axes, methods):
        grid = np.asarray([[record["accuracy"][name][str(n)][f"{d:g}"] for n in lengths] for d in depths], float)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], fontsize=7, rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("prompt length (tokens)", fontsize=8)
    for ax in axes[::cols]:
        ax.set_ylabel("depth of the key", fontsize=8)
    fig.colorbar(image, ax=axes[:len(methods)].tolist(), shrink=0.8, label="accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    raise SystemExit(main())
