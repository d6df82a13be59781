"""load_tokenizer: sentencepiece tokenizer.model, tokenizers tokenizer.json, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters.tokenizer import load_tokenizer

WORDS = (
    "the quick brown fox jumps over lazy dog lion tiger bear wolf river mountain cloud "
    "yellow purple garden kitchen window zebra jacket vivid whisper quartz"
).split()


def random_text(seed: int, lines: int = 300) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(lines))


def test_sentencepiece_model(tmp_path):
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(random_text(0))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=50,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.json").write_text("{}")  # tokenizer.model takes precedence
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 50)
    text = random_text(1, lines=1)
    ids = tok.encode(text)
    assert ids and all(3 <= i < 50 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text


def write_word_level(tmp_path, **special) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(special))
    return vocab


def test_tokenizer_json(tmp_path):
    vocab = write_word_level(tmp_path, bos_token="<s>", eos_token={"content": "</s>"})
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, len(vocab))
    text = random_text(2, lines=1)
    ids = tok.encode(text)
    assert ids == [vocab[w] for w in text.split()]
    assert tok.decode([1, *ids, 2]) == text


def test_tokenizer_json_special_ids_from_config(tmp_path):
    write_word_level(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [2, 1]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (2, None)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
