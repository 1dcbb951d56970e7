"""Online normalisation of the feature slots and of the Δlog-loss targets (host-side, NumPy float64).

Features arrive on the host as NumPy vectors whose slots differ by many orders of
magnitude (a loss of 1e3 next to a learning rate of 1e-4), so the network only
ever sees each slot standardised by its own running mean and spread. The
statistics follow a drifting training run: the update rate is 1/n for the first
n observations (an exact mean) and never falls below ``min_rate`` afterwards.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["RunningNormalizer", "RunningScale"]


class RunningNormalizer:
    """Per-slot running mean and variance; `normalize` standardises and clips to ±``bound``."""

    def __init__(self, dim: int, *, min_rate: float = 0.01, bound: float = 5.0) -> None:
        self.min_rate = min_rate
        self.bound = bound
        self.count = 0
        self.mean = np.zeros(dim)
        self.var = np.zeros(dim)
        self._std = self._spread()

    def update(self, x: np.ndarray) -> None:
        """Fold one observation into the statistics (exponentially weighted Welford step)."""
        self.count += 1
        rate = max(1.0 / self.count, self.min_rate)
        delta = x - self.mean
        self.mean = self.mean + rate * delta
        self.var = (1.0 - rate) * (self.var + rate * delta * delta)
        self._std = self._spread()

    @property
    def std(self) -> np.ndarray:
        """The spread used to standardise (kept from the last update: `normalize` runs every step)."""
        return self._std

    def _spread(self) -> np.ndarray:
        # The relative floor keeps float rounding of a constant slot at 0.
        return np.sqrt(self.var) + 1e-8 * (1.0 + np.abs(self.mean))

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """(x − mean) / std, clipped to ±bound, for one row or a stack of rows."""
        # minimum/maximum rather than np.clip, whose Python wrapper costs more than the arithmetic here.
        return np.minimum(np.maximum((x - self.mean) / self.std, -self.bound), self.bound)

    def state_dict(self) -> dict[str, Any]:
        """Count, mean and variance (copies)."""
        return {"count": self.count, "mean": self.mean.copy(), "var": self.var.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.count = int(state["count"])
        self.mean = np.array(state["mean"], dtype=np.float64)
        self.var = np.array(state["var"], dtype=np.float64)
        self._std = self._spread()


class RunningScale:
    """Running root-mean-square of a scalar target, starting from a prior ``initial`` scale."""

    def __init__(self, initial: float, *, min_rate: float = 0.01, floor: float = 1e-6) -> None:
        self.min_rate = min_rate
        self.floor = floor
        self.count = 0
        self.mean_square = initial * initial

    def update(self, value: float) -> None:
        """Fold one target into the running mean square (the first one replaces the prior)."""
        self.count += 1
        rate = max(1.0 / self.count, self.min_rate)
        self.mean_square += rate * (value * value - self.mean_square)

    @property
    def scale(self) -> float:
        """The RMS, never below ``floor`` so a flat loss does not divide by zero."""
        return max(math.sqrt(self.mean_square), self.floor)

    def state_dict(self) -> dict[str, Any]:
        """Count and mean square."""
        return {"count": self.count, "mean_square": self.mean_square}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.count = int(state["count"])
        self.mean_square = float(state["mean_square"])
