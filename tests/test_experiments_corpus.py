"""experiments.corpus: the command, writing token files or encoding with an existing tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lminf_jax.experiments import corpus as cli
from lminf_jax.tasks import corpus


def test_a_source_without_documents_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "o"), "--source", str(tmp_path / "empty")])
    assert "no readable documents" in capsys.readouterr().err


def test_encode_with_an_existing_tokenizer(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    with src.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"record {i}: " + "alpha beta gamma " * (i % 5 + 1)}) + "\n")
    manifest = corpus.prepare(tmp_path / "data", str(src), vocab_size=300, held_out_percent=25, log=lambda m: None)
    assert "train" in cli.summary(manifest) and "heldout" in cli.summary(manifest)
    held = np.asarray(corpus.load_tokens(tmp_path / "data", "heldout"))
    tok = tmp_path / "data" / "tokenizer.model"
    # the held-out split encoded again matches the token file the corpus wrote
    assert cli.main(["--out", str(tmp_path / "enc"), "--source", str(src), "--encode-with", str(tok),
                     "--held-out-percent", "25"]) == 0
    assert "stream.npy" in capsys.readouterr().out
    stream = np.load(tmp_path / "enc" / "stream.npy")
    info = json.loads((tmp_path / "enc" / "stream.json").read_text())
    assert stream.dtype == np.uint16 and np.array_equal(stream, held)
    assert info["split"] == "heldout" and info["tokens"] == held.size and info["documents"] == info["documents_available"]
    # every document, cut at max_tokens: documents are read in order until enough tokens exist
    info = corpus.encode_source(tmp_path / "all", str(src), tok, split="all", max_tokens=50, log=lambda m: None)
    part = np.load(tmp_path / "all" / "stream.npy")
    sp = corpus.load_tokenizer(tok)
    whole = np.concatenate([[corpus.BOS_ID, *sp.encode(d.text)] for d in corpus.read_source(str(src)).documents])
    assert part.size == 50 and np.array_equal(part, whole[:50]) and info["first_document"] == "line:0"
    assert info["documents"] < 40 and info["documents_available"] == 40
    with pytest.raises(ValueError, match="split must be"):
        corpus.encode_source(tmp_path / "x", str(src), tok, split="valid")
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        corpus.encode_source(tmp_path / "x", str(src), tok, max_tokens=0)
