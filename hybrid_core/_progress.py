"""Progress display for long loops, built on tqdm: a bar in a terminal or a notebook, plain lines in a log.

The mode is chosen from where the output goes:

- ``"bar"``: the stream is a terminal; a tqdm bar redrawn in place (rate, ETA, the extra text).
- ``"notebook"``: running in a Jupyter kernel; tqdm's notebook widget (with ipywidgets), else
  tqdm's text bar, which a notebook also redraws in place.
- ``"lines"``: anything else (a file, a pipe, a CI log); one plain line per new tenth of the
  total, one at least every ``log_every`` seconds, and one at the end — never a carriage return.
  The line is tqdm's own meter: ``train:  30% 180/600 [00:02<00:05, 80.1it/s, phase=full, ...]``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["MODES", "Progress", "progress_mode"]

MODES = ("bar", "notebook", "lines")
"""The display modes of `Progress`."""

_LINE = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_LINE_OPEN = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"

Extra = str | Callable[[], str]
"""The text after the meter, or a function making it (called only when a line is drawn)."""


def progress_mode(stream: TextIO) -> str:
    """``"bar"`` for a terminal, ``"notebook"`` inside a Jupyter kernel, ``"lines"`` otherwise."""
    if bool(getattr(stream, "isatty", lambda: False)()):
        return "bar"
    return "notebook" if _in_notebook() else "lines"


class Progress:
    """Shows ``label``, done/total, rate, ETA and an extra text for a loop (see the module docstring).

    ``update(done, extra)`` is cheap when nothing is drawn: a callable ``extra`` is called only
    when a line or a redraw is due (at most every ``min_interval`` seconds on a bar).
    """

    def __init__(self, total: int | None, label: str = "", stream: TextIO | None = None,
                 min_interval: float = 0.25, *, mode: str | None = None, log_every: float = 30.0) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.mode = mode if mode is not None else progress_mode(self.stream)
        self.min_interval = min_interval
        self.log_every = log_every
        self._start = time.perf_counter()
        self._done = 0
        self._last_draw = self._start if self.mode == "lines" else -float("inf")
        self._last_line_done = 0
        self._last_tenth = 0
        self._extra = ""
        self._bar: Any = None
        if self.mode != "lines":
            self._bar = _make_bar(self.mode, total, label, self.stream, min_interval)

    def update(self, done: int, extra: Extra = "") -> None:
        """Report ``done`` units finished in all."""
        self._done = done
        now = time.perf_counter()
        if self._bar is not None:
            if now - self._last_draw >= self.min_interval or done == self.total:
                self._last_draw = now
                self._bar.set_postfix_str(_text(extra), refresh=False)
            self._bar.update(done - self._bar.n)
            return
        tenth = 10 * done // self.total if self.total else 0
        if tenth > self._last_tenth or now - self._last_draw >= self.log_every or done == self.total:
            if done == self._last_line_done:
                return
            self._last_tenth = tenth
            self._extra = _text(extra)
            self._line(now)

    def close(self, extra: Extra | None = None) -> None:
        """End the display (a last line in ``"lines"`` mode when the last count was not shown yet)."""
        if self._bar is not None:
            if extra is not None:
                self._bar.set_postfix_str(_text(extra), refresh=False)
            self._bar.close()
            self._bar = None
            return
        if self._done != self._last_line_done and self.mode == "lines":
            if extra is not None:
                self._extra = _text(extra)
            self._line(time.perf_counter())

    def _line(self, now: float) -> None:
        self._last_draw, self._last_line_done = now, self._done
        fmt = _LINE if self.total else _LINE_OPEN
        line = tqdm.format_meter(self._done, self.total or None, now - self._start, prefix=self.label or "progress",
                                 postfix=self._extra or None, bar_format=fmt)
        self.stream.write(line + "\n")
        self.stream.flush()


def _text(extra: Extra) -> str:
    return extra() if callable(extra) else extra


def _make_bar(mode: str, total: int | None, label: str, stream: TextIO, min_interval: float) -> Any:
    options = {"total": total, "desc": label or None, "mininterval": min_interval, "leave": True}
    if mode == "notebook":
        try:
            from tqdm.notebook import tqdm as notebook_bar

            return notebook_bar(**options)
        except ImportError:  # no ipywidgets: the text bar, which a notebook redraws in place too
            return tqdm(file=stream, dynamic_ncols=True, **options)
    return tqdm(file=stream, dynamic_ncols=True, **options)


def _in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython's kernel app is configured)."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    if get is None:
        return False
    try:
        shell = get()
    except Exception:  # an IPython in a broken state is not a notebook we can draw in
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})
