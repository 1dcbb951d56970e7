"""`PredictionCycle`: one PREDICT phase and the CORRECT phase after it, start to reward.

The cycle owns everything between entering PREDICT and leaving CORRECT: the direction
and the forecast, the scales applied (so rolling back to any point is one update by
minus the later scales: no copy of the weights), the forward checks, CORRECT's line
search and residual bookkeeping, and the reward the bandit is paid. Its methods return
records (`Check`, `LineSearch`, `Residual inputs`, `CycleEnd`); the trainer counts and
logs them. It also owns the horizon the bandit chose for the next cycle and the shrink
factor the divergence monitor puts on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np

from ._checks import has_method
from ._config import HybridConfig
from ._ledger import copies
from ._protocols import Array, Model, Prediction
from ._statecheck import fields as state_fields
from ._statecheck import flag, integer, matrix, optional, real, reals, sequence

__all__ = ["Check", "CycleEnd", "LineSearch", "PredictionCycle", "corrected", "cycle_reward"]


@dataclass
class CycleRun:
    """The state of the cycle in progress."""

    arm: int | None
    context: np.ndarray
    direction: list[Array]
    prediction: Prediction
    entry_slope: float
    slope_stderr: float
    probe: bool
    applied: list[float] = field(default_factory=list)
    """Scales of the predicted steps still applied along ``direction``."""
    good: int = 0
    """How many of ``applied`` a forward check has vouched for."""
    steps: int = 0
    """Predicted steps taken (rolled-back ones included)."""
    forwards: int = 0
    """Forward-only passes spent on checks and the line search."""
    correct_raw: Prediction | None = None
    correct_prediction: Prediction | None = None
    correct_context: np.ndarray | None = None
    best_fraction: float | None = None
    paired_gain: float | None = None
    """log L(entry point) − log L(all predicted steps applied) on the line-search batch."""


class Check(NamedTuple):
    """A forward-only check during PREDICT."""

    loss: float
    predicted: float
    passed: bool
    undone: float
    """Scale rolled back (0 if the check passed or nothing was unchecked)."""


class LineSearch(NamedTuple):
    """CORRECT's line search: the fraction of the displacement rolled back, and what it cost."""

    best_fraction: float
    forwards: int
    finite: bool


class _SearchStart(NamedTuple):
    """What CORRECT's line search changed, kept until the first CORRECT step is read (see `undo_search`)."""

    params: list[Array] | None
    """Copies of the weights the search started from (None: the model has no ``set_parameters``)."""
    moved: float
    """The scale the search applied along the direction (undone by ``apply_update`` without a copy)."""
    forwards: int


class CycleEnd(NamedTuple):
    """A finished cycle: the arm it was run for and its reward."""

    arm: int | None
    context: np.ndarray
    reward: float


class PredictionCycle:
    """The cycle in progress (if any), the arm chosen for the next one, and the horizon's shrink factor."""

    def __init__(self, config: HybridConfig) -> None:
        self._config = config
        self._run: CycleRun | None = None
        self.chosen: tuple[int, np.ndarray] | None = None
        """(arm, context) the bandit chose for the PREDICT phase about to start."""
        self.horizon_scale = 1.0
        """Shrinks the next horizon after the monitor saw a spike; a cycle that pays resets it."""
        self._search: _SearchStart | None = None

    @property
    def active(self) -> bool:
        """Whether a cycle is between PREDICT's start and CORRECT's end."""
        return self._run is not None

    @property
    def applied(self) -> list[float]:
        """Scales of the predicted steps still applied (a copy)."""
        return list(self._require().applied)

    @property
    def run(self) -> CycleRun | None:
        """The cycle in progress (read it, do not change it), or None."""
        return self._run

    @property
    def prediction(self) -> Prediction:
        """The forecast of the PREDICT phase in progress."""
        return self._require().prediction

    # -- PREDICT -------------------------------------------------------------------------------

    def start(self, direction: list[Array], prediction: Prediction, context: np.ndarray,
              trend: tuple[float, float], probe: bool) -> None:
        """Begin a cycle along ``direction`` with ``prediction`` (already corrected)."""
        arm, chosen_context = self.chosen if (self.chosen is not None and not probe) else (None, None)
        self.chosen = None
        self._run = CycleRun(arm, context if chosen_context is None else chosen_context, direction, prediction,
                             trend[0], trend[1], probe)

    def check_due(self, k: int) -> bool:
        """Whether predicted step ``k`` (0-based) starts with a forward check."""
        run = self._require()
        interval = 1 if run.probe else self._config.check_interval
        return bool(interval) and k > 0 and k % interval == 0

    def check(self, model: Model, k: int, loss: float, diverging: bool) -> Check:
        """Judge the loss measured before step ``k``; outside the band (or ``diverging``) roll back to the
        last vouched-for point."""
        run = self._require()
        run.forwards += 1
        # k steps are applied: the forecast for "after k steps" is entry k − 1.
        predicted = run.prediction.loss[k - 1]
        if diverging or not math.isfinite(loss) or loss > run.prediction.upper[k - 1]:
            return Check(loss, predicted, False, self.roll_back(model, run.good))
        run.good = len(run.applied)
        return Check(loss, predicted, True, 0.0)

    def advance(self, model: Model, k: int) -> None:
        """Apply predicted step ``k``: θ += step_scale[k] · direction."""
        run = self._require()
        scale = run.prediction.step_scale[k]
        model.apply_update(run.direction, scale)
        run.applied.append(scale)
        run.steps += 1

    def count_failed_step(self) -> None:
        """A predicted step whose check failed (it applied nothing but counts as spent)."""
        self._require().steps += 1

    def roll_back(self, model: Model, index: int) -> float:
        """Undo the predicted steps applied after the first ``index``; returns the scale undone."""
        run = self._require()
        undo = math.fsum(run.applied[index:])
        if undo:
            model.apply_update(run.direction, -undo)
        del run.applied[index:]
        run.good = min(run.good, index)
        return undo

    # -- CORRECT -------------------------------------------------------------------------------

    def enter_correct(self, raw: Prediction, factor: float, context: np.ndarray) -> None:
        """CORRECT begins: the forecast its real steps are compared with (``raw`` times ``factor``)."""
        run = self._require()
        run.correct_raw, run.correct_context = raw, context
        run.correct_prediction = corrected(raw, factor)

    @property
    def search_due(self) -> bool:
        """Whether CORRECT's line search is still to run (a cycle is active and has not searched yet)."""
        run = self._run
        return run is not None and run.best_fraction is None and run.paired_gain is None

    def line_search(self, model: Model, batch: Any, forward: Callable[[Any], Array],
                    read: Callable[[list[Array]], list[float]]) -> LineSearch | None:
        """Roll back the fraction of the PREDICT displacement that fits ``batch`` best (forward passes only).

        0 (keep everything) and 1 (back to the entry point) are always measured: their paired
        difference on one batch is what the reward is made of. None when nothing is applied.

        Atomic: if a forward pass or the read raises, the weights are put back where the search
        found them (bit for bit through ``set_parameters``, else by one more ``apply_update``) and
        the cycle is unchanged. A search that completes can still be taken back with `undo_search`
        until the first CORRECT step is read (`keep_search`).
        """
        run = self._require()
        total = math.fsum(run.applied)
        if not run.applied or total == 0.0:
            run.paired_gain = 0.0
            return None
        fractions = sorted({0.0, 1.0, *self._config.correction_fractions})
        start = copies(model.parameters()) if has_method(model, "set_parameters") else None
        losses, at = [], 0.0
        try:
            for f in fractions:
                model.apply_update(run.direction, -(f - at) * total)
                at = f
                losses.append(forward(batch))
            values = read(losses)
        except BaseException:
            _put_back(model, run.direction, start, at * total)
            raise
        finite = [(v, f) for v, f in zip(values, fractions) if math.isfinite(v)]
        best = min(finite)[1] if finite else 1.0
        model.apply_update(run.direction, -(best - at) * total)
        self._search = _SearchStart(start, best * total, run.forwards)
        run.forwards += len(fractions)
        run.best_fraction = best
        entry, predicted_end = values[-1], values[0]
        if math.isfinite(entry) and entry > 0:
            run.paired_gain = (math.log(entry) - math.log(predicted_end)
                               if math.isfinite(predicted_end) and predicted_end > 0 else -math.inf)
        return LineSearch(best, len(fractions), bool(finite))

    def undo_search(self, model: Model) -> bool | None:
        """Take back the line search of a first CORRECT step that failed: the weights where the search found
        them and the cycle as before it (so the next step searches again).

        True when the weights are back bit for bit (a copy through ``set_parameters``), False when one
        more ``apply_update`` undid the move (exact up to rounding), None when there is nothing to undo
        (no search ran, or its step was already read).
        """
        search, self._search = self._search, None
        run = self._run
        if search is None or run is None:
            return None
        _put_back(model, run.direction, search.params, search.moved)
        run.forwards, run.best_fraction, run.paired_gain = search.forwards, None, None
        return search.params is not None

    def keep_search(self) -> None:
        """The first CORRECT step was read (or skipped): its line search stays; drop the copy kept to undo it."""
        self._search = None

    def step_scale_seen(self) -> float | None:
        """The step scale CORRECT's line search found best (what the first CORRECT step teaches the
        dynamics model), or None."""
        run = self._run
        if run is None or run.best_fraction is None or not run.applied:
            return None
        return (1.0 - run.best_fraction) * run.prediction.step_scale[0]

    def expected_in_correct(self, k: int) -> tuple[float, float, np.ndarray] | None:
        """(corrected forecast, raw forecast, context) for CORRECT step ``k``; None outside a cycle."""
        run = self._run
        if run is None or run.correct_prediction is None or run.correct_raw is None:
            return None
        k = min(k, len(run.correct_prediction.loss) - 1)
        context = run.correct_context if run.correct_context is not None else run.context
        return run.correct_prediction.loss[k], run.correct_raw.loss[k], context

    def finish(self) -> CycleEnd | None:
        """End the cycle and price it (None if none was running)."""
        run, self._run = self._run, None
        self._search = None
        if run is None:
            return None
        reward = cycle_reward(run, self._config.forward_cost, self._config.predict_step_cost)
        if reward > 0:
            self.horizon_scale = 1.0
        return CycleEnd(run.arm, run.context, reward)

    def shrink(self, factor: float) -> None:
        """Cap the next horizon's scale at ``factor`` (not cumulative)."""
        self.horizon_scale = min(self.horizon_scale, factor)

    def _require(self) -> CycleRun:
        if self._run is None:
            raise RuntimeError("no prediction cycle is running")
        return self._run

    # -- persistence ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The cycle in progress (arrays kept as arrays), the chosen arm and the horizon scale."""
        run = None
        if self._run is not None:
            run = {}
            for f in fields(self._run):
                value = getattr(self._run, f.name)
                run[f.name] = ([list(v) if isinstance(v, tuple) else v for v in value]
                               if isinstance(value, Prediction) else value)
        chosen = None if self.chosen is None else [self.chosen[0], self.chosen[1].tolist()]
        return {"run": run, "chosen": chosen, "horizon_scale": self.horizon_scale}

    def check_state_dict(self, state: dict[str, Any]) -> tuple[CycleRun | None, tuple[int, np.ndarray] | None, float]:
        """(run, chosen, horizon scale) as `load_state_dict` would set them; `ValueError` naming the field if
        malformed. That the direction fits the model and the arms the bandit is checked by the trainer."""
        state_fields(state, ("run", "chosen", "horizon_scale"), what="cycle state")
        run = None if state["run"] is None else _run(state["run"])
        chosen = state["chosen"]
        if chosen is not None:
            arm, context = sequence(chosen, "chosen", 2, 2)
            chosen = (integer(arm, "chosen.arm"), _vector(context, "chosen.context"))
        scale = real(state["horizon_scale"], "horizon_scale", 0.0, 1.0)
        if scale == 0.0:
            raise ValueError("horizon_scale=0.0: must be in (0, 1]")
        return run, chosen, scale

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (`ValueError` naming the field, and no change, if malformed)."""
        self._run, self.chosen, self.horizon_scale = self.check_state_dict(state)
        self._search = None


_LONGEST = 100_000
"""Bound on a saved forecast's length (the config's bound on a horizon)."""


def _run(saved: Any) -> CycleRun:
    """A `CycleRun` from its saved dict, every field checked."""
    names = [f.name for f in fields(CycleRun)]
    state_fields(saved, names, what="run")
    applied = reals(saved["applied"], "run.applied")
    return CycleRun(
        arm=optional(integer, saved["arm"], "run.arm"), context=_vector(saved["context"], "run.context"),
        direction=sequence(saved["direction"], "run.direction"),
        prediction=_prediction(saved["prediction"], "run.prediction"),
        entry_slope=real(saved["entry_slope"], "run.entry_slope", finite=False),
        slope_stderr=real(saved["slope_stderr"], "run.slope_stderr", finite=False),
        probe=flag(saved["probe"], "run.probe"),
        applied=applied, good=integer(saved["good"], "run.good", 0, len(applied)),
        steps=integer(saved["steps"], "run.steps"), forwards=integer(saved["forwards"], "run.forwards"),
        correct_raw=optional(_prediction, saved["correct_raw"], "run.correct_raw"),
        correct_prediction=optional(_prediction, saved["correct_prediction"], "run.correct_prediction"),
        correct_context=optional(_vector, saved["correct_context"], "run.correct_context"),
        best_fraction=optional(real, saved["best_fraction"], "run.best_fraction", 0.0, 1.0),
        paired_gain=optional(real, saved["paired_gain"], "run.paired_gain", finite=False))


def _prediction(saved: Any, name: str) -> Prediction:
    """A `Prediction` from ``[loss, lower, upper, step_scale, confidence]``: four lists of one length >= 1
    (finite step scales: they move the weights) and a confidence in [0, 1] or NaN."""
    loss, lower, upper, scale, confidence = sequence(saved, name, 5, 5)
    tracks = [reals(v, f"{name}.{n}", _LONGEST, 1, finite=n == "step_scale")
              for v, n in ((loss, "loss"), (lower, "lower"), (upper, "upper"), (scale, "step_scale"))]
    if len({len(t) for t in tracks}) != 1:
        raise ValueError(f"{name}: loss, lower, upper and step_scale differ in length")
    return Prediction(*(tuple(t) for t in tracks), real(confidence, f"{name}.confidence", 0.0, 1.0, finite=False))


def _vector(saved: Any, name: str) -> np.ndarray:
    """A 1-D float64 array of finite numbers from a list or a 1-D array."""
    length = saved.shape[0] if isinstance(saved, np.ndarray) and saved.ndim == 1 else len(sequence(saved, name))
    return matrix(saved, name, (length,))


def _put_back(model: Model, direction: list[Array], params: list[Array] | None, moved: float) -> None:
    """Undo a move of ``moved`` along ``-direction``: from the copy ``params`` when there is one."""
    if params is not None:
        model.set_parameters(params)
    elif moved:
        model.apply_update(direction, moved)


def corrected(prediction: Prediction, factor: float) -> Prediction:
    """``prediction`` with its loss and band multiplied by ``factor``."""
    return prediction._replace(
        loss=tuple(v * factor for v in prediction.loss),
        lower=tuple(v * factor for v in prediction.lower),
        upper=tuple(v * factor for v in prediction.upper),
    )


def cycle_reward(run: CycleRun, forward_cost: float, predict_step_cost: float) -> float:
    """Plain steps the predicted steps saved, per predicted step, clipped to [-1, 1].

    Gain: the line search measured, on one batch, the loss at the PREDICT entry point
    (fraction 1) and with the whole predicted displacement applied (fraction 0); the
    log-loss drop between them, divided by the plain-training trend (log-loss per real
    step, floored at its own standard error so a flat trend does not inflate it), is
    the number of plain steps the predicted steps were worth. Both points see the same
    batch, so batch noise largely cancels, and neither is the line search's pick, so
    the estimate is not biased by that selection. Cost: the predicted steps and
    forward passes spent, in plain-step units (``forward_cost`` and ``predict_step_cost``
    are their prices relative to a FULL step). Costs are counted, not timed, so a run
    is reproducible; the benchmark measures real wall-clock. Arm 0 (no PREDICT) earns
    exactly 0, so the bandit prefers it whenever predicting loses.
    """
    if run.paired_gain is None:
        return -1.0 if run.steps else 0.0
    worth = run.paired_gain / max(-run.entry_slope, run.slope_stderr, 1e-8)
    cost = run.forwards * forward_cost + run.steps * predict_step_cost
    return float(np.clip((worth - cost) / max(run.steps, 1), -1.0, 1.0))
