"""The deterministic path: a GRU cell batched over ensemble members, its window forward and backward.

Every array carries the ensemble as its leading axis E, so one batched matmul
serves all members. With ``a`` the input projection x·Wx + b (gates r, u, n in
that order along the last axis) and ``g`` = h·Wh:

    r = σ(a_r + g_r),  u = σ(a_u + g_u),  c = g_n + b_n,  n = tanh(a_n + r·c),
    h' = (1 − u)·n + u·h

(PyTorch's GRU with the input-side biases folded into ``b``). Nothing is
written in place, so immutable arrays (JAX) work.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

__all__ = ["GRUCache", "backward", "forward", "sigmoid", "step"]


def sigmoid(xp: ModuleType, x: Any) -> Any:
    """The logistic function written with tanh, which cannot overflow."""
    return 0.5 * (1.0 + xp.tanh(0.5 * x))


def step(xp: ModuleType, a: Any, h: Any, w_h: Any, b_n: Any) -> tuple[Any, tuple[Any, Any, Any]]:
    """One cell update for input projection ``a`` (E, B, 3H) and state ``h`` (E, B, H): h' and (ru, c, n).

    ``ru`` holds the r and u gates side by side (one sigmoid for both).
    """
    hidden = h.shape[-1]
    g = xp.matmul(h, w_h)
    ru = sigmoid(xp, a[..., :2 * hidden] + g[..., :2 * hidden])
    c = g[..., 2 * hidden:] + b_n
    n = xp.tanh(a[..., 2 * hidden:] + ru[..., :hidden] * c)
    return n + ru[..., hidden:] * (h - n), (ru, c, n)


class GRUCache(NamedTuple):
    """What `backward` needs from `forward`: the per-step gate values and the states before each step."""

    gates: list[tuple[Any, Any, Any]]
    h_prev: list[Any]


def forward(xp: ModuleType, a: Any, h0: Any, w_h: Any, b_n: Any) -> tuple[Any, GRUCache]:
    """Run the cell over the T steps of ``a`` (E, T, 3H) from ``h0`` (E, 1, H): states (E, T, H), cache."""
    h = h0
    states, gates, h_prev = [], [], []
    for t in range(a.shape[1]):
        h_prev.append(h)
        h, parts = step(xp, a[:, t:t + 1, :], h, w_h, b_n)
        gates.append(parts)
        states.append(h)
    return xp.concat(states, axis=1), GRUCache(gates, h_prev)


def backward(xp: ModuleType, d_states: Any, cache: GRUCache, w_h: Any) -> tuple[Any, Any, Any]:
    """Backpropagate ∂L/∂states (E, T, H) through time: ∂L/∂a (E, T, 3H), ∂L/∂Wh, ∂L/∂b_n (h0 constant)."""
    hidden = w_h.shape[1]
    ru, c, n = (xp.concat([g[i] for g in cache.gates], axis=1) for i in range(3))
    h_prev = xp.concat(cache.h_prev, axis=1)
    r, u = ru[..., :hidden], ru[..., hidden:]
    # The factors that do not depend on the incoming gradient, for all steps at once (fewer calls per step).
    k_n = (1.0 - u) * (1.0 - n * n)
    k_u = h_prev - n
    k_ru = ru * (1.0 - ru)
    w_h_t = xp.matrix_transpose(w_h)
    steps = len(cache.gates)
    d_ru: list[Any] = [None] * steps
    d_an: list[Any] = [None] * steps
    d_g: list[Any] = [None] * steps
    d_next = None
    for t in reversed(range(steps)):
        now = slice(t, t + 1)
        dh = d_states[:, now, :] if d_next is None else d_states[:, now, :] + d_next
        d_an[t] = dh * k_n[:, now, :]
        d_ru[t] = xp.concat([d_an[t] * c[:, now, :], dh * k_u[:, now, :]], axis=-1) * k_ru[:, now, :]
        d_g[t] = xp.concat([d_ru[t], d_an[t] * r[:, now, :]], axis=-1)
        d_next = dh * u[:, now, :] + xp.matmul(d_g[t], w_h_t)
    d_g_all = xp.concat(d_g, axis=1)
    # One matmul over all steps instead of one outer product per step.
    d_w_h = xp.matmul(xp.matrix_transpose(h_prev), d_g_all)
    d_b_n = xp.sum(d_g_all[..., 2 * hidden:], axis=1, keepdims=True)
    return xp.concat([xp.concat(d_ru, axis=1), xp.concat(d_an, axis=1)], axis=-1), d_w_h, d_b_n
