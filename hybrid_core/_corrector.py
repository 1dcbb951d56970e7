"""Residuals of the dynamics model's predictions, and an online corrector for them."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, NamedTuple

import numpy as np

from ._statecheck import fields, integer, matrix, real, reals, sequence

__all__ = ["Residual", "ResidualCorrector", "ResidualStore"]


class Residual(NamedTuple):
    """One compared step: the context then, the predicted and actual loss, log(actual/predicted)."""

    step: int
    context: tuple[float, ...]
    predicted: float
    actual: float
    residual: float


class ResidualStore:
    """The newest ``capacity`` residuals (bounded), with their running mean."""

    def __init__(self, capacity: int = 512) -> None:
        self._items: deque[Residual] = deque(maxlen=capacity)
        self.total = 0

    def add(self, step: int, context: np.ndarray, predicted: float, actual: float) -> Residual:
        """Record a comparison; the residual is in log space (≈ relative error)."""
        res = math.log(max(actual, 1e-30)) - math.log(max(predicted, 1e-30))
        item = Residual(step, tuple(float(v) for v in context), predicted, actual, res)
        self._items.append(item)
        self.total += 1
        return item

    def __len__(self) -> int:
        return len(self._items)

    @property
    def items(self) -> list[Residual]:
        """The kept residuals, oldest first."""
        return list(self._items)

    def mean(self) -> float:
        """Mean log residual of the kept items (0 when empty)."""
        return float(np.mean([r.residual for r in self._items])) if self._items else 0.0

    def state_dict(self) -> dict[str, Any]:
        """Kept items and the total count."""
        return {"capacity": self._items.maxlen, "items": [list(r) for r in self._items], "total": self.total}

    def check_state_dict(self, state: dict[str, Any]) -> tuple[list[Residual], int]:
        """(items, total) as `load_state_dict` would keep them; `ValueError` naming the field if malformed.

        The store keeps its own capacity (the newest items that fit); the saved one is only checked.
        """
        fields(state, ("capacity", "items", "total"), what="residual store")
        capacity = integer(state["capacity"], "capacity", 1)
        items = []
        for i, r in enumerate(sequence(state["items"], "items", capacity)):
            step, context, *values = sequence(r, f"items[{i}]", 5, 5)
            items.append(Residual(integer(step, f"items[{i}].step"), tuple(reals(context, f"items[{i}].context",
                                                                                    finite=False)),
                                  *(real(v, f"items[{i}]", finite=False) for v in values)))
        total = integer(state["total"], "total", len(items))
        return items[len(items) - (self._items.maxlen or 0):], total

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (`ValueError` naming the field, and no change, if malformed)."""
        items, self.total = self.check_state_dict(state)
        self._items = deque(items, maxlen=self._items.maxlen)


class ResidualCorrector:
    """Recursive least squares (with forgetting) from context to log residual.

    `correct` multiplies a predicted loss by exp(w·x), learning from every CORRECT
    step how far the dynamics model was off in situations like this one.
    """

    def __init__(self, dim: int, forgetting: float = 0.99, prior: float = 10.0, max_log_correction: float = 1.0
                 ) -> None:
        self.dim = dim
        self.forgetting = forgetting
        self.prior = prior
        self.max_log_correction = max_log_correction
        self.w = np.zeros(dim)
        self.p = np.eye(dim) * prior
        self.updates = 0

    def update(self, context: np.ndarray, residual: float) -> None:
        """One RLS step towards predicting ``residual`` from ``context``."""
        x = np.asarray(context, dtype=np.float64)
        if not (np.all(np.isfinite(x)) and math.isfinite(residual)):
            return
        px = self.p @ x
        gain = px / (self.forgetting + x @ px)
        self.w = self.w + gain * (residual - self.w @ x)
        self.p = (self.p - np.outer(gain, px)) / self.forgetting
        # Keep P symmetric and bounded so long runs with little excitation stay stable.
        self.p = 0.5 * (self.p + self.p.T)
        np.clip(self.p, -1e6, 1e6, out=self.p)
        self.updates += 1

    def log_correction(self, context: np.ndarray) -> float:
        """The predicted log residual for ``context``, clipped to ±``max_log_correction``."""
        value = float(self.w @ np.asarray(context, dtype=np.float64))
        if not math.isfinite(value):
            return 0.0
        return max(-self.max_log_correction, min(self.max_log_correction, value))

    def correct(self, loss: float, context: np.ndarray) -> float:
        """``loss`` corrected by the learned residual."""
        return loss * math.exp(self.log_correction(context))

    def state_dict(self) -> dict[str, Any]:
        """Weights, covariance and settings."""
        return {"dim": self.dim, "forgetting": self.forgetting, "prior": self.prior,
                "max_log_correction": self.max_log_correction, "w": self.w.tolist(), "p": self.p.tolist(),
                "updates": self.updates}

    def check_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """The attributes `load_state_dict` would set; `ValueError` naming the field if malformed (the
        dimension must be this corrector's, the weights and covariance finite)."""
        fields(state, ("dim", "forgetting", "prior", "max_log_correction", "w", "p", "updates"),
               what="corrector state")
        dim = integer(state["dim"], "dim", 1)
        if dim != self.dim:
            raise ValueError(f"dim={dim}: this corrector's context has {self.dim} entries")
        forgetting = real(state["forgetting"], "forgetting", 0.0, 1.0)
        prior = real(state["prior"], "prior", 0.0)
        if forgetting == 0.0 or prior == 0.0:
            raise ValueError("forgetting and prior must be > 0")
        return {"forgetting": forgetting, "prior": prior,
                "max_log_correction": real(state["max_log_correction"], "max_log_correction", 0.0),
                "w": matrix(state["w"], "w", (dim,)), "p": matrix(state["p"], "p", (dim, dim)),
                "updates": integer(state["updates"], "updates")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (`ValueError` naming the field, and no change, if malformed)."""
        for name, value in self.check_state_dict(state).items():
            setattr(self, name, value)
