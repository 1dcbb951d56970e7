"""`Adam` (L2 in the gradient) and `AdamW` (decoupled decay), torch.optim's formulas."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .._protocols import Model
from ._base import OptimizerBase, positive, unit_interval

__all__ = ["Adam", "AdamW"]


class _AdamFamily(OptimizerBase):
    """Shared Adam arithmetic; subclasses choose how weight decay enters."""

    _buffers = ("exp_avg", "exp_avg_sq")
    _hyper = ("betas", "eps", "weight_decay")
    _decoupled = False

    def __init__(self, model: Model, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float) -> None:
        pair = isinstance(betas, (tuple, list)) and len(betas) == 2
        problems = [
            unit_interval("betas[0]", betas[0]) if pair else f"betas={betas!r}: must be a pair",
            unit_interval("betas[1]", betas[1]) if pair else None,
            positive("eps", eps),
            positive("weight_decay", weight_decay, allow_zero=True),
        ]
        super().__init__(model, lr, problems)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.exp_avg: list[Any] | None = None
        self.exp_avg_sq: list[Any] | None = None

    def step(self, grads: Sequence[Any]) -> list[Any]:
        """Apply one Adam update and return Δθ."""
        grads = self._check_grads(grads)
        params = self.model.parameters()
        if self.weight_decay and not self._decoupled:
            grads = [g + self.weight_decay * p for g, p in zip(grads, params)]
        update, self.exp_avg, self.exp_avg_sq = self._update(grads, self.step_count + 1)
        return self._apply(update)

    def extrapolate(self) -> list[Any]:
        """The next update if the next (decayed) gradient equalled m̂ = m / (1 − β₁ᵗ); zeros before any step."""
        if self.exp_avg is None:
            return self._zeros()
        correction = 1.0 - self.betas[0] ** self.step_count
        guess = [m / correction for m in self.exp_avg]
        return self._update(guess, self.step_count + 1)[0]

    def _update(self, grads: list[Any], t: int) -> tuple[list[Any], list[Any], list[Any]]:
        xp = self._xp
        b1, b2 = self.betas
        m_prev = self.exp_avg if self.exp_avg is not None else [xp.zeros_like(g) for g in grads]
        v_prev = self.exp_avg_sq if self.exp_avg_sq is not None else [xp.zeros_like(g) for g in grads]
        m = [b1 * mp + (1.0 - b1) * g for mp, g in zip(m_prev, grads)]
        v = [b2 * vp + (1.0 - b2) * g * g for vp, g in zip(v_prev, grads)]
        step_size = self._lr / (1.0 - b1**t)
        root_bc2 = math.sqrt(1.0 - b2**t)
        update = [-step_size * mi / (xp.sqrt(vi) / root_bc2 + self.eps) for mi, vi in zip(m, v)]
        if self.weight_decay and self._decoupled:
            update = [u - self._lr * self.weight_decay * p for u, p in zip(update, self.model.parameters())]
        return update, m, v


class Adam(_AdamFamily):
    """Adam with L2 weight decay added to the gradient (torch.optim.Adam); implements `Optimizer`."""

    def __init__(self, model: Model, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(model, lr, betas, eps, weight_decay)


class AdamW(_AdamFamily):
    """Adam with decoupled weight decay (torch.optim.AdamW); implements `Optimizer`."""

    _decoupled = True

    def __init__(self, model: Model, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(model, lr, betas, eps, weight_decay)
