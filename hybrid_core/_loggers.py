"""Loggers of the trainer's step records: CSV, JSON Lines and TensorBoard event files (`fit` callbacks).

A logger writes `MetricsCollector` records (`StepRecord`: step, phase, loss, predicted loss,
backward, wall seconds, confidence, skipped, learning rate, gradient norm) as the trainer reads
them: a real step's loss is known only once it is read (every ``read_every`` steps), so each
call writes the records read since the last one, and ``on_fit_end`` (called by `fit` after its
last read) writes the rest. Nothing is read from the device for a logger.

A logger starts at the first step it is called after (or again at an earlier step, when the
trainer was restored to one). At step 0 the file starts afresh. At a later step (a resumed or
continued run) an existing CSV or JSON Lines file keeps its rows of earlier steps and loses those
of this step and later (rows a killed run wrote past its last checkpoint); rows missing between
the file's last row and this step come from the trainer's kept records (a checkpoint holds
them), so every step appears once, in order. A row torn by a kill and rows without a step are
dropped. A TensorBoard logger marks its first step with a purge event, which makes TensorBoard
hide the earlier event files' points from there on; points the killed process had not flushed
(at most ``flush_secs`` of them) are missing.
"""

from __future__ import annotations

import csv
import json
import os
import time
from abc import ABC, abstractmethod
from typing import IO, TYPE_CHECKING, Any

from ._errors import ConfigError
from ._metrics import StepRecord, json_line
from ._phase import Phase

if TYPE_CHECKING:
    from ._result import StepResult

__all__ = ["CSVLogger", "JSONLLogger", "TensorBoardLogger"]

FIELDS: tuple[str, ...] = StepRecord._fields
"""The columns of `CSVLogger` and the keys of `JSONLLogger`, in this order."""

PHASE_CODES = {phase.value: i for i, phase in enumerate(Phase)}
"""The number `TensorBoardLogger` writes as ``train/phase``: warmup 0, full 1, predict 2, correct 3."""

_TENSORBOARD_SCALARS = ("loss", "predicted_loss", "lr", "grad_norm", "confidence")


class _RecordLogger(ABC):
    """Writes the records read since the last call; `on_fit_end` writes the rest and closes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._next: int | None = None
        """The first step not written yet (None before the first call)."""

    def __call__(self, trainer: Any, result: StepResult) -> None:
        """Write the records read so far; never stops `fit`."""
        if self._next is None or result.step < self._next:  # first call, or the trainer went back
            self._close()
            self._next = self._begin(result.step)
        self._write_new(trainer)

    def on_fit_end(self, trainer: Any) -> None:
        """Write the records of the loop's last read and close the file (the next call reopens it)."""
        self._write_new(trainer)
        self._close()

    def _write_new(self, trainer: Any) -> None:
        if self._next is None:
            return
        records = trainer.metrics.since(self._next - 1)
        if records:
            self._write(records)
            self._next = records[-1].step + 1

    @abstractmethod
    def _begin(self, start: int) -> int:
        """Prepare to log from step ``start`` on; the first step to write (earlier ones are logged already)."""

    @abstractmethod
    def _write(self, records: list[StepRecord]) -> None:
        """Append ``records`` to the log."""

    @abstractmethod
    def _close(self) -> None:
        """Close the log (the next write reopens it)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, next_step={self._next})"


class _FileLogger(_RecordLogger):
    """A text file of rows with a ``step``: kept rows of earlier steps on a restart, appended after."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        _check_file_path(self.path)
        self._file: IO[str] | None = None

    def _begin(self, start: int) -> int:
        kept = self._rows_before(start) if start > 0 and os.path.isfile(self.path) else []
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            self._header(f)
            f.writelines(row for _, row in kept)
        os.replace(tmp, self.path)
        # Steps between the file's last row and `start` (a kill can come before they were written) are
        # taken from the trainer's kept records, which a checkpoint restores.
        return kept[-1][0] + 1 if kept else 0

    def _write(self, records: list[StepRecord]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8", newline="")  # kept open across calls
        self._lines(self._file, records)
        self._file.flush()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _rows_before(self, start: int) -> list[tuple[int, str]]:
        """(step, line) of the file's rows in step order up to ``start``; torn and foreign rows are dropped."""
        with open(self.path, encoding="utf-8", newline="") as f:
            lines = f.readlines()
        kept: list[tuple[int, str]] = []
        for line in lines[self._header_lines:]:
            step = self._step_of(line) if line.endswith("\n") else None
            if step is not None and step < start and (not kept or step > kept[-1][0]):
                kept.append((step, line))
        return kept

    _header_lines = 0

    def _header(self, f: IO[str]) -> None:
        """Write the file's header lines (none by default; CSV writes its column names)."""

    @abstractmethod
    def _lines(self, f: IO[str], records: list[StepRecord]) -> None:
        """Write one row per record."""

    @abstractmethod
    def _step_of(self, line: str) -> int | None:
        """The step of a row written by `_lines`, or None for a row that is not one."""


class JSONLLogger(_FileLogger):
    """Writes one JSON object per step (the `StepRecord` fields; NaN as null) to ``path``, as it is read.

    The same rows as `MetricsCollector.to_jsonl` and ``hybrid-train demo --jsonl``, so
    ``hybrid-train plot`` draws either. See the module docstring for resumed runs.
    """

    def _lines(self, f: IO[str], records: list[StepRecord]) -> None:
        f.writelines(json_line(r._asdict()) for r in records)

    def _step_of(self, line: str) -> int | None:
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            return None
        return step if isinstance(step, int) else None


class CSVLogger(_FileLogger):
    """Writes a header (`FIELDS`) and one row per step to ``path``, as it is read.

    Empty cells are values not known (a predicted step's loss without a check, a gradient norm
    of a step that was not measured); booleans are ``True``/``False``. An existing file with
    other columns is refused at construction (`ConfigError`). See the module docstring for
    resumed runs.
    """

    _header_lines = 1

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        if os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != FIELDS:
                raise ConfigError(f"CSVLogger: {self.path} exists with other columns ({', '.join(header)[:80]})",
                                  "Choose another path, or move the file away; this logger's columns are "
                                  + ", ".join(FIELDS) + ".")

    def _header(self, f: IO[str]) -> None:
        csv.writer(f).writerow(FIELDS)

    def _lines(self, f: IO[str], records: list[StepRecord]) -> None:
        csv.writer(f).writerows(["" if v is None else v for v in r] for r in records)

    def _step_of(self, line: str) -> int | None:
        head = line.split(",", 1)[0]
        return int(head) if head.isdigit() else None


class TensorBoardLogger(_RecordLogger):
    """Writes TensorBoard event files into the directory ``logdir`` (through tensorboardX).

    Scalars at the global step *steps done* (a record's step + 1): ``train/loss``,
    ``train/predicted_loss``, ``train/lr``, ``train/grad_norm``, ``train/confidence`` (each only
    where the record has it) and ``train/phase`` (`PHASE_CODES`). With ``validation`` (a
    `ValidationLogger` among the same callbacks) its rows go to ``validation/<metric>`` at their
    ``step``. Needs ``pip install "hybrid-predict-trainer[tensorboard]"`` (tensorboardX); view
    with ``tensorboard --logdir LOGDIR``. See the module docstring for resumed runs.
    """

    def __init__(self, logdir: str | os.PathLike[str], validation: Any = None, flush_secs: float = 30.0) -> None:
        super().__init__(logdir)
        try:
            from tensorboardX import SummaryWriter
        except ImportError as exc:
            raise ConfigError("TensorBoardLogger needs the tensorboardX package, which is not installed",
                              'pip install "hybrid-predict-trainer[tensorboard]" (or pip install tensorboardX).'
                              ) from exc
        problems = []
        if validation is not None and not hasattr(validation, "last"):
            problems.append(f"validation={validation!r}: must be a ValidationLogger (or None)")
        if not isinstance(flush_secs, (int, float)) or isinstance(flush_secs, bool) or not flush_secs > 0:
            problems.append(f"flush_secs={flush_secs!r}: must be a number > 0")
        if problems:
            raise ConfigError(problems)
        _check_dir_path(self.path)
        self._writer_class = SummaryWriter
        self.validation = validation
        self.flush_secs = float(flush_secs)
        self._writer: Any = None
        self._purge: int | None = None
        self._validation_step = -1

    def _begin(self, start: int) -> int:
        self._purge = start + 1 if start > 0 else None
        self._validation_step = start
        return start

    def _write_new(self, trainer: Any) -> None:
        super()._write_new(trainer)
        row = None if self.validation is None else self.validation.last
        if row is not None and isinstance(row.get("step"), int) and row["step"] > self._validation_step:
            writer = self._open()
            for key, value in row.items():
                if key not in ("step", "lr", "seconds") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    writer.add_scalar(f"validation/{key}", float(value), row["step"])
            self._validation_step = row["step"]

    def _write(self, records: list[StepRecord]) -> None:
        writer = self._open()
        for r in records:
            step = r.step + 1
            for name in _TENSORBOARD_SCALARS:
                value = getattr(r, name)
                if value is not None:
                    writer.add_scalar(f"train/{name}", float(value), step)
            writer.add_scalar("train/phase", PHASE_CODES[r.phase], step)

    def _open(self) -> Any:
        if self._writer is None:
            # tensorboardX names a file by the second it was opened and truncates a file of that name: the
            # nanosecond suffix keeps each writer's file apart and sorts them in the order they were written.
            self._writer = self._writer_class(self.path, purge_step=self._purge, flush_secs=self.flush_secs,
                                              filename_suffix=f".{time.time_ns():020d}")
            self._purge = None  # only the first writer after a restart purges
        return self._writer

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _check_file_path(path: str) -> None:
    """`ConfigError` unless ``path`` can be a file written here: its directory exists and ``path`` is no directory."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a directory", "Give a file name for the log.")
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {path}: the directory {folder} does not exist", "Create it first.")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"cannot write {path}: the directory {folder} is not writable", "Choose another path.")


def _check_dir_path(path: str) -> None:
    """`ConfigError` unless ``path`` is a directory or can be made one (its nearest existing ancestor is writable)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{path} is a file, not a directory",
                          "Give TensorBoardLogger a directory for its event files.")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise ConfigError(f"cannot create or write {path}: {probe} is not a writable directory", "Choose another path.")
