"""The deterministic path: a GRU cell batched over ensemble members and windows, its forward and backward.

Every state carries the ensemble as its leading axis E and a batch axis B (windows
trained together, or rollout samples), so one batched matmul serves all of them.
With ``a`` the input projection x·Wx + b (gates r, u, n in that order along the
last axis) and ``g`` = h·Wh:

    r = σ(a_r + g_r),  u = σ(a_u + g_u),  c = g_n + b_n,  n = tanh(a_n + r·c),
    h' = (1 − u)·n + u·h

(PyTorch's GRU with the input-side biases folded into ``b``). Over a window the
inputs are time-major, (T, E, B, 3H), so a step is a cheap index of the first
axis. Nothing is written in place, so immutable arrays (JAX) work; products use
the ``@`` operator, which every array-API array has and which skips the compat
layer's wrapper (a fair share of the cost of these tiny matmuls).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

__all__ = ["GRUCache", "backward", "forward", "members_to_time_major", "sigmoid", "step", "time_major_to_members"]


def sigmoid(xp: ModuleType, x: Any) -> Any:
    """The logistic function written with tanh, which cannot overflow."""
    return 0.5 * (1.0 + xp.tanh(0.5 * x))


def step(xp: ModuleType, a: Any, h: Any, w_h: Any, b_n: Any) -> tuple[Any, tuple[Any, Any, Any]]:
    """One cell update for input projection ``a`` (E, B, 3H) and state ``h`` (E, B, H): h' and (ru, c, n).

    ``ru`` holds the r and u gates side by side (one sigmoid for both).
    """
    hidden = h.shape[-1]
    g = h @ w_h
    ru = sigmoid(xp, a[..., :2 * hidden] + g[..., :2 * hidden])
    c = g[..., 2 * hidden:] + b_n
    n = xp.tanh(a[..., 2 * hidden:] + ru[..., :hidden] * c)
    return n + ru[..., hidden:] * (h - n), (ru, c, n)


class GRUCache(NamedTuple):
    """What `backward` needs from `forward`: the per-step gate values and the states before each step."""

    gates: list[tuple[Any, Any, Any]]
    h_prev: list[Any]


def forward(xp: ModuleType, a: Any, h0: Any, w_h: Any, b_n: Any) -> tuple[Any, GRUCache]:
    """Run the cell over the T steps of ``a`` (T, E, B, 3H) from ``h0`` (E, B, H): states (T, E, B, H), cache."""
    h = h0
    states, gates, h_prev = [], [], []
    for t in range(a.shape[0]):
        h_prev.append(h)
        h, parts = step(xp, a[t, ...], h, w_h, b_n)
        gates.append(parts)
        states.append(h)
    return xp.stack(states), GRUCache(gates, h_prev)


def backward(xp: ModuleType, d_states: Any, cache: GRUCache, w_h: Any) -> tuple[Any, Any, Any]:
    """Backpropagate ∂L/∂states (T, E, B, H) through time: ∂L/∂a (T, E, B, 3H), ∂L/∂Wh, ∂L/∂b_n (h0 constant).

    Each gate's gradient is the incoming ∂L/∂h times a factor that does not depend on it
    (∂a_r = dh·(1−u)(1−n²)·c·r(1−r), ∂a_u = dh·(h−n)·u(1−u), ∂a_n = dh·(1−u)(1−n²), and
    ∂g differs from ∂a only by r in its n part), so those factors are formed for all
    steps at once and a step costs a few array operations.
    """
    hidden = w_h.shape[1]
    ru, c, n = (xp.stack([g[i] for g in cache.gates]) for i in range(3))
    h_prev = xp.stack(cache.h_prev)
    r, u = ru[..., :hidden], ru[..., hidden:]
    k_n = (1.0 - u) * (1.0 - n * n)
    k_r = k_n * c * r * (1.0 - r)
    k_u = (h_prev - n) * u * (1.0 - u)
    factor_a = xp.concat([k_r, k_u, k_n], axis=-1)
    factor_g = xp.concat([k_r, k_u, k_n * r], axis=-1)
    w_h_t = xp.matrix_transpose(w_h)
    steps = len(cache.gates)
    d_h: list[Any] = [None] * steps
    d_g: list[Any] = [None] * steps
    d_next = None
    for t in reversed(range(steps)):
        dh = d_states[t, ...] if d_next is None else d_states[t, ...] + d_next
        d_h[t] = dh
        d_g[t] = xp.concat([dh, dh, dh], axis=-1) * factor_g[t, ...]
        d_next = dh * u[t, ...] + d_g[t] @ w_h_t
    d_all = xp.stack(d_h)
    d_a = xp.concat([d_all, d_all, d_all], axis=-1) * factor_a
    # One matmul over every step and window instead of one outer product per step.
    d_g_all = time_major_to_members(xp, xp.stack(d_g))
    d_w_h = xp.matrix_transpose(time_major_to_members(xp, h_prev)) @ d_g_all
    d_b_n = xp.sum(d_g_all[..., 2 * hidden:], axis=1, keepdims=True)
    return d_a, d_w_h, d_b_n


def time_major_to_members(xp: ModuleType, values: Any) -> Any:
    """(T, E, B, k) → (E, T·B, k), positions ordered by step, then window."""
    steps, members, batch, width = values.shape
    return xp.reshape(xp.permute_dims(values, (1, 0, 2, 3)), (members, steps * batch, width))


def members_to_time_major(xp: ModuleType, values: Any, steps: int) -> Any:
    """(E, T·B, k) → (T, E, B, k): the inverse of `time_major_to_members`."""
    members, positions, width = values.shape
    return xp.permute_dims(xp.reshape(values, (members, steps, positions // steps, width)), (1, 0, 2, 3))
