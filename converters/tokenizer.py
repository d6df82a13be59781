"""`load_tokenizer`: a checkpoint's tokenizer behind one small interface."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    """Text <-> token ids. `encode` adds no special tokens; `decode` drops them."""

    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece ``tokenizer.model`` (LLaMA)."""

    def __init__(self, path: Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.bos_id = _optional_id(self._sp.bos_id())
        self.eos_id = _optional_id(self._sp.eos_id())
        self.vocab_size: int = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (GPT-J, MPT). BOS/EOS come from
    tokenizer_config.json's ``bos_token``/``eos_token``, else config.json's ``*_token_id``."""

    def __init__(self, path: Path):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id(path.parent, "bos")
        self.eos_id = self._special_id(path.parent, "eos")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def _special_id(self, root: Path, kind: str) -> int | None:
        token = _json(root / "tokenizer_config.json").get(f"{kind}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            return self._tok.token_to_id(token)
        token_id = _json(root / "config.json").get(f"{kind}_token_id")
        return token_id if isinstance(token_id, int) else None


def _optional_id(token_id: int) -> int | None:
    return None if token_id < 0 else token_id


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def load_tokenizer(hf_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of checkpoint directory `hf_dir`: ``tokenizer.model`` (sentencepiece)
    when present, else ``tokenizer.json`` (read with `tokenizers`)."""
    root = Path(hf_dir)
    if (root / "tokenizer.model").is_file():
        return SentencePieceTokenizer(root / "tokenizer.model")
    if (root / "tokenizer.json").is_file():
        return HFTokenizer(root / "tokenizer.json")
    raise FileNotFoundError(f"no tokenizer in {root}: expected tokenizer.model or tokenizer.json")
