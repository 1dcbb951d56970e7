"""`TrendDynamics`: the simple baseline dynamics model every learned one must beat.

Holt's linear-trend smoothing of log-loss: a level ℓ and a per-step trend b,
updated on every observed real step. The forecast k steps ahead is
exp(ℓ + k·b); its band comes from the one-step residuals. Confidence is the
recent accuracy of the model's own ``lookahead``-step forecasts of the level,
beyond what batch noise alone explains (the level itself jitters by about
σ·√(α/(2−α)) when the one-step residuals have spread σ), so it is only high when
the trend has been predictable lately; pure noise around a good trend is not
held against it, a wandering trajectory is.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from .._errors import CheckpointError, ConfigError
from .._protocols import Outcome, Prediction
from .._statecheck import fields, integer, real, reals

__all__ = ["TrendDynamics"]

_Z90 = 1.6448536269514722  # two-sided 90% band of a normal


class TrendDynamics:
    """Baseline `DynamicsModel`: double exponential smoothing of log-loss.

    ``level_rate`` and ``trend_rate`` are Holt's α and β; ``tolerance`` is the
    log-space forecast error (≈ relative error) at which confidence falls to
    1/e; ``lookahead`` is the horizon whose forecasts are scored.

    It reads only the loss, so the trainer need not encode features for `observe`.
    """

    observes_features = False

    def __init__(
        self,
        level_rate: float = 0.05,
        trend_rate: float = 0.02,
        tolerance: float = 0.05,
        lookahead: int = 10,
        min_observations: int = 20,
    ) -> None:
        problems = []
        for name, value in (("level_rate", level_rate), ("trend_rate", trend_rate)):
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                problems.append(f"{name}={value!r}: must be in (0, 1]")
        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
            problems.append(f"tolerance={tolerance!r}: must be a finite number > 0")
        for name, value in (("lookahead", lookahead), ("min_observations", min_observations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r}: must be an integer >= 1")
        if problems:
            raise ConfigError(problems)
        self.level_rate = float(level_rate)
        self.trend_rate = float(trend_rate)
        self.tolerance = float(tolerance)
        self.lookahead = lookahead
        self.min_observations = min_observations
        self._level = 0.0
        self._trend = 0.0
        self._resid_var = 0.0
        self._seen = 0
        self._forecast_err = math.nan
        self._pending: deque[float] = deque(maxlen=lookahead)
        self._confidence = 0.0

    def observe(self, features: Any, outcome: Outcome) -> None:
        """Update level, trend, residual variance and the scored forecasts with one real loss."""
        if not math.isfinite(outcome.loss):
            return
        y = math.log(max(outcome.loss, 1e-30))
        if self._seen == 0:
            self._level = y
        else:
            forecast = self._level + self._trend
            resid = y - forecast
            weight = 1.0 / self._seen if self._seen < 1.0 / self.level_rate else self.level_rate
            self._resid_var += weight * (resid * resid - self._resid_var)
            level = self.level_rate * y + (1.0 - self.level_rate) * forecast
            self._trend += self.trend_rate * (level - self._level - self._trend)
            self._level = level
        self._seen += 1
        if len(self._pending) == self.lookahead:
            err = abs(self._level - self._pending[0])
            self._forecast_err = err if math.isnan(self._forecast_err) else (
                self._forecast_err + self.level_rate * (err - self._forecast_err)
            )
        self._pending.append(self._level + self.lookahead * self._trend)
        self._confidence = self._compute_confidence()

    def predict(self, features: Any, horizon: int) -> Prediction:
        """Loss after 1..horizon further steps, a 90% band for a single batch's loss, unit scales."""
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ConfigError(f"horizon={horizon!r}: must be an integer >= 1")
        k = np.arange(1, horizon + 1, dtype=np.float64)
        mean = self._level + k * self._trend
        # Band for one batch's loss: residual noise, widening with the trend's uncertainty.
        half = _Z90 * math.sqrt(max(self._resid_var, 0.0)) * np.sqrt(1.0 + k / self.lookahead)
        with np.errstate(over="ignore"):
            loss = np.exp(np.clip(mean, -690.0, 690.0))
            lower = np.exp(np.clip(mean - half, -690.0, 690.0))
            upper = np.exp(np.clip(mean + half, -690.0, 690.0))
        return Prediction(
            loss=tuple(loss.tolist()),
            lower=tuple(lower.tolist()),
            upper=tuple(upper.tolist()),
            step_scale=(1.0,) * horizon,
            confidence=self._confidence,
        )

    def confidence(self) -> float:
        """exp(−(forecast error − level noise)₊ / tolerance) once enough steps were seen; 0 before."""
        return self._confidence

    def _compute_confidence(self) -> float:
        if self._seen < self.min_observations or math.isnan(self._forecast_err):
            return 0.0
        a = self.level_rate
        level_noise = math.sqrt(max(self._resid_var, 0.0) * a / (2.0 - a))
        excess = max(0.0, self._forecast_err - level_noise)
        return float(min(1.0, max(0.0, math.exp(-excess / self.tolerance))))

    def state_dict(self) -> dict[str, Any]:
        """Scalars and the pending forecasts."""
        return {
            "level": self._level,
            "trend": self._trend,
            "resid_var": self._resid_var,
            "seen": self._seen,
            "forecast_err": self._forecast_err,
            "pending": list(self._pending),
            "confidence": self._confidence,
        }

    def check_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """The attributes `load_state_dict` would set; `CheckpointError` naming the field if malformed (every
        number finite, the forecast error NaN until scored, at most ``lookahead`` pending forecasts)."""
        try:
            fields(state, ("level", "trend", "resid_var", "seen", "forecast_err", "pending", "confidence"),
                   what="TrendDynamics state")
            error = real(state["forecast_err"], "forecast_err", 0.0, finite=False)
            if math.isinf(error):
                raise ValueError("forecast_err is infinite")
            return {"_level": real(state["level"], "level"), "_trend": real(state["trend"], "trend"),
                    "_resid_var": real(state["resid_var"], "resid_var", 0.0), "_seen": integer(state["seen"], "seen"),
                    "_forecast_err": error,
                    "_pending": deque(reals(state["pending"], "pending", self.lookahead), maxlen=self.lookahead),
                    "_confidence": real(state["confidence"], "confidence", 0.0, 1.0)}
        except ValueError as exc:
            raise CheckpointError(f"TrendDynamics state: {exc}",
                                  "Load a state_dict() saved by TrendDynamics with the same lookahead.") from exc

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (`CheckpointError`, and no change, if malformed)."""
        for name, value in self.check_state_dict(state).items():
            setattr(self, name, value)
