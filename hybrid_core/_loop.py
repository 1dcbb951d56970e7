"""The `fit` loop and its automatic checkpoints, on the trainer's public methods alone."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from ._errors import CheckpointError, ConfigError
from ._metrics import MetricsCollector
from ._persist import CheckpointPolicy, checkpoint_path, newest_checkpoint
from ._progress import Progress
from ._result import StepResult

__all__ = ["Callback", "Trainer", "fit", "resume"]


class Trainer(Protocol):
    """What the loop uses of `Trainer` (its public methods; the trainer imports this module)."""

    metrics: MetricsCollector

    def summary(self) -> dict[str, Any]: ...

    @property
    def phase(self) -> Any: ...

    @property
    def steps_done(self) -> int: ...

    def step(self, batch: Any) -> StepResult: ...

    def flush(self) -> None: ...

    def save(self, path: str | os.PathLike[str]) -> None: ...

    def restore(self, path: str | os.PathLike[str]) -> list[str]: ...


Callback = Callable[[Any, StepResult], "bool | None"]
"""Called after every `fit` step as ``callback(trainer, result)``; returning True stops the loop."""


def fit(trainer: Trainer, batches: Iterable[Any] | Callable[[int], Any], steps: int | None,
        progress: bool | None, callbacks: Sequence[Callback], checkpoint: CheckpointPolicy | None) -> dict[str, Any]:
    """`HybridTrainer.fit` (see there)."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ConfigError(f"steps={steps!r}: must be an integer >= 0 or None")
    if checkpoint is not None and checkpoint.resume:
        resume(trainer, checkpoint.directory)
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


def resume(trainer: Trainer, directory: str | os.PathLike[str]) -> None:
    """Restore ``trainer`` from the newest checkpoint in ``directory`` that loads (others are skipped, said so)."""
    for path in newest_checkpoint(directory):
        try:
            changed = trainer.restore(path)
        except CheckpointError as err:
            print(f"hybrid_core: skipping unreadable checkpoint {path}: {err.message}", file=sys.stderr)
            continue
        if changed:
            print(f"hybrid_core: resumed from {path} with this run's config, which differs from the saved "
                  f"one in {', '.join(changed)}", file=sys.stderr)
        trainer.metrics.count("resumed")
        return


def _auto_save(trainer: Trainer, policy: CheckpointPolicy) -> None:
    os.makedirs(policy.directory, exist_ok=True)
    trainer.save(checkpoint_path(policy.directory, trainer.steps_done))
    for old in newest_checkpoint(policy.directory)[policy.keep:]:
        old.unlink(missing_ok=True)
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
