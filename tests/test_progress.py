"""lminf_jax.progress.Progress: line content, rate limiting, final line, rate, postfix."""

from __future__ import annotations

import io

from lminf_jax.progress import Progress


def test_bytes_line_and_rate_limiting():
    out = io.StringIO()
    with Progress(1000, "tensors", "converting", stream=out, interval=60.0) as bar:
        for _ in range(1000):
            bar.update(1, nbytes=1_000_000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first update, then only the final line
    assert lines[0].startswith("converting: 1/1000 tensors, 1.0 MB, ") and lines[0].endswith(" s")
    assert lines[1].startswith("converting: 1000/1000 tensors, 1000.0 MB, ") and " MB/s, " in lines[1]
    assert "tensors/s" not in lines[1]


def test_rate_in_own_unit_and_postfix():
    out = io.StringIO()
    with Progress(100_000, "tokens", "streaming NLL", stream=out, interval=0.0, rate=True) as bar:
        bar.update(4096)
        bar.update(4096, postfix="mean NLL 2.3100")
        bar.update(4096)  # the postfix stays until replaced
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # interval 0: every update plus the final line
    assert lines[0].startswith("streaming NLL: 4096/100000 tokens, ") and " tokens/s, " in lines[0]
    assert lines[0].endswith(" s")
    assert lines[1].startswith("streaming NLL: 8192/100000 tokens, ") and lines[1].endswith(" s, mean NLL 2.3100")
    assert lines[3].startswith("streaming NLL: 12288/100000 tokens, ") and lines[3].endswith(", mean NLL 2.3100")
    assert " MB" not in lines[3]


def test_rate_counts_only_work_after_initial():
    bar = Progress(1000, "tokens", rate=True, initial=900, enabled=False)
    bar._start -= 10.0  # 10 s ago
    bar.update(50)
    line = bar.line()
    assert line.startswith("950/1000 tokens, ")
    rate = float(line.split(", ")[1].split()[0])
    assert 4.5 <= rate <= 5.0  # 50 tokens in about 10 s, not 950


def test_postfix_attribute_and_no_desc():
    out = io.StringIO()
    with Progress(3, "steps", stream=out, interval=60.0) as bar:
        bar.postfix = "loss 0.5"
        bar.update(3)
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("3/3 steps, ") and last.endswith(", loss 0.5")


def test_disabled_writes_nothing():
    quiet = io.StringIO()
    with Progress(3, "steps", "work", enabled=False, stream=quiet, rate=True, postfix="x") as bar:
        bar.update(3, nbytes=10)
    assert quiet.getvalue() == ""
