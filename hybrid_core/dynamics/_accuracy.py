"""How accurate the recent forecasts were, beyond the batch noise no forecast can remove, and how far
the network's correction of Holt's forecast has earned trust.

Two running averages of squared log-space errors:

- one-step: |realised − predicted| log-loss of every observed step, predicted before
  learning from it. A model that knows the trend still misses each loss by its batch
  noise, so this is the noise floor of a single loss.
- forecast: now and then (the owner calls `start` whenever the tracker is `idle`) the
  mean forecast log-loss over the last ``span`` steps of the next ``lookahead`` is
  stored; when those losses have been observed their mean is compared with it.
  Averaging ``span`` losses divides the noise variance by ``span``, so what remains
  above floor / span is trend error: a drifting forecast or a loss that wanders like
  a random walk.

The reported error is √(forecast − one-step / span)₊, the RMS trend error.

Trust: each forecast is stored as Holt's baseline b plus the network's correction c
(both span means). Once scored against the realised mean y, the tracker keeps running
means of (y − b)·c and c²; `trust` = clip(mean((y − b)·c) / mean(c²), 0, 1) is the
least-squares weight of the correction in the recent forecasts. It starts at 0, so a
network that has not yet shown that its correction helps adds nothing to Holt's
forecast, and it falls back to 0 when the correction stops helping.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["AccuracyTracker"]


class AccuracyTracker:
    """Running squared errors of one-step predictions and of ``lookahead``-step forecasts; the correction's trust."""

    def __init__(self, lookahead: int, span: int, step_rate: float, forecast_rate: float,
                 trust_rate: float = 0.1) -> None:
        self.lookahead = lookahead
        self.span = span
        self.step_rate = step_rate
        self.forecast_rate = forecast_rate
        self.trust_rate = trust_rate
        self.step_sq = math.nan
        self.forecast_sq = math.nan
        # Running means of (realised − baseline)·correction and correction², from 0 (so trust starts at 0).
        self.gain = 0.0
        self.power = 0.0
        # [first and last observation number covered, baseline mean, correction mean, trust used, realised sum]
        self.pending: list[float] | None = None

    def add_step_error(self, error: float) -> None:
        """Fold in one one-step prediction error."""
        self.step_sq = _ema(self.step_sq, error * error, self.step_rate)

    @property
    def trust(self) -> float:
        """The weight in [0, 1] of the network's correction that the scored forecasts support."""
        return min(1.0, max(0.0, self.gain / self.power)) if self.power > 0.0 else 0.0

    def observed(self, number: int, log_loss: float) -> None:
        """Record the log-loss of observation ``number`` (1-based) against the pending forecast."""
        if self.pending is None or number < self.pending[0]:
            return
        self.pending[5] += log_loss
        if number == self.pending[1]:
            _, _, baseline, correction, trust, total = self.pending
            gap = total / self.span - baseline
            error = gap - trust * correction
            self.forecast_sq = _ema(self.forecast_sq, error * error, self.forecast_rate)
            self.gain += self.trust_rate * (gap * correction - self.gain)
            self.power += self.trust_rate * (correction * correction - self.power)
            self.pending = None

    @property
    def idle(self) -> bool:
        """Whether no forecast is waiting to be scored (a new one may `start`)."""
        return self.pending is None

    def start(self, number: int, baseline: list[float], correction: list[float]) -> None:
        """Store the forecast of observations number+1 … number+lookahead: Holt's ``baseline`` and the
        network's ``correction`` per step; it is scored as baseline + `trust`·correction."""
        span = self.span
        self.pending = [float(number + self.lookahead - span + 1), float(number + self.lookahead),
                        sum(baseline[-span:]) / span, sum(correction[-span:]) / span, self.trust, 0.0]

    def trend_error(self) -> float:
        """The RMS forecast error beyond batch noise; NaN until a forecast has been scored."""
        if math.isnan(self.forecast_sq):
            return math.nan
        return math.sqrt(max(0.0, self.forecast_sq - self.step_sq / self.span))

    def state_dict(self) -> dict[str, Any]:
        """The averages and the pending forecast."""
        return {"step_sq": self.step_sq, "forecast_sq": self.forecast_sq, "gain": self.gain, "power": self.power,
                "pending": None if self.pending is None else list(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        pending = None if state["pending"] is None else [float(v) for v in state["pending"]]
        if pending is not None and len(pending) != 6:
            raise ValueError(f"pending forecast has {len(pending)} fields, expected 6")
        self.step_sq = float(state["step_sq"])
        self.forecast_sq = float(state["forecast_sq"])
        self.gain = float(state["gain"])
        self.power = float(state["power"])
        self.pending = pending


def _ema(average: float, value: float, rate: float) -> float:
    """``average`` moved ``rate`` of the way to ``value`` (``value`` itself when ``average`` is NaN)."""
    return value if math.isnan(average) else average + rate * (value - average)
