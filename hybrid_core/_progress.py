"""A dependency-free progress line for long loops (stderr, throttled)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Shows ``label  done/total  extra`` on one line; rewrites it on a terminal, prints every 10% otherwise."""

    def __init__(self, total: int | None, label: str = "", stream: TextIO | None = None,
                 min_interval: float = 0.25) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_time = 0.0
        self._last_decile = -1
        self._start = time.perf_counter()
        self._width = 0

    def update(self, done: int, extra: str = "") -> None:
        """Report ``done`` units finished; cheap when nothing is shown."""
        now = time.perf_counter()
        if self._tty:
            if now - self._last_time < self.min_interval and done != self.total:
                return
            self._last_time = now
            line = self._line(done, extra, now)
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
            self.stream.flush()
            return
        decile = (10 * done // self.total) if self.total else done // 100
        if decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(self._line(done, extra, now) + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the progress line."""
        if self._tty and self._width:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, done: int, extra: str, now: float) -> str:
        of = f"/{self.total}" if self.total else ""
        return f"{self.label} {done}{of} [{now - self._start:.1f}s] {extra}".strip()
