"""Reusable `HybridTrainer.fit` callbacks: early stopping, learning-rate decay, validation and step logs.

A callback is called after every step as ``callback(trainer, result)``; returning True stops
`fit`; an ``on_fit_end(trainer)`` method, if it has one, is called once when `fit` ends (after
its last read). `EarlyStopping`, `ExponentialLR` and `ValidationLogger` act every ``every``
steps, counted by the global step index (``result.step + 1``), so a resumed run keeps the same
schedule. `CSVLogger`, `JSONLLogger` and `TensorBoardLogger` write every step's record as it is
read (see `hybrid_core._loggers`). Gradient clipping is not a callback (it must run before the
update): see `hybrid_core.optim.ClipGradNorm`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, final

from ._errors import ConfigError
from ._loggers import CSVLogger, JSONLLogger, TensorBoardLogger
from ._metrics import write_jsonl
from ._protocols import Array

if TYPE_CHECKING:
    from ._trainer import HybridTrainer, StepResult

__all__ = ["CSVLogger", "EarlyStopping", "ExponentialLR", "JSONLLogger", "TensorBoardLogger", "ValidationLogger"]

_MODES = ("min", "max")


@final
class EarlyStopping:
    """Stops `fit` after ``patience`` evaluations without improvement, keeping the best weights.

    Every ``every`` steps ``evaluate()`` gives a validation metric (lower is better with
    ``mode="min"``, higher with ``"max"``); it improves when it beats the best so far by more
    than ``min_delta``. The best parameters are copied when they are seen; with
    ``restore_best`` they are put back exactly when the patience runs out (call `restore`
    yourself if `fit` ended for another reason). A NaN metric never counts as an improvement.

    With ``readout`` (the default) ``evaluate()`` runs inside ``trainer.evaluation_parameters()``:
    on the averaged read-out the trainer chose (the raw weights until one did better), and the
    best parameters kept are those evaluated weights.
    """

    def __init__(
        self,
        evaluate: Callable[[], float],
        every: int,
        patience: int,
        min_delta: float = 0.0,
        restore_best: bool = True,
        mode: str = "min",
        readout: bool = True,
    ) -> None:
        problems = [_count_problem("every", every), _count_problem("patience", patience)]
        if not isinstance(readout, bool):
            problems.append(f"readout={readout!r}: must be True or False")
        if not _is_number(min_delta) or min_delta < 0:
            problems.append(f"min_delta={min_delta!r}: must be a finite number >= 0")
        if not isinstance(restore_best, bool):
            problems.append(f"restore_best={restore_best!r}: must be True or False")
        if mode not in _MODES:
            problems.append(f"mode={mode!r}: must be 'min' or 'max'")
        if not callable(evaluate):
            problems.append(f"evaluate={evaluate!r}: must be a function returning a number")
        problems = [p for p in problems if p]
        if problems:
            raise ConfigError(problems)
        self._evaluate = evaluate
        self.every = every
        self.patience = patience
        self.min_delta = float(min_delta)
        self.restore_best = restore_best
        self.readout = readout
        self.mode = mode
        self.best: float | None = None
        """The best metric seen so far (None before the first evaluation)."""
        self.best_step: int | None = None
        """The global step count at which `best` was measured."""
        self.evaluations = 0
        """How many times the metric was evaluated."""
        self.bad_evaluations = 0
        """Evaluations since the last improvement."""
        self.stopped_step: int | None = None
        """The step count at which this callback stopped `fit` (None if it did not)."""
        self._best_params: list[Array] | None = None
        self._model: Any = None

    def __call__(self, trainer: HybridTrainer, result: StepResult) -> bool | None:
        """Evaluate on schedule; True (after restoring the best weights) once patience runs out."""
        done = result.step + 1
        if done % self.every:
            return None
        with _evaluated(trainer, self.readout):
            value = float(self._evaluate())
            improved = self._improves(value)
            if improved:
                # `* 1` makes a new array: a model that updates in place must not overwrite the copy.
                self._best_params = [p * 1 for p in trainer.model.parameters()]
        self.evaluations += 1
        if improved:
            self.best, self.best_step, self.bad_evaluations = value, done, 0
            self._model = trainer.model
            return None
        self.bad_evaluations += 1
        if self.bad_evaluations < self.patience:
            return None
        self.stopped_step = done
        if self.restore_best:
            self.restore()
        return True

    def restore(self) -> bool:
        """Put the best parameters seen back into the model; False if there is nothing to restore."""
        if self._best_params is None:
            return False
        model = self._model
        # θ + (−θ) is exactly 0 and 0 + θ_best is exactly θ_best: an exact set through the
        # Model protocol, where θ + (θ_best − θ) could be off by a rounding.
        model.apply_update([p * 1 for p in model.parameters()], -1.0)
        model.apply_update(self._best_params, 1.0)
        return True

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def __repr__(self) -> str:
        return (f"EarlyStopping(every={self.every}, patience={self.patience}, min_delta={self.min_delta}, "
                f"mode={self.mode!r}, best={self.best}, best_step={self.best_step})")


@final
class ExponentialLR:
    """Every ``every`` steps multiplies the optimizer's learning rate by ``gamma`` (never below ``min_lr``)."""

    def __init__(self, gamma: float, every: int, min_lr: float = 0.0) -> None:
        problems = [_count_problem("every", every)]
        if not _is_number(gamma) or not 0 < gamma <= 1:
            problems.append(f"gamma={gamma!r}: must be a number in (0, 1]")
        if not _is_number(min_lr) or min_lr < 0:
            problems.append(f"min_lr={min_lr!r}: must be a finite number >= 0")
        problems = [p for p in problems if p]
        if problems:
            raise ConfigError(problems)
        self.gamma = float(gamma)
        self.every = every
        self.min_lr = float(min_lr)

    def __call__(self, trainer: HybridTrainer, result: StepResult) -> None:
        """Decay ``trainer.optimizer.lr`` when ``result.step + 1`` is a multiple of ``every``."""
        if (result.step + 1) % self.every == 0:
            lr = float(trainer.optimizer.lr)
            trainer.optimizer.lr = max(lr * self.gamma, min(self.min_lr, lr))

    def __repr__(self) -> str:
        return f"ExponentialLR(gamma={self.gamma}, every={self.every}, min_lr={self.min_lr})"


@final
class ValidationLogger:
    """Every ``every`` steps records ``evaluate()`` with the step, learning rate and elapsed seconds.

    ``evaluate`` returns a number (stored as ``value``) or a mapping of names to numbers (ints
    stay ints, anything else goes through ``float``). The rows are kept in `records` and, with
    ``path``, the whole list is rewritten there as JSON Lines after each evaluation (through a
    temporary file renamed into place, so a reader never sees half a file). Never stops `fit`.
    With ``readout`` (the default) ``evaluate()`` runs inside ``trainer.evaluation_parameters()``
    and each row names the evaluated ``weights`` (``raw``, ``lawa`` or ``ema``).
    """

    def __init__(self, evaluate: Callable[[], float | Mapping[str, float]], every: int,
                 path: str | os.PathLike[str] | None = None, readout: bool = True) -> None:
        problems = [_count_problem("every", every)]
        if not isinstance(readout, bool):
            problems.append(f"readout={readout!r}: must be True or False")
        if not callable(evaluate):
            problems.append(f"evaluate={evaluate!r}: must be a function returning a number or a mapping")
        problems = [p for p in problems if p]
        if problems:
            raise ConfigError(problems)
        self._evaluate = evaluate
        self.every = every
        self.path = path
        self.readout = readout
        self._rows: list[dict[str, Any]] = []
        self._start = time.perf_counter()

    @property
    def records(self) -> list[dict[str, Any]]:
        """One dict per evaluation: ``step``, ``lr``, ``seconds`` since the logger was made, and the metrics."""
        return [dict(r) for r in self._rows]

    @property
    def last(self) -> dict[str, Any] | None:
        """The newest row (a copy), None before the first evaluation; the progress line shows its metric."""
        return dict(self._rows[-1]) if self._rows else None

    def __call__(self, trainer: HybridTrainer, result: StepResult) -> None:
        """Evaluate and record on schedule."""
        done = result.step + 1
        if done % self.every:
            return
        with _evaluated(trainer, self.readout) as weights:
            metrics = self._evaluate()
        values = {k: _plain(v) for k, v in metrics.items()} if isinstance(metrics, Mapping) else {
            "value": float(metrics)}
        row = {"step": done, "lr": float(trainer.optimizer.lr), "weights": weights,
               "seconds": round(time.perf_counter() - self._start, 6), **values}
        self._rows.append(row)
        if self.path is not None:
            write_jsonl(self.path, self._rows)

    def __repr__(self) -> str:
        return f"ValidationLogger(every={self.every}, path={self.path!r}, records={len(self._rows)})"


def _evaluated(trainer: Any, readout: bool) -> AbstractContextManager[str]:
    """``trainer.evaluation_parameters()`` when asked for and available, else the raw weights."""
    if readout and hasattr(trainer, "evaluation_parameters"):
        return trainer.evaluation_parameters()
    return nullcontext("raw")


def _plain(value: Any) -> int | float:
    """An int stays an int (epoch and step counts); anything else becomes a float (0-d arrays too)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count_problem(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"{name}={value!r}: must be an integer >= 1"
    return None
