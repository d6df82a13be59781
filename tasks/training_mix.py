"""RULER instances as fine-tuning windows (``python -m experiments.train ... --ruler-fraction F``).

`TrainingMix` makes windows of L_train tokens holding an instance of a random task, length (up to what
fits) and depth, its answer (`lminf_jax.tasks.ruler.answer_text`), EOS, then BOS and training text.
Text haystacks come from the training split, so evaluation haystacks (held-out text) stay unseen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lminf_jax.tasks.passkey import filled_window
from lminf_jax.tasks.ruler import NEEDS_TEXT, TASKS, Instance, TooShort, answer_text, generate, prompt_tokens


class TrainingMix:
    """Fine-tuning windows of RULER instances no longer than a training length (`windows`).

    Every task of `tasks` whose shortest instance with its answer fits in `seq_len` takes part
    (`included`; `excluded` says why the others do not, e.g. cwe, whose shortest prompt is about
    1,000 tokens). Text haystacks are decoded from the training token stream, never held-out text."""

    def __init__(self, tokenizer, seq_len: int, stream: np.ndarray, tasks: Sequence[str] = TASKS):
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown RULER task {unknown[0]!r}; known: {', '.join(TASKS)}")
        if tokenizer.eos_id is None:
            raise ValueError("the RULER fine-tuning mix ends each answer with EOS: the tokenizer has none")
        self.tokenizer, self.seq_len, self.stream = tokenizer, seq_len, stream
        self.shortest: dict[str, int] = {}
        self.excluded: dict[str, str] = {}
        text = self._text(np.random.default_rng(0))
        for task in tasks:
            fits = self._fits(task, text)
            if fits is None:
                self.excluded[task] = f"its shortest instance with its answer needs more than {seq_len} tokens"
            else:
                self.shortest[task] = fits
        if not self.shortest:
            raise ValueError(f"no RULER task of {', '.join(tasks)} fits in {seq_len} tokens: "
                             + "; ".join(f"{t}: {why}" for t, why in self.excluded.items()))

    @property
    def included(self) -> tuple[str, ...]:
        return tuple(self.shortest)

    def describe(self) -> str:
        """The tasks in the mix, then each one left out and why (for logs and model cards)."""
        return ", ".join(self.included) + "".join(f"; not {t}: {why}" for t, why in self.excluded.items())

    def _text(self, rng: np.random.Generator) -> str:
        span = 4 * self.seq_len  # words enough for any haystack of seq_len tokens
        start = int(rng.integers(0, max(1, self.stream.shape[0] - span)))
        return self.tokenizer.decode([int(t) for t in self.stream[start:start + span]])

    def _room(self, instance: Instance) -> int:
        """Tokens left in a window after the prompt, its answer, EOS and BOS (negative: too long)."""
        return self.seq_len - instance.tokens - len(self.tokenizer.encode(answer_text(instance))) - 2

    def _fits(self, task: str, text: str) -> int | None:
        """The shortest length (a multiple of 8) at which `task` makes an instance that fits, or None."""
        for n in range(16, self.seq_len + 1, 8):
            try:
                instance = generate(task, self.tokenizer, n, None if task in ("cwe", "fwe") else 0.5, 0, text)
            except TooShort:
                continue
            return n if self._room(instance) >= 0 else None
        return None

    def instance(self, rng: np.random.Generator) -> Instance:
        """A random instance (task, length, depth, seed drawn from `rng`) that fits with its answer."""
        task = self.included[int(rng.integers(len(self.included)))]
        depth = None if task in ("cwe", "fwe") else float(rng.random())
        seed = int(rng.integers(2**31))
        text = self._text(rng) if task in NEEDS_TEXT else None
        length = int(rng.integers(self.shortest[task], self.seq_len - 1))
        for _ in range(16):  # the answer's tokens are known once the instance is made
            try:
                instance = generate(task, self.tokenizer, length, depth, seed, text)
            except TooShort:  # this seed's shortest prompt is longer than the one `shortest` measured
                length += 8
                continue
            except RuntimeError:  # needles moved by a unit changed the tokens at their seams: another seed
                seed += 1
                continue
            room = self._room(instance)
            if room >= 0:
                return instance
            length += room
        raise RuntimeError(f"{task}: no instance of seed {seed} fits in {self.seq_len} tokens with its answer")

    def windows(self, rows: int, rng: np.random.Generator, bos_id: int) -> np.ndarray:
        """``(rows, seq_len)`` int32 windows: an instance's prompt, its answer (`answer_text`) and EOS,
        then BOS and training tokens from a random offset to fill the window."""
        out = np.empty((rows, self.seq_len), np.int32)
        for r in range(rows):
            instance = self.instance(rng)
            head = (prompt_tokens(self.tokenizer, instance.prompt, instance.answer_prefix)
                    + list(self.tokenizer.encode(answer_text(instance))) + [self.tokenizer.eos_id, bos_id])
            out[r] = filled_window(head, self.stream, self.seq_len, rng)
        return out
