"""Perplexity vs length: vanilla attention, LM-Infinite and its ablations on the same held-out text.

    python -m experiments.perplexity [MODEL_DIR] [--source stdlib|FOLDER|FILE.jsonl | --tokens F.npy
        | --text FILE [FILE ...]] [--tokenizer DIR] [--multiples 1 2 4 8 16 32] [--sequences N]
        [--methods M [M ...] | all] [-G G] [-L L] [-D D] [--group-size g] [--leak k]
        [--dtype bf16|fp16|fp32] [--batch-tokens N] [--block N] [--out results/perplexity.json]
        [--plot PNG (default: --out with .png) | --no-plot] [--no-progress] [--mesh AXES] [--fsdp]

With no arguments this is the project's main job: the LLaMA-style model this project trained and
ships (`SHIPPED_MODEL`), on held-out standard-library text, vanilla vs LM-Infinite at
L_train x {1, 2, 4, 8, 16, 32}, 3 segments (a few minutes on a laptop CPU).

MODEL_DIR: a converted or Hugging Face directory. Lengths are multiples of the model's
pretraining length L_train (``max_position_embeddings`` or its family's equivalent).

Text (default ``--source stdlib``): the held-out documents of a corpus under
`tasks.corpus`'s split rule (for ``stdlib``: the standard library of the running
interpreter, 5% of files by path hash, none of which the shipped models trained on), encoded
with the model's tokenizer (``--tokenizer DIR``: another directory's), BOS + ids per document,
concatenated in path order. ``--text`` encodes the given files the same way; ``--tokens`` takes a
1-D integer ``.npy`` as it is (no tokenizer needed).

Design (`lminf_jax.evaluation.perplexity`): ``--sequences`` S segments of ``T - 1`` tokens (T the longest
length), evenly spaced over the text; at every length n each segment is cut into tiles of
``n - 1`` tokens, each scored as BOS + tile. Every length thus scores the same tokens and only
their positions differ. The table shows exp(mean NLL) per length; the JSON adds its standard
error, each segment's perplexity, the NLL by query position of the longest sequences and the
paper-style prefix perplexity of those sequences.

Methods: a mask method (``lminf_jax.spec.METHODS``): ``vanilla``, ``lm_infinite`` (Λ-mask +
distance limit), ``lambda_mask`` (Λ-mask only), ``distance_limit`` (only distances capped at D:
ReRoPE), ``sliding_window`` (the last L tokens, no sinks), ``streaming_llm`` (sinks at their
position inside a G + L cache), ``self_extend`` (grouped positions beyond a neighbour window),
``leaky_rerope`` (distances beyond a window grow k times slower); or a RoPE frequency method
(``lminf_jax.FREQUENCY_METHODS``: ``pi``, ``ntk``, ``dynamic_ntk``, ``yarn``) written
``[MASK+]FREQ[@FACTOR]`` (`experiments.methods.MethodChoice`): without ``@`` the factor each length
n needs, n / L_train (at least 1), e.g. ``yarn``, ``pi@32``, ``lm_infinite+ntk``. ``MASK@cover``
chooses Self-Extend's group size or Leaky ReRoPE's leak per length, the smallest that keeps every
scored distance below L_train (`lminf_jax.AttentionSpec.covering`), e.g. ``self_extend@cover``. Default
``vanilla lm_infinite``; ``all`` is every mask method, then ``pi ntk yarn`` at the factor each length
needs and at the one the longest length needs (``pi@M ntk@M yarn@M``), then ``dynamic_ntk`` (RoPE
models only). Each method option (-G/-L/-D, --group-size, --leak) applies to the methods that take
it; defaults as in ``--help`` (L and D from L_train).

Devices: with more than one, every sequence is split over all of them (``--mesh seq=-1``;
context-parallel LM-Infinite, `lminf_jax.context_parallel`); ``--mesh``/``--fsdp`` choose
another layout (`lminf_jax.sharding`).

Output: a table (perplexity per method and length, then what each method costs at the longest
length) on stdout, ``--out`` JSON (settings; per method and length: tiles, tokens, NLL, its standard
error, perplexity (None when not finite: ``nan_scores`` counts the NaN token scores, and the table
shows ``nan`` or ``inf``), per-segment perplexity, the attention method and RoPE scaling used, the farthest
distance a query scores a key at, keys attended per query (the mask's, mean over the scored queries) and the bytes of the KV cache a decoder holds at that length, in total
and per token; per method: NLL by position and prefix perplexity; time; with NaN scores,
``settings.nan_origin``: the weights' tensors that hold NaN or infinite values, or the forward pass) and ``--plot``
(default: ``--out`` with ``.png``; log-scale perplexity vs length, one line per method, the spread across segments
shaded, next to NLL vs position). Completed work survives an interrupted run: the scores of each batch are saved as
they are computed in ``OUT.parts/KEY/NAME.SHA.npy``, KEY a hash of the model (its params'
`lminf_jax.evaluation.fingerprint.tree_fingerprint`, config, dtypes), the text and the settings, SHA the
start of the sha256 of the file's bytes. A rerun with the same settings reuses the parts whose
bytes match their SHA and scores a damaged one again, with a warning; the folder is removed once
the JSON is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import io
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lminf_jax.experiments.loading import (
    DTYPES, add_mesh_args, hf_config, load_config, load_model, model_kind, nonfinite_params, params_dtype,
    pretraining_length, resolve_dtype, sharding_plan,
)
from lminf_jax.evaluation.resume import TEMP, OwnFolder, read_checked, write_checked
from lminf_jax.spec import KINDS
from lminf_jax.experiments.methods import (
    add_methods_arg, checked_methods, method_options, method_spec, MethodChoice, spec_settings,
)
from lminf_jax.experiments.options import add_output_args, command_parser, input_path, int_option, run_cli, save_result
from lminf_jax.experiments.shipped import add_model_arg
from lminf_jax.experiments.text import add_text_args, bos_id, check_ids, token_stream

if TYPE_CHECKING:
    from lminf_jax.sharding import ShardingPlan

#: The LLaMA-style model trained by this project (``experiments/train.py``), shipped in the repository.
DEFAULT_MULTIPLES = (1, 2, 4, 8, 16, 32)
DEFAULT_METHODS = ("vanilla", "lm_infinite")
#: Segments of the main job: enough text for every length (3 x 16,383 tokens) within its CPU budget.
DEFAULT_SEQUENCES = 3
PARTS_FORMAT = "lminf_jax-perplexity-parts-v2"
#: The parts store of ``OUT.parts``: a folder per `parts_key`, holding only parts (and debris of their writes).
PARTS = OwnFolder("--out", "parts store", re.compile(r"[0-9a-f]{16}"),
                  re.compile(rf"[^/]+\.[0-9a-f]{{16}}\.npy|{TEMP.pattern}"))


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("perplexity", __doc__)
    add_model_arg(p)
    add_text_args(p)
    p.add_argument("--multiples", type=int_option(1), nargs="+", default=list(DEFAULT_MULTIPLES), metavar="M",
                   help="lengths as multiples of L_train")
    p.add_argument("--sequences", type=int_option(1), default=DEFAULT_SEQUENCES, metavar="S",
                   help="segments of the longest length, evenly spaced over the text")
    add_methods_arg(p, DEFAULT_METHODS, {"all": "every mask method, then (RoPE models) pi, ntk, yarn at the factor "
                                                "each length needs and at the longest's, and dynamic_ntk"})
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the stored weights' dtype)")
    p.add_argument("--batch-tokens", type=int_option(1), default=16384, metavar="N",
                   help="tokens per forward pass: N // length sequences, at least one")
    p.add_argument("--block", type=int_option(1), default=512, metavar="N", help="blockwise attention block size")
    add_output_args(p, "results/perplexity.json", "the result (JSON)", plot="perplexity vs length plot")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--from-json", type=input_path, metavar="JSON",
                   help="evaluate nothing: print the table of this saved result and draw it again at --plot (default: "
                        "this file's path with .png)")
    add_mesh_args(p, "seq=-1: every sequence split over all devices, context-parallel LM-Infinite")
    return p


# ----- resumable scoring ------------------------------------------------------------------------


def parts_key(settings: dict, segments: np.ndarray) -> str:
    """Hash of everything the scores depend on: settings (model, dtype, specs, blocks) and the text."""
    h = hashlib.sha256(PARTS_FORMAT.encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(segments, np.int32).tobytes())
    return h.hexdigest()[:16]


def rows_per_call(batch_tokens: int, rows: int, length: int, plan: ShardingPlan | None) -> int:
    """Sequences per forward pass: ``batch_tokens // length`` (at least one), but no more than the
    ``rows`` there are, rounded up to the ``data`` mesh axis so that they still split over it (a
    short evaluation would otherwise pad its one batch with copies of its last row)."""
    data = 1 if plan is None else plan.size("data")
    return max(1, min(batch_tokens // length, -(-rows // data) * data))


def score(forward, params, sequences: np.ndarray, batch: int, parts: Path, key: str, bar) -> np.ndarray:
    """NLL ``(R, n - 1)`` float32 of the rows of ``sequences (R, n)`` under ``forward`` (logits or scores,
    `lminf_jax.evaluation.perplexity.sequence_nll`; the CLI's is `models.decoder.LanguageModel.score`, no logits),
    ``batch`` rows per call (the last batch padded by repeating its last row, so one shape compiles). Each
    batch is saved in ``parts`` as it completes and read back (verified, `lminf_jax.evaluation.resume.read_checked`)
    instead of recomputed."""
    from lminf_jax.evaluation.perplexity import sequence_nll

    out = []
    for first in range(0, sequences.shape[0], batch):
        rows = sequences[first:first + batch]
        stem = f"{key}-{first:06d}"
        saved = read_checked(parts, stem, redo="scoring that batch again")
        if saved is not None:
            nll = np.load(io.BytesIO(saved))
        else:
            padded = np.concatenate([rows, np.repeat(rows[-1:], batch - rows.shape[0], axis=0)])
            nll = sequence_nll(forward, params, padded)[: rows.shape[0]]
            buffer = io.BytesIO()
            np.save(buffer, nll)
            write_checked(parts, stem, buffer.getvalue())
        out.append(nll)
        bar.update(rows.size)
    return np.concatenate(out)


def remove_parts(root: Path) -> None:
    """Delete the parts store's own folders in `root` (``OUT.parts``), and `root` when nothing else is left."""
    for path in PARTS.entries(root):
        PARTS.discard(path)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def _plotting_available() -> bool:
    try:
        importlib.import_module("matplotlib.figure")
    except ImportError:
        return False
    return True


# ----- output -----------------------------------------------------------------------------------


def format_table(record: dict) -> str:
    """Perplexity per method (rows) and length (columns, with their multiple of L_train)."""
    lengths, l_train = record["settings"]["lengths"], record["settings"]["l_train"]
    width = max(9, *(len(f"{n:,}") + 1 for n in lengths))
    lines = [f"{'method':<16}" + "".join(f"{n:>{width},}" for n in lengths),
             f"{'(x L_train)':<16}" + "".join(f"{n / l_train:>{width}g}" for n in lengths)]
    name_width = max(16, *(len(name) + 2 for name in record["methods"]))
    lines = [f"{line[:16]:<{name_width}}{line[16:]}" for line in lines]
    for name, res in record["methods"].items():
        lines.append(f"{name:<{name_width}}" + "".join(f"{_ppl_text(p):>{width}}" for p in res["lengths"]))
    costs = [(name, res["lengths"][-1]) for name, res in record["methods"].items()
             if "attended_keys" in res["lengths"][-1]]
    if costs:
        lines += ["", f"{f'at {lengths[-1]:,} tokens':<{name_width}}{'keys/query':>12}{'cache bytes/token':>19}"
                      f"{'KV cache':>12}"]
        lines += [f"{name:<{name_width}}{p['attended_keys']:>12,.0f}{p['cache_bytes_per_token']:>19,.0f}"
                  f"{_bytes(p['cache_bytes']):>12}" for name, p in costs]
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _ppl_text(point: dict) -> str:
    """A length point's perplexity for the table: ``nan`` when a score was NaN, ``inf`` when it
    overflowed (JSON holds None for both; ``nan_scores`` tells them apart)."""
    value = point["ppl"]
    if value is None:
        return "nan" if point.get("nan_scores") else "inf"
    return f"{value:.3g}" if value >= 1e4 else f"{value:.2f}"


def nan_origin(record: dict, params) -> str | None:
    """Where the NaN scores of a run came from (None when there are none): the weights, naming the
    tensors that hold non-finite values, or else the forward pass."""
    cells = [f"{name} at {p['length']:,}" for name, res in record["methods"].items() for p in res["lengths"]
             if p.get("nan_scores")]
    if not cells:
        return None
    bad = nonfinite_params(params)
    if bad:
        shown = ", ".join(f"{name} ({n:,} values)" for name, n in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        source = f"the weights hold NaN or infinite values: {shown}{more}"
    else:
        source = ("the weights are finite, so the forward pass made them (an overflow in the compute dtype "
                  f"{record['settings']['compute_dtype']}? try --dtype fp32)")
    return f"NaN perplexity for {', '.join(cells)}: {source}"


def headline(record: dict) -> list[str]:
    """The paper's two claims as ratios to the perplexity at L_train, where measured."""
    lengths, l_train = record["settings"]["lengths"], record["settings"]["l_train"]
    lines = []
    for name, multiple in (("lm_infinite", max(lengths) // l_train), ("vanilla", 16)):
        n = multiple * l_train
        if name in record["methods"] and l_train in lengths and n in lengths and n != l_train:
            ppl = {p["length"]: p["ppl"] for p in record["methods"][name]["lengths"]}
            if ppl[n] is not None and ppl[l_train] is not None:
                lines.append(f"{name}: perplexity at {multiple} x L_train ({n:,}) / at L_train ({l_train:,}) = "
                             f"{ppl[n]:.4g} / {ppl[l_train]:.4g} = {ppl[n] / ppl[l_train]:.3f}")
    return lines


def plot(record: dict, path: Path) -> bool:
    """Draw a result record (the ``--out`` JSON): left, perplexity vs length (log-log), one line
    per method with ``exp(NLL +- 2 standard errors)`` shaded; right, mean NLL by query position of
    the longest sequences. False when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    settings, methods = record["settings"], record["methods"]
    fig = Figure(figsize=(12, 4.4) if len(methods) <= 6 else (14, 5.2))
    left, right = fig.subplots(1, 2)
    for i, (name, res) in enumerate(methods.items()):
        color, points = _color(i, len(methods)), [p for p in res["lengths"] if p["ppl"] is not None]
        style = _line_style(res["attention"])
        lengths = [p["length"] for p in points]
        left.plot(lengths, [p["ppl"] for p in points], marker="o", markersize=3, color=color, linestyle=style,
                  label=name)
        sem = [p["nll_sem"] or 0.0 for p in points]
        left.fill_between(lengths, [math.exp(p["nll"] - 2 * e) for p, e in zip(points, sem)],
                          [math.exp(p["nll"] + 2 * e) for p, e in zip(points, sem)], color=color,
                          alpha=0.15 if len(methods) <= 6 else 0.05)
        rows = [r for r in res["buckets"] if r["nll"] is not None]
        right.plot([math.sqrt((r["lo"] + 1) * r["hi"]) for r in rows], [r["nll"] for r in rows], color=color,
                   linestyle=style, label=name, linewidth=1.2)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.axvline(settings["l_train"], color="gray", linestyle="--", linewidth=0.8)
        ax.grid(True, which="both", alpha=0.3)
    left.set_yscale("log")
    left.set_xlabel("sequence length (tokens); shaded: exp(NLL +- 2 s.e.)")
    left.set_ylabel("perplexity (log scale)")
    left.legend(fontsize=7, ncol=1 if len(methods) <= 8 else 2)
    right.set_xlabel("tokens seen by the query (position + 1), longest sequences")
    right.set_ylabel("mean NLL (nats / token)")
    fig.suptitle(f"{settings['family']} ({Path(settings['model']).name}), L_train {settings['l_train']:,}: "
                 f"{settings['segments']} segment(s) x {settings['segment_tokens']:,} tokens, every length on "
                 "the same tokens", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return True


def _color(i: int, count: int):
    if count <= 10:
        return f"C{i}"
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


def _line_style(attention: dict) -> str:
    """Solid: a mask method; dashed: a frequency method at each length's factor; dotted: at a fixed one."""
    if attention.get("frequency") is None:
        return "-"
    return "--" if attention.get("factor") == "per length" else ":"


# ----- the command ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


def all_methods(longest_multiple: int, rope: bool) -> list[MethodChoice]:
    """``--methods all``: every mask method; on a RoPE model also pi / ntk / yarn at the factor each
    length needs and at ``longest_multiple``, and dynamic NTK."""
    masks = [MethodChoice(kind) for kind in KINDS]
    if not rope:
        return masks
    static = ("pi", "ntk", "yarn")
    return [*masks, *(MethodChoice("vanilla", f) for f in static),
            *(MethodChoice("vanilla", f, float(longest_multiple)) for f in static), MethodChoice("vanilla", "dynamic_ntk")]


def _methods(names: list[str], longest_multiple: int, rope: bool) -> list[MethodChoice]:
    if checked_methods(names) == ["all"]:
        return all_methods(longest_multiple, rope)
    return [MethodChoice.parse(name) for name in names]


def method_settings(choice: MethodChoice, spec) -> dict:
    """A method's settings for the result file: its mask's spec (with ``cover``, the value of its
    `AttentionSpec.STRETCH` parameter at each length is in the length's ``attention``) and its frequency method."""
    return {**spec_settings(spec), "cover": choice.cover, "frequency": choice.frequency,
            "factor": "per length" if choice.frequency is not None and choice.factor is None else choice.factor}


def _asdict(scaling) -> dict | None:
    return None if scaling is None else dataclasses.asdict(scaling)


def cache_bytes(model, length: int) -> int:
    """Bytes of the KV cache (keys, values, positions) ``model`` decodes a ``length``-token sequence
    with (batch 1): a Λ-cache for a bounded method, else a full cache of ``length`` slots."""
    import jax

    shapes = jax.eval_shape(lambda: model.init_cache(1, capacity=length))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))


def show_saved(path: str, png: str | None) -> int:
    """Table (and plot at `png`) of a saved result."""
    from lminf_jax.converters.reader import read_json_object

    record = read_json_object(Path(path))
    if not isinstance(record.get("settings"), dict) or not isinstance(record.get("methods"), dict):
        raise ValueError(f"{path} is not a result of experiments.perplexity (no settings / methods)")
    print(format_table(record))
    for line in headline(record):
        print(line)
    if png is not None:
        if not plot(record, Path(png)):
            raise ImportError("matplotlib is not installed: no plot (pip install matplotlib)")
        print(f"wrote {png}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.from_json is not None:
        return show_saved(args.from_json, None if args.no_plot else args.plot)
    from lminf_jax.evaluation.perplexity import length_point, position_buckets, prefix_ppl, text_segments, tile_segments
    from lminf_jax.evaluation.fingerprint import tree_fingerprint
    from lminf_jax.progress import Progress
    from lminf_jax.evaluation.buckets import PositionBuckets
    from lminf_jax.evaluation.streaming import finite_or_none
    from lminf_jax import AttentionCall, Rotary

    if len(set(args.multiples)) != len(args.multiples):
        raise ValueError(f"--multiples must be distinct, got {args.multiples}")
    family, config = load_config(args.model_dir)  # validate the options before reading weights
    rope = isinstance(family.model(config).decoder().positional, Rotary)
    methods = _methods(args.methods, max(args.multiples), rope)
    l_train = pretraining_length(config)
    lengths = [m * l_train for m in sorted(args.multiples)]
    specs = {c.name: method_spec(c.mask, config, **method_options(args)) for c in methods}
    choices = {c.name: c for c in methods}

    def call(name: str, n: int) -> AttentionCall:
        return AttentionCall(choices[name].spec(specs[name], n, l_train), block_q=args.block, block_k=args.block,
                             frequencies=choices[name].frequencies(n, l_train))

    for name in specs:  # a method that cannot apply to this model fails here, before any work
        for n in lengths:
            family.model(config, call(name, n))

    stream, source = token_stream(args)
    check_ids(stream, config.vocab_size)
    bos = bos_id(args.model_dir, args.tokenizer)
    segments = text_segments(stream, args.sequences, lengths[-1] - (bos is not None))
    tiles = {n: tile_segments(segments, n, bos) for n in lengths}

    plan = sharding_plan(args, "seq=-1")
    began = time.perf_counter()
    family, config, params = load_model(args.model_dir, args.dtype, progress=sys.stderr.isatty(), plan=plan)
    load_s = time.perf_counter() - began
    stored = params_dtype(params)
    dtype = resolve_dtype(args.dtype) or stored
    settings = {
        "model": str(Path(args.model_dir).resolve()), "model_kind": model_kind(args.model_dir), "family": family.name,
        "config": hf_config(args.model_dir), "params": tree_fingerprint(params), "params_dtype": stored.name,
        "compute_dtype": dtype.name,
        "l_train": l_train, "bos_id": bos, "batch_tokens": args.batch_tokens, "block": args.block,
        "attention": {m: method_settings(choices[m], spec) for m, spec in specs.items()},
        "devices": "1 device" if plan is None else plan.describe(family.param_shardings(config, plan)),
    }
    out_path = Path(args.out)
    parts = out_path.with_name(out_path.name + ".parts") / parts_key(settings, segments)
    PARTS.entries(parts.parent)  # refuses a folder named like a part's that is not the store's
    parts.mkdir(parents=True, exist_ok=True)
    s, seg_tokens = segments.shape
    print(f"{family.name} from {args.model_dir} (L_train {l_train:,}): {s} segment(s) x {seg_tokens:,} tokens of "
          f"{source.get('source', 'the given text')} ({stream.size:,} tokens); lengths {lengths[0]:,}.."
          f"{lengths[-1]:,}; methods {', '.join(specs)}", file=sys.stderr)

    results = {}
    total = len(methods) * sum(t.size for t in tiles.values())
    with Progress(total, "tokens", "perplexity", rate=True, enabled=not args.no_progress) as bar:
        for name, spec in specs.items():
            t0, points = time.perf_counter(), []
            for n in lengths:
                model = family.model(config, call(name, n), dtype, plan)
                bar.postfix = f"{name} at {n:,}"
                batch = rows_per_call(args.batch_tokens, tiles[n].shape[0], n, plan)
                nll = score(model.score, params, tiles[n], batch, parts, f"{name}-{n}", bar)
                costs, at_n = cache_bytes(model, n), model.call.spec
                points.append({**length_point(nll, s).to_json(), "nan_scores": int(np.isnan(nll).sum()),
                               "rope_scaling": _asdict(model.call.frequencies),
                               "attention": at_n.describe(), "farthest_distance": float(at_n.farthest_distance(n)),
                               "attended_keys": float(np.mean(at_n.attended_keys(np.arange(n - 1)))),
                               "cache_bytes": costs, "cache_bytes_per_token": costs / n})
            results[name] = {"spec": spec, "seconds": time.perf_counter() - t0, "points": points,
                             "prefix_ppl": prefix_ppl(nll, lengths), "buckets": position_buckets(nll, PositionBuckets(2))}

    record = {
        "settings": {**settings, "source": source, "text_tokens": int(stream.size), "segments": s,
                     "segment_tokens": seg_tokens, "lengths": lengths,
                     "multiples": sorted(args.multiples), "load_s": load_s},
        "methods": {name: {"attention": method_settings(choices[name], res["spec"]), "seconds": res["seconds"],
                           "lengths": res["points"],
                           "prefix_ppl": finite_or_none(list(res["prefix_ppl"])),
                           "buckets": [dataclasses.asdict(r) for r in res["buckets"]]}
                    for name, res in results.items()},
    }
    record = finite_or_none(record)
    origin = nan_origin(record, params)
    if origin is not None:
        record["settings"]["nan_origin"] = origin
    print(format_table(record))
    for line in headline(record):
        print(line)
    if origin is not None:
        print(f"warning: {origin}", file=sys.stderr)
    drawn = not args.no_plot and _plotting_available()
    if not args.no_plot and not drawn:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    save_result(record, out_path, plot if drawn else None, args.plot)
    remove_parts(parts.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
