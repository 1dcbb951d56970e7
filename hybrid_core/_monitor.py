"""`DivergenceMonitor`: reads the run's health and maps what it sees to a recovery level."""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import numpy as np

from ._state import TrainingState

__all__ = ["Assessment", "DivergenceMonitor", "Level"]


class Level(enum.IntEnum):
    """Severity, each with its recovery action in the trainer."""

    OK = 0
    SHRINK = 1
    """Halve the next PREDICT horizon."""
    FORCE_FULL = 2
    """No PREDICT now; end a running PREDICT phase (a failed check also rolls its steps back)."""
    FATAL = 3
    """Stop with `DivergenceError` (or skip the batch when the config says so)."""


class Assessment(NamedTuple):
    """The level and the reasons that raised it."""

    level: Level
    reasons: tuple[str, ...] = ()


class DivergenceMonitor:
    """Loss σ-deviation, gradient explosion/vanishing versus WARMUP, NaN/Inf, prediction error, oscillation."""

    def __init__(self, sigma: float = 2.2, explode_ratio: float = 10.0, vanish_ratio: float = 1e-3,
                 max_prediction_error: float = 0.7, max_oscillation: float = 0.85) -> None:
        self.sigma = sigma
        self.explode_ratio = explode_ratio
        self.vanish_ratio = vanish_ratio
        self.max_prediction_error = max_prediction_error
        self.max_oscillation = max_oscillation

    def assess(self, state: TrainingState, loss: float, grad_norm: float | None,
               oscillation: bool = True) -> Assessment:
        """Judge a measured loss (and gradient norm, when measured) against the history in ``state``.

        ``oscillation`` also scans the last 32 losses for step-to-step sign flips (the one check
        that reads a window, so the trainer asks for it once per statistics measurement).
        """
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            return Assessment(Level.FATAL, ("non-finite loss or gradient",))
        if not state.warmup_done:
            return Assessment(Level.OK)
        found: list[tuple[Level, str]] = []
        std = math.sqrt(max(state.loss_var_ema, 0.0))
        if std > 0:
            z = (loss - state.loss_ema_fast) / std
            if z > 2 * self.sigma:
                found.append((Level.FORCE_FULL, f"loss {z:.1f}σ above its EMA"))
            elif z > self.sigma:
                found.append((Level.SHRINK, f"loss {z:.1f}σ above its EMA"))
        base = state.warmup_grad_norm
        if grad_norm is not None and math.isfinite(base) and base > 0:
            if grad_norm > self.explode_ratio * base:
                found.append((Level.FORCE_FULL, f"gradient norm {grad_norm / base:.1f}× the WARMUP mean"))
            elif grad_norm < self.vanish_ratio * base:
                found.append((Level.SHRINK, "vanishing gradient"))
        if state.pred_err_ema > self.max_prediction_error:
            found.append((Level.SHRINK, f"prediction error {state.pred_err_ema:.2f} (log)"))
        window = state.losses.last(32) if oscillation else ()
        if len(window) >= 16:
            diffs = np.sign(np.diff(window))
            diffs = diffs[diffs != 0]
            if diffs.size > 2 and float(np.mean(diffs[1:] != diffs[:-1])) > self.max_oscillation:
                found.append((Level.SHRINK, "loss oscillates step to step"))
        if not found:
            return Assessment(Level.OK)
        return Assessment(max(level for level, _ in found), tuple(reason for _, reason in found))
