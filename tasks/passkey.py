"""Passkey retrieval (the paper's downstream test): prompts at any length and depth, fine-tuning
windows and the scoring of answers (`python -m experiments.passkey` runs it).

A prompt of n tokens is BOS, `INTRO`, the filler sentences `FILLER` repeated, the key sentence
`KEY` ("The pass key is NNNNN. Remember it. NNNNN is the pass key.") inserted at a depth in [0, 1]
of the filler (0: right after the intro, 1: right before the question), and `QUESTION`; the pieces
are tokenized separately and the filler is cut to make exactly n tokens. The model continues
greedily; the answer is the first run of digits in the continuation (`parse_answer`).

A small model does not follow the instruction unless taught: `training_windows` makes fine-tuning
windows (a passkey prompt of at most L_train tokens plus its answer, then corpus text), used by
``python -m experiments.train --init MODEL_DIR --passkey-fraction F``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Token ids of one prompt, its key and where the key sentence starts (token index)."""

    tokens: tuple[int, ...]
    key: str
    depth: float
    key_at: int


class PasskeyBuilder:
    """Builds prompts of an exact token length with a tokenizer (``encode``, ``bos_id``)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        self.intro, self.filler, self.question = (list(tokenizer.encode(t)) for t in (INTRO, FILLER, QUESTION))
        self.longest_key = len(tokenizer.encode(KEY.format(key="99999")))

    @property
    def minimum_length(self) -> int:
        """The shortest prompt: no filler at all."""
        return len(self.bos) + len(self.intro) + self.longest_key + len(self.question) + 4

    def prompt(self, length: int, depth: float, key: str) -> Prompt:
        """A prompt of exactly `length` tokens with `key` at `depth` of the filler."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], got {depth}")
        key_ids = list(self.tokenizer.encode(KEY.format(key=key)))
        room = length - len(self.bos) - len(self.intro) - len(key_ids) - len(self.question)
        if room < 0 or length < self.minimum_length:
            raise ValueError(f"a passkey prompt needs at least {self.minimum_length} tokens, got length {length}")
        filler = (self.filler * (room // len(self.filler) + 1))[:room]
        cut = int(round(depth * room))
        head = self.bos + self.intro + filler[:cut]
        tokens = head + key_ids + filler[cut:] + self.question
        return Prompt(tuple(tokens), key, float(depth), len(head))

    def answer(self, key: str) -> list[int]:
        """The ids the model should continue with: ``" " + key + "."``."""
        return list(self.tokenizer.encode(f" {key}."))


def random_key(rng: np.random.Generator) -> str:
    """A random five-digit key."""
    return f"{int(rng.integers(10_000, 100_000))}"


def parse_answer(text: str) -> str | None:
    """The first run of digits in a continuation, or None."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def training_windows(builder: PasskeyBuilder, rows: int, seq_len: int, rng: np.random.Generator,
                     stream: np.ndarray, bos_id: int) -> np.ndarray:
    """``(rows, seq_len)`` int32 fine-tuning windows: a passkey prompt of a random length in
    ``[minimum, seq_len - answer - 2]`` (random depth and key) followed by its answer, then BOS
    and corpus tokens from a random offset of `stream` to fill the window."""
    out = np.empty((rows, seq_len), np.int32)
    for r in range(rows):
        key = random_key(rng)
        answer = builder.answer(key)
        top = seq_len - len(answer) - 2
        if top < builder.minimum_length:
            raise ValueError(f"seq_len {seq_len} is too short for a passkey window (needs "
                             f"{builder.minimum_length + len(answer) + 2})")
        prompt = builder.prompt(int(rng.integers(builder.minimum_length, top + 1)), float(rng.random()), key)
        out[r] = filled_window(list(prompt.tokens) + answer + [bos_id], stream, seq_len, rng)
    return out


def filled_window(head: list[int], stream: np.ndarray, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """``head`` followed by tokens of `stream` from a random offset: one int32 window of `seq_len`."""
    start = int(rng.integers(0, stream.shape[0] - seq_len))
    return np.concatenate([head, np.asarray(stream[start:start + seq_len - len(head)])]).astype(np.int32)


def accuracy_by_depth(rows: list[dict], depths: Sequence[float]) -> dict:
    """``{"all": acc, "<depth>": acc, ...}`` for one cell's answers."""
    out = {"all": float(np.mean([r["correct"] for r in rows]))}
    for d in depths:
        picked = [r["correct"] for r in rows if r["depth"] == d]
        out[f"{d:g}"] = float(np.mean(picked)) if picked else None
    return out
