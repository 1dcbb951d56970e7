"""The ensemble network's weights and its training objective over one window, with hand-written gradients.

Weights come in the fixed order of `WEIGHT_NAMES`, each with the ensemble as a
leading axis E (biases are (E, 1, k) so every array is 3-D); they live as views
of one flat (E, P) array (`unflatten`), so the optimiser updates a single array.
On B windows of T steps, window b starting from a given GRU state h0_b, member e
minimises

    Lₑ = (1/(T·B))·Σₜ,ᵦ wₑₜᵦ·[ ½((yₜᵦ − mₜᵦ)/σₜᵦ)² + log σₜᵦ         (Gaussian NLL of the target)
                             + κ·maskₜᵦ·(sₜᵦ − s*ₜᵦ)²               (step scale, observed targets only)
                             + β·Σⱼ KL(N(μₜᵦⱼ, σ_z²) ‖ N(0, 1)) ]    (keeps the latent a calibrated noise source)

with wₑₜᵦ the member's bootstrap weight of that observation; the total is Σₑ Lₑ,
so each member's gradient is its own. The h0 are constants (truncated BPTT).
`loss_and_grads` is checked against finite differences and torch.autograd in the tests.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from . import _gru, _heads

__all__ = [
    "KL_WEIGHT",
    "SCALE_WEIGHT",
    "WEIGHT_NAMES",
    "WindowBatch",
    "flatten",
    "initial_weights",
    "loss",
    "loss_and_grads",
    "unflatten",
]

WEIGHT_NAMES = ("w_x", "b", "w_h", "b_n", "w_p", "b_p", "w_o", "b_o")
"""Input→gates, gate bias, hidden→gates, candidate bias, prior head (W, b), output head (W, b)."""

KL_WEIGHT = 0.1
"""β: weight of the latent's KL term."""

SCALE_WEIGHT = 1.0
"""κ: weight of the step-scale head's squared error."""


def initial_weights(rng: np.random.Generator, ensemble: int, features: int, hidden: int,
                    latent: int) -> list[np.ndarray]:
    """Fresh float64 weights; every member draws its own, and the heads start small (m ≈ 0, σ ≈ 1, s ≈ 1)."""
    e, d, h, z = ensemble, features, hidden, latent
    return [
        rng.normal(0.0, 1.0 / math.sqrt(d), (e, d, 3 * h)),
        np.zeros((e, 1, 3 * h)),
        rng.normal(0.0, 1.0 / math.sqrt(h), (e, h, 3 * h)),
        np.zeros((e, 1, h)),
        rng.normal(0.0, 0.1 / math.sqrt(h), (e, h, 2 * z)),
        np.zeros((e, 1, 2 * z)),
        rng.normal(0.0, 0.1 / math.sqrt(h + z), (e, h + z, 3)),
        np.zeros((e, 1, 3)),
    ]


class WindowBatch(NamedTuple):
    """B windows of T steps, time-major: h0 (E, B, H), x (T, B, D), targets, mask (T, B), w (E, T, B), ε (E, T, B, Z).

    Row t of window b is the t-th step of that window; every window has the same length.
    """

    h0: Any
    x: Any
    target: Any
    scale_target: Any
    scale_mask: Any
    weight: Any
    eps: Any


class _Cache(NamedTuple):
    gru: _gru.GRUCache
    heads: _heads.HeadCache


def _positions(xp: ModuleType, value: Any) -> Any:
    """A (E, T, B[, k]) per-member array as (E, T·B[, k]), positions ordered as `_gru.time_major_to_members`."""
    shape = tuple(value.shape)
    return xp.reshape(value, (shape[0], shape[1] * shape[2], *shape[3:]))


def _forward(xp: ModuleType, weights: list[Any], batch: WindowBatch) -> tuple[Any, _Cache]:
    """The total loss (0-d) and the cache."""
    w_x, b, w_h, b_n, w_p, b_p, w_o, b_o = weights
    steps, windows, width = batch.x.shape
    # (T·B, D) @ (E, D, 3H): one product per member, then laid out time-major (T, E, B, 3H).
    a = _gru.members_to_time_major(xp, xp.reshape(batch.x, (steps * windows, width)) @ w_x + b, steps)
    states, gru_cache = _gru.forward(xp, a, batch.h0, w_h, b_n)
    heads = _heads.forward(xp, _gru.time_major_to_members(xp, states), _positions(xp, batch.eps),
                           w_p, b_p, w_o, b_o)
    out = heads.out
    count = batch.target.shape[0] * batch.target.shape[1]
    z_score = (xp.reshape(batch.target, (count,)) - out.mean) * xp.exp(-out.log_std)
    kl = xp.sum(0.5 * (out.mu * out.mu + out.sigma_z * out.sigma_z - 1.0) - out.log_sigma_z, axis=-1)
    diff = out.scale - xp.reshape(batch.scale_target, (count,))
    per_position = _positions(xp, batch.weight) * (
        0.5 * z_score * z_score + out.log_std
        + SCALE_WEIGHT * xp.reshape(batch.scale_mask, (count,)) * diff * diff + KL_WEIGHT * kl)
    total = xp.sum(per_position) / count
    return total, _Cache(gru_cache, heads)


def loss(xp: ModuleType, weights: list[Any], batch: WindowBatch) -> Any:
    """The total training loss Σₑ Lₑ as a 0-d array (forward only)."""
    return _forward(xp, weights, batch)[0]


def loss_and_grads(xp: ModuleType, weights: list[Any], batch: WindowBatch) -> tuple[Any, list[Any]]:
    """The total loss and its gradient w.r.t. each weight (`WEIGHT_NAMES` order)."""
    total, cache = _forward(xp, weights, batch)
    _, _, w_h, _, w_p, _, w_o, _ = weights
    out = cache.heads.out
    steps = batch.target.shape[0]
    count = steps * batch.target.shape[1]
    k = _positions(xp, batch.weight) / count
    inv_std = xp.exp(-out.log_std)
    z_score = (xp.reshape(batch.target, (count,)) - out.mean) * inv_std
    d_mean = -k * z_score * inv_std
    d_log_std = k * (1.0 - z_score * z_score)
    d_scale = (k * (2.0 * SCALE_WEIGHT) * xp.reshape(batch.scale_mask, (count,))
               * (out.scale - xp.reshape(batch.scale_target, (count,))))
    k_kl = (KL_WEIGHT * k)[..., None]
    d_mu = k_kl * out.mu
    d_log_sigma_z = k_kl * (out.sigma_z * out.sigma_z - 1.0)
    d_states, head_grads = _heads.backward(xp, cache.heads, w_p, w_o, d_mean, d_log_std, d_scale, d_mu,
                                           d_log_sigma_z)
    d_a, d_w_h, d_b_n = _gru.backward(xp, _gru.members_to_time_major(xp, d_states, steps), cache.gru, w_h)
    d_a_all = _gru.time_major_to_members(xp, d_a)
    x_all = xp.reshape(batch.x, (count, batch.x.shape[-1]))
    d_w_x = xp.matrix_transpose(x_all) @ d_a_all
    d_b = xp.sum(d_a_all, axis=1, keepdims=True)
    return total, [d_w_x, d_b, d_w_h, d_b_n, *head_grads]


def flatten(xp: ModuleType, arrays: list[Any]) -> Any:
    """Per-member arrays (E, …) side by side as one (E, P) array, in `WEIGHT_NAMES` order."""
    return xp.concat([xp.reshape(a, (a.shape[0], -1)) for a in arrays], axis=1)


def unflatten(xp: ModuleType, flat: Any, shapes: list[tuple[int, ...]]) -> list[Any]:
    """The arrays of per-member ``shapes`` that `flatten` laid side by side in ``flat`` (views where possible)."""
    members, arrays, offset = flat.shape[0], [], 0
    for shape in shapes:
        size = math.prod(shape)
        arrays.append(xp.reshape(flat[:, offset:offset + size], (members, *shape)))
        offset += size
    return arrays
