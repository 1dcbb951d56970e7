"""Array-API reference implementations of the fused whole-parameter operations.

These are the ground truth every per-backend kernel is tested against. They are
also the unfused baselines: one array operation per tensor (or per time step),
written only with the array API standard, so they run on NumPy, array-api-strict,
PyTorch, JAX and CuPy alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

from hybrid_core._errors import BackendError

__all__ = ["STATS_FIELDS", "fused_axpy", "fused_axpy_", "fused_stats", "gru_ensemble_rollout"]

STATS_FIELDS = ("loss", "grad_sq", "update_sq", "grad_dot_update", "grad_max_abs", "nonfinite")
"""Order of the entries of the vector `fused_stats` returns."""


def fused_axpy(params: Sequence[Any], direction: Sequence[Any], scale: float) -> list[Any]:
    """θ_i + s·d_i for every pair: a new list, each result in its parameter's dtype and device.

    ``direction[i]`` is cast to ``params[i]``'s dtype first; ``scale`` is a Python number,
    so it never changes a dtype.
    """
    out = []
    for p, d in zip(params, direction):
        xp = array_api_compat.array_namespace(p, d)
        d = xp.astype(d, p.dtype) if d.dtype != p.dtype else d
        out.append(p + scale * d)
    return out


def fused_axpy_(params: Sequence[Any], direction: Sequence[Any], scale: float) -> Sequence[Any]:
    """θ_i += s·d_i in place, one array at a time (d_i cast to θ_i's dtype); returns ``params``.

    Writes through ``θ_i[...] = θ_i + s·d_i``, so it needs arrays that support item
    assignment (NumPy, CuPy, PyTorch, array-api-strict). Immutable arrays (JAX) and
    read-only NumPy arrays raise `BackendError` before anything is written.
    """
    for i, p in enumerate(params):
        if array_api_compat.is_jax_array(p):
            raise BackendError("fused_axpy_ updates arrays in place, and JAX arrays are immutable",
                               "Use fused_axpy (it returns new arrays) with JAX.")
        if isinstance(p, np.ndarray) and not p.flags.writeable:
            raise BackendError(f"fused_axpy_ cannot write parameter #{i}: the NumPy array is read-only",
                               "Pass writable arrays (np.array(a) copies), or use fused_axpy.")
    for p, d in zip(params, direction):
        xp = array_api_compat.array_namespace(p, d)
        d = xp.astype(d, p.dtype) if d.dtype != p.dtype else d
        try:
            p[...] = p + scale * d
        except (TypeError, ValueError) as exc:
            raise BackendError(f"fused_axpy_ cannot write a {type(p).__name__} in place: {exc}",
                               "Use fused_axpy (it returns new arrays) for arrays without item assignment.") from exc
    return params


def fused_stats(loss: Any, grads: Sequence[Any], updates: Sequence[Any] | None) -> Any:
    """One 1-D array: loss, Σg², Σu², Σg·u, max|g| and the count of non-finite gradient entries.

    Stays on the device in the loss's namespace and dtype, so the caller reads every
    per-step scalar with a single host transfer. ``updates`` may be ``None`` (no
    update yet): its entries are then 0. max|g| is NaN when any gradient entry is NaN.
    """
    with np.errstate(all="ignore"):  # NaN/Inf entries are counted below, not warned about
        return _fused_stats(loss, grads, updates)


def _fused_stats(loss: Any, grads: Sequence[Any], updates: Sequence[Any] | None) -> Any:
    xp = array_api_compat.array_namespace(loss, *grads)
    if array_api_compat.is_numpy_namespace(xp) and updates is not None and len(updates) == len(grads):
        return _fused_stats_numpy(loss, grads, updates)
    dtype = loss.dtype
    zero = xp.zeros((), dtype=dtype, device=array_api_compat.device(loss))
    grad_sq = update_sq = dot = grad_max = nonfinite = zero
    for i, g in enumerate(grads):
        g = xp.astype(g, dtype) if g.dtype != dtype else g
        if array_api_compat.size(g) == 0:
            continue
        grad_sq = grad_sq + xp.sum(g * g)
        grad_max = xp.maximum(grad_max, xp.max(xp.abs(g)))
        nonfinite = nonfinite + xp.astype(xp.sum(xp.astype(~xp.isfinite(g), xp.int32)), dtype)
        if updates is not None:
            u = updates[i]
            u = xp.astype(u, dtype) if u.dtype != dtype else u
            update_sq = update_sq + xp.sum(u * u)
            dot = dot + xp.sum(g * u)
    return xp.stack([xp.reshape(loss, ()), grad_sq, update_sq, dot, grad_max, nonfinite])


def _fused_stats_numpy(loss: Any, grads: Sequence[Any], updates: Sequence[Any]) -> Any:
    # NumPy is already on the host, so branching on values costs no transfer: BLAS dot
    # products for the sums, and the non-finite count only when a sum says there is one.
    dtype = loss.dtype
    grad_sq = update_sq = dot = 0.0
    grad_max = 0.0
    for g, u in zip(grads, updates, strict=True):
        if g.size == 0:
            continue
        gf = np.ravel(g.astype(dtype, copy=False))
        uf = np.ravel(u.astype(dtype, copy=False))
        grad_sq += np.dot(gf, gf)
        update_sq += np.dot(uf, uf)
        dot += np.dot(gf, uf)
        grad_max = max(grad_max, float(np.max(np.abs(gf))))
    nonfinite = 0
    if not (np.isfinite(grad_sq) and np.isfinite(grad_max)):
        nonfinite = sum(int(np.count_nonzero(~np.isfinite(g))) for g in grads)
        if any(np.isnan(g).any() for g in grads if g.size):
            grad_max = math.nan
    return np.asarray([np.reshape(loss, ()), grad_sq, update_sq, dot, grad_max, nonfinite], dtype=dtype)


def gru_ensemble_rollout(w_x: Any, w_h: Any, b_x: Any, b_h: Any, h0: Any, x: Any) -> Any:
    """Run E independent GRUs over T steps: all hidden states, shape (E, T, H).

    Shapes: ``w_x`` (E, D, 3H), ``w_h`` (E, H, 3H), ``b_x`` and ``b_h`` (E, 3H),
    ``h0`` (E, H), ``x`` (E, T, D). PyTorch's GRU conventions: the 3H axis holds the
    reset, update and new gates (r, z, n) in that order, and with a = x·W_x + b_x,
    g = h·W_h + b_h::

        r = σ(a_r + g_r),  z = σ(a_z + g_z),  n = tanh(a_n + r·g_n),  h' = (1 − z)·n + z·h

    so ``w_x[e]`` is ``torch.nn.GRU.weight_ih_l0.T`` and ``b_h`` is ``bias_hh_l0``
    (the hidden-side n bias sits inside r·(…), which is why there are two biases).
    """
    xp = array_api_compat.array_namespace(w_x, w_h, b_x, b_h, h0, x)
    hidden = h0.shape[-1]
    steps = x.shape[1]
    if steps == 0:
        return xp.zeros((x.shape[0], 0, hidden), dtype=h0.dtype, device=array_api_compat.device(h0))
    # The input projection does not depend on h: one batched matmul for every step.
    a_all = xp.matmul(x, w_x) + b_x[:, None, :]
    h = h0
    states = []
    for t in range(steps):
        a = a_all[:, t, :]
        g = xp.matmul(h[:, None, :], w_h)[:, 0, :] + b_h
        r = _sigmoid(xp, a[:, :hidden] + g[:, :hidden])
        z = _sigmoid(xp, a[:, hidden:2 * hidden] + g[:, hidden:2 * hidden])
        n = xp.tanh(a[:, 2 * hidden:] + r * g[:, 2 * hidden:])
        h = (1.0 - z) * n + z * h
        states.append(h)
    return xp.stack(states, axis=1)


def _sigmoid(xp: Any, v: Any) -> Any:
    # Written with tanh so large |v| cannot overflow (and warn) the way exp(-v) would.
    return 0.5 * (1.0 + xp.tanh(0.5 * v))
