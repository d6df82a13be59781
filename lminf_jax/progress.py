"""A dependency-free, rate-limited progress line (standard library only)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Context manager reporting ``done/total unit`` plus, optionally, a rate and a postfix.

    Writes at most one line per `interval` seconds to `stream` (default stderr), rewriting
    it in place on a terminal, and a final line on exit; writes nothing when not `enabled`.

    * Bytes passed to `update` add ``, X MB, Y MB/s`` (the converters' format).
    * ``rate=True`` adds the rate in the line's own unit, ``, 2450 tokens/s``; it counts
      only what was done since entering (not `initial`, the work done before a resume).
    * `postfix` (an attribute, or `update`'s keyword) is free text appended to the line.

    A line reads ``desc: done/total unit[, MB, MB/s][, rate unit/s], elapsed s[, postfix]``::

        with Progress(len(items), "tensors", "converting") as bar:
            for item in items:
                bar.update(1, nbytes=item.nbytes)

        with Progress(n, "tokens", "streaming NLL", rate=True) as bar:
            ...
            bar.update(scored, postfix=f"mean NLL {mean:.4f}")
        # streaming NLL: 12288/100000 tokens, 2450 tokens/s, 5.0 s, mean NLL 2.3100
    """

    def __init__(
        self,
        total: int,
        unit: str = "items",
        desc: str = "",
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 0.1,
        rate: bool = False,
        initial: int = 0,
        postfix: str = "",
    ):
        self.total, self.unit, self.desc = total, unit, desc
        self.enabled, self.interval, self.rate = enabled, interval, rate
        self.stream = sys.stderr if stream is None else stream
        self.initial = self.done = initial
        self.nbytes = 0
        self.postfix = postfix
        self._start, self._last = time.monotonic(), -float("inf")

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._write(time.monotonic(), final=True)

    def update(self, n: int = 1, nbytes: int = 0, *, postfix: str | None = None) -> None:
        """Count `n` more units (and `nbytes` more bytes); replace the postfix when given."""
        self.done += n
        self.nbytes += nbytes
        if postfix is not None:
            self.postfix = postfix
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._write(now, final=False)

    def line(self, now: float | None = None) -> str:
        """The progress line as it would be written now (no trailing newline)."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._start
        text = f"{self.desc}: " if self.desc else ""
        text += f"{self.done}/{self.total} {self.unit}"
        if self.nbytes:
            mb = self.nbytes / 1e6
            text += f", {mb:.1f} MB, {mb / max(elapsed, 1e-9):.1f} MB/s"
        if self.rate:
            text += f", {_rate((self.done - self.initial) / max(elapsed, 1e-9))} {self.unit}/s"
        text += f", {elapsed:.1f} s"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _write(self, now: float, final: bool) -> None:
        if self.stream.isatty():
            self.stream.write("\r" + self.line(now) + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()


def _rate(value: float) -> str:
    """A rate with about three significant digits and no exponent: 2450, 12.3, 0.052."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.1f}"
    return f"{value:.3g}"
