"""experiments.continuation: continuing held-out text with three methods on a tiny random LLaMA."""

from __future__ import annotations

import json

import numpy as np
from tiny_checkpoint import PRETRAIN, make_model_dir, random_text

from lminf_jax.experiments import continuation as cli
from lminf_jax.experiments.loading import load_tokenizer_from
from lminf_jax.spec import LMInfinite, Vanilla


def test_continuations_are_scored_and_timed(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "m")
    (tmp_path / "held.txt").write_text(random_text(4, 200))
    out = tmp_path / "c.json"
    code = cli.main([str(model_dir), "--text", str(tmp_path / "held.txt"), "--multiples", "1", "2", "--sequences", "2",
                     "--new-tokens", "5", "-G", "2", "--out", str(out), "--plot", str(tmp_path / "c.png")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(out.read_text())
    assert record["settings"]["positions"] == [PRETRAIN, 2 * PRETRAIN] and list(record["methods"]) == list(cli.METHODS)
    tok = load_tokenizer_from(model_dir)
    specs = {"vanilla": Vanilla(), "lm_infinite": LMInfinite(2, PRETRAIN), "truncation": None}
    for name, rows in record["methods"].items():
        for p, r in rows.items():
            assert 0 <= r["bleu"] <= 1 and 0 <= r["rouge_l"] <= 1 and r["ms_per_token"] >= 0
            assert len(r["samples"]) == 2
            assert r["bleu"] == np.mean([s["bleu"] for s in r["samples"]])
            assert r["keys_attended"] == cli.work_per_token(name, int(p), 5, PRETRAIN, specs[name])["keys_attended"]
            for s in r["samples"]:
                assert len(tok.encode(s["reference"])) >= 4  # the 5 true next tokens, decoded
    # from position L every method sees the same context for its first token
    firsts = {name: [s["generated"][:1] for s in rows[str(PRETRAIN)]["samples"]] for name, rows in record["methods"].items()}
    assert firsts["vanilla"] == firsts["lm_infinite"] == firsts["truncation"]
    assert record["methods"]["truncation"][str(PRETRAIN)]["tokens_through_model"] == PRETRAIN
    # keys per new token: vanilla every earlier one; LM-Infinite its window and, once past them, its G = 2 sinks
    assert record["methods"]["vanilla"][str(PRETRAIN)]["keys_attended"] == PRETRAIN + 2
    assert record["methods"]["lm_infinite"][str(2 * PRETRAIN)]["keys_attended"] == PRETRAIN + 2
    assert captured.out.splitlines()[0].split()[:3] == ["method", "from", "BLEU"]
    assert (tmp_path / "c.png").stat().st_size > 0


def test_repeated_truncation_reencodes_the_last_window(monkeypatch):
    class Recorder:
        def forward(self, params, window):
            seen.append(np.asarray(window))
            return np.eye(10, dtype=np.float32)[np.asarray(window) % 10]  # next token = last token

    seen = []
    prompts = np.arange(2 * 12).reshape(2, 12) % 10
    monkeypatch.setattr(cli, "_next_token",
                        lambda model, params, window: np.asarray(model.forward(params, window))[:, -1].argmax(-1))
    out = cli.repeated_truncation(Recorder(), None, prompts, 3, l_train=5, bos=1)
    assert out.tolist() == [[prompts[0, -1]] * 3, [prompts[1, -1]] * 3]
    assert all(w.shape == (2, 5) and (w[:, 0] == 1).all() for w in seen)
    assert seen[0][:, 1:].tolist() == prompts[:, -4:].tolist()
