"""The ensemble network's weights and its training objective over one window, with hand-written gradients.

Weights come in the fixed order of `WEIGHT_NAMES`, each with the ensemble as a
leading axis E (biases are (E, 1, k) so every array is 3-D). On a window of T
steps from a given GRU state h0, member e minimises

    Lₑ = (1/T)·Σₜ wₑₜ·[ ½((yₜ − mₜ)/σₜ)² + log σₜ            (Gaussian NLL of the target)
                       + κ·maskₜ·(sₜ − s*ₜ)²                  (step scale, observed targets only)
                       + β·Σⱼ KL(N(μₜⱼ, σ_zₜⱼ²) ‖ N(0, 1)) ]  (keeps the latent a calibrated noise source)

with wₑₜ the member's bootstrap weight of that observation; the total is Σₑ Lₑ,
so each member's gradient is its own. h0 is a constant (truncated BPTT).
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
    "initial_weights",
    "loss",
    "loss_and_grads",
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
    """One training window; h0 is (E, 1, H), x (T, D), the targets and mask (T,), w (E, T), ε (E, T, Z)."""

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


def _forward(xp: ModuleType, weights: list[Any], batch: WindowBatch) -> tuple[Any, _Cache]:
    """The total loss (0-d) and the cache."""
    w_x, b, w_h, b_n, w_p, b_p, w_o, b_o = weights
    a = xp.matmul(batch.x, w_x) + b
    states, gru_cache = _gru.forward(xp, a, batch.h0, w_h, b_n)
    heads = _heads.forward(xp, states, batch.eps, w_p, b_p, w_o, b_o)
    out = heads.out
    z_score = (batch.target - out.mean) * xp.exp(-out.log_std)
    kl = xp.sum(0.5 * (out.mu * out.mu + out.sigma_z * out.sigma_z - 1.0) - out.log_sigma_z, axis=-1)
    diff = out.scale - batch.scale_target
    per_position = batch.weight * (0.5 * z_score * z_score + out.log_std
                                   + SCALE_WEIGHT * batch.scale_mask * diff * diff + KL_WEIGHT * kl)
    total = xp.sum(per_position) / per_position.shape[1]
    return total, _Cache(gru_cache, heads)


def loss(xp: ModuleType, weights: list[Any], batch: WindowBatch) -> Any:
    """The total training loss Σₑ Lₑ as a 0-d array (forward only)."""
    return _forward(xp, weights, batch)[0]


def loss_and_grads(xp: ModuleType, weights: list[Any], batch: WindowBatch) -> tuple[Any, list[Any], Any]:
    """The total loss, its gradient w.r.t. each weight (`WEIGHT_NAMES` order), the GRU states (E, T, H)."""
    total, cache = _forward(xp, weights, batch)
    _, _, w_h, _, w_p, _, w_o, _ = weights
    out = cache.heads.out
    k = batch.weight / batch.weight.shape[1]
    inv_std = xp.exp(-out.log_std)
    z_score = (batch.target - out.mean) * inv_std
    d_mean = -k * z_score * inv_std
    d_log_std = k * (1.0 - z_score * z_score)
    d_scale = k * (2.0 * SCALE_WEIGHT) * batch.scale_mask * (out.scale - batch.scale_target)
    k_kl = (KL_WEIGHT * k)[..., None]
    d_mu = k_kl * out.mu
    d_log_sigma_z = k_kl * (out.sigma_z * out.sigma_z - 1.0)
    d_states, head_grads = _heads.backward(xp, cache.heads, w_p, w_o, d_mean, d_log_std, d_scale, d_mu,
                                           d_log_sigma_z)
    d_a, d_w_h, d_b_n = _gru.backward(xp, d_states, cache.gru, w_h)
    d_w_x = xp.matmul(xp.matrix_transpose(batch.x), d_a)
    d_b = xp.sum(d_a, axis=1, keepdims=True)
    return total, [d_w_x, d_b, d_w_h, d_b_n, *head_grads], cache.heads.states

