"""How accurate the recent forecasts were, beyond the batch noise no forecast can remove.

Two running averages of squared log-space errors:

- one-step: |realised − predicted| Δlog-loss of every observed step, predicted before
  learning from it. A model that knows the trend still misses each loss by its batch
  noise, so this is the noise floor of a single loss.
- forecast: every ``lookahead`` steps the mean forecast log-loss over the last ``span``
  steps of the next ``lookahead`` is stored; when those losses have been observed their
  mean is compared with it. Averaging ``span`` losses divides the noise variance by
  ``span``, so what remains above floor / span is trend error: a drifting forecast or a
  loss that wanders like a random walk.

The reported error is √(forecast − one-step / span)₊, the RMS trend error.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["AccuracyTracker"]


class AccuracyTracker:
    """Running squared errors of one-step predictions and of ``lookahead``-step forecasts."""

    def __init__(self, lookahead: int, span: int, step_rate: float, forecast_rate: float) -> None:
        self.lookahead = lookahead
        self.span = span
        self.step_rate = step_rate
        self.forecast_rate = forecast_rate
        self.step_sq = math.nan
        self.forecast_sq = math.nan
        # [first and last observation number covered, forecast mean log-loss, realised sum so far]
        self.pending: list[float] | None = None

    def add_step_error(self, error: float) -> None:
        """Fold in one one-step prediction error."""
        self.step_sq = _ema(self.step_sq, error * error, self.step_rate)

    def observed(self, number: int, log_loss: float) -> None:
        """Record the log-loss of observation ``number`` (1-based) against the pending forecast."""
        if self.pending is None or number < self.pending[0]:
            return
        self.pending[3] += log_loss
        if number == self.pending[1]:
            error = self.pending[3] / self.span - self.pending[2]
            self.forecast_sq = _ema(self.forecast_sq, error * error, self.forecast_rate)
            self.pending = None

    def wants_forecast(self, number: int) -> bool:
        """Whether a forecast should be made after observation ``number``."""
        return number % self.lookahead == 0

    def start(self, number: int, forecast: list[float]) -> None:
        """Store the mean forecast log-losses of observations number+1 … number+lookahead (``forecast``)."""
        last = forecast[-self.span:]
        self.pending = [float(number + self.lookahead - self.span + 1), float(number + self.lookahead),
                        sum(last) / self.span, 0.0]

    def trend_error(self) -> float:
        """The RMS forecast error beyond batch noise; NaN until a forecast has been scored."""
        if math.isnan(self.forecast_sq):
            return math.nan
        return math.sqrt(max(0.0, self.forecast_sq - self.step_sq / self.span))

    def state_dict(self) -> dict[str, Any]:
        """The two averages and the pending forecast."""
        return {"step_sq": self.step_sq, "forecast_sq": self.forecast_sq,
                "pending": None if self.pending is None else list(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.step_sq = float(state["step_sq"])
        self.forecast_sq = float(state["forecast_sq"])
        self.pending = None if state["pending"] is None else [float(v) for v in state["pending"]]


def _ema(average: float, value: float, rate: float) -> float:
    """``average`` moved ``rate`` of the way to ``value`` (``value`` itself when ``average`` is NaN)."""
    return value if math.isnan(average) else average + rate * (value - average)
