"""`evaluate_dynamics`: replay a recorded trajectory through any `DynamicsModel` and score its forecasts."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._errors import ConfigError
from .._protocols import DynamicsModel, Outcome

__all__ = ["evaluate_dynamics"]


def evaluate_dynamics(
    make_dynamics: Callable[[], DynamicsModel],
    features: np.ndarray,
    losses: np.ndarray,
    horizons: Sequence[int] = (1, 10, 50),
    warmup: int = 100,
    *,
    every: int = 5,
) -> dict[str, Any]:
    """Observe every step of a trajectory online and, every ``every`` steps after ``warmup``, score forecasts.

    ``features[t]`` is the feature vector taken before step t and ``losses[t]`` the loss
    measured at step t. After observing steps 0..t the model predicts from
    ``features[t + 1]``; its ``loss[h − 1]`` is compared with ``losses[t + h]`` for each
    horizon h that still fits in the trajectory. Per horizon the result holds ``r2``
    (1 − SSE / spread of the realised losses around their mean), ``skill`` (1 − SSE / SSE
    of repeating the last observed loss), ``coverage`` of the [lower, upper] band and the
    ``count`` of scored forecasts (NaN scores where undefined); ``observe_ms`` and
    ``predict_ms`` are mean wall-clock costs per call, ``predictions`` the number of calls.
    """
    feats = np.asarray(features, dtype=np.float64)
    target = np.asarray(losses, dtype=np.float64)
    hs = tuple(horizons)
    problems = _problems(feats, target, hs, warmup, every)
    if problems:
        raise ConfigError(problems, "Pass features (T, D), losses (T,) and the listed arguments in range.")
    dynamics = make_dynamics()
    steps, longest = len(target), max(hs)
    scored: dict[int, list[tuple[float, float, float, float, float]]] = {h: [] for h in hs}
    observe_s = predict_s = 0.0
    predictions = 0
    for t in range(steps):
        start = time.perf_counter()
        dynamics.observe(feats[t], Outcome(float(target[t])))
        observe_s += time.perf_counter() - start
        if t + 1 < warmup or (t + 1 - warmup) % every or t + 1 >= steps:
            continue
        horizon = min(longest, steps - 1 - t)
        start = time.perf_counter()
        pred = dynamics.predict(feats[t + 1], horizon)
        predict_s += time.perf_counter() - start
        predictions += 1
        for h in hs:
            if h <= horizon:
                k = h - 1
                scored[h].append((target[t + h], pred.loss[k], pred.lower[k], pred.upper[k], target[t]))
    result: dict[str, Any] = {"r2": {}, "skill": {}, "coverage": {}, "count": {}}
    for h, rows in scored.items():
        table = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
        actual, predicted, lower, upper, last = table.T
        sse = float(np.sum((actual - predicted) ** 2))
        result["r2"][h] = _one_minus_ratio(sse, float(np.sum((actual - actual.mean()) ** 2)) if rows else 0.0)
        result["skill"][h] = _one_minus_ratio(sse, float(np.sum((actual - last) ** 2)))
        result["coverage"][h] = float(np.mean((lower <= actual) & (actual <= upper))) if rows else math.nan
        result["count"][h] = len(rows)
    result["observe_ms"] = 1e3 * observe_s / steps
    result["predict_ms"] = 1e3 * predict_s / predictions if predictions else math.nan
    result["predictions"] = predictions
    return result


def _one_minus_ratio(error: float, reference: float) -> float:
    return 1.0 - error / reference if reference > 0.0 else math.nan


def _problems(feats: np.ndarray, target: np.ndarray, horizons: tuple[Any, ...], warmup: Any,
              every: Any) -> list[str]:
    problems = []
    if target.ndim != 1 or len(target) < 2 or not np.all(np.isfinite(target)):
        problems.append(f"losses: shape {target.shape}; must be a finite 1-D array of at least 2 losses")
    if feats.ndim != 2 or len(feats) != len(target):
        problems.append(f"features: shape {feats.shape}; must be (T, D) with T = len(losses)")
    if not horizons or not all(_is_int(h) and h >= 1 for h in horizons):
        problems.append(f"horizons={horizons!r}: must be a non-empty sequence of integers >= 1")
    if not _is_int(warmup) or not 1 <= warmup < max(len(target), 2):
        problems.append(f"warmup={warmup!r}: must be an integer in [1, T)")
    if not _is_int(every) or every < 1:
        problems.append(f"every={every!r}: must be an integer >= 1")
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
