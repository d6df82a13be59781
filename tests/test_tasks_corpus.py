"""tasks.corpus: sources, split, tokenizer, token files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lminf_jax.tasks import corpus


def _folder(tmp_path):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "tests").mkdir()
    for i in range(40):
        (root / "pkg" / f"mod{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i}  # é\n" * (i + 1))
    (root / "notes.md").write_text("# Notes\n\nSome *markdown* text.\n")
    (root / "readme.rst").write_text("Title\n=====\n")
    (root / "plain.txt").write_text("plain text\n")
    (root / "data.bin").write_bytes(b"\0\1")  # wrong suffix: ignored
    (root / "pkg" / "tests" / "test_x.py").write_text("assert True\n")  # test suite: excluded
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))  # not UTF-8: skipped
    (root / "empty.txt").write_text("  \n")
    (root / "big.txt").write_text("x" * 5000)
    return root


def test_folder_source(tmp_path):
    c = corpus.read_folder(_folder(tmp_path), max_bytes=4000)
    names = [d.name for d in c.documents]
    assert "notes.md" in names and "readme.rst" in names and "plain.txt" in names and "pkg/mod00.py" in names
    assert not any("tests" in n or n.endswith(".bin") for n in names)
    assert len(names) == 43
    assert c.skipped == {"too large": 1, "not UTF-8": 1, "empty": 1, "excluded folder": 1}
    assert names == sorted(names)


def test_jsonl_source(tmp_path):
    path = tmp_path / "pile.jsonl"
    lines = [json.dumps({"text": "first doc"}), "not json", json.dumps({"meta": 1}), "",
             json.dumps({"text": "日本語 doc", "meta": {"pile_set_name": "x"}}), json.dumps({"text": " "})]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    c = corpus.read_source(str(path))
    assert [(d.name, d.text) for d in c.documents] == [("line:0", "first doc"), ("line:4", "日本語 doc")]
    assert c.skipped["invalid JSON"] == 1 and c.skipped["no 'text' string"] == 1
    assert c.skipped["empty"] == 1 and c.skipped["not UTF-8"] == 1


def test_split_is_deterministic_and_disjoint(tmp_path):
    c = corpus.read_folder(_folder(tmp_path))
    train, held = c.split(20)
    train2, held2 = corpus.read_folder(tmp_path / "src").split(20)
    assert [d.name for d in held] == [d.name for d in held2] and [d.name for d in train] == [d.name for d in train2]
    assert not {d.name for d in train} & {d.name for d in held}
    assert len(train) + len(held) == len(c.documents) and held and train
    # By name only: independent of the other documents.
    assert all(corpus.is_held_out(d.name, 20) for d in held)
    assert not any(corpus.is_held_out(d.name, 20) for d in train)
    assert corpus.is_held_out("anything", 100) and not corpus.is_held_out("anything", 0)
    # Roughly the requested fraction on many names.
    frac = np.mean([corpus.is_held_out(f"a/b{i}.py", 5) for i in range(20000)])
    assert 0.04 < frac < 0.06


def test_stdlib_listing_excludes_tests_and_site_packages():
    c = corpus.read_folder(corpus.stdlib_dir(), suffixes=(".py",))
    names = [d.name for d in c.documents[:100000]]
    assert len(names) > 100
    assert not any(n.startswith("site-packages/") or "/test/" in f"/{n}" or "idle_test" in n for n in names)


def test_tokenizer_round_trip_with_byte_fallback(tmp_path):
    texts = [f"def function_{i}(value):\n    return value + {i}\n\n" * 3 for i in range(200)]
    path = corpus.train_tokenizer(texts, tmp_path, vocab_size=320)
    sp = corpus.load_tokenizer(path)
    assert sp.get_piece_size() == 320
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    for s in ["def f(x):\n    return x\n", "héllo wörld 日本語 🎉\t\r\n  trailing  ", "\n\n\n", "   "]:
        ids = sp.encode(s)
        assert sp.decode(ids) == s
        assert corpus.BOS_ID not in ids and corpus.UNK_ID not in ids
    # Deterministic: the same inputs give the same model file.
    path2 = corpus.train_tokenizer(texts, tmp_path / "again", vocab_size=320)
    assert path.read_bytes() == path2.read_bytes()


def test_prepare_token_files_and_cache(tmp_path):
    src = tmp_path / "docs.jsonl"
    with src.open("w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"document {i}: " + "lorem ipsum dolor " * (i % 7 + 1)}) + "\n")
    logs = []
    m = corpus.prepare(tmp_path / "out", str(src), vocab_size=300, held_out_percent=25, log=logs.append)
    assert m["vocab_size"] == 300 and m["token_dtype"] == "uint16"
    total_docs = 0
    for split in ("train", "heldout"):
        tokens = corpus.load_tokens(tmp_path / "out", split)
        starts = np.load(tmp_path / "out" / f"{split}_docs.npy")
        s = m["splits"][split]
        assert s["documents"] == len(starts) > 0 and s["tokens"] == tokens.size
        assert starts[0] == 0 and np.all(tokens[starts] == corpus.BOS_ID)
        assert np.count_nonzero(np.asarray(tokens) == corpus.BOS_ID) == len(starts)  # BOS only at doc starts
        total_docs += len(starts)
    assert total_docs == 60
    held_names = m["splits"]["heldout"]["names"]
    assert all(corpus.is_held_out(n, 25) for n in held_names)
    sp = corpus.load_tokenizer(tmp_path / "out")
    held = np.asarray(corpus.load_tokens(tmp_path / "out", "heldout"))
    first_len = m["splits"]["heldout"]["document_tokens"][0]
    text = json.loads(src.read_text().splitlines()[int(held_names[0].split(":")[1])])["text"]
    assert sp.decode(held[1:first_len].tolist()) == text
    mtime = (tmp_path / "out" / "train.npy").stat().st_mtime_ns
    logs.clear()
    m2 = corpus.prepare(tmp_path / "out", str(src), vocab_size=300, held_out_percent=25, log=logs.append)
    assert m2 == m and any("reusing" in line for line in logs)
    assert (tmp_path / "out" / "train.npy").stat().st_mtime_ns == mtime


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--source"):
        corpus.read_source(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="does not exist"):
        corpus.read_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="vocab_size"):
        corpus.train_tokenizer(["abc"], tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="held_out_percent"):
        corpus.is_held_out("x", 150)
    with pytest.raises(ValueError, match="split"):
        corpus.load_tokens(tmp_path, "valid")
    with pytest.raises(FileNotFoundError, match="experiments.corpus"):
        corpus.load_manifest(tmp_path)


def test_encode_stream_uses_the_tokenizer_bos():
    class Chars:
        bos_id = 7

        def encode(self, text):
            return [ord(c) for c in text]

    docs = [corpus.Document("a", "hi"), corpus.Document("b", "yo!")]
    assert corpus.encode_stream(Chars(), docs).tolist() == [7, 104, 105, 7, 121, 111, 33]
    Chars.bos_id = None
    assert corpus.encode_stream(Chars(), docs).tolist() == [104, 105, 121, 111, 33]
    assert corpus.encode_stream(Chars(), []).dtype == np.int32
