"""The `fit` loop and its automatic checkpoints, on the trainer's public methods alone."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from ._errors import CheckpointError, ConfigError
from ._metrics import MetricsCollector
from ._persist import CheckpointPolicy
from ._progress import Progress
from ._result import StepResult
from ._rundir import checkpoint_path, make_directory, prune_run, scan_directory

__all__ = ["Callback", "Trainer", "fit", "resume", "start_run"]


class Trainer(Protocol):
    """What the loop uses of `Trainer` (its public methods; the trainer imports this module)."""

    metrics: MetricsCollector

    def summary(self) -> dict[str, Any]: ...

    @property
    def phase(self) -> Any: ...

    @property
    def steps_done(self) -> int: ...

    @property
    def run_id(self) -> str: ...

    @run_id.setter
    def run_id(self, value: str) -> None: ...

    def step(self, batch: Any) -> StepResult: ...

    def flush(self) -> None: ...

    def save(self, path: str | os.PathLike[str]) -> None: ...

    def restore(self, path: str | os.PathLike[str], max_bytes: int = ..., run_id: str | None = None) -> None: ...


Callback = Callable[[Any, StepResult], "bool | None"]
"""Called after every `fit` step as ``callback(trainer, result)``; returning True stops the loop."""


def fit(trainer: Trainer, batches: Iterable[Any] | Callable[[int], Any], steps: int | None,
        progress: bool | None, callbacks: Sequence[Callback], checkpoint: CheckpointPolicy | None) -> dict[str, Any]:
    """`HybridTrainer.fit` (see there)."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ConfigError(f"steps={steps!r}: must be an integer >= 0 or None")
    if checkpoint is not None:
        if not isinstance(checkpoint, CheckpointPolicy):
            raise ConfigError(f"checkpoint must be a CheckpointPolicy or None, got {type(checkpoint).__name__}")
        start_run(trainer, checkpoint)
    if callable(batches) and not isinstance(batches, Iterable):
        if steps is None:
            raise ConfigError("steps is required when batches is a function of the step index")
        first = trainer.steps_done
        source: Iterator[Any] = (batches(first + i) for i in range(steps))
    else:
        source = iter(batches)
    show = Progress(steps, "train") if progress is not False else None
    shown = _Shown(trainer, callbacks)
    done = 0
    try:
        while steps is None or done < steps:
            try:
                batch = next(source)
            except StopIteration:
                break
            result = trainer.step(batch)
            done += 1
            if show is not None:
                show.update(done, shown.text)
            if checkpoint is not None and trainer.steps_done % checkpoint.every == 0:
                _auto_save(trainer, checkpoint)
            if any(cb(trainer, result) for cb in callbacks):
                break
        trainer.flush()
    finally:
        if show is not None:
            show.close(shown.text)
        for cb in callbacks:
            end = getattr(cb, "on_fit_end", None)
            if callable(end):
                end(trainer)
    return trainer.summary()


def start_run(trainer: Trainer, policy: CheckpointPolicy) -> None:
    """Before `fit` steps: resume the policy's run from its directory (or refuse to overwrite it), take its id."""
    run = policy.run_id or trainer.run_id
    if policy.resume:
        resume(trainer, policy.directory, run)
    else:
        ahead = [f for f in scan_directory(policy.directory) if f.run_id == run and f.step > trainer.steps_done]
        if ahead:
            raise ConfigError(f"resume=False, but run {run} already has checkpoints in {policy.directory} up to "
                              f"step {ahead[0].step} (the trainer is at step {trainer.steps_done})",
                              "Pass resume=True to continue that run, another run_id to start a new one, "
                              "or remove its files.")
    trainer.run_id = run


def resume(trainer: Trainer, directory: str | os.PathLike[str], run_id: str | None = None) -> bool:
    """Restore ``trainer`` from the newest good checkpoint of run ``run_id`` in ``directory`` ahead of it.

    ``run_id`` defaults to the trainer's. Files that do not load are skipped (said on stderr),
    so are files of other runs and files without a run id (a warning lists those runs when the
    directory holds no file of this run); a `ConfigError` (the file's settings differ) propagates.
    Returns whether a checkpoint was restored.
    """
    run = trainer.run_id if run_id is None else run_id
    found = scan_directory(directory)
    for f in found:
        if f.run_id != run or f.step <= trainer.steps_done:
            continue
        try:
            trainer.restore(f.path, run_id=run)
        except CheckpointError as err:
            print(f"hybrid_core: skipping checkpoint {f.path}: {err.message}", file=sys.stderr)
            continue
        trainer.metrics.count("resumed")
        return True
    others = sorted({f.run_id or "(no run id)" for f in found if f.run_id != run})
    if others and not any(f.run_id == run for f in found):
        warnings.warn(f"hybrid_core: {os.fspath(directory)} holds checkpoints of other runs ({', '.join(others)}); "
                      f"run {run} does not resume them. Pass CheckpointPolicy(run_id=...) to continue one of "
                      "those runs, or HybridTrainer.load(path, ...) for a file without a run id.", stacklevel=4)
    return False


def _auto_save(trainer: Trainer, policy: CheckpointPolicy) -> None:
    make_directory(policy.directory)
    step = trainer.steps_done
    trainer.save(checkpoint_path(policy.directory, step, trainer.run_id))
    prune_run(policy.directory, trainer.run_id, step, policy.keep)
    trainer.metrics.count("checkpoints_saved")


class _Shown:
    """The progress text: phase, the newest loss and learning rate read, backward passes skipped, validation."""

    def __init__(self, trainer: Trainer, callbacks: Sequence[Callback]) -> None:
        self._trainer = trainer
        # A validation logger among the callbacks (duck-typed: its newest row as `last`).
        self._validation = next((cb for cb in callbacks if hasattr(cb, "last") and hasattr(cb, "records")), None)
        self._loss: float | None = None
        self._lr: float | None = None

    def text(self) -> str:
        """Called only when a line is drawn: reads nothing from the device."""
        metrics = self._trainer.metrics
        rec = metrics.last
        if rec is not None:
            self._loss = rec.loss if rec.loss is not None else self._loss
            self._lr = rec.lr if rec.lr is not None else self._lr
        parts = [f"phase={self._trainer.phase.value}",
                 "loss=" + ("-" if self._loss is None else f"{self._loss:.4g}"),
                 "lr=" + ("-" if self._lr is None else f"{self._lr:.3g}"),
                 f"backward_skipped={metrics.backward_passes_skipped}"]
        row = self._validation.last if self._validation is not None else None
        metric = _validation_metric(row) if row else None
        if metric is not None:
            parts.append(("val" if metric[0] == "value" else f"val_{metric[0]}") + f"={metric[1]:.4g}")
        return ", ".join(parts)


def _validation_metric(row: dict[str, Any]) -> tuple[str, float] | None:
    """The metric a validation row is shown by: ``value``, ``loss``, else its first number (None: no number)."""
    numbers = {k: v for k, v in row.items() if k not in ("step", "lr", "seconds", "weights")
               and isinstance(v, (int, float)) and not isinstance(v, bool)}
    name = next((k for k in ("value", "loss") if k in numbers), next(iter(numbers), None))
    return None if name is None else (name, float(numbers[name]))
