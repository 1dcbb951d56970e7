"""`PredictCycle`: one PREDICT phase and the CORRECT phase after it, and what it earned."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._protocols import Array, Model, Prediction

__all__ = ["PredictCycle", "corrected", "cycle_reward"]


@dataclass
class PredictCycle:
    """Everything the trainer tracks between entering PREDICT and leaving CORRECT.

    ``applied`` holds the scale of every predicted step still applied along
    ``direction``, so rolling back to any point of the phase is one update by
    −(sum of the later scales): no copy of the weights is kept.
    """

    horizon: int
    arm: int | None
    direction: list[Array]
    prediction: Prediction
    context: np.ndarray
    entry_slope: float
    slope_stderr: float
    applied: list[float] = field(default_factory=list)
    good: int = 0
    """How many of ``applied`` a forward check has vouched for."""
    predicted_steps: int = 0
    correct_prediction: Prediction | None = None
    correct_raw: Prediction | None = None
    correct_context: np.ndarray | None = None
    correct_losses: list[float] = field(default_factory=list)
    best_fraction: float | None = None
    paired_gain: float | None = None
    """log L(entry point) − log L(all predicted steps applied) on the line-search batch."""
    forward_passes: int = 0
    """Forward-only passes spent on checks and the line search."""

    def roll_back_to(self, model: Model, index: int) -> float:
        """Undo the applied predicted steps after ``index``; returns the scale undone."""
        undo = math.fsum(self.applied[index:])
        if undo:
            model.apply_update(self.direction, -undo)
        del self.applied[index:]
        self.good = min(self.good, index)
        return undo

    def net_scale(self) -> float:
        """Total scale still applied along the direction."""
        return math.fsum(self.applied)


def corrected(prediction: Prediction, factor: float) -> Prediction:
    """``prediction`` with its loss and band multiplied by ``factor``."""
    return prediction._replace(
        loss=tuple(v * factor for v in prediction.loss),
        lower=tuple(v * factor for v in prediction.lower),
        upper=tuple(v * factor for v in prediction.upper),
    )


def cycle_reward(cycle: PredictCycle, forward_cost: float, predict_step_cost: float) -> float:
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
    if cycle.paired_gain is None:
        return -1.0 if cycle.predicted_steps else 0.0
    worth = cycle.paired_gain / max(-cycle.entry_slope, cycle.slope_stderr, 1e-8)
    cost = cycle.forward_passes * forward_cost + cycle.predicted_steps * predict_step_cost
    return float(np.clip((worth - cost) / max(cycle.predicted_steps, 1), -1.0, 1.0))
