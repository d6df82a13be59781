"""Streaming NLL of a long token stream under LM-Infinite attention (or an ablation).

    python -m experiments.stream_nll MODEL_DIR (--tokens FILE.npy | --text FILE [FILE ...] [--tokenizer DIR])
        [--max-tokens N] [--streams B] [--chunk C] [--capacity N] [--dtype bf16|fp16|fp32]
        [--per-octave K] [--checkpoint-dir DIR] [--checkpoint-every N] [--max-chunks N]
        [--out results/stream_nll.json] [--plot PNG (default: --out with .png) | --no-plot] [--no-progress]
        [--method MASK[+FREQ@FACTOR]] [-G G] [-L L] [-D D] [--group-size g] [--leak k] [--mesh AXES] [--fsdp]

The stream runs through the model chunk by chunk (`lminf_jax.evaluation.streaming.streaming_nll`; each chunk
scored by `models.decoder.LanguageModel.score_step`, without its chunk x vocabulary logits),
carrying a Λ-cache of G + L slots, so device memory does not depend on its length. Methods
that attend unboundedly many keys (vanilla, distance_limit) need a full cache of the
stream's length (``--capacity`` bounds it: a longer stream is an error). ``--method MASK+FREQ@FACTOR``
adds a static RoPE frequency method (``pi``, ``ntk`` or ``yarn`` at a factor, e.g. ``lm_infinite+yarn@4``)
to any of them.

Input: ``--tokens`` memory-maps a 1-D integer ``.npy``; ``--text`` tokenizes text files with
the model directory's tokenizer, or ``--tokenizer DIR``'s (each file encoded on its own, the ids concatenated, BOS
once at the start if the tokenizer has one) and caches the ids as ``tokens-HASH.npy`` in
the checkpoint directory (else next to ``--out``), HASH covering the files' contents and
the tokenizer, so a resumed run reads the same stream. ``--max-tokens`` keeps the first N
tokens; ``--streams B`` splits them into B equal contiguous streams (each starting at
position 0) evaluated side by side (the remainder of the division is dropped).

Output: a table of NLL by query position (log-spaced buckets) on stdout; ``--out`` holds
`StreamResult.to_json()` plus ``settings``; ``--plot`` (default: ``--out`` with ``.png``) draws NLL vs
position (log x axis)
with matplotlib (a dependency; should it be missing, the plot is skipped, saying so on
stderr). With ``--checkpoint-dir`` the state is saved every ``--checkpoint-every``
chunks and a rerun resumes it (``--max-chunks`` ends a run early, e.g. to fit a time limit).
A checkpoint records the model (a fingerprint of its params, its config, the full attention
call and the compute dtype), the chunk and a hash of the stream it scored; a rerun with any of
them different is refused, naming the field (`lminf_jax.evaluation.stream_store`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lminf_jax.evaluation.resume import atomic_file, write_json_atomic
from lminf_jax.experiments.loading import (
    DTYPES, TOKENIZER_FILES, add_mesh_args, add_tokenizer_arg, load_config, load_model, model_kind, open_tokenizer,
    params_dtype, pretraining_length, resolve_dtype, sharding_plan,
)
from lminf_jax.experiments.methods import add_attention_args, frequencies_from_args, spec_from_args, spec_settings
from lminf_jax.experiments.options import add_output_args, command_parser, input_path, int_option, output_dir, run_cli
from lminf_jax.experiments.shipped import add_model_arg
from lminf_jax.experiments.text import check_ids, npy_tokens, read_text_file

if TYPE_CHECKING:
    from lminf_jax import AttentionCall
    from lminf_jax.cache import KVCache
    from lminf_jax.evaluation.streaming import StreamResult
    from lminf_jax.models.declaration import ModelConfig
    from lminf_jax.models.decoder import LanguageModel
    from lminf_jax.models.registry import Family
    from lminf_jax.sharding import ShardingPlan
    from lminf_jax.spec import AttentionSpec

TOKEN_CACHE_VERSION = 1
#: Tokenizer files whose bytes identify the tokenization (in the token-cache hash).
TOKENIZATION_FILES = (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("stream_nll", __doc__)
    add_model_arg(p, None)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", type=input_path, metavar="FILE.npy", help="a 1-D integer .npy of token ids (memory-mapped)")
    source.add_argument("--text", nargs="+", type=input_path, metavar="FILE", help="text files, tokenized with the model's tokenizer")
    add_tokenizer_arg(p)
    p.add_argument("--max-tokens", type=int_option(2), metavar="N", help="use only the first N tokens (default: all)")
    p.add_argument("--streams", type=int_option(1), default=1, metavar="B", help="equal contiguous streams side by side")
    p.add_argument("--chunk", type=int_option(1), default=512, metavar="C", help="tokens per model call")
    p.add_argument("--capacity", type=int_option(1), metavar="N",
                   help="full-cache slots for vanilla / distance_limit (default: the stream length)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="cast floating params and compute in this dtype (default: the params' dtype)")
    p.add_argument("--per-octave", type=int_option(1), default=4, metavar="K", help="position buckets per doubling")
    p.add_argument("--checkpoint-dir", type=output_dir, metavar="DIR",
                   help="save the state here and resume from it (default: no checkpoints)")
    p.add_argument("--checkpoint-every", type=int_option(1), default=100, metavar="N", help="chunks between saves")
    p.add_argument("--max-chunks", type=int_option(0), metavar="N", help="stop after N chunks in this run (default: no limit)")
    add_output_args(p, "results/stream_nll.json", "the result (JSON)", plot="NLL vs position plot")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    add_attention_args(p)
    add_mesh_args(p, "the streams split over data=gcd(B, devices), the heads over the devices left (model)")
    return p


# ----- the token stream -------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def text_tokens(model_dir: str | os.PathLike, files: list[str], cache_dir: Path,
                tokenizer_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, Path, bool]:
    """``(ids memmap, its .npy path, reused)``: the files tokenized with the tokenizer of `tokenizer_dir`,
    else of `model_dir` (see the module docstring), from ``cache_dir/tokens-HASH.npy`` when it exists,
    else tokenized and written there."""
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"--text: no such file: {path}")
    tokenizer = open_tokenizer(model_dir, tokenizer_dir, alternative="score token ids with --tokens F.npy")
    source = Path(model_dir if tokenizer_dir is None else tokenizer_dir)
    h = hashlib.sha256(f"stream_nll-tokens-v{TOKEN_CACHE_VERSION}\nbos={tokenizer.bos_id}\n".encode())
    for name in TOKENIZATION_FILES:
        if (source / name).is_file():
            h.update(f"{name}={_file_digest(source / name)}\n".encode())
    for path in paths:
        h.update(f"text={_file_digest(path)}\n".encode())
    target = cache_dir / f"tokens-{h.hexdigest()[:16]}.npy"
    if target.is_file():
        return np.load(target, mmap_mode="r"), target, True
    pieces = [np.asarray([] if tokenizer.bos_id is None else [tokenizer.bos_id], np.int64)]
    for path in paths:
        pieces.append(np.asarray(tokenizer.encode(read_text_file(path, "--text")), np.int64))
    ids = np.concatenate(pieces)
    if ids.size and ids.max() > np.iinfo(np.int32).max:
        raise ValueError(f"token id {ids.max()} does not fit int32")
    with atomic_file(target) as f:  # a resumed run never sees half a file
        np.save(f, ids.astype(np.int32))
    return np.load(target, mmap_mode="r"), target, False


def split_streams(tokens: np.ndarray, streams: int) -> tuple[np.ndarray, int]:
    """``(B, n)`` view of ``B`` equal contiguous parts (``(n,)`` for one) and the tokens dropped."""
    n = tokens.shape[0] // streams
    if n < 2:
        raise ValueError(f"{tokens.shape[0]} tokens cannot make {streams} streams of at least 2 tokens")
    view = tokens[: streams * n]
    return (view if streams == 1 else view.reshape(streams, n)), tokens.shape[0] - streams * n


# ----- output -----------------------------------------------------------------------------------


def format_table(result) -> str:
    """Buckets of query positions (inclusive), scores, mean NLL and perplexity."""
    lines = [f"{'query positions':>23} {'tokens':>12} {'mean NLL':>10} {'ppl':>12}"]
    for row in result.buckets:
        span = f"{row.lo}" if row.hi == row.lo + 1 else f"{row.lo}-{row.hi - 1}"
        lines.append(f"{span:>23} {row.count:>12,} {row.nll:>10.4f} {row.ppl:>12.3f}")
    lines.append(f"{'all':>23} {result.tokens:>12,} {result.nll:>10.4f} {result.ppl:>12.3f}")
    return "\n".join(lines)


def plot(result, path: Path, title: str, marks: dict[str, int]) -> bool:
    """NLL per bucket against the context the query has seen (``lo+1..hi`` tokens, drawn at
    the bucket's geometric centre), log x axis, with vertical lines at `marks`. False when
    matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    rows = [r for r in result.buckets if math.isfinite(r.nll)]
    x = [math.sqrt((r.lo + 1) * r.hi) for r in rows]
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    ax.plot(x, [r.nll for r in rows], marker=".", linewidth=1.2)
    ax.set_xscale("log")
    for i, (label, value) in enumerate(sorted(marks.items(), key=lambda kv: kv[1])):
        ax.axvline(value, color=f"C{i + 1}", linestyle="--", linewidth=0.8, label=f"{label} = {value}")
    if marks:
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("tokens seen by the query (position + 1)")
    ax.set_ylabel("mean NLL (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return True


# ----- the command ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """The attention asked for, checked against the model's config before anything expensive:
    `family` and `config` (from `load_config`), the ``--method`` `spec` and its `call`."""

    family: Family
    config: ModelConfig
    spec: AttentionSpec
    call: AttentionCall


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """The streams scored (`split_streams`'s view), `length` tokens each, `dropped` by the split,
    `total` tokens in the source (before ``--max-tokens``) and the `source` recorded in the settings."""

    tokens: np.ndarray
    length: int
    dropped: int
    total: int
    source: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """The model as loaded: its `family`, `config` and `params` (stored in `stored`), the `model`
    computing in its dtype, its `cache`, the device `plan` (None: one device) and `load_s` seconds."""

    family: Family
    config: ModelConfig
    params: Any
    stored: Any
    model: LanguageModel
    cache: KVCache
    plan: ShardingPlan | None
    load_s: float


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """The command: check the method, read the stream, load the model, score, report, write, plot."""
    method = check_method(args)
    stream = read_stream(args, method.config)
    loaded = build_model(args, method, device_plan(args), stream)
    result = score(args, loaded, stream)
    report(args, result, stream.length, loaded.load_s)
    write_record(args, result, method, loaded, stream)
    if not args.no_plot:
        draw(args, result, method.spec, loaded)
    return 0


def check_method(args: argparse.Namespace) -> Method:
    """The checkpoint folder and the attention options, checked against the config before any weights are read."""
    from lminf_jax.evaluation.stream_store import check_checkpoint_dir
    from lminf_jax import AttentionCall

    if args.checkpoint_dir is not None:
        check_checkpoint_dir(args.checkpoint_dir)  # a folder the store could not use, before any work
    family, config = load_config(args.model_dir)  # validate the options before reading weights
    spec = spec_from_args(args, config)
    if spec.top_k is not None:
        raise ValueError("--top-k-middle applies to the last query of each model call; it has no meaning for "
                         "streaming NLL (use it with experiments.generate)")
    call = AttentionCall(spec, frequencies=frequencies_from_args(args, config))
    family.model(config, call)  # a frequency method on an ALiBi model fails here
    return Method(family, config, spec, call)


def read_stream(args: argparse.Namespace, config: ModelConfig) -> TokenStream:
    """The ``--tokens`` ids or the tokenized ``--text`` (cached), cut to ``--max-tokens``, checked against the
    vocabulary and split into ``--streams``."""
    if args.tokens is not None:
        if args.tokenizer is not None:
            raise ValueError("--tokenizer applies to --text; --tokens are token ids already")
        tokens, source = npy_tokens(args.tokens), {"tokens": str(args.tokens)}
    else:
        cache_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(args.out).parent
        tokens, cached, reused = text_tokens(args.model_dir, args.text, cache_dir, args.tokenizer)
        source = {"text": list(args.text), "token_file": str(cached),
                  **({} if args.tokenizer is None else {"tokenizer": str(args.tokenizer)})}
        print(f"{'reusing' if reused else 'tokenized into'} {cached}: {tokens.shape[0]:,} tokens", file=sys.stderr)
    total = tokens.shape[0]
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
    check_ids(tokens, config.vocab_size)
    stream, dropped = split_streams(tokens, args.streams)
    return TokenStream(stream, stream.shape[-1], dropped, total, source)


def device_plan(args: argparse.Namespace) -> ShardingPlan | None:
    """``--mesh`` / ``--fsdp``'s plan (default: the streams over data=gcd(B, devices), the heads over model);
    refused when it splits a sequence."""
    import jax

    data = math.gcd(args.streams, jax.device_count())
    plan = sharding_plan(args, f"data={data},model={jax.device_count() // data}")
    if plan is not None and plan.context_parallel:
        raise ValueError("--mesh: streaming runs chunk by chunk on its cache; there is no sequence to split over seq "
                         "(split the streams over data and the heads over model)")
    return plan


def build_model(args: argparse.Namespace, method: Method, plan: ShardingPlan | None,
                stream: TokenStream) -> LoadedModel:
    """The weights read, the model built and its cache: a Λ-cache, or for an unbounded method a full cache of
    ``--capacity`` slots (default: the stream length; fewer is refused). Says what will run on stderr."""
    spec, length = method.spec, stream.length
    began = time.perf_counter()
    family, config, params = load_model(args.model_dir, args.dtype, progress=sys.stderr.isatty(), plan=plan)
    load_s = time.perf_counter() - began
    stored = params_dtype(params)
    model = family.model(config, method.call, resolve_dtype(args.dtype) or stored, plan)
    if not spec.bounded:
        capacity = length if args.capacity is None else args.capacity
        if capacity < length:
            raise ValueError(f"--method {args.method} needs a full cache holding the whole stream: {length:,} tokens "
                             f"per stream exceed --capacity {capacity:,} (use a bounded method, --max-tokens or "
                             "more --streams)")
        cache = model.init_cache(args.streams, capacity=capacity)
    else:
        cache = model.init_cache(args.streams)
        if args.capacity is not None:
            print(f"note: --capacity unused: {spec.describe()} runs on a Λ-cache of G + L slots", file=sys.stderr)
    print(f"{family.name} from {args.model_dir}: {spec.describe()}, {args.streams} stream(s) of {length:,} tokens "
          f"({stream.dropped} dropped), chunk {args.chunk}, cache {cache.describe()}", file=sys.stderr)
    return LoadedModel(family, config, params, stored, model, cache, plan, load_s)


def score(args: argparse.Namespace, loaded: LoadedModel, stream: TokenStream) -> StreamResult:
    """`streaming_nll` over the streams, checkpointed and resumed under the model's identity."""
    from lminf_jax.evaluation.buckets import PositionBuckets
    from lminf_jax.evaluation.streaming import streaming_nll

    model = loaded.model
    return streaming_nll(
        model, loaded.params, stream.tokens, loaded.cache, chunk=args.chunk, buckets=PositionBuckets(args.per_octave),
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
        identity={"family": loaded.family.name, "config": dataclasses.asdict(loaded.config),
                  "attention": dataclasses.asdict(model.call), "compute dtype": model.dtype.name},
        progress=not args.no_progress, max_chunks=args.max_chunks,
    )


def report(args: argparse.Namespace, result: StreamResult, length: int, load_s: float) -> None:
    """The table (and per-stream NLL, and how far an incomplete run got) on stdout; the timings on stderr."""
    print(format_table(result))
    if args.streams > 1:
        print("per stream: " + ", ".join(f"{x:.4f}" for x in result.stream_nll))
    if not result.complete:
        print(f"incomplete: {result.positions:,} of {length - 1:,} positions per stream"
              + (f"; rerun with --checkpoint-dir {args.checkpoint_dir} to continue" if args.checkpoint_dir else ""))
    print(f"{result.tokens - result.resumed_tokens:,} tokens scored in {result.elapsed_s:.2f} s "
          f"({result.tokens_per_s:.1f} tokens/s, compilation included; {result.resumed_tokens:,} resumed from the "
          f"checkpoint); loading {load_s:.2f} s", file=sys.stderr)


def write_record(args: argparse.Namespace, result: StreamResult, method: Method, loaded: LoadedModel,
                 stream: TokenStream) -> None:
    """``--out``: `StreamResult.to_json()` plus the run's ``settings``."""
    family, config, plan = loaded.family, loaded.config, loaded.plan
    frequencies = method.call.frequencies
    record = result.to_json()
    record["settings"] = {
        "model": str(args.model_dir),
        "model_kind": model_kind(args.model_dir),
        "family": family.name,
        "method": args.method,
        "attention": spec_settings(method.spec),
        "rope_scaling": None if frequencies is None else dataclasses.asdict(frequencies),
        "source": stream.source,
        "source_tokens": int(stream.total),
        "max_tokens": args.max_tokens,
        "streams": args.streams,
        "stream_length": int(stream.length),
        "dropped_tokens": int(stream.dropped),
        "chunk": args.chunk,
        "params_dtype": loaded.stored.name,
        "compute_dtype": loaded.model.dtype.name,
        "cache": loaded.cache.describe(),
        "devices": "1 device" if plan is None else plan.describe(family.param_shardings(config, plan)),
        "per_octave": args.per_octave,
        "checkpoint_dir": args.checkpoint_dir,
        "load_s": loaded.load_s,
    }
    out_path = Path(args.out)
    write_json_atomic(out_path, record)
    print(f"wrote {out_path}", file=sys.stderr)


def draw(args: argparse.Namespace, result: StreamResult, spec: AttentionSpec, loaded: LoadedModel) -> None:
    """``--plot``, marking L and the pretraining length (when known); skipped, saying so, without matplotlib."""
    marks = {}
    if spec.local_branch is not None:
        marks["L"] = spec.local_branch
    try:
        pretrain = pretraining_length(loaded.config)
    except ValueError:
        pretrain = None
    if pretrain is not None and pretrain not in marks.values():
        marks["pretraining length"] = pretrain
    if plot(result, Path(args.plot), f"{loaded.family.name} {spec.describe()}: streaming NLL", marks):
        print(f"wrote {args.plot}", file=sys.stderr)
    else:
        print(f"plot skipped: matplotlib is missing (pip install matplotlib to draw {args.plot})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
