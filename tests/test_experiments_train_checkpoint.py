"""experiments.train_checkpoint: the loss log cut back to a resumed step (the checkpoints themselves are tried
by tests/test_experiments_train.py's resumes)."""

from __future__ import annotations

import json

from lminf_jax.experiments.train_checkpoint import truncate_log


def test_the_log_keeps_what_was_logged_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "loss.jsonl"
    truncate_log(path, 3)  # no log yet: nothing written
    assert not path.exists()
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "heldout_loss": 1.5}, {"step": 3, "loss": 1.0},
            {"step": 3, "heldout_loss": 1.2, "final": True}, {"step": 4, "loss": 0.9}, ["not", "a", "row"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')  # the last line cut by a kill
    truncate_log(path, 3)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:3])
    assert [p.name for p in tmp_path.iterdir()] == ["loss.jsonl"]  # no temporary file left
