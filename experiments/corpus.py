"""A training corpus, a sentencepiece tokenizer and token files for the project's own models.

The command of `lminf_jax.tasks.corpus`, which describes the sources, the held-out split, the
tokenizer and the files written.

CLI::

    python -m experiments.corpus --out data/stdlib [--source stdlib|PATH] [--vocab-size 4096]
    python -m experiments.corpus --out data/long --encode-with data/stdlib/tokenizer.model \
        --source PATH [--split heldout|train|all] [--max-tokens N]

The second form encodes a source with an existing tokenizer into ``OUT/stream.npy`` (see
`encode_source`), e.g. a long stream of text no model here trained on for streaming NLL.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lminf_jax.experiments.options import command_parser, input_path, int_option, output_dir, parse_checked
from lminf_jax.tasks.corpus import (
    DEFAULT_HELD_OUT_PERCENT, DEFAULT_VOCAB, MANIFEST, TOKENIZER_FILE, encode_source, prepare,
)


def summary(manifest: dict) -> str:
    """A table of the manifest's splits: documents, size, tokens and long documents."""
    lines = [f"{'split':8} {'documents':>10} {'MB':>9} {'tokens':>12} {'bytes/token':>12}  long documents (tokens >= N)"]
    for name, s in manifest["splits"].items():
        long = ", ".join(f">={n}: {c}" for n, c in s["documents_with_at_least"].items())
        lines.append(f"{name:8} {s['documents']:>10} {s['bytes'] / 1e6:>9.2f} {s['tokens']:>12} "
                     f"{s['bytes_per_token']:>12.2f}  {long}; longest {s['longest_document_tokens']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("corpus", __doc__)
    parser.add_argument("--out", required=True, type=output_dir, help="output folder (tokenizer, token files, manifest)")
    parser.add_argument("--source", default="stdlib", type=input_path, help="'stdlib' (default), a folder, or a .jsonl with 'text'")
    parser.add_argument("--vocab-size", type=int_option(264), default=DEFAULT_VOCAB, help="BPE vocabulary size")
    parser.add_argument("--held-out-percent", type=float, default=DEFAULT_HELD_OUT_PERCENT,
                        help="share of the files held out, chosen by a hash of their path")
    parser.add_argument("--tokenizer-sample-mb", type=float, default=8.0,
                        help="text sampled to train the tokenizer (MB)")
    parser.add_argument("--seed", type=int_option(0), default=0, help="seed of the tokenizer's sample")
    encode = parser.add_argument_group("encoding with an existing tokenizer (no tokenizer training, no split files)")
    encode.add_argument("--encode-with", type=input_path, metavar="TOKENIZER",
                        help="tokenizer.model (or its folder): write OUT/stream.npy + stream.json instead")
    encode.add_argument("--split", choices=("heldout", "train", "all"), default="heldout",
                        help="documents to encode with --encode-with (default: heldout)")
    encode.add_argument("--max-tokens", type=int_option(1), metavar="N",
                        help="keep the first N tokens (--encode-with; default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_checked(parser, argv)
    if args.encode_with is not None:
        try:
            info = encode_source(args.out, args.source, args.encode_with, split=args.split,
                                 held_out_percent=args.held_out_percent, max_tokens=args.max_tokens,
                                 log=lambda m: print(m, file=sys.stderr))
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
        print(json.dumps(info, indent=1))
        print(f"wrote {Path(args.out).absolute() / 'stream.npy'}")
        return 0
    try:
        manifest = prepare(args.out, args.source, args.vocab_size, args.held_out_percent,
                           tokenizer_sample_bytes=int(args.tokenizer_sample_mb * 1e6), seed=args.seed,
                           log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    print(summary(manifest))
    print(f"wrote {Path(args.out).absolute()} ({MANIFEST}, {TOKENIZER_FILE}, train.npy, heldout.npy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
