"""RULER's synthetic tasks (`lminf_jax.tasks.ruler`): every method continues the same instances, scored as
RULER does (`lminf_jax.tasks.ruler_scoring`).

Evaluation (`main`)::

    python -m experiments.ruler [MODEL_DIR] [--tokenizer DIR] [--tasks T ...] [--lengths N ... | --multiples 4 8 16]
        [--depths 0 0.25 0.5 0.75 1 | random] [--samples 2] [--seed 0] [--methods ... | all] [-G G] [-L L] [-D D]
        [--group-size g] [--leak k] [--top-k-middle 5] [--top-k-from-layer 4] [--top-k-to-layer H]
        [--top-k-insert-at N] [--instances FILE.jsonl | --write-instances FILE.jsonl] [--batch 8]
        [--out results/ruler.json] [--plot PNG (default: --out with .png) | --no-plot]

Instances are made with the model's tokenizer (``--tokenizer DIR``: another directory's), or read from
``--instances``, whose grid they then define, every line checked against what
`lminf_jax.tasks.ruler.generate` makes) before the model loads, after a check that they fit in host
memory, and every method continues the same ones: greedy, left-padded batches, ``max_new_tokens`` per
task, stopping at EOS. Methods and their defaults are `experiments.passkey`'s (truncation keeps BOS +
the last L_train - 1 - new tokens); MODEL_DIR defaults to the shipped model fine-tuned on
`lminf_jax.tasks.training_mix.TrainingMix`'s windows. A task too short for a length (cwe below
about 1,000 tokens) is skipped there and listed in the JSON. Output: scores x 100 per task, method
and length (a table on stdout, with the share of instances whose needles the mask lets the prompt's
last token see), JSON (settings, instances without their prompts, every prediction, its score and
whether its needles were visible, scores per task, length and depth) and a heat map (length x
depth; its format by --plot's extension: png, pdf, svg, ...) per task and method. The JSON is saved
after each task x length x method cell; a rerun with the same settings and weights
(``settings.params``: their `lminf_jax.evaluation.fingerprint.tree_fingerprint`) keeps the finished cells
(methods may be added), and one with other settings or weights is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lminf_jax.evaluation.resume import PARAMS, ResultFile
from lminf_jax.experiments.loading import (
    add_tokenizer_arg, hf_config, load_config, load_model, open_tokenizer, params_dtype, pretraining_length,
)
from lminf_jax.experiments.methods import (
    TOP_K_DEFAULTS, add_task_methods_arg, method_options, method_spec, prompt_settings, task_attention_call,
    task_method_names, task_method_specs, top_k_from_args,
)
from lminf_jax.experiments.options import (
    add_output_args, command_parser, input_path, int_option, output_file, run_cli, save_result,
)
from lminf_jax.experiments.shipped import SHIPPED_RULER_MODEL, add_model_arg
from lminf_jax.experiments.task_generation import PromptSettings, check_prompt_methods, generate_answers
from lminf_jax.tasks.ruler import NEEDS_TEXT, TASKS, Instance, TooShort, generate_grid, held_out_text, prompt_tokens
from lminf_jax.tasks.ruler_jsonl import read_jsonl, write_jsonl
from lminf_jax.tasks.ruler_scoring import aggregate, score

DEFAULT_MULTIPLES, DEFAULT_DEPTHS, DEFAULT_SAMPLES = (4, 8, 16), (0.0, 0.25, 0.5, 0.75, 1.0), 2
#: Options that choose the instances: not allowed with ``--instances``, whose grid the file defines.
GRID_OPTIONS = ("tasks", "lengths", "multiples", "depths", "samples", "seed")
#: Host memory per prompt token: while an instance is made (its haystack's units and their
#: tokenizations: tracemalloc peaks of `generate` up to 1,166 over every task at 4,096, 16,384 and
#: 65,536 tokens) and while it is held (its ids in a Python list: 36; its prompt: ~3).
MAKE_BYTES_PER_TOKEN, HOLD_BYTES_PER_TOKEN = 1200, 40


def depth_option(text: str) -> float | None:
    """An argparse type: a depth in [0, 1], or ``random`` (None: RULER's random depths)."""
    if text == "random":
        return None
    try:
        depth = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'random', got {text!r}") from None
    if not 0.0 <= depth <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return depth


def depth_label(depth: float | None) -> str:
    """A depth as a JSON key: ``f"{depth:g}"``, ``"any"`` for None (random, or cwe and fwe)."""
    return "any" if depth is None else f"{depth:g}"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("ruler", "RULER's synthetic tasks: every method on the same instances.")
    add_model_arg(p, SHIPPED_RULER_MODEL, "the shipped model fine-tuned on RULER instances")
    add_tokenizer_arg(p)
    p.add_argument("--tasks", nargs="+", choices=TASKS, metavar="TASK", help=f"of {', '.join(TASKS)} (default: all)")
    lengths = p.add_mutually_exclusive_group()
    lengths.add_argument("--lengths", type=int_option(1), nargs="+", metavar="N",
                         help="prompt lengths in tokens (default: those of --multiples)")
    lengths.add_argument("--multiples", type=int_option(1), nargs="+", metavar="M",
                         help=f"prompt lengths as multiples of L_train (default {' '.join(map(str, DEFAULT_MULTIPLES))})")
    p.add_argument("--depths", type=depth_option, nargs="+", metavar="F",
                   help=f"needle depths in [0, 1] or 'random' (default {' '.join(f'{d:g}' for d in DEFAULT_DEPTHS)})")
    p.add_argument("--samples", type=int_option(1), help=f"instances per task, length and depth (default {DEFAULT_SAMPLES})")
    p.add_argument("--seed", type=int_option(0), help="first instance seed (default 0)")
    add_task_methods_arg(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--instances", type=input_path, metavar="JSONL", help="read the instances (write_jsonl's) instead of making them")
    source.add_argument("--write-instances", type=output_file, metavar="JSONL", help="also write the instances made")
    p.add_argument("--batch", type=int_option(1), default=8, metavar="B", help="prompts per generate call")
    add_output_args(p, "results/ruler.json", "the result (JSON), saved after each cell; a rerun resumes it",
                    plot="heat maps of the score by length and depth")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


def make_instances(args: argparse.Namespace, tokenizer, l_train: int) -> tuple[list[Instance], dict]:
    """The instances (generated, or read from ``--instances`` and checked against this tokenizer) and
    where they came from. A task whose shortest prompt is longer than a length is skipped there and
    listed under ``"skipped"``; any other failure to make an instance stops the run."""
    if args.instances is not None:
        given = [f"--{o}" for o in GRID_OPTIONS if getattr(args, o) is not None]
        if given:
            raise ValueError(f"--instances defines the tasks, lengths and depths: drop {', '.join(given)}")
        instances = read_jsonl(args.instances)
        if not instances:
            raise ValueError(f"{args.instances} holds no instances")
        for i, inst in enumerate(instances):  # read_jsonl checked the rest
            if len(prompt_tokens(tokenizer, inst.prompt, inst.answer_prefix)) != inst.tokens:
                raise ValueError(f"{args.instances}:{i + 1}: the prompt does not make {inst.tokens} tokens with "
                                 f"{args.tokenizer or args.model_dir}'s tokenizer (made with another one?)")
        return instances, {"file": str(args.instances)}
    tasks = args.tasks or list(TASKS)
    lengths = sorted(set(args.lengths or [m * l_train for m in args.multiples or DEFAULT_MULTIPLES]))
    samples = DEFAULT_SAMPLES if args.samples is None else args.samples
    seed = args.seed or 0
    depths = args.depths or DEFAULT_DEPTHS
    per_length = samples * sum(1 if task in ("cwe", "fwe") else len(depths) for task in tasks)
    check_host_memory({n: per_length for n in lengths})
    text = held_out_text() if set(tasks) & set(NEEDS_TEXT) else None
    instances, skipped = [], {}
    for n in lengths:
        for task in tasks:
            try:
                instances += generate_grid([task], tokenizer, [n], depths, samples, seed, text)
            except TooShort as e:  # e.g. cwe below about 1,000 tokens: that cell stays empty, said here and in the JSON
                skipped[f"{task}@{n}"] = str(e)
                print(f"skipping {task} at {n:,} tokens: {e}", file=sys.stderr)
            except ValueError as e:
                raise ValueError(f"{task} at {n:,} tokens: {e}") from None
    if not instances:
        raise ValueError(f"no task can be made at {', '.join(f'{n:,}' for n in lengths)} tokens: "
                         + "; ".join(f"{cell}: {why}" for cell, why in skipped.items()))
    return instances, {"generated": {"samples": samples, "seed": seed, "text": "stdlib held-out" if text else None,
                                     "skipped": skipped}}


def check_host_memory(instances: dict[int, int]) -> None:
    """Raise a ValueError, before any instance is made, when `instances` (how many per length)
    would not fit in the host's memory: `MAKE_BYTES_PER_TOKEN` of the longest while it is made,
    `HOLD_BYTES_PER_TOKEN` of every one while the run holds them."""
    from lminf_jax.cache import host_memory

    longest, count = max(instances), sum(instances.values())
    need = longest * MAKE_BYTES_PER_TOKEN + sum(n * k for n, k in instances.items()) * HOLD_BYTES_PER_TOKEN
    have = host_memory()
    if need > have:
        raise ValueError(f"{count:,} instances of up to {longest:,} tokens need about {need:,} bytes of host memory "
                         f"({MAKE_BYTES_PER_TOKEN:,} per token to make the longest, {HOLD_BYTES_PER_TOKEN} per token "
                         f"to hold them all), more than its {have:,}: lower --lengths, --multiples or --samples")


def instance_record(inst: Instance, tokens: list[int]) -> dict:
    """An instance for the result file: its fields but the prompt, and the sha256 of its token ids."""
    fields = {k: v for k, v in dataclasses.asdict(inst).items() if k not in ("prompt", "answer_prefix")}
    return {**fields, "prompt_sha256": hashlib.sha256(np.asarray(tokens, np.int64).tobytes()).hexdigest()}


def predict(name: str, model, prefill, params, tokenizer, prompts: list[list[int]], new_tokens: int, batch: int,
            l_train: int, settings: PromptSettings = PromptSettings()) -> list[dict]:
    """Greedy continuations of method ``name`` (`experiments.task_generation.generate_answers`, with SirLLM's
    and XL3M's ``settings``) stopping at EOS, `batch` prompts per call (the last padded with copies of its last
    prompt)."""
    size = min(batch, len(prompts))
    stops = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    rows = []
    for first in range(0, len(prompts), size):
        chunk = prompts[first:first + size]
        out = generate_answers(name, model, prefill, params, chunk + [chunk[-1]] * (size - len(chunk)), l_train=l_train,
                               new_tokens=new_tokens, stop_tokens=stops, settings=settings)
        for b in range(len(chunk)):
            ids = out.row(b)[:out.lengths[b] - int(out.stopped[b])]
            rows.append({"prediction": tokenizer.decode(ids), "new_tokens": len(ids), "stopped": bool(out.stopped[b])})
    return rows


def needles_visible(spec, instance: Instance, keep: int | None = None) -> bool | None:
    """Whether the prompt's last token attends every needle of `instance` under the mask of `spec`
    (top-k middle tokens, chosen per layer, aside), or, with ``keep``, whether truncation to the
    first token + the last `keep` kept them all; None for tasks without needles (cwe, fwe) and for methods
    that choose what the last token sees when they run (retrieval, SirLLM, XL3M: ``spec`` None)."""
    if not instance.needle_positions or spec is None or spec.retrieves:
        return None
    needles = np.asarray(instance.needle_positions)
    if keep is not None:
        return bool(instance.tokens <= keep + 1 or np.all(needles >= instance.tokens - keep))
    last = np.full_like(needles, instance.tokens - 1)
    return not bool(np.any(np.asarray(spec.middle(last, needles))))


def run(args: argparse.Namespace) -> int:
    from lminf_jax.evaluation.fingerprint import tree_fingerprint

    family, config = load_config(args.model_dir)
    l_train = pretraining_length(config)
    tokenizer = open_tokenizer(args.model_dir, args.tokenizer)
    specs = {name: task_method_specs(config, name, args) for name in task_method_names(args.methods)}
    instances, source = make_instances(args, tokenizer, l_train)
    prompts = [prompt_tokens(tokenizer, i.prompt, i.answer_prefix) for i in instances]
    tasks = list(dict.fromkeys(i.task for i in instances))
    lengths = sorted({i.length for i in instances})
    new_tokens = {t: next(i.max_new_tokens for i in instances if i.task == t) for t in tasks}
    prompt = prompt_settings(args, list(specs))
    check_prompt_methods(specs, l_train, max(new_tokens.values()), f"{max(new_tokens, key=new_tokens.get)}'s new tokens",
                         prompt)
    for name, (spec, _) in specs.items():  # a method that cannot apply to this model fails here
        for n in lengths:
            family.model(config, task_attention_call(name, spec, n, l_train))
    if args.write_instances:
        write_jsonl(instances, args.write_instances)
    records = [instance_record(i, t) for i, t in zip(instances, prompts)]
    # lm_infinite_top_k's middle tokens, recorded whichever methods run (a rerun may add that one)
    top_k = top_k_from_args(args, method_spec("lm_infinite", config, **method_options(args)).window,
                            config.num_layers, k=TOP_K_DEFAULTS["k"])
    settings = json.loads(json.dumps({
        "model": str(Path(args.model_dir).resolve()), "family": family.name, "config": hf_config(args.model_dir),
        "l_train": l_train, "eos_id": tokenizer.eos_id, "tasks": tasks, "lengths": lengths,
        "depths": sorted({depth_label(i.depth) for i in instances}), "new_tokens": new_tokens,
        "instances_sha256": hashlib.sha256(json.dumps(records).encode()).hexdigest(), "batch": args.batch,
        "tokenizer": args.tokenizer, "method_options": method_options(args), "top_k": dataclasses.asdict(top_k),
        # SirLLM's and XL3M's fields set over their defaults (a rerun with others starts afresh)
        "prompt_settings": {"sirllm": dict(prompt.sirllm), "xl3m": dict(prompt.xl3m)}}))
    results = ResultFile(Path(args.out), "RULER", ("methods",))
    old = results.earlier(settings)
    _, config, params = load_model(args.model_dir)
    dtype = params_dtype(params)
    settings[PARAMS] = tree_fingerprint(params)
    record = {"settings": settings, "source": source, "instances": records,
              "methods": (results.resume(old, settings[PARAMS]) or {"methods": {}})["methods"]}
    cells = {(t, n): [k for k, i in enumerate(instances) if (i.task, i.length) == (t, n)] for t in tasks for n in lengths}
    cells = {key: picked for key, picked in cells.items() if picked}
    todo = [(name, n, t) for name in specs for n in lengths for t in tasks
            if (t, n) in cells and f"{t}@{n}" not in record["methods"].get(name, {"cells": {}})["cells"]]
    built: dict[tuple[str, int], tuple] = {}
    for name, n, task in todo:
        spec, prefill_spec = specs[name]
        call = task_attention_call(name, spec, n, l_train)
        if (name, n) not in built:
            built = {(name, n): (family.model(config, call, dtype), None if prefill_spec is None else family.model(
                config, dataclasses.replace(call, spec=prefill_spec), dtype))}
        t0 = time.perf_counter()
        keep = l_train - 1 - new_tokens[task] if name == "truncation" else None
        rows = predict(name, *built[name, n], params, tokenizer, [prompts[k] for k in cells[task, n]],
                       new_tokens[task], args.batch, l_train, prompt)
        mask = None if name in ("sirllm", "xl3m") else call.spec
        for k, row in zip(cells[task, n], rows):
            row.update(instance=k, score=score(instances[k], row["prediction"]),
                       needles_visible=needles_visible(mask, instances[k], keep))
        policy = prompt.describe(name, l_train, new_tokens[task])
        record["methods"].setdefault(name, {"cells": {}})["cells"][f"{task}@{n}"] = {
            "attention": call.spec.describe(), **({} if policy is None else {"settings": policy}),
            "seconds": time.perf_counter() - t0, "predictions": rows,
            "rope_scaling": None if call.frequencies is None else dataclasses.asdict(call.frequencies)}
        print(f"{name} {task} at {n:,}: {100 * np.mean([r['score'] for r in rows]):.1f} "
              f"({len(rows)} instances, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        record["scores"] = scores(record, instances)
        results.write(record)
    record["scores"] = scores(record, instances)
    record["needles_visible"] = visibility(record)
    print(format_table(record))
    save_result(record, args.out, plot, None if args.no_plot else args.plot)
    return 0


def scores(record: dict, instances: Sequence[Instance]) -> dict:
    """``{method: {task: {"<length>": {"all": mean, "<depth>": mean, ...}}}}`` (in [0, 1]) of the
    finished cells, by `aggregate`."""
    out: dict = {}
    for name, res in record["methods"].items():
        rows = [r for cell in res["cells"].values() for r in cell["predictions"]]
        picked, predictions = [instances[r["instance"]] for r in rows], [r["prediction"] for r in rows]
        by_task = out[name] = {}
        for (task, n, depth), cell in aggregate(picked, predictions).items():
            by_task.setdefault(task, {}).setdefault(str(n), {})[depth_label(depth)] = cell["score"]
        for (task, n, _), cell in aggregate([dataclasses.replace(i, depth=None) for i in picked], predictions).items():
            by_task[task][str(n)]["all"] = cell["score"]
    return out


def visibility(record: dict) -> dict:
    """``{method: {"<length>": share}}``: the share of the finished instances with needles (niah, vt)
    whose needles all stay visible to the prompt's last token (`needles_visible`)."""
    out: dict = {}
    for name, res in record["methods"].items():
        seen: dict[str, list[bool]] = {}
        for cell in res["cells"].values():
            for r in cell["predictions"]:
                if r.get("needles_visible") is not None:
                    seen.setdefault(str(record["instances"][r["instance"]]["length"]), []).append(r["needles_visible"])
        out[name] = {n: float(np.mean(v)) for n, v in seen.items()}
    return out


def format_table(record: dict) -> str:
    """Scores x 100 per task (blocks), method (rows) and length (columns), then their mean over the
    tasks made at every length (a task skipped at some length, e.g. cwe when too short, is left out),
    then, where instances have needles, the share each method lets the last prompt token see."""
    lengths, tasks = record["settings"]["lengths"], record["settings"]["tasks"]
    made = {(i["task"], i["length"]) for i in record["instances"]}
    everywhere = [t for t in tasks if all((t, n) in made for n in lengths)]
    average = "average" if everywhere == tasks else f"average of {', '.join(everywhere)}"
    width = max(9, *(len(f"{n:,}") + 1 for n in lengths))
    name_width = max(24, *(len(name) + 4 for name in record["methods"]))
    lines = [f"{'task / method':<{name_width}}" + "".join(f"{n:>{width},}" for n in lengths)]

    def cell(name: str, task: str, n: int) -> float | None:
        got = record["scores"].get(name, {}).get(task, {}).get(str(n))
        return None if got is None else 100 * got["all"]

    for task in [*tasks, average]:
        lines.append(task)
        for name in record["methods"]:
            values = [cell(name, task, n) if task != average else
                      (None if None in (got := [cell(name, t, n) for t in everywhere]) else float(np.mean(got)))
                      for n in lengths]
            lines.append(f"  {name:<{name_width - 2}}" + "".join(
                f"{'-':>{width}}" if v is None else f"{v:>{width}.1f}" for v in values))
    visible = visibility(record)
    if not any(visible.values()):  # only niah and vt instances have needles
        return "\n".join(lines)
    lines.append("needles visible to the prompt's last token (% of niah and vt instances)")
    for name, by_length in visible.items():
        values = [by_length.get(str(n)) for n in lengths]
        lines.append(f"  {name:<{name_width - 2}}" + "".join(
            f"{'-':>{width}}" if v is None else f"{100 * v:>{width}.1f}" for v in values))
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    """A heat map (length x depth) of the score per task (rows) and method (columns)."""
    from matplotlib.figure import Figure

    lengths, tasks, methods = record["settings"]["lengths"], record["settings"]["tasks"], list(record["methods"])
    fig = Figure(figsize=(2.6 * len(methods) + 1, 1.8 * len(tasks) + 0.6), layout="constrained")
    axes = np.asarray(fig.subplots(len(tasks), len(methods), squeeze=False))
    for row, task in zip(axes, tasks):
        depths = sorted({d for by_length in (record["scores"].get(m, {}).get(task, {}) for m in methods)
                         for by_depth in by_length.values() for d in by_depth if d != "all"},
                        key=lambda d: (d == "any", 0.0 if d == "any" else float(d)))
        for ax, name in zip(row, methods):
            by_length = record["scores"].get(name, {}).get(task, {})
            grid = np.asarray([[by_length.get(str(n), {}).get(d, np.nan) for n in lengths] for d in depths], float)
            image = ax.imshow(grid.reshape(len(depths), len(lengths)), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                              origin="lower")
            ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], fontsize=6, rotation=45)
            ax.set_yticks(range(len(depths)), depths, fontsize=6)
            ax.set_title(f"{task}: {name}", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("depth", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("prompt length (tokens)", fontsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="score")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    raise SystemExit(main())
