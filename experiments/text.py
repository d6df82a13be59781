"""The text an evaluation reads: command-line options and the token stream they name.

    --source stdlib|FOLDER|FILE.jsonl   the held-out documents of a corpus (default: stdlib)
    --tokens FILE.npy                   a 1-D integer .npy of token ids, used as is
    --text FILE [FILE ...]              text files, each encoded as BOS + ids
    --held-out-percent P                the split of --source (default 5, as in experiments.corpus)
    --tokenizer DIR                     encode with DIR's tokenizer (default: the model directory's)

``--source`` takes the held-out documents under `tasks.corpus`'s split rule (for
``stdlib``: the standard library of the running interpreter, 5% of files by path hash, none of
which the shipped models trained on), encodes them with the model's tokenizer, BOS + ids per
document, and concatenates them in path order.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from lminf_jax.experiments.loading import add_tokenizer_arg, hf_config, open_tokenizer
from lminf_jax.experiments.options import input_path
from lminf_jax.tasks import corpus


def add_text_args(parser: argparse.ArgumentParser) -> None:
    """Register the text options (see the module docstring) on `parser`."""
    group = parser.add_argument_group("text (one of)")
    text = group.add_mutually_exclusive_group()
    text.add_argument("--source", default="stdlib", type=input_path,
                      help="held-out split of 'stdlib' (default), a folder or a .jsonl with 'text'")
    text.add_argument("--tokens", type=input_path, metavar="FILE.npy", help="a 1-D integer .npy of token ids, used as is")
    text.add_argument("--text", nargs="+", type=input_path, metavar="FILE", help="text files, each encoded as BOS + ids")
    group.add_argument("--held-out-percent", type=float, default=corpus.DEFAULT_HELD_OUT_PERCENT, metavar="P",
                       help="the split of --source (default 5, as in experiments.corpus)")
    add_tokenizer_arg(group)


def npy_tokens(path: str | os.PathLike) -> np.ndarray:
    """A 1-D integer ``.npy``, memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--tokens: no such file: {path}")
    try:
        tokens = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise ValueError(f"--tokens {path}: not a readable .npy array ({e})") from None
    if not isinstance(tokens, np.ndarray) or tokens.dtype.kind not in "iu" or tokens.ndim != 1:
        raise ValueError(f"--tokens {path}: expected a 1-D integer array, got "
                         f"{getattr(tokens, 'dtype', '?')} of shape {getattr(tokens, 'shape', '?')}")
    return tokens


def read_text_file(path: str | os.PathLike, option: str) -> str:
    """The UTF-8 text of the file an `option` names; a ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{option}: no such file: {path}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{option} {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def check_ids(tokens: np.ndarray, vocab_size: int, block: int = 1 << 24) -> None:
    """Every id in ``[0, vocab_size)`` (read block by block: a memmap is not loaded whole)."""
    for start in range(0, tokens.size, block):
        part = np.asarray(tokens[start:start + block])
        lo, hi = int(part.min()), int(part.max())
        if lo < 0 or hi >= vocab_size:
            bad = int(np.flatnonzero((part < 0) | (part >= vocab_size))[0]) + start
            raise ValueError(f"token ids must lie in [0, {vocab_size}): token {int(tokens[bad])} at index {bad} "
                             f"is outside the model's vocabulary [0, {vocab_size})")


def token_stream(args: argparse.Namespace) -> tuple[np.ndarray, dict]:
    """``(1-D token ids, description)`` of the text the options name."""
    if args.tokens is not None:
        tokens = np.asarray(npy_tokens(args.tokens))
        return tokens, {"tokens": str(args.tokens)}
    tokenizer = open_tokenizer(args.model_dir, args.tokenizer, alternative="score token ids with --tokens F.npy")
    tokenizer_note = {} if args.tokenizer is None else {"tokenizer": str(args.tokenizer)}
    if args.text is not None:
        docs = []
        for name in args.text:
            docs.append(corpus.Document(name, read_text_file(name, "--text")))
        return corpus.encode_stream(tokenizer, docs), {"text": list(args.text), **tokenizer_note}
    docs, read = corpus.held_out_documents(args.source, args.held_out_percent)
    return corpus.encode_stream(tokenizer, docs), {
        "source": read.source, "held_out_percent": args.held_out_percent, "split_rule": corpus.split_rule(args.held_out_percent),
        "documents": len(docs), "bytes": sum(len(d.text.encode("utf-8", "surrogatepass")) for d in docs),
        "python": sys.version.split()[0] if args.source == "stdlib" else None, **tokenizer_note,
    }


def bos_id(model_dir: str, tokenizer_dir: str | None = None) -> int | None:
    """The model's BOS id: its tokenizer's (`tokenizer_dir`'s when given), else its config's
    ``bos_token_id``, else None."""
    try:
        tokenizer_bos = open_tokenizer(model_dir, tokenizer_dir).bos_id
    except ValueError:
        tokenizer_bos = None
    if tokenizer_bos is not None:
        return tokenizer_bos
    value = hf_config(model_dir).get("bos_token_id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None
