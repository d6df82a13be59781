"""A dependency-free, rate-limited progress line."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Context manager reporting `done/total unit` (plus MB and MB/s when bytes are given).

    Writes at most one line per `interval` seconds to `stream` (default stderr), rewriting
    it in place on a terminal, and a final line on exit; writes nothing when not `enabled`.

        with Progress(len(items), "tensors", "converting") as bar:
            for item in items:
                bar.update(1, nbytes=item.nbytes)
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
    ):
        self.total, self.unit, self.desc = total, unit, desc
        self.enabled, self.interval = enabled, interval
        self.stream = sys.stderr if stream is None else stream
        self.done = self.nbytes = 0
        self._start, self._last = time.monotonic(), -float("inf")

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._write(time.monotonic(), final=True)

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        """Count `n` more units (and `nbytes` more bytes)."""
        self.done += n
        self.nbytes += nbytes
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._write(now, final=False)

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        text = f"{self.desc}: " if self.desc else ""
        text += f"{self.done}/{self.total} {self.unit}"
        if self.nbytes:
            mb = self.nbytes / 1e6
            text += f", {mb:.1f} MB, {mb / max(elapsed, 1e-9):.1f} MB/s"
        return text + f", {elapsed:.1f} s"

    def _write(self, now: float, final: bool) -> None:
        if self.stream.isatty():
            self.stream.write("\r" + self._line(now) + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(self._line(now) + "\n")
        self.stream.flush()
