"""A tiny Adam over a list of ensemble weight arrays, clipping each member's global gradient norm first."""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = ["Adam"]


class Adam:
    """Adam (Kingma & Ba, bias-corrected) over arrays whose leading axis E indexes ensemble members.

    Members are independent models, so one member's gradient spike must not shrink
    the others' steps: member e's gradients are scaled so that their norm over all
    arrays is at most ``max_norm``.
    """

    def __init__(self, lr: float, max_norm: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.lr = lr
        self.max_norm = max_norm
        self.betas = betas
        self.eps = eps
        self.step_count = 0
        self.exp_avg: list[Any] | None = None
        self.exp_avg_sq: list[Any] | None = None

    def step(self, xp: ModuleType, weights: Sequence[Any], grads: Sequence[Any]) -> list[Any]:
        """The weights after one clipped Adam step; the moments are rebound, never written in place."""
        b1, b2 = self.betas
        squares = [g * g for g in grads]
        norm = xp.sqrt(sum(xp.sum(s, axis=tuple(range(1, s.ndim))) for s in squares))
        factor = xp.reshape(1.0 / xp.maximum(norm / self.max_norm, xp.ones_like(norm)), (-1, 1, 1))
        if self.exp_avg is None or self.exp_avg_sq is None:
            self.exp_avg = [xp.zeros_like(w) for w in weights]
            self.exp_avg_sq = [xp.zeros_like(w) for w in weights]
        self.step_count += 1
        # β·m + (1−β)·(f·g) with the per-member factor f folded into a small (E, 1, 1) coefficient.
        c1, c2 = (1.0 - b1) * factor, (1.0 - b2) * factor * factor
        self.exp_avg = [b1 * m + c1 * g for m, g in zip(self.exp_avg, grads, strict=True)]
        self.exp_avg_sq = [b2 * v + c2 * s for v, s in zip(self.exp_avg_sq, squares, strict=True)]
        root_correction = math.sqrt(1.0 - b2**self.step_count)
        step_size = self.lr * root_correction / (1.0 - b1**self.step_count)
        # θ − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + eps), rearranged to save a whole-array pass and ordered
        # so NumPy reuses each temporary in place.
        return [(-step_size) * m / (xp.sqrt(v) + self.eps * root_correction) + w
                for w, m, v in zip(weights, self.exp_avg, self.exp_avg_sq, strict=True)]
