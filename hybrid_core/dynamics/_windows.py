"""The training batch of `RSSMDynamics`: windows ending at its newest observations, fed as rollouts are.

The windows, each of ``length`` rows, are stacked time-major into one
`_network.WindowBatch`, so a single Adam step on all of them costs about what a
step on one window costs plus the wider arithmetic: the array operations are the
same, only wider.

A window is fed the way `predict` feeds the future: after a random row j (any but
the last) every input is blank but for the real log-loss slot, the staleness and
the Holt inputs, and the targets of rows i > j are the residuals of Holt's
(i − j + 1)-step forecast from the state before row j. (Feeding only half the
windows this way learnt long rollouts slower: 50-step log errors about twice as
large over steps 300–700 of a noisy power law.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from . import _network, _rollout
from ._normalizer import RunningNormalizer

__all__ = ["DELTA_BOUND", "LOG_BOUND", "Rows", "slot_log_loss", "window_batch"]

LOG_BOUND = 700.0
"""|log-loss| fed to exp(), so every returned loss is finite."""

DELTA_BOUND = 50.0
"""|residual of Holt's log-loss forecast| in raw units."""

_TARGET_BOUND = 10.0  # |residual| target in running-RMS units: one spike cannot dominate a window


class Rows(NamedTuple):
    """The stored observations, oldest first: raw features (n, D), log-loss, Holt's level and trend before
    each row, step-scale target and mask (n,), bootstrap weights (n, E)."""

    features: np.ndarray
    log_loss: np.ndarray
    level: np.ndarray
    trend: np.ndarray
    scale_target: np.ndarray
    scale_mask: np.ndarray
    weight: np.ndarray


def slot_log_loss(raw: np.ndarray, slot: int) -> np.ndarray:
    """The raw log-loss slot of feature rows, bounded as the losses are."""
    return np.clip(raw[..., slot], -LOG_BOUND, LOG_BOUND)


def window_batch(
    xp: ModuleType,
    to_xp: Callable[[np.ndarray], Any],
    rows: Rows,
    h_before: Sequence[Any],
    ends: Sequence[int],
    length: int,
    *,
    features: RunningNormalizer,
    target_scale: float,
    slot: int,
    stale_cap: int,
    latent: int,
    rng: np.random.Generator,
) -> _network.WindowBatch:
    """The windows of ``length`` rows that end at the rows ``ends`` (indices, each >= ``length`` − 1).

    ``h_before[i]`` is the carried GRU state (E, 1, H) before row i, the constant start
    of a window beginning there. Draws each window's last real row, then the latent
    noise, from ``rng``.
    """
    count = len(ends)
    starts = np.asarray(ends, dtype=np.int64) - (length - 1)
    position = np.arange(length)[:, None]
    index = starts[None, :] + position  # (T, B) row of step t of window b
    last_real = rng.integers(0, length - 1, count) if length >= 2 else np.zeros(count, dtype=np.int64)
    real = position <= last_real[None, :]
    normalized = features.normalize(rows.features)[index]  # (T, B, D)
    blank = np.zeros_like(normalized)
    blank[..., slot] = normalized[..., slot]
    inputs = np.where(real[..., None], normalized, blank)
    stale = np.where(real, 0.0, np.minimum(position - last_real, stale_cap) / max(stale_cap, 1))
    origin = starts[None, :] + np.minimum(position, last_real[None, :])
    trend = rows.trend[origin]
    forecast = rows.level[origin] + (index - origin + 1) * trend
    extra = _rollout.holt_inputs(stale, trend, forecast - slot_log_loss(rows.features[index], slot),
                                 target_scale, features.bound)
    residual = np.clip(rows.log_loss[index] - forecast, -DELTA_BOUND, DELTA_BOUND)
    target = np.clip(residual / target_scale, -_TARGET_BOUND, _TARGET_BOUND)
    members = rows.weight.shape[1]
    eps = rng.standard_normal((members, length, count, latent))
    return _network.WindowBatch(
        h0=xp.concat([h_before[s] for s in starts.tolist()], axis=1),
        x=to_xp(np.concatenate([inputs, extra], axis=-1)),
        target=to_xp(target),
        scale_target=to_xp(rows.scale_target[index]),
        scale_mask=to_xp(rows.scale_mask[index]),
        weight=to_xp(np.transpose(rows.weight[index], (2, 0, 1))),
        eps=to_xp(eps),
    )
