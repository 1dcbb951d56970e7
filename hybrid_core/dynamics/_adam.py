"""A tiny Adam over one (E, P) array of ensemble weights, clipping each member's gradient norm first."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

__all__ = ["Adam"]


class Adam:
    """Adam (Kingma & Ba, bias-corrected) over a flat (E, P) array whose rows are ensemble members.

    Members are independent models, so one member's gradient spike must not shrink
    the others' steps: row e of the gradient is scaled so that its norm is at most
    ``max_norm``. One array for all weights keeps a step at about ten array operations.
    """

    def __init__(self, lr: float, max_norm: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.lr = lr
        self.max_norm = max_norm
        self.betas = betas
        self.eps = eps
        self.step_count = 0
        self.exp_avg: Any = None
        self.exp_avg_sq: Any = None

    def step(self, xp: ModuleType, weights: Any, grads: Any) -> Any:
        """The weights after one clipped Adam step; the moments are rebound, never written in place."""
        b1, b2 = self.betas
        squares = grads * grads
        norm = xp.sqrt(xp.sum(squares, axis=1, keepdims=True))
        factor = 1.0 / xp.maximum(norm / self.max_norm, xp.ones_like(norm))
        if self.exp_avg is None or self.exp_avg_sq is None:
            self.exp_avg = xp.zeros_like(weights)
            self.exp_avg_sq = xp.zeros_like(weights)
        self.step_count += 1
        # β·m + (1−β)·(f·g) with the per-member factor f folded into a small (E, 1) coefficient.
        self.exp_avg = b1 * self.exp_avg + ((1.0 - b1) * factor) * grads
        self.exp_avg_sq = b2 * self.exp_avg_sq + ((1.0 - b2) * factor * factor) * squares
        root_correction = math.sqrt(1.0 - b2**self.step_count)
        step_size = self.lr * root_correction / (1.0 - b1**self.step_count)
        # θ − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + eps), rearranged to save a whole-array pass.
        return (-step_size) * self.exp_avg / (xp.sqrt(self.exp_avg_sq) + self.eps * root_correction) + weights
