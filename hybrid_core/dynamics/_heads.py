"""The heads on the GRU state h: the Gaussian latent prior and the loss / step-scale outputs.

With ``E`` members, ``B`` positions (window steps or rollout samples), hidden
size H and latent size Z:

- prior: [μ, ρ] = h·Wp + bp, log σ_z = 2·tanh(ρ/2) (σ_z in (e⁻², e²)), and the
  latent z = μ + σ_z·ε by the reparameterisation trick (ε ~ N(0, 1) given);
- outputs: o = [h, z]·Wo + bo, read as the target mean m = o₀ (the residual of
  Holt's log-loss forecast, in units of the running target scale), its log-std ℓ = L·tanh(o₁/L) with L =
  `LOG_STD_BOUND`, and the step scale s = 2·σ(o₂) in (0, 2).

The tanh bounds keep exp(·) finite for any weights without clipping gradients away.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

from ._gru import sigmoid

__all__ = [
    "LOG_STD_BOUND",
    "Folded",
    "HeadCache",
    "HeadOutputs",
    "backward",
    "fold",
    "folded_mean_head",
    "forward",
    "log_std",
    "mean_head",
    "sample",
    "step_scale",
]

LOG_STD_BOUND = 4.0
"""|log-std| of the target head, in units of the running target scale, stays below this."""


class HeadOutputs(NamedTuple):
    """Per-position outputs, each (E, B) except the latent statistics (E, B, Z)."""

    mean: Any
    log_std: Any
    scale: Any
    mu: Any
    log_sigma_z: Any
    sigma_z: Any


class HeadCache(NamedTuple):
    """What `backward` needs from `forward`."""

    states: Any
    joint: Any
    eps: Any
    tanh_rho: Any
    tanh_std: Any
    out: HeadOutputs


def forward(xp: ModuleType, states: Any, eps: Any, w_p: Any, b_p: Any, w_o: Any, b_o: Any) -> HeadCache:
    """Both heads on ``states`` (E, B, H) with latent noise ``eps`` (E, B, Z)."""
    latent = eps.shape[-1]
    p = states @ w_p + b_p
    mu = p[..., :latent]
    tanh_rho = xp.tanh(0.5 * p[..., latent:])
    log_sigma_z = 2.0 * tanh_rho
    sigma_z = xp.exp(log_sigma_z)
    joint = xp.concat([states, mu + sigma_z * eps], axis=-1)
    o = joint @ w_o + b_o
    tanh_std = xp.tanh(o[..., 1] / LOG_STD_BOUND)
    out = HeadOutputs(o[..., 0], LOG_STD_BOUND * tanh_std, step_scale(xp, o), mu, log_sigma_z, sigma_z)
    return HeadCache(states, joint, eps, tanh_rho, tanh_std, out)


def log_std(xp: ModuleType, o: Any) -> Any:
    """The target log-std read from raw outputs ``o`` (…, 3)."""
    return LOG_STD_BOUND * xp.tanh(o[..., 1] / LOG_STD_BOUND)


def step_scale(xp: ModuleType, o: Any) -> Any:
    """The step scale in (0, 2) read from raw outputs ``o`` (…, 3)."""
    return 2.0 * sigmoid(xp, o[..., 2])


class Folded(NamedTuple):
    """The heads with z = μ + σ_z·ε substituted: [ρ, o − (σ_z·ε)·Wo_z] = h·w + c, for cheap rollouts."""

    w: Any
    c: Any
    w_z: Any


def fold(xp: ModuleType, w_p: Any, b_p: Any, w_o: Any, b_o: Any) -> Folded:
    """Fold the prior mean into the output head: o = h·(Wo_h + Wp_μ·Wo_z) + bo + bp_μ·Wo_z + (σ_z·ε)·Wo_z."""
    hidden, latent = w_p.shape[1], w_p.shape[2] // 2
    w_z = w_o[:, hidden:, :]
    w = xp.concat([w_p[..., latent:], w_o[:, :hidden, :] + w_p[..., :latent] @ w_z], axis=-1)
    c = xp.concat([b_p[..., latent:], b_o + b_p[..., :latent] @ w_z], axis=-1)
    return Folded(w, c, w_z)


def sample(xp: ModuleType, folded: Folded, h: Any, eps: Any) -> Any:
    """Raw outputs o (E, B, 3) on states ``h`` (E, B, H) for latent noise ``eps`` (E, B, Z); as `forward`."""
    latent = eps.shape[-1]
    q = h @ folded.w + folded.c
    sigma_z = xp.exp(2.0 * xp.tanh(0.5 * q[..., :latent]))
    return q[..., latent:] + (sigma_z * eps) @ folded.w_z


def backward(
    xp: ModuleType,
    cache: HeadCache,
    w_p: Any,
    w_o: Any,
    d_mean: Any,
    d_log_std: Any,
    d_scale: Any,
    d_mu: Any,
    d_log_sigma_z: Any,
) -> tuple[Any, list[Any]]:
    """∂L/∂states and [∂L/∂Wp, ∂L/∂bp, ∂L/∂Wo, ∂L/∂bo] from the loss's direct output gradients.

    ``d_mean``, ``d_log_std``, ``d_scale`` are (E, B); ``d_mu`` and ``d_log_sigma_z`` (E, B, Z) are the
    loss's direct dependence on the latent statistics (the KL term), added to what flows back through z.
    """
    hidden = cache.states.shape[-1]
    s = cache.out.scale
    d_o1 = d_log_std * (1.0 - cache.tanh_std * cache.tanh_std)
    d_o = xp.stack([d_mean, d_o1, d_scale * s * (1.0 - 0.5 * s)], axis=-1)
    d_w_o = xp.matrix_transpose(cache.joint) @ d_o
    d_b_o = xp.sum(d_o, axis=1, keepdims=True)
    d_joint = d_o @ xp.matrix_transpose(w_o)
    d_z = d_joint[..., hidden:]
    d_mu = d_mu + d_z
    d_log_sigma_z = d_log_sigma_z + d_z * cache.out.sigma_z * cache.eps
    d_p = xp.concat([d_mu, d_log_sigma_z * (1.0 - cache.tanh_rho * cache.tanh_rho)], axis=-1)
    d_w_p = xp.matrix_transpose(cache.states) @ d_p
    d_b_p = xp.sum(d_p, axis=1, keepdims=True)
    d_states = d_joint[..., :hidden] + d_p @ xp.matrix_transpose(w_p)
    return d_states, [d_w_p, d_b_p, d_w_o, d_b_o]


def mean_head(xp: ModuleType, w_p: Any, b_p: Any, w_o: Any, b_o: Any) -> tuple[Any, Any]:
    """(w, c) with m = h·w + c the target mean at z = μ: the heads are linear in z, so this is E_z[m]."""
    return folded_mean_head(fold(xp, w_p, b_p, w_o, b_o))


def folded_mean_head(folded: Folded) -> tuple[Any, Any]:
    """`mean_head` read from heads already folded: the mean output's column of ``folded``."""
    latent = folded.w_z.shape[1]
    return folded.w[..., latent:latent + 1], folded.c[..., latent:latent + 1]
