"""The FastGRNN cell's elementwise functions: its gates (exact or piecewise linear), their slopes, the loss."""

from __future__ import annotations

from types import ModuleType
from typing import Any

__all__ = ["bce_with_logits", "pwl_sigmoid", "pwl_tanh", "sigmoid", "slopes", "tanh"]


def sigmoid(xp: ModuleType, a: Any) -> Any:
    """σ(a) written with tanh: no exp() that can overflow for large |a|."""
    return 0.5 * (1.0 + xp.tanh(0.5 * a))


def tanh(xp: ModuleType, a: Any) -> Any:
    """tanh(a)."""
    return xp.tanh(a)


def pwl_sigmoid(xp: ModuleType, a: Any) -> Any:
    """σ̂(a) = clip((a + 1)/2, 0, 1), the paper's piecewise-linear σ."""
    return xp.clip(0.5 * (a + 1.0), 0.0, 1.0)


def pwl_tanh(xp: ModuleType, a: Any) -> Any:
    """tanĥ(a) = clip(a, −1, 1), the paper's piecewise-linear tanh."""
    return xp.clip(a, -1.0, 1.0)


def slopes(xp: ModuleType, z: Any, cand: Any, pwl: bool) -> tuple[Any, Any]:
    """dz/da and dh̃/da from the outputs: σ(1 − σ) and 1 − tanh², or ½ and 1 strictly inside the clip range."""
    if not pwl:
        return z * (1.0 - z), 1.0 - cand * cand
    inside_z = xp.astype((z > 0.0) & (z < 1.0), z.dtype)
    return 0.5 * inside_z, xp.astype(xp.abs(cand) < 1.0, cand.dtype)


def bce_with_logits(xp: ModuleType, s: Any, p: Any) -> Any:
    """max(s, 0) − s·p + log(1 + e^{−|s|}) elementwise: −p·log σ(s) − (1 − p)·log(1 − σ(s)) without overflow."""
    return xp.maximum(s, xp.zeros_like(s)) - s * p + xp.log1p(xp.exp(-xp.abs(s)))
