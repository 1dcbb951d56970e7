"""Multi-step rollout of the ensemble with sampled latents, and quantiles across the samples.

Step k's log-loss is Holt's k-step forecast ℓ + k·b plus the heads' residual: the
network corrects Holt's forecast directly at each horizon, so its errors do not
add up along the rollout.

Future features are unknown. After the GRU has run over the real features (the
caller passes the state after the observed rows and the current row), every later
input is blank (all slots at their running mean, i.e. 0 once standardised) except
the log-loss slot, into which each sample feeds back its own predicted log-loss
(standardised with the frozen running statistics), the staleness input, which
counts the steps since the features were real, and the Holt inputs: the last real
trend and the gap between Holt's forecast and the fed-back log-loss. The GRU state
carries what the real features said; the model is trained on windows fed the same
way (see `RSSMDynamics`), so a rollout is in its training distribution.
(Repeating the last real features instead made the model re-apply its correction
of the last loss's noise at every step: a 10-step log error of about 14% RMS after
300 steps on a noisy power law, against 3% this way.)
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from . import _gru, _heads

__all__ = ["EXTRA_INPUTS", "Feedback", "Holt", "Net", "Rollout", "holt_inputs", "mean_rollout", "prepare", "quantile",
           "rollout", "staleness", "warm_up"]


class Feedback(NamedTuple):
    """The fed-back input: log-loss slot index, its running mean and std, clip bound; staleness cap."""

    index: int
    mean: float
    std: float
    bound: float
    stale_cap: int


class Holt(NamedTuple):
    """Holt's smoothed log-loss level and per-step trend after the last observed loss."""

    level: float
    trend: float


EXTRA_INPUTS = 3
"""Inputs after the feature slots: staleness, Holt's trend and the gap between Holt's forecast and the last loss."""

TREND_HORIZON = 10.0
"""Holt's trend is fed as its change over this many steps, in running target-scale units."""


def holt_inputs(stale: np.ndarray, trend: np.ndarray, gap: np.ndarray, scale: float, bound: float) -> np.ndarray:
    """The extra input columns (…, 3) for staleness, Holt's raw trend and raw gap, standardised and clipped (host)."""
    trend_in = np.minimum(np.maximum(TREND_HORIZON * trend / scale, -bound), bound)
    gap_in = np.minimum(np.maximum(gap / scale, -bound), bound)
    return np.stack([stale, trend_in, gap_in], axis=-1)


class Net(NamedTuple):
    """The weights (`_network.WEIGHT_NAMES` order) and what rollouts derive from them, computed once per update."""

    weights: list[Any]
    folded: _heads.Folded
    w_mean: Any
    b_mean: Any


def prepare(xp: ModuleType, weights: list[Any]) -> Net:
    """The weights with their folded heads and mean head (see `_heads.fold`, `_heads.mean_head`)."""
    folded = _heads.fold(xp, *weights[4:])
    return Net(weights, folded, *_heads.folded_mean_head(folded))


class Rollout(NamedTuple):
    """Per step k, member e, sample s (each (K, E, S)): trend log-loss, its one-step noise std, step scale."""

    log_loss: Any
    noise_std: Any
    step_scale: Any


def rollout(
    xp: ModuleType,
    net: Net,
    h0: Any,
    x: Any,
    holt: Holt,
    feedback: Feedback,
    target_scale: float,
    noise: Any,
) -> Rollout:
    """Roll K = noise.shape[0] steps ahead after running the GRU from ``h0`` (E, 1, H) over ``x`` (T, D + 3).

    ``holt`` is the Holt state after the last observed loss and ``noise`` (K, E, S, Z) the latent
    draws. Step k's log-loss is Holt's k-step forecast plus m·target_scale from the heads on the state
    after k inputs: the network predicts the residual of Holt's forecast, not a step to be summed.
    """
    advance = _feeder(xp, net.weights, feedback, holt, target_scale)
    steps, members, samples = noise.shape[0], noise.shape[1], noise.shape[2]
    h = warm_up(xp, net.weights, h0, x)
    h = xp.broadcast_to(h, (members, samples, h.shape[-1]))
    trend, raw = [], []
    for k in range(steps):
        o = _heads.sample(xp, net.folded, h, noise[k, ...])
        log_loss = (holt.level + (k + 1) * holt.trend) + target_scale * o[..., 0]
        trend.append(log_loss)
        raw.append(o)
        if k + 1 < steps:
            h = advance(h, log_loss, k + 1)
    # The noise and step-scale read-outs do not feed back: one call each for all steps.
    raw_all = xp.stack(raw)
    return Rollout(xp.stack(trend), target_scale * xp.exp(_heads.log_std(xp, raw_all)),
                   _heads.step_scale(xp, raw_all))


def mean_rollout(
    xp: ModuleType,
    net: Net,
    h0: Any,
    x: Any,
    holt: Holt,
    feedback: Feedback,
    target_scale: float,
    steps: int,
) -> Any:
    """The trend log-loss (K, E) of `rollout` with every latent at its prior mean, far cheaper."""
    advance = _feeder(xp, net.weights, feedback, holt, target_scale)
    h = warm_up(xp, net.weights, h0, x)
    trend = []
    for k in range(steps):
        log_loss = (holt.level + (k + 1) * holt.trend) + target_scale * (h @ net.w_mean + net.b_mean)[..., 0]
        trend.append(log_loss)
        if k + 1 < steps:
            h = advance(h, log_loss, k + 1)
    return xp.concat(trend, axis=1).T


def warm_up(xp: ModuleType, weights: list[Any], h0: Any, x: Any) -> Any:
    """The GRU state (E, 1, H) after the real inputs ``x``."""
    w_x, b, w_h, b_n = weights[:4]
    a = x @ w_x + b
    h = h0
    for t in range(a.shape[1]):
        h = _gru.step(xp, a[:, t:t + 1, :], h, w_h, b_n)[0]
    return h


def _feeder(xp: ModuleType, weights: list[Any], feedback: Feedback, holt: Holt,
            target_scale: float) -> Callable[[Any, Any, int], Any]:
    """advance(h, log_loss, k): one GRU step on a blank input carrying ``log_loss`` (E, B), k steps stale.

    The Holt inputs of a blank step: the trend of the last real step, and the gap between Holt's
    forecast of the step being predicted and the fed-back log-loss.
    """
    w_x, b, w_h, b_n = weights[:4]
    dim = w_x.shape[1] - EXTRA_INPUTS
    w_slot = w_x[:, feedback.index:feedback.index + 1, :]
    w_stale, w_trend, w_gap = (w_x[:, dim + i:dim + i + 1, :] for i in range(EXTRA_INPUTS))
    # Clamping against 0-d arrays: the portable clip is a slow Python wrapper on NumPy.
    high = xp.asarray(feedback.bound, dtype=w_x.dtype, device=array_api_compat.device(w_x))
    low = -high
    trend_in = min(max(TREND_HORIZON * holt.trend / target_scale, -feedback.bound), feedback.bound)
    base = b + trend_in * w_trend

    def advance(h: Any, log_loss: Any, stale_steps: int) -> Any:
        fed_back = xp.minimum(xp.maximum((log_loss - feedback.mean) / feedback.std, low), high)
        ref = holt.level + (stale_steps + 1) * holt.trend
        gap = xp.minimum(xp.maximum((ref - log_loss) / target_scale, low), high)
        a = (base + fed_back[..., None] * w_slot + gap[..., None] * w_gap
             + staleness(stale_steps, feedback.stale_cap) * w_stale)
        return _gru.step(xp, a, h, w_h, b_n)[0]

    return advance


def staleness(steps: int, cap: int) -> float:
    """The staleness input for features ``steps`` steps old: min(steps, cap) / cap, in [0, 1]."""
    return min(steps, cap) / max(cap, 1)


def quantile(xp: ModuleType, values: Any, q: float) -> Any:
    """The ``q``-quantile along the last axis with linear interpolation (NumPy's default method)."""
    ordered = xp.sort(values, axis=-1)
    position = (values.shape[-1] - 1) * q
    below = int(position)
    above = min(below + 1, values.shape[-1] - 1)
    frac = position - below
    return ordered[..., below] + frac * (ordered[..., above] - ordered[..., below])

