"""tasks.passkey: prompts of exact length and depth, answers and fine-tuning windows."""

from __future__ import annotations

import numpy as np
import pytest

from lminf_jax.tasks import passkey


class Chars:
    """A character tokenizer: every character is one id, BOS = 1."""

    bos_id = 1

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_prompts_have_the_exact_length_and_the_key_at_its_depth():
    b = passkey.PasskeyBuilder(Chars())
    for length in (b.minimum_length, 300, 1001):
        for depth in (0.0, 0.3, 1.0):
            p = b.prompt(length, depth, "12345")
            text = Chars().decode(list(p.tokens[1:]))
            assert len(p.tokens) == length and p.tokens[0] == 1
            assert text.startswith(passkey.INTRO) and text.endswith(passkey.QUESTION)
            key_sentence = passkey.KEY.format(key="12345")
            assert Chars().decode(list(p.tokens[p.key_at:p.key_at + len(key_sentence)])) == key_sentence
            room = length - 1 - len(passkey.INTRO) - len(key_sentence) - len(passkey.QUESTION)
            assert p.key_at - 1 - len(passkey.INTRO) == round(depth * room)
    with pytest.raises(ValueError, match="at least"):
        b.prompt(b.minimum_length - 1, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        b.prompt(300, 1.5, "12345")
    assert b.answer("12345") == Chars().encode(" 12345.")


def test_answers_are_parsed_from_the_continuation():
    assert passkey.parse_answer(" 56002. Remember") == "56002"
    assert passkey.parse_answer(" the pass key") is None
    assert passkey.parse_answer("x 12 and 345") == "12"


def test_training_windows_start_with_a_prompt_and_its_answer():
    b = passkey.PasskeyBuilder(Chars())
    stream = np.arange(5000, 6000, dtype=np.int32)
    rows = passkey.training_windows(b, 3, 400, np.random.default_rng(0), stream, bos_id=1)
    assert rows.shape == (3, 400) and rows.dtype == np.int32
    for row in rows:
        text = Chars().decode([int(t) for t in row if t < 5000][1:])
        key = passkey.parse_answer(text[text.index("pass key is"):])
        assert text.startswith(passkey.INTRO) and f"{passkey.QUESTION} {key}." in text
        tail = row[row >= 5000]
        assert np.array_equal(tail, np.arange(tail[0], tail[0] + tail.size))  # corpus text after BOS
    with pytest.raises(ValueError, match="too short"):
        passkey.training_windows(b, 1, b.minimum_length, np.random.default_rng(0), stream, bos_id=1)
