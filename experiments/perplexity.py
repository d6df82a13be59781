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
``leaky_rerope`` (distances beyond a window grow k times slower), the retrieval methods ``longheads``
and ``infllm`` (`lminf_jax.spec.RetrievalSpec`); ``sirllm`` (vanilla attention over SirLLM's token-entropy
cache, `lminf_jax.entropy_cache.sirllm_surprisal`: each token's NLL as the text streams through it; XL3M
builds a prompt for a question and has no perplexity: it runs in passkey and RULER); or a RoPE frequency method
(``lminf_jax.FREQUENCY_METHODS``: ``pi``, ``ntk``, ``dynamic_ntk``, ``yarn``) written
``[MASK+]FREQ[@FACTOR]`` (`experiments.methods.MethodChoice`): without ``@`` the factor each length
n needs, n / L_train (at least 1), e.g. ``yarn``, ``pi@32``, ``lm_infinite+ntk``. ``MASK@cover``
chooses Self-Extend's group size or Leaky ReRoPE's leak per length, the smallest that keeps every
scored distance below L_train (`lminf_jax.AttentionSpec.covering`), e.g. ``self_extend@cover``. Default
``vanilla lm_infinite``; ``all`` is every mask method, then ``pi ntk yarn`` at the factor each length
needs and at the one the longest length needs (``pi@M ntk@M yarn@M``), then ``dynamic_ntk`` (RoPE
models only), then ``sirllm``. Each method option (-G/-L/-D, --group-size, --leak, the retrieval methods'
--chunk-size and the like) applies to the methods that take it; defaults as in ``--help`` (L and D from
L_train).

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
import io
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lminf_jax.experiments.loading import (
    DTYPES, add_mesh_args, hf_config, load_config, load_model, model_kind, nonfinite_params, params_dtype,
    pretraining_length, resolve_dtype, sharding_plan,
)
from lminf_jax.evaluation.resume import TEMP, OwnFolder, read_checked, write_checked
from lminf_jax.spec import KINDS
from lminf_jax.experiments.methods import (
    add_methods_arg, add_prompt_settings_args, checked_methods, method_options, method_spec, MethodChoice,
    prompt_settings, spec_settings,
)
from lminf_jax.experiments.options import add_output_args, command_parser, input_path, int_option, run_cli, save_result
from lminf_jax.experiments.perplexity_report import plot, plotting_available, print_table, show_saved
from lminf_jax.experiments.shipped import add_model_arg
from lminf_jax.experiments.text import add_text_args, bos_id, check_ids, token_stream

if TYPE_CHECKING:
    from lminf_jax import AttentionCall, AttentionSpec
    from lminf_jax.models.registry import Family
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
    group = add_methods_arg(p, DEFAULT_METHODS, {
        "sirllm": "SirLLM's token-entropy cache (lminf_jax.entropy_cache, SirLLM.for_model; --sirllm): each token's "
                  "NLL as the text streams through its cache of 4 + 3 L_train / 4 slots",
        "all": "every mask method, then (RoPE models) pi, ntk, yarn at the factor each length needs and at the "
               "longest's, dynamic_ntk, and sirllm"})
    add_prompt_settings_args(group, ("sirllm",))
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


def score(nll_of: Callable[[np.ndarray], np.ndarray], sequences: np.ndarray, batch: int, parts: Path, key: str,
          bar) -> np.ndarray:
    """NLL ``(R, n - 1)`` float32 of the rows of ``sequences (R, n)`` by ``nll_of`` (rows to their NLL: `model_nll`
    or SirLLM's `sirllm_nll`), ``batch`` rows per call (the last batch padded by repeating its last row, so one
    shape compiles). Each batch is saved in ``parts`` as it completes and read back (verified,
    `lminf_jax.evaluation.resume.read_checked`) instead of recomputed."""
    out = []
    for first in range(0, sequences.shape[0], batch):
        rows = sequences[first:first + batch]
        stem = f"{key}-{first:06d}"
        saved = read_checked(parts, stem, redo="scoring that batch again")
        if saved is not None:
            nll = np.load(io.BytesIO(saved))
        else:
            padded = np.concatenate([rows, np.repeat(rows[-1:], batch - rows.shape[0], axis=0)])
            nll = nll_of(padded)[: rows.shape[0]]
            buffer = io.BytesIO()
            np.save(buffer, nll)
            write_checked(parts, stem, buffer.getvalue())
        out.append(nll)
        bar.update(rows.size)
    return np.concatenate(out)


def model_nll(model, params) -> Callable[[np.ndarray], np.ndarray]:
    """`score`'s rows-to-NLL of a model's one pass over each row (`lminf_jax.evaluation.perplexity.sequence_nll` of
    `models.decoder.LanguageModel.score`: no logits)."""
    from lminf_jax.evaluation.perplexity import sequence_nll

    return lambda rows: sequence_nll(model.score, params, rows)


def sirllm_nll(model, params, policy) -> Callable[[np.ndarray], np.ndarray]:
    """`score`'s rows-to-NLL under SirLLM's cache: each row streamed through ``policy`` (`lminf_jax.entropy_cache.
    sirllm_surprisal`) by ``model`` (vanilla attention)."""
    from lminf_jax.entropy_cache import sirllm_surprisal

    positional = model.decoder().positional
    return lambda rows: sirllm_surprisal(model, params, rows, policy, positional=positional,
                                         cache=model.init_cache(rows.shape[0], capacity=policy.size))


def open_parts(out_path: Path, settings: dict, segments: np.ndarray) -> Path:
    """The parts store's folder for these settings and text, ``OUT.parts/KEY`` (`parts_key`), created."""
    parts = out_path.with_name(out_path.name + ".parts") / parts_key(settings, segments)
    PARTS.entries(parts.parent)  # refuses a folder named like a part's that is not the store's
    parts.mkdir(parents=True, exist_ok=True)
    return parts


def remove_parts(root: Path) -> None:
    """Delete the parts store's own folders in `root` (``OUT.parts``), and `root` when nothing else is left."""
    for path in PARTS.entries(root):
        PARTS.discard(path)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


# ----- the command ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


#: The methods that are a cache policy over vanilla attention rather than a mask: scored by `sirllm_nll`.
POLICIES = ("sirllm",)


def all_methods(longest_multiple: int, rope: bool) -> list[MethodChoice]:
    """``--methods all``: every mask method; on a RoPE model also pi / ntk / yarn at the factor each
    length needs and at ``longest_multiple``, and dynamic NTK."""
    masks = [MethodChoice(kind) for kind in KINDS]
    if not rope:
        return masks
    static = ("pi", "ntk", "yarn")
    return [*masks, *(MethodChoice("vanilla", f) for f in static),
            *(MethodChoice("vanilla", f, float(longest_multiple)) for f in static), MethodChoice("vanilla", "dynamic_ntk")]


def _methods(names: list[str], longest_multiple: int, rope: bool) -> tuple[list[MethodChoice], tuple[str, ...]]:
    """The mask methods (with their frequency methods) and the cache policies (`POLICIES`) of ``--methods``."""
    if checked_methods(names) == ["all"]:
        return all_methods(longest_multiple, rope), POLICIES
    return [MethodChoice.parse(name) for name in names if name not in POLICIES], tuple(n for n in names if n in POLICIES)


def method_settings(choice: MethodChoice, spec) -> dict:
    """A method's settings for the result file: its mask's spec (with ``cover``, the value of its
    `AttentionSpec.STRETCH` parameter at each length is in the length's ``attention``) and its frequency method."""
    return {**spec_settings(spec), "cover": choice.cover, "frequency": choice.frequency,
            "factor": "per length" if choice.frequency is not None and choice.factor is None else choice.factor}


def _asdict(scaling) -> dict | None:
    return None if scaling is None else dataclasses.asdict(scaling)


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


@dataclasses.dataclass(frozen=True)
class Grid:
    """The methods and lengths a run scores, checked against the model's config before any work."""

    config: Any  #: the model's config as read without its weights (`load_config`)
    l_train: int
    lengths: list[int]  #: sorted multiples of ``l_train``
    methods: list[MethodChoice]
    specs: dict[str, AttentionSpec]  #: each method's mask spec by name, before `MethodChoice.spec` fits it to a length
    block: int  #: ``--block``
    policies: dict[str, Any] = dataclasses.field(default_factory=dict)  #: each cache policy (`POLICIES`) by name

    @property
    def choices(self) -> dict[str, MethodChoice]:
        """Each method by name."""
        return {c.name: c for c in self.methods}

    def call(self, name: str, n: int) -> AttentionCall:
        """How method `name` attends at length `n`."""
        from lminf_jax import AttentionCall

        choice = self.choices[name]
        return AttentionCall(choice.spec(self.specs[name], n, self.l_train), block_q=self.block, block_k=self.block,
                             frequencies=choice.frequencies(n, self.l_train))


@dataclasses.dataclass(frozen=True)
class Text:
    """The scored text: its token stream, the segments cut from it and their tiles at every length."""

    stream: np.ndarray
    source: dict  #: `token_stream`'s description
    bos: int | None
    segments: np.ndarray  #: ``(S, tokens)``
    tiles: dict[int, np.ndarray]  #: per length n, ``(rows, n)`` sequences


@dataclasses.dataclass(frozen=True)
class Loaded:
    """The weights as loaded (over the devices of `plan`) and the settings the scores depend on."""

    family: Family
    config: Any
    params: Any
    dtype: Any  #: the compute dtype
    plan: ShardingPlan | None
    load_s: float
    settings: dict  #: the record's settings so far: `parts_key` hashes them


def checked_grid(args: argparse.Namespace) -> Grid:
    """The methods and lengths of the options, every model they need built once from the config alone,
    so that a method that cannot apply to this model fails before the text, the weights or a compile."""
    from lminf_jax import Rotary

    if len(set(args.multiples)) != len(args.multiples):
        raise ValueError(f"--multiples must be distinct, got {args.multiples}")
    family, config = load_config(args.model_dir)  # validate the options before reading weights
    rope = isinstance(family.model(config).decoder().positional, Rotary)
    methods, policies = _methods(args.methods, max(args.multiples), rope)
    l_train = pretraining_length(config)
    settings = prompt_settings(args, list(policies))
    policies = {name: settings.sirllm_policy(l_train) for name in policies}
    grid = Grid(config, l_train, [m * l_train for m in sorted(args.multiples)], methods,
                {c.name: method_spec(c.mask, config, **method_options(args)) for c in methods}, args.block,
                dict(policies))
    for name in grid.specs:  # a method that cannot apply to this model fails here, before any work
        for n in grid.lengths:
            family.model(config, grid.call(name, n))
    return grid


def read_text(args: argparse.Namespace, grid: Grid) -> Text:
    """The text of the options, its ids checked against the vocabulary, cut into segments of the
    longest length and tiled at every length (`lminf_jax.evaluation.perplexity`)."""
    from lminf_jax.evaluation.perplexity import text_segments, tile_segments

    stream, source = token_stream(args)
    check_ids(stream, grid.config.vocab_size)
    bos = bos_id(args.model_dir, args.tokenizer)
    segments = text_segments(stream, args.sequences, grid.lengths[-1] - (bos is not None))
    return Text(stream, source, bos, segments, {n: tile_segments(segments, n, bos) for n in grid.lengths})


def load_weights(args: argparse.Namespace, grid: Grid, text: Text) -> Loaded:
    """The model's weights, laid out over the devices (``--mesh``), and the run's settings."""
    from lminf_jax.evaluation.fingerprint import tree_fingerprint

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
        "l_train": grid.l_train, "bos_id": text.bos, "batch_tokens": args.batch_tokens, "block": args.block,
        "attention": {**{m: method_settings(grid.choices[m], spec) for m, spec in grid.specs.items()},
                      **{m: dataclasses.asdict(policy) for m, policy in grid.policies.items()}},
        "devices": "1 device" if plan is None else plan.describe(family.param_shardings(config, plan)),
    }
    return Loaded(family, config, params, dtype, plan, load_s, settings)


def length_result(model, nll: np.ndarray, n: int, segments: int) -> dict:
    """A length's entry in the record: the perplexity of `model`'s scores `nll` at length `n` and its
    spread over the `segments`, the attention and RoPE scaling used, and what the method costs there."""
    from lminf_jax.evaluation.perplexity import length_point

    costs, at_n = model.cache_bytes(capacity=n), model.call.spec  # a Λ-cache for a bounded method
    return {**length_point(nll, segments).to_json(), "nan_scores": int(np.isnan(nll).sum()),
            "rope_scaling": _asdict(model.call.frequencies),
            "attention": at_n.describe(), "farthest_distance": float(at_n.farthest_distance(n)),
            "attended_keys": float(np.mean(at_n.attended_keys(np.arange(n - 1)))),
            "cache_bytes": costs, "cache_bytes_per_token": costs / n}


def policy_length_result(model, policy, nll: np.ndarray, n: int, segments: int) -> dict:
    """`length_result` of a cache policy (SirLLM's): its cache of ``policy.size`` slots holds what a token sees."""
    from lminf_jax.evaluation.perplexity import length_point

    slots = policy.size
    costs = model.cache_bytes(capacity=slots) + policy.score_bytes
    return {**length_point(nll, segments).to_json(), "nan_scores": int(np.isnan(nll).sum()), "rope_scaling": None,
            "attention": f"sirllm(G={policy.sinks}, R={policy.recent}, E={policy.entropy}, turn={policy.turn})",
            "farthest_distance": float(min(n, slots) - 1),
            "attended_keys": float(np.mean(np.minimum(np.arange(1, n), slots))),
            "cache_bytes": costs, "cache_bytes_per_token": costs / n}


def score_methods(args: argparse.Namespace, grid: Grid, text: Text, loaded: Loaded, parts: Path) -> dict[str, dict]:
    """Every method's entry in the record (``methods``): each length scored (`score`, its batches kept
    in `parts`), then the NLL by position and the prefix perplexity of the longest sequences."""
    from lminf_jax.progress import Progress

    lengths, (s, seg_tokens) = grid.lengths, text.segments.shape
    print(f"{loaded.family.name} from {args.model_dir} (L_train {grid.l_train:,}): {s} segment(s) x {seg_tokens:,} "
          f"tokens of {text.source.get('source', 'the given text')} ({text.stream.size:,} tokens); lengths "
          f"{lengths[0]:,}..{lengths[-1]:,}; methods {', '.join([*grid.specs, *grid.policies])}", file=sys.stderr)
    results = {}
    total = (len(grid.methods) + len(grid.policies)) * sum(t.size for t in text.tiles.values())
    with Progress(total, "tokens", "perplexity", rate=True, enabled=not args.no_progress) as bar:
        for name, spec in grid.specs.items():
            t0, points = time.perf_counter(), []
            for n in lengths:
                model = loaded.family.model(loaded.config, grid.call(name, n), loaded.dtype, loaded.plan)
                bar.postfix = f"{name} at {n:,}"
                batch = rows_per_call(args.batch_tokens, text.tiles[n].shape[0], n, loaded.plan)
                nll = score(model_nll(model, loaded.params), text.tiles[n], batch, parts, f"{name}-{n}", bar)
                points.append(length_result(model, nll, n, s))
            results[name] = {"attention": method_settings(grid.choices[name], spec),
                             "seconds": time.perf_counter() - t0, "lengths": points, **by_position(nll, lengths)}
        for name, policy in grid.policies.items():
            t0, points = time.perf_counter(), []
            model = loaded.family.model(loaded.config, dtype=loaded.dtype)  # vanilla attention over the policy's cache
            for n in lengths:
                bar.postfix = f"{name} at {n:,}"
                batch = rows_per_call(args.batch_tokens, text.tiles[n].shape[0], n, None)
                nll = score(sirllm_nll(model, loaded.params, policy), text.tiles[n], batch, parts, f"{name}-{n}", bar)
                points.append(policy_length_result(model, policy, nll, n, s))
            results[name] = {"attention": dataclasses.asdict(policy), "seconds": time.perf_counter() - t0,
                             "lengths": points, **by_position(nll, lengths)}
    return results


def by_position(nll: np.ndarray, lengths: list[int]) -> dict:
    """A method's entries from the longest length's NLL ``nll``: the perplexity of its prefixes of ``lengths``
    tokens and of position buckets."""
    from lminf_jax.evaluation.buckets import PositionBuckets
    from lminf_jax.evaluation.perplexity import position_buckets, prefix_ppl
    from lminf_jax.evaluation.streaming import finite_or_none

    return {"prefix_ppl": finite_or_none(list(prefix_ppl(nll, lengths))),
            "buckets": [dataclasses.asdict(r) for r in position_buckets(nll, PositionBuckets(2))]}


def make_record(args: argparse.Namespace, grid: Grid, text: Text, loaded: Loaded, methods: dict) -> dict:
    """The result (the ``--out`` JSON): settings and `methods`, numbers that are not finite as None and,
    with NaN scores, where they came from (``settings.nan_origin``, `nan_origin`)."""
    from lminf_jax.evaluation.streaming import finite_or_none

    s, seg_tokens = text.segments.shape
    record = finite_or_none({
        "settings": {**loaded.settings, "source": text.source, "text_tokens": int(text.stream.size), "segments": s,
                     "segment_tokens": seg_tokens, "lengths": grid.lengths,
                     "multiples": sorted(args.multiples), "load_s": loaded.load_s},
        "methods": methods,
    })
    origin = nan_origin(record, loaded.params)
    if origin is not None:
        record["settings"]["nan_origin"] = origin
    return record


def report(args: argparse.Namespace, record: dict, parts: Path) -> None:
    """Print the table (and warn of NaN scores), write the JSON and the plot, then remove the parts
    store that the JSON replaces."""
    print_table(record)
    origin = record["settings"].get("nan_origin")
    if origin is not None:
        print(f"warning: {origin}", file=sys.stderr)
    drawn = not args.no_plot and plotting_available()
    if not args.no_plot and not drawn:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    save_result(record, Path(args.out), plot if drawn else None, args.plot)
    remove_parts(parts.parent)


def run(args: argparse.Namespace) -> int:
    """The command: a saved result shown again (``--from-json``), or every method scored at every length."""
    if args.from_json is not None:
        return show_saved(args.from_json, None if args.no_plot else args.plot)
    grid = checked_grid(args)  # every refusal of the options comes before the text, the weights, a compile
    text = read_text(args, grid)
    loaded = load_weights(args, grid, text)
    parts = open_parts(Path(args.out), loaded.settings, text.segments)
    methods = score_methods(args, grid, text, loaded, parts)
    report(args, make_record(args, grid, text, loaded, methods), parts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
