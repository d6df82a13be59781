"""A training corpus, a sentencepiece tokenizer and token files for the project's own models
(``python -m experiments.corpus`` writes them).

Sources (`read_source`; the command's ``--source``):

* ``stdlib`` (default): the ``*.py`` sources of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``), without ``site-packages``, test suites and files over
  `MAX_FILE_BYTES`. Every machine has it, so the default experiment needs no download.
* a folder: every ``.txt``/``.md``/``.rst``/``.py`` file under it (same exclusions);
* a ``.jsonl`` file with a ``"text"`` field per line (the Pile's format).

Documents are read as UTF-8; undecodable or empty ones are skipped and counted.

Split: document-level and deterministic, 5% held out by default (2% left only ~0.1M held-out
tokens of the stdlib, too few sequences of 16-32 x 512 tokens for perplexity vs length).
A document is held out when the first 8 bytes of ``sha256(relative path)`` (for jsonl: ``"line:N"``) taken mod 10000 fall below
``held_out_percent * 100``. The split therefore depends only on the names, never on the machine,
the order of listing or the other files.

Tokenizer: sentencepiece BPE with ``byte_fallback`` (any text encodes), ``unk=0, bos=1, eos=2``,
no pad, identity normalisation and no dummy prefix (``decode(encode(s)) == s`` exactly, indentation
and newlines included), pieces may span whitespace (indentation runs become single tokens).
It is trained on a deterministic sample of the training split only (chunks of about 2 kB cut
at line ends, at most ``tokenizer_sample_bytes``), single-threaded enough to be reproducible.

Vocabulary size: 4096 by default. The models trained here have 3-6M parameters; with an
untied output head a 256-wide model spends ``2 * V * 256`` parameters on the vocabulary
(2.1M at V = 4096, 4.2M at 8192), so 4096 keeps most of the budget in the transformer while
still giving ~3 bytes per token on Python sources. Use 8192 for larger models.

Token files in ``OUT``: ``train.npy`` / ``heldout.npy`` (uint16 when the vocabulary fits, else
int32), every document prefixed with BOS and concatenated; ``train_docs.npy`` /
``heldout_docs.npy`` hold each document's start offset (where its BOS is). ``manifest.json``
records documents, bytes and tokens per split, the source, the split rule, the tokenizer's
sha256 and a hash of the corpus; a second run with the same inputs reuses everything.

`encode_source` encodes a source with an existing tokenizer into ``OUT/stream.npy``, e.g. a long
stream of text no model here trained on for streaming NLL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sysconfig
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

MAX_FILE_BYTES = 1_000_000
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
#: Folder names (anywhere in the relative path) that are never read.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                           ".git", "node_modules"})
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
DEFAULT_VOCAB = 4096
DEFAULT_HELD_OUT_PERCENT = 5.0
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
FORMAT = "lminf_jax-corpus"
FORMAT_VERSION = 1
#: Documents of at least this many tokens count as "long" in the held-out statistics.
LONG_DOC_TOKENS = (2048, 8192, 16384)


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # relative path, or "line:N" for jsonl
    text: str


@dataclasses.dataclass
class Corpus:
    source: str  # "stdlib", a folder or a jsonl file (absolute)
    documents: list[Document]
    skipped: dict[str, int]  # reason -> count

    def split(self, held_out_percent: float = DEFAULT_HELD_OUT_PERCENT) -> tuple[list[Document], list[Document]]:
        """(train, held-out) documents; see `is_held_out`."""
        train, held = [], []
        for doc in self.documents:
            (held if is_held_out(doc.name, held_out_percent) else train).append(doc)
        return train, held

    def digest(self) -> str:
        h = hashlib.sha256()
        for doc in self.documents:
            h.update(doc.name.encode("utf-8", "surrogatepass") + b"\0")
            h.update(doc.text.encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()


def split_rule(held_out_percent: float) -> str:
    return (f"held out iff int.from_bytes(sha256(name)[:8], 'big') % 10000 < {held_out_percent * 100:g} "
            "(name = relative path, or 'line:N' for jsonl)")


def is_held_out(name: str, held_out_percent: float = DEFAULT_HELD_OUT_PERCENT) -> bool:
    """Whether document `name` belongs to the held-out split (deterministic, by name only)."""
    if not 0 <= held_out_percent <= 100:
        raise ValueError(f"held_out_percent must lie in [0, 100], got {held_out_percent}")
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[:8], "big") % 10000
    return bucket < held_out_percent * 100


# ----- reading ----------------------------------------------------------------------------------


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    parts = rel.parts[:-1]
    if any(p in EXCLUDED_DIRS or p.startswith(".") for p in parts):
        return True
    # lib2to3/tests, idlelib/idle_test, ctypes/test, unittest/test, ... are caught above;
    # also skip test-data folders with names like "tests_data" or "test_xxx".
    return any(p.startswith("test_") or p.endswith("_test") or p.endswith("_tests") for p in parts)


def read_folder(root: str | os.PathLike, suffixes: Sequence[str] = TEXT_SUFFIXES,
                max_bytes: int = MAX_FILE_BYTES) -> Corpus:
    """Every file under `root` with one of `suffixes` (sorted by relative path)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"corpus folder {root} does not exist or is not a folder")
    skipped = {"too large": 0, "not UTF-8": 0, "empty": 0, "excluded folder": 0}
    docs = []
    for path in sorted(root.rglob("*")):
        if path.suffix not in suffixes or not path.is_file():
            continue
        rel = path.relative_to(root)
        if _excluded(rel):
            skipped["excluded folder"] += 1
            continue
        if path.stat().st_size > max_bytes:
            skipped["too large"] += 1
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped["not UTF-8"] += 1
            continue
        if not text.strip():
            skipped["empty"] += 1
            continue
        docs.append(Document(rel.as_posix(), text))
    return Corpus(str(root.absolute()), docs, skipped)


def read_jsonl(path: str | os.PathLike, field: str = "text") -> Corpus:
    """One document per line of a jsonl file, from its `field` (the Pile format)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"jsonl corpus {path} does not exist")
    skipped = {"not UTF-8": 0, "empty": 0, f"no {field!r} string": 0, "invalid JSON": 0}
    docs = []
    with path.open("rb") as f:
        for i, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped["not UTF-8"] += 1
                continue
            except json.JSONDecodeError:
                skipped["invalid JSON"] += 1
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                skipped[f"no {field!r} string"] += 1
                continue
            if not text.strip():
                skipped["empty"] += 1
                continue
            docs.append(Document(f"line:{i}", text))
    return Corpus(str(path.absolute()), docs, skipped)


def read_source(source: str = "stdlib") -> Corpus:
    """``"stdlib"``, a folder, or a ``.jsonl`` file."""
    if source == "stdlib":
        corpus = read_folder(stdlib_dir(), suffixes=(".py",))
        corpus.source = "stdlib"
        return corpus
    path = Path(source)
    if path.is_dir():
        return read_folder(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    raise ValueError(f"--source must be 'stdlib', a folder or a .jsonl file; got {source!r}")


# ----- tokenizer --------------------------------------------------------------------------------


def _chunks(text: str, size: int = 2000) -> Iterable[str]:
    """Pieces of about `size` characters cut after a newline (sentencepiece's sentences)."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB, *,
                    sample_bytes: int = 8_000_000, seed: int = 0) -> Path:
    """Train a sentencepiece BPE tokenizer on `texts`; write ``OUT_DIR/tokenizer.model``.

    A deterministic sample of ~2 kB chunks (at most `sample_bytes` of text, drawn with `seed`)
    is fed to the trainer. Returns the model's path.
    """
    import sentencepiece as spm

    if vocab_size < 260 + 4:
        raise ValueError(f"vocab_size must be at least 264 (3 specials + 256 byte pieces + some), got {vocab_size}")
    chunks = [c for t in texts for c in _chunks(t)]
    if not chunks:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    order = np.random.default_rng(seed).permutation(len(chunks))
    sample, total = [], 0
    for i in order:
        if total >= sample_bytes:
            break
        sample.append(chunks[i])
        total += len(chunks[i])
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_by_whitespace=False,
        allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=16384,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, shuffle_input_sentence=False,
        input_sentence_size=0, num_threads=1, minloglevel=2, hard_vocab_limit=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    path.write_bytes(model.getvalue())
    return path


def load_tokenizer(path: str | os.PathLike):
    """A ``sentencepiece.SentencePieceProcessor`` for a ``tokenizer.model`` file (or its folder)."""
    import sentencepiece as spm

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    return spm.SentencePieceProcessor(model_file=str(path))


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----- token files ------------------------------------------------------------------------------


def encode_documents(sp, docs: Sequence[Document], batch: int = 256) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(tokens, document start offsets, tokens per document): BOS + ids of each document, concatenated."""
    dtype = np.uint16 if sp.get_piece_size() <= 2**16 else np.int32
    parts, lengths = [], []
    for i in range(0, len(docs), batch):
        for ids in sp.encode([d.text for d in docs[i:i + batch]]):
            parts.append(np.asarray([BOS_ID, *ids], dtype))
            lengths.append(len(ids) + 1)
    tokens = np.concatenate(parts) if parts else np.zeros((0,), dtype)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths else np.zeros((0,), np.int64)
    return tokens, starts, lengths


def encode_stream(tokenizer, docs: Sequence[Document]) -> np.ndarray:
    """int32 ids of `docs` in order, each ``[bos_id] + tokenizer.encode(text)`` (no BOS when the
    tokenizer has none): the layout of the token files, for any tokenizer with ``encode`` and
    ``bos_id`` (`converters.tokenizer.Tokenizer`)."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    parts = [np.asarray(bos + list(tokenizer.encode(d.text)), np.int64) for d in docs]
    ids = np.concatenate(parts) if parts else np.zeros((0,), np.int64)
    if ids.size and ids.max() > np.iinfo(np.int32).max:
        raise ValueError(f"token id {ids.max()} does not fit int32")
    return ids.astype(np.int32)


def held_out_documents(source: str = "stdlib", held_out_percent: float = DEFAULT_HELD_OUT_PERCENT) -> tuple[list[Document], Corpus]:
    """The held-out documents of `source` (in path order) under the split rule, and the corpus read."""
    corpus = read_source(source)
    held = corpus.split(held_out_percent)[1]
    if not held:
        raise ValueError(f"source {source!r} has no held-out documents at {held_out_percent}% "
                         f"({len(corpus.documents)} documents read)")
    return held, corpus


def load_tokens(data_dir: str | os.PathLike, split: str) -> np.ndarray:
    """The token stream of `split` (``"train"`` or ``"heldout"``), memory-mapped."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    path = Path(data_dir) / f"{split}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"no token file {path}; run python -m experiments.corpus --out {data_dir}")
    return np.load(path, mmap_mode="r")


def load_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {data_dir}; run python -m experiments.corpus --out {data_dir}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a corpus manifest")
    return manifest


def prepare(out_dir: str | os.PathLike, source: str = "stdlib", vocab_size: int = DEFAULT_VOCAB,
            held_out_percent: float = DEFAULT_HELD_OUT_PERCENT, *, tokenizer_sample_bytes: int = 8_000_000,
            seed: int = 0, log=print) -> dict:
    """Read `source`, split it, train the tokenizer, write the token files; return the manifest.

    Reuses an existing tokenizer and token files when ``OUT_DIR/manifest.json`` records the same
    corpus, settings and tokenizer.
    """
    if vocab_size < 264:
        raise ValueError(f"vocab_size must be at least 264, got {vocab_size}")
    out = Path(out_dir)
    t0 = time.monotonic()
    corpus = read_source(source)
    if not corpus.documents:
        raise ValueError(f"source {source!r} holds no readable documents (skipped: {corpus.skipped})")
    train, held = corpus.split(held_out_percent)
    if not train or not held:
        raise ValueError(f"the split leaves {len(train)} training and {len(held)} held-out documents; "
                         "both must be non-empty (add documents or change held_out_percent)")
    settings = {"source": corpus.source, "corpus_sha256": corpus.digest(), "vocab_size": vocab_size,
                "held_out_percent": held_out_percent, "tokenizer_sample_bytes": tokenizer_sample_bytes,
                "seed": seed}
    log(f"read {len(corpus.documents)} documents from {corpus.source} in {time.monotonic() - t0:.1f} s "
        f"(skipped: {', '.join(f'{k} {v}' for k, v in corpus.skipped.items() if v) or 'none'})")
    tok_path = out / TOKENIZER_FILE
    try:
        old = load_manifest(out)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        old = None
    if (old is not None and old.get("settings") == settings and tok_path.is_file()
            and file_sha256(tok_path) == old.get("tokenizer_sha256")
            and all((out / f"{s}.npy").is_file() for s in ("train", "heldout"))):
        log(f"{out / MANIFEST} matches: reusing tokenizer and token files")
        return old
    t1 = time.monotonic()
    train_tokenizer((d.text for d in train), out, vocab_size, sample_bytes=tokenizer_sample_bytes, seed=seed)
    log(f"trained tokenizer (vocab {vocab_size}) in {time.monotonic() - t1:.1f} s")
    sp = load_tokenizer(tok_path)
    splits = {}
    for name, docs in (("train", train), ("heldout", held)):
        t2 = time.monotonic()
        tokens, starts, lengths = encode_documents(sp, docs)
        np.save(out / f"{name}.npy", tokens)
        np.save(out / f"{name}_docs.npy", starts)
        nbytes = sum(len(d.text.encode("utf-8", "surrogatepass")) for d in docs)
        splits[name] = {"documents": len(docs), "bytes": nbytes, "tokens": int(tokens.size),
                        "bytes_per_token": round(nbytes / max(tokens.size, 1), 4),
                        "longest_document_tokens": int(max(lengths)),
                        "documents_with_at_least": {str(n): int(sum(l >= n for l in lengths)) for n in LONG_DOC_TOKENS}}
        if name == "heldout":
            splits[name]["names"] = [d.name for d in docs]
            splits[name]["document_tokens"] = lengths
        log(f"encoded {name} in {time.monotonic() - t2:.1f} s")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "settings": settings,
        "split_rule": split_rule(held_out_percent), "skipped": corpus.skipped,
        "tokenizer": TOKENIZER_FILE, "tokenizer_sha256": file_sha256(tok_path),
        "vocab_size": sp.get_piece_size(), "bos_id": BOS_ID, "eos_id": EOS_ID, "unk_id": UNK_ID,
        "token_dtype": str(np.load(out / "train.npy", mmap_mode="r").dtype),
        "layout": "each document = BOS + its tokens, concatenated; <split>_docs.npy = document start offsets",
        "splits": splits,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def encode_source(out_dir: str | os.PathLike, source: str, tokenizer_path: str | os.PathLike, *, split: str = "heldout",
                  held_out_percent: float = DEFAULT_HELD_OUT_PERCENT, max_tokens: int | None = None, log=print) -> dict:
    """Encode a source's documents with an existing tokenizer into ``OUT/stream.npy`` (BOS + ids per
    document, in path order; uint16 when the vocabulary fits) and describe it in ``OUT/stream.json``.

    ``split``: ``"heldout"``, ``"train"`` or ``"all"`` documents under the split rule (``"all"`` for
    text no model here trained on, e.g. another folder). ``max_tokens`` keeps the first N tokens
    (documents are encoded only until N are reached).
    """
    if split not in ("heldout", "train", "all"):
        raise ValueError(f"split must be 'heldout', 'train' or 'all', got {split!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    t0 = time.monotonic()
    corpus = read_source(source)
    train, held = corpus.split(held_out_percent)
    docs = {"heldout": held, "train": train, "all": corpus.documents}[split]
    if not docs:
        raise ValueError(f"source {source!r} has no {split} documents ({len(corpus.documents)} read)")
    sp = load_tokenizer(tokenizer_path)
    parts, used, total = [], 0, 0
    for doc in docs:
        ids = np.asarray([BOS_ID, *sp.encode(doc.text)], np.int64)
        parts.append(ids)
        used, total = used + 1, total + ids.size
        if max_tokens is not None and total >= max_tokens:
            break
    tokens = np.concatenate(parts)[:max_tokens]
    tokens = tokens.astype(np.uint16 if sp.get_piece_size() <= 2**16 else np.int32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "stream.npy", tokens)
    info = {"source": corpus.source, "split": split, "split_rule": split_rule(held_out_percent),
            "documents": used, "documents_available": len(docs), "tokens": int(tokens.size),
            "max_tokens": max_tokens, "bytes": sum(len(d.text.encode("utf-8", "surrogatepass")) for d in docs[:used]),
            "tokenizer_sha256": file_sha256(Path(tokenizer_path) / TOKENIZER_FILE if Path(tokenizer_path).is_dir()
                                            else tokenizer_path),
            "first_document": docs[0].name, "last_document": docs[used - 1].name}
    (out / "stream.json").write_text(json.dumps(info, indent=1))
    log(f"encoded {used} of {len(docs)} {split} documents of {corpus.source} into {tokens.size:,} tokens "
        f"in {time.monotonic() - t0:.1f} s")
    return info
