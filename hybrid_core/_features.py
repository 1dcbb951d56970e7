"""The 64-slot feature vector that describes the run to the dynamics model.

Each slot is named and documented in `FEATURE_SLOTS`; `encode_features` fills them
from a `TrainingState` in one pass over small host-side histories. Every slot is
finite for any finite input (logs are floored, ratios guarded, values clipped to
±1e6), because the dynamics model trains on these numbers online.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from ._phase import Phase, PhaseState
from ._state import TrainingState

__all__ = ["FEATURE_DIM", "FEATURE_NAMES", "FEATURE_SLOTS", "LOG_LOSS_SLOT", "encode_features"]

_WINDOW = 32
_SHORT = 8
_LAGS = (2, 4, 8, 16, 32, 64)
_CLIP = 1e6

FEATURE_SLOTS: tuple[tuple[str, str], ...] = (
    ("loss", "loss of the last real step"),
    ("log_loss", "log of the last real-step loss"),
    ("loss_ema_fast", "EMA of the loss, α = 0.1"),
    ("loss_ema_slow", "EMA of the loss, α = 0.01"),
    ("log_ema_fast", "log of the fast loss EMA"),
    ("log_ema_slow", "log of the slow loss EMA"),
    ("ema_gap", "(fast EMA − slow EMA) / slow EMA: negative while the loss still falls"),
    ("loss_std_rel", "EMA standard deviation of the loss around its fast EMA, relative to it (batch noise)"),
    ("log_loss_var_window", "variance of log-loss over the last 32 real steps"),
    ("trend_window", "least-squares slope of log-loss per step over the last 32 real steps"),
    ("trend_short", "least-squares slope of log-loss per step over the last 8 real steps"),
    ("trend_long", "least-squares slope of log-loss per step over the whole history buffer"),
    ("loss_over_min", "loss / lowest loss seen"),
    ("log_loss_over_first", "log(loss / first loss): progress made so far"),
    ("window_min_ratio", "min loss of the last 32 real steps / fast EMA"),
    ("window_median_ratio", "median loss of the last 32 real steps / fast EMA"),
    ("window_max_ratio", "max loss of the last 32 real steps / fast EMA"),
    ("delta_last", "log-loss change over the last real step"),
    ("delta_ema", "EMA of the per-step log-loss change"),
    ("abs_delta_ema", "EMA of the absolute per-step log-loss change"),
    ("oscillation", "fraction of sign flips of the loss change over the last 32 real steps"),
    ("up_fraction", "fraction of the last 32 real steps whose loss rose"),
    ("lag2_change", "log-loss now − 2 real steps ago"),
    ("lag4_change", "log-loss now − 4 real steps ago"),
    ("lag8_change", "log-loss now − 8 real steps ago"),
    ("lag16_change", "log-loss now − 16 real steps ago"),
    ("lag32_change", "log-loss now − 32 real steps ago"),
    ("lag64_change", "log-loss now − 64 real steps ago"),
    ("grad_norm", "gradient L2 norm of the last measured real step"),
    ("log_grad_norm", "log of the gradient norm"),
    ("grad_norm_ema", "EMA of the gradient norm over measured steps"),
    ("grad_ratio_ema", "gradient norm / its EMA: > 1 on a spike"),
    ("grad_ratio_warmup", "gradient norm / mean gradient norm of WARMUP: explosion or vanishing"),
    ("grad_log_change_1", "log gradient norm now − 1 measurement ago"),
    ("grad_log_change_8", "log gradient norm now − 8 measurements ago"),
    ("log_grad_max", "log(1 + max |gradient entry|)"),
    ("grad_peakiness", "max |gradient entry| / RMS gradient entry"),
    ("update_norm", "L2 norm of the optimizer update of the last measured step"),
    ("log_update_norm", "log of the update norm"),
    ("update_norm_ema", "EMA of the update norm"),
    ("update_over_grad", "update norm / gradient norm: the effective step size"),
    ("cos_grad_update", "cosine between a measured step's gradient and its update (the previous step's update when "
                        "every step is read): −1 = the update descends along the gradient"),
    ("cos_ema", "EMA of that cosine: consistency of the descent direction"),
    ("lr", "current learning rate"),
    ("log_lr", "log of the learning rate"),
    ("lr_ratio", "learning rate / learning rate at the first step (schedules)"),
    ("phase_warmup", "1 in WARMUP"),
    ("phase_full", "1 in FULL"),
    ("phase_predict", "1 in PREDICT"),
    ("phase_correct", "1 in CORRECT"),
    ("log_steps_in_phase", "log(1 + steps done in the current phase)"),
    ("log_steps_since_correction", "log(1 + steps since the last CORRECT phase ended)"),
    ("log_total_steps", "log(1 + all steps so far)"),
    ("predicted_fraction", "predicted steps / all steps so far"),
    ("pred_err_last", "|log actual − log predicted| of the last compared step"),
    ("pred_err_ema", "EMA of that prediction error"),
    ("last_horizon_frac", "horizon of the last PREDICT phase / max_predict_steps"),
    ("last_check", "1 if the last forward check passed, 0 if it failed, 0.5 before any"),
    ("nonfinite_ema", "EMA of skipped NaN/Inf batches"),
    ("history_fill", "fraction of the loss history buffer filled"),
    ("warmup_done", "1 once WARMUP has ended"),
    ("log10_param_count", "log10 of the number of parameters (model size)"),
    ("log_steps_since_min", "log(1 + real steps since the lowest loss): plateau length"),
    ("bias", "constant 1: lets linear read-outs learn an offset"),
)
"""(name, meaning) of each slot, in order."""

FEATURE_NAMES: tuple[str, ...] = tuple(name for name, _ in FEATURE_SLOTS)
"""Slot names in order."""

FEATURE_DIM = len(FEATURE_SLOTS)
"""Length of the feature vector (64)."""

LOG_LOSS_SLOT = FEATURE_NAMES.index("log_loss")
"""Index of log(loss), which rollouts of dynamics models feed back."""

_PHASES = (Phase.WARMUP, Phase.FULL, Phase.PREDICT, Phase.CORRECT)


def encode_features(state: TrainingState, phase: PhaseState, max_predict_steps: int) -> np.ndarray:
    """The feature vector (float64, length `FEATURE_DIM`) of ``state`` in ``phase``."""
    with np.errstate(all="ignore"):  # overflow on absurd inputs is clipped below, not an error
        return _encode(state, phase, max_predict_steps)


def _encode(state: TrainingState, phase: PhaseState, max_predict_steps: int) -> np.ndarray:
    # Windows are a few dozen floats: plain Python beats NumPy's per-call overhead here,
    # and this runs on every real step.
    recent = state.losses.last(_LAGS[-1] + 1).tolist()
    has = bool(recent)
    loss = recent[-1] if has else 0.0
    logs = [math.log(max(v, 1e-30)) for v in recent]
    log_loss = logs[-1] if has else 0.0
    win = recent[-_WINDOW:]
    wlog = logs[-_WINDOW:]
    ema_fast = _finite(state.loss_ema_fast)
    ema_slow = _finite(state.loss_ema_slow)
    steps = max(state.step, 1)
    diffs = [b - a for a, b in itertools.pairwise(win)]
    signs = [d > 0 for d in diffs if d != 0]
    grads = state.grad_norms
    gnorm = state.grad_norm
    n = len(recent)

    values = [
        loss,
        log_loss,
        ema_fast,
        ema_slow,
        _log(ema_fast),
        _log(ema_slow),
        _ratio(ema_fast - ema_slow, ema_slow),
        _ratio(math.sqrt(max(state.loss_var_ema, 0.0)), ema_fast),
        _variance(wlog),
        _slope(wlog),
        _slope(logs[-_SHORT:]),
        _long_slope(state),
        _ratio(loss, state.min_loss) if math.isfinite(state.min_loss) else 1.0,
        log_loss - _log(state.first_loss) if math.isfinite(state.first_loss) else 0.0,
        _ratio(min(win), ema_fast) if has else 1.0,
        _ratio(sorted(win)[len(win) // 2], ema_fast) if has else 1.0,
        _ratio(max(win), ema_fast) if has else 1.0,
        logs[-1] - logs[-2] if n > 1 else 0.0,
        state.delta_ema,
        state.abs_delta_ema,
        sum(a != b for a, b in itertools.pairwise(signs)) / (len(signs) - 1) if len(signs) > 1 else 0.0,
        sum(d > 0 for d in diffs) / len(diffs) if diffs else 0.0,
        *(logs[-1] - logs[-1 - lag] if n > lag else 0.0 for lag in _LAGS),
        gnorm,
        _log(gnorm),
        _finite(state.grad_norm_ema),
        _ratio(gnorm, state.grad_norm_ema),
        _ratio(gnorm, state.warmup_grad_norm),
        _log(gnorm) - _log(grads.get(1)) if len(grads) > 1 else 0.0,
        _log(gnorm) - _log(grads.get(8)) if len(grads) > 8 else 0.0,
        math.log1p(max(state.grad_max, 0.0)),
        _ratio(state.grad_max, state.grad_rms),
        state.update_norm,
        _log(state.update_norm),
        state.update_norm_ema,
        _ratio(state.update_norm, gnorm),
        state.cos_grad_update,
        state.cos_ema,
        state.lr,
        _log(state.lr),
        _ratio(state.lr, state.initial_lr),
        *(1.0 if phase.phase is p else 0.0 for p in _PHASES),
        math.log1p(phase.steps_in_phase),
        math.log1p(state.steps_since_correction),
        math.log1p(state.step),
        state.predicted_steps / steps,
        state.pred_err_last,
        state.pred_err_ema,
        state.last_horizon / max(max_predict_steps, 1),
        state.last_check,
        state.nonfinite_ema,
        len(state.losses) / state.losses.capacity,
        1.0 if state.warmup_done else 0.0,
        math.log10(max(state.param_count, 1)),
        math.log1p(state.steps_since_min),
        1.0,
    ]
    return np.array([_clip(v) for v in values], dtype=np.float64)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def _log(x: float) -> float:
    return math.log(x) if math.isfinite(x) and x > 1e-30 else math.log(1e-30)


def _ratio(num: float, den: float) -> float:
    if not (math.isfinite(num) and math.isfinite(den)) or abs(den) < 1e-30:
        return 1.0 if num == den else 0.0
    return num / den


def _clip(v: float) -> float:
    if v != v:  # NaN
        return 0.0
    return _CLIP if v > _CLIP else -_CLIP if v < -_CLIP else float(v)


def _variance(y: list[float]) -> float:
    n = len(y)
    if n < 2:
        return 0.0
    mean = sum(y) / n
    return sum((v - mean) * (v - mean) for v in y) / n


def _slope(y: list[float]) -> float:
    n = len(y)
    if n < 2:
        return 0.0
    centre = (n - 1) / 2.0
    mean = sum(y) / n
    num = sum((i - centre) * (v - mean) for i, v in enumerate(y))
    return num / (n * (n * n - 1) / 12.0)


def _long_slope(state: TrainingState) -> float:
    y = np.log(np.maximum(state.losses.last(), 1e-30))
    n = y.size
    if n < 2:
        return 0.0
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    return float(np.dot(x, y - y.mean()) / np.dot(x, x))

CONTEXT_NAMES = ("bias", "confidence", "trend_window", "loss_std_rel", "pred_err_ema")
"""Slots of the compact context the horizon bandit and the residual corrector read.

Few on purpose: every slot is a weight each bandit arm must learn from a handful of
rewards, so only the readings that say whether prediction can pay are kept."""

_TREND = FEATURE_NAMES.index("trend_window")
_NOISE = FEATURE_NAMES.index("loss_std_rel")
_PRED_ERR = FEATURE_NAMES.index("pred_err_ema")


def compact_context(features: np.ndarray, confidence: float) -> np.ndarray:
    """A summary of ``features`` (see `CONTEXT_NAMES`) on comparable scales, each clipped to [-5, 5]."""
    trend = features[_TREND] * 100.0  # log-loss change per 100 steps
    values = np.array([1.0, confidence, trend, features[_NOISE], features[_PRED_ERR]], dtype=np.float64)
    np.nan_to_num(values, copy=False, nan=0.0, posinf=5.0, neginf=-5.0)
    return np.clip(values, -5.0, 5.0, out=values)
