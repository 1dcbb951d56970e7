"""Reusable `HybridTrainer.fit` callbacks: early stopping, learning-rate decay, validation and step logs.

A callback is called after every step as ``callback(trainer, result)``; returning True stops
`fit`; an ``on_fit_start(trainer)`` method, if it has one, is called once before `fit` resumes
or steps, and an ``on_fit_end(trainer)`` method once when `fit` ends (after its last read).
`EarlyStopping`, `ExponentialLR` and `ValidationLogger` act every ``every`` steps, counted by the
global step index (``result.step + 1``), so a resumed run keeps the same schedule.
`EarlyStopping` and `ValidationLogger` have state (``state_dict``/``load_state_dict``), saved in the
trainer's checkpoints and restored on resume (see `hybrid_core._callbackstate`); `ExponentialLR` has
none of its own (the rate it sets lives in the optimizer's state). `CSVLogger`, `JSONLLogger` and
`TensorBoardLogger` write every step's record as it is read (see `hybrid_core._loggers`); their
state is their file and the trainer's records, which a checkpoint holds. Gradient clipping is not
a callback (it must run before the update): see `hybrid_core.optim.ClipGradNorm`.
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
from ._statecheck import arrays_like, fields, integer, optional, real, sequence

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

    Its state (`best`, `best_step`, the evaluation counts, `stopped_step` and the best parameters) is
    saved in the trainer's checkpoints and restored on resume, so a resumed run stops where the
    uninterrupted one stops; its settings (``every``, ``patience``, ...) are the ones it was built with.
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

    def on_fit_start(self, trainer: HybridTrainer) -> None:
        """Know the model before a resume hands over a state (its best parameters are checked against it)."""
        self._model = trainer.model

    def __call__(self, trainer: HybridTrainer, result: StepResult) -> bool | None:
        """Evaluate on schedule; True (after restoring the best weights) once patience runs out."""
        self._model = trainer.model
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
            return None
        self.bad_evaluations += 1
        if self.bad_evaluations < self.patience:
            return None
        self.stopped_step = done
        if self.restore_best:
            self.restore()
        return True

    def restore(self) -> bool:
        """Put the best parameters seen back into the model; False if there is nothing to restore (or no model known
        yet: it is learned at `fit`'s start and at every call)."""
        if self._best_params is None or self._model is None:
            return False
        model = self._model
        # θ + (−θ) is exactly 0 and 0 + θ_best is exactly θ_best: an exact set through the
        # Model protocol, where θ + (θ_best − θ) could be off by a rounding.
        model.apply_update([p * 1 for p in model.parameters()], -1.0)
        model.apply_update(self._best_params, 1.0)
        return True

    def state_dict(self) -> dict[str, Any]:
        """What it has seen: best value and step, evaluation counts, the step it stopped at, the best parameters."""
        return {"best": self.best, "best_step": self.best_step, "evaluations": self.evaluations,
                "bad_evaluations": self.bad_evaluations, "stopped_step": self.stopped_step,
                "best_params": None if self._best_params is None else list(self._best_params)}

    def check_state_dict(self, state: dict[str, Any]) -> tuple[Any, ...]:
        """The values `load_state_dict` would set; `ValueError` naming the field (best parameters: finite arrays
        lining up with the model's, once the callback knows the model), nothing changed."""
        fields(state, ("best", "best_step", "evaluations", "bad_evaluations", "stopped_step", "best_params"),
               what="EarlyStopping state")
        params = state["best_params"]
        if params is not None:
            if self._model is not None:
                params = arrays_like(params, "best_params", self._model.parameters())
            else:
                params = sequence(params, "best_params")
        return (optional(real, state["best"], "best", finite=False), optional(integer, state["best_step"], "best_step"),
                integer(state["evaluations"], "evaluations"), integer(state["bad_evaluations"], "bad_evaluations"),
                optional(integer, state["stopped_step"], "stopped_step"), params)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state (`check_state_dict` first: a refused state changes nothing)."""
        (self.best, self.best_step, self.evaluations, self.bad_evaluations, self.stopped_step,
         self._best_params) = self.check_state_dict(state)

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

    Its rows are saved in the trainer's checkpoints. On resume it takes them back (``seconds`` goes
    on from the last row's) and rewrites ``path`` with them at its first call, so rows a killed run wrote after its
    last checkpoint are dropped and every step's row is in the file once. An evaluation also drops
    kept rows of its step and later ones (left by a trainer restored to an earlier step).
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
        self._unwritten = False
        """Rows were restored: rewrite ``path`` at the next call."""

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
            if self._unwritten:
                self._write()
            return
        with _evaluated(trainer, self.readout) as weights:
            metrics = self._evaluate()
        values = {k: _plain(v) for k, v in metrics.items()} if isinstance(metrics, Mapping) else {
            "value": float(metrics)}
        row = {"step": done, "lr": float(trainer.optimizer.lr), "weights": weights,
               "seconds": round(time.perf_counter() - self._start, 6), **values}
        self._rows = [r for r in self._rows if r["step"] < done]
        self._rows.append(row)
        self._write()

    def on_fit_end(self, trainer: HybridTrainer) -> None:
        """Write restored rows not written yet (a `fit` that ended before this logger's first call)."""
        if self._unwritten:
            self._write()

    def _write(self) -> None:
        if self.path is not None:
            write_jsonl(self.path, self._rows)
        self._unwritten = False

    def state_dict(self) -> dict[str, Any]:
        """Its rows."""
        return {"rows": self.records}

    def check_state_dict(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows `load_state_dict` would take; `ValueError` naming the field, nothing changed.

        Each row is a dict with an integer ``step`` >= 1 (in increasing order) whose values are numbers,
        text or None."""
        fields(state, ("rows",), what="ValidationLogger state")
        rows = []
        for i, row in enumerate(sequence(state["rows"], "rows")):
            if not isinstance(row, Mapping) or not all(isinstance(k, str) for k in row):
                raise ValueError(f"rows[{i}] is not a dict of named values")
            step = integer(row.get("step"), f"rows[{i}].step", 1)
            if rows and step <= rows[-1]["step"]:
                raise ValueError(f"rows[{i}].step={step} does not follow step {rows[-1]['step']}")
            bad = [k for k, v in row.items() if v is not None and (isinstance(v, bool)
                                                                    or not isinstance(v, (int, float, str)))]
            if bad:
                raise ValueError(f"rows[{i}] holds {bad[0]!r}, neither a number, text nor None")
            rows.append(dict(row))
        return rows

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take saved rows back (`check_state_dict` first); ``path`` is rewritten with them at the next call, and
        ``seconds`` goes on from the last row's."""
        rows = self.check_state_dict(state)
        last = rows[-1].get("seconds") if rows else None
        elapsed = float(last) if isinstance(last, (int, float)) and math.isfinite(last) and last >= 0 else 0.0
        self._rows, self._start, self._unwritten = rows, time.perf_counter() - elapsed, True

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
