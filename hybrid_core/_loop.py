"""The `fit` loop and its automatic checkpoints, on the trainer's public methods alone.

A run's length is a total: ``max_steps`` steps and/or ``epochs`` passes over a re-iterable source, so a
resumed run ends where the uninterrupted one ends (``steps``, a count from the call, stays for
compatibility). Data positions are `_position.DataPosition`'s, callbacks' states `_callbackstate`'s,
and the schedule's room `_schedule`'s.
"""

from __future__ import annotations

import numbers
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

from ._callbackstate import CallbackStates
from ._errors import CheckpointError, ConfigError
from ._metrics import MetricsCollector
from ._persist import CheckpointPolicy
from ._position import DataFeed, DataPosition, source_kind
from ._progress import Progress
from ._result import StepResult
from ._rundir import checkpoint_path, make_directory, prune_run, scan_directory
from ._schedule import check_room

__all__ = ["Callback", "Trainer", "fit", "resume", "start_run"]


class Trainer(Protocol):
    """What the loop uses of `Trainer` (its public methods; the trainer imports this module)."""

    metrics: MetricsCollector
    optimizer: Any
    data_position: DataPosition
    callback_states: CallbackStates

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
        progress: bool | None, callbacks: Sequence[Callback], checkpoint: CheckpointPolicy | None,
        max_steps: int | None = None, epochs: int | None = None) -> dict[str, Any]:
    """`HybridTrainer.fit` (see there)."""
    steps, max_steps, epochs = _lengths(steps, max_steps, epochs)
    kind = source_kind(batches)
    if kind == "function":
        if epochs is not None:
            raise ConfigError(f"epochs={epochs}: epochs count passes over an iterable, but batches is a function of "
                              "the step index", "Give the run's length as max_steps.")
        if steps is None and max_steps is None:
            raise ConfigError("max_steps (or steps) is required when batches is a function of the step index")
    if checkpoint is not None and not isinstance(checkpoint, CheckpointPolicy):
        raise ConfigError(f"checkpoint must be a CheckpointPolicy or None, got {type(checkpoint).__name__}")
    callbacks = list(callbacks)
    if max_steps is not None:  # before anything changes (a resume keeps the schedule's count in step)
        check_room(trainer.optimizer, max(0, max_steps - trainer.steps_done), f"max_steps={max_steps}")
    for cb in callbacks:
        start = getattr(cb, "on_fit_start", None)
        if callable(start):
            start(trainer)
    trainer.callback_states.attach(callbacks)
    if checkpoint is not None:
        start_run(trainer, checkpoint)
    total = max_steps if max_steps is not None else None if steps is None else trainer.steps_done + steps
    feed = DataFeed(trainer.data_position, batches, epochs, total is not None, lambda: _kept_random_state(trainer))
    planned = _planned(trainer, feed, total)
    check_room(trainer.optimizer, planned, _length_text(steps, max_steps, epochs))
    show = Progress(planned, "train") if progress is not False else None
    shown = _Shown(trainer, callbacks, feed)
    done = 0
    try:
        while (total is None or trainer.steps_done < total) and not feed.finished:
            batch = feed.next(trainer.steps_done)
            if batch is DataFeed.END:
                break
            before = trainer.steps_done
            try:
                result = trainer.step(batch)
            finally:
                feed.moved(trainer.steps_done - before)
            done += 1
            # Every callback sees the step (one that stops fit does not hide it from the next), and they act
            # before it is checkpointed, so a resume from here keeps what they did.
            stop = any([cb(trainer, result) for cb in callbacks])
            if show is not None:
                show.update(done, shown.text)
            if checkpoint is not None and trainer.steps_done % checkpoint.every == 0:
                _auto_save(trainer, checkpoint)
            if stop:
                break
        trainer.flush()
    finally:
        if show is not None:
            show.close(shown.text)
        for cb in callbacks:
            end = getattr(cb, "on_fit_end", None)
            if callable(end):
                end(trainer)
    if feed.ran_out:
        _say_ran_out(trainer, feed, _length_text(steps, max_steps, epochs))
    position = trainer.data_position
    return {**trainer.summary(), "epochs": position.epoch, "epoch_batches": position.batch}


def _lengths(steps: Any, max_steps: Any, epochs: Any) -> tuple[int | None, int | None, int | None]:
    """The three lengths as ints (NumPy integers accepted); `ConfigError` for anything but integers >= 0 or None,
    and for ``steps`` with ``max_steps``."""
    problems = [f"{name}={value!r}: must be an integer >= 0 or None" for name, value in
                (("steps", steps), ("max_steps", max_steps), ("epochs", epochs))
                if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                          or value < 0)]
    if problems:
        raise ConfigError(problems)
    if steps is not None and max_steps is not None:
        raise ConfigError(f"steps={steps} and max_steps={max_steps} given together: steps counts from this call, "
                          "max_steps is the run's total", "Give one: max_steps (the run's total, which a resumed "
                          "run ends at too) or steps (a count from the trainer's current step).")
    return tuple(None if v is None else int(v) for v in (steps, max_steps, epochs))  # type: ignore[return-value]


def _length_text(steps: int | None, max_steps: int | None, epochs: int | None) -> str:
    """How the run's length was asked for, for messages."""
    said = [f"max_steps={max_steps}"] if max_steps is not None else [f"steps={steps}"] if steps is not None else []
    return " and ".join(said + ([f"epochs={epochs}"] if epochs is not None else [])) or "one pass over the batches"


def _planned(trainer: Trainer, feed: DataFeed, total: int | None) -> int | None:
    """The steps this call will take at most, when known: to the step total, to the epoch total, or to the end of
    the pass (no total given) for a re-iterable with a length."""
    bounds = [] if total is None else [max(0, total - trainer.steps_done)]
    if feed.kind == "reiterable" and feed.length is not None:
        pos = feed.position
        batch = pos.batch if pos.restored or pos.source is feed.batches else 0
        if feed.epochs is not None:
            bounds.append(max(0, (feed.epochs - pos.epoch) * feed.length - batch))
        elif total is None:
            bounds.append(max(0, feed.length - batch))
    return min(bounds) if bounds else None


def _say_ran_out(trainer: Trainer, feed: DataFeed, asked: str) -> None:
    """One line on stderr (and an event) when the batches ended before the run's length."""
    trainer.metrics.count("batches_ran_out")
    where = f"at step {trainer.steps_done} (epoch {feed.position.epoch})"
    if feed.empty:
        print(f"hybrid_core: the batches gave no batch in a whole pass {where}, before {asked}: stopping",
              file=sys.stderr)
    else:
        print(f"hybrid_core: the batches ran out {where}, before {asked}: a one-shot iterator makes one pass; pass a "
              "re-iterable (a list, a DataLoader) or a function of the step index to train on", file=sys.stderr)


@contextmanager
def _kept_random_state(trainer: Trainer) -> Iterator[None]:
    """The process's random generators as they were before the body (batches drawn again to be dropped)."""
    rng = getattr(trainer, "rng", None)
    if rng is None:
        with nullcontext():
            yield
        return
    saved = rng.state_dict()
    try:
        yield
    finally:
        rng.load_state_dict(saved)


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
        print(f"hybrid_core: resumed from step {trainer.steps_done} (file {os.fspath(f.path)})", file=sys.stderr)
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
    if getattr(getattr(trainer, "collective", None), "rank", 0) == 0:  # the rank that writes also prunes
        prune_run(policy.directory, trainer.run_id, step, policy.keep)
    trainer.metrics.count("checkpoints_saved")


class _Shown:
    """The progress text: epoch, phase, the newest loss and learning rate read, backward passes skipped, validation."""

    def __init__(self, trainer: Trainer, callbacks: Sequence[Callback], feed: DataFeed) -> None:
        self._trainer = trainer
        self._feed = feed
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
        parts = [f"epoch={_epoch_text(self._feed)}"] if self._feed.kind == "reiterable" else []
        parts += [f"phase={self._trainer.phase.value}",
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


def _epoch_text(feed: DataFeed) -> str:
    """Passes completed, with the fraction of the current one when the source has a length (``2.45``, ``2.45/10``)."""
    pos = feed.position
    done = f"{pos.epoch + pos.batch / feed.length:.2f}" if feed.length else str(pos.epoch)
    return done if feed.epochs is None else f"{done}/{feed.epochs}"
