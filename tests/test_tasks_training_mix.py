"""tasks.training_mix: fine-tuning windows of RULER instances with their answers."""

from __future__ import annotations

import numpy as np
import pytest
from ruler_examples import TEXT, TOKENIZER

from lminf_jax.tasks import ruler
from lminf_jax.tasks.training_mix import TrainingMix


def test_training_mix_windows_hold_an_instance_its_answer_eos_then_training_tokens():
    stream = np.asarray(TOKENIZER.encode(TEXT), np.int32)
    mix = TrainingMix(TOKENIZER, 512, stream)
    assert mix.included == tuple(t for t in ruler.TASKS if t != "cwe") and list(mix.excluded) == ["cwe"]
    windows = mix.windows(8, np.random.default_rng(7), 1)
    assert windows.shape == (8, 512) and windows.dtype == np.int32
    assert np.array_equal(windows, mix.windows(8, np.random.default_rng(7), 1))  # seeded
    replay = np.random.default_rng(7)
    for row in windows:
        inst = mix.instance(replay)
        replay.integers(0, stream.shape[0] - 512)  # the row's offset in the stream
        assert inst.length <= 512 and inst.task in mix.included
        head = (ruler.prompt_tokens(TOKENIZER, inst.prompt, inst.answer_prefix)
                + TOKENIZER.encode(ruler.answer_text(inst)) + [TOKENIZER.eos_id, 1])
        assert row[:len(head)].tolist() == head
        tail = row[len(head):]
        starts = np.flatnonzero(stream[:stream.shape[0] - len(tail) + 1] == tail[0])
        assert any(np.array_equal(stream[s:s + len(tail)], tail) for s in starts)  # a slice of the stream
    assert len({TrainingMix.instance(mix, np.random.default_rng(s)).task for s in range(40)}) > 5


def test_training_mix_refuses_what_cannot_work():
    stream = np.asarray(TOKENIZER.encode(TEXT), np.int32)
    with pytest.raises(ValueError, match="unknown RULER task 'qa_1'"):
        TrainingMix(TOKENIZER, 512, stream, ["niah_single_1", "qa_1"])
    with pytest.raises(ValueError, match="no RULER task of vt, cwe fits in 256 tokens: vt: its shortest"):
        TrainingMix(TOKENIZER, 256, stream, ["vt", "cwe"])

    class NoEos:
        eos_id = None

    with pytest.raises(ValueError, match="ends each answer with EOS: the tokenizer has none"):
        TrainingMix(NoEos(), 512, stream)

