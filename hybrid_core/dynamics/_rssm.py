"""`RSSMDynamics`: a small recurrent state-space ensemble that learns the loss trajectory online.

The model forecasts the residual of Holt's linear-trend smoothing of log-loss (the
forecast of `TrendDynamics`, carried inside the model with the same rates): the
log-loss k steps ahead is ℓ + k·b plus a learnt correction. The network sees Holt's
trend and the gap between Holt's forecast and the last loss as inputs, and the
members' mean correction is shrunk by their disagreement (`predict`), so where the
network has nothing reliable to add the forecast falls back to Holt's.

Each of E members is a GRU (the deterministic path) over the stream of feature
vectors, a Gaussian latent z drawn from a prior head on the GRU state, and heads
on [h, z] for the residual (mean and log-std) and the step scale. The latent is
"lite": it has no posterior and does not feed back into the GRU; it is learned
noise injection, kept near N(0, 1) by a KL term, whose samples spread the
rollouts. Members differ by initialisation and by Poisson(1) bootstrap weights
drawn once per observation, so their disagreement measures what the data has
not pinned down. The members are batched along a leading axis: one array op
serves all of them.

Every ``train_every``-th `observe` takes one Adam step (each member's gradient
clipped to global norm ``clip``) on the Gaussian NLL of the last ``window``
residual targets, by truncated BPTT with hand-written gradients (`_network`):
the GRU state before the window is carried over from earlier steps as a
constant (moved on by one GRU step when an observe does not train), and the
window's tail is fed the way a rollout feeds the unknown future (`_rollout`).
Features are standardised online per slot and the targets by their running RMS
(`_normalizer`, host-side), since slot magnitudes differ by orders of magnitude.
"""

from __future__ import annotations

import copy
import math
from types import ModuleType
from typing import Any, final

import numpy as np

from .._backend import as_namespace, from_numpy, to_numpy
from .._errors import CheckpointError, ConfigError
from .._protocols import Outcome, Prediction
from . import _checks, _heads, _network, _rollout
from ._accuracy import AccuracyTracker
from ._adam import Adam
from ._normalizer import RunningNormalizer, RunningScale

__all__ = ["RSSMDynamics"]

_MIN_OBSERVATIONS = 20  # below this the error averages mean little: confidence stays 0
_LOOKAHEAD = 10  # horizon of the forecasts behind confidence (see _accuracy), one made every this many steps
_SPAN = 5  # a forecast is scored on the mean of its last this many steps
_STEP_RATE = 0.05  # EMA rate of the squared one-step error (≈ the last 20 steps)
_FORECAST_RATE = 0.2  # EMA rate of the scored forecasts' squared errors (≈ the last 5, i.e. 50 steps)
_BAND = (0.05, 0.95)
_NOISE_DRAWS = 4  # one-step noise draws per trend sample: smoother band quantiles at little cost
_LOG_BOUND = 700.0  # |log-loss| fed to exp(), so every returned loss is finite
_DELTA_BOUND = 50.0  # |residual of Holt's log-loss forecast| in raw units
_TARGET_BOUND = 10.0  # |residual| target in running-RMS units: one spike cannot dominate a window
_INITIAL_TARGET_SCALE = 0.1  # prior RMS of the residual before the first observation
_HISTORY_KEYS = ("features", "log_loss", "level", "trend", "scale_target", "scale_mask", "weight")
_HOLT = (0.05, 0.02)  # Holt's level and trend rates, as in TrendDynamics
_SHAPE_KEYS = ("feature_dim", "hidden", "latent", "ensemble", "window", "log_loss_slot")
_FORMAT = "RSSMDynamics/2"


@final
class RSSMDynamics:
    """Ensemble RSSM-lite `DynamicsModel` trained online by truncated BPTT; runs on any array-API namespace.

    ``samples`` latent draws per member are rolled out by `predict`; ``tolerance`` is the
    log-space error (≈ relative error) at which each confidence factor falls to 1/e.
    Weights are ``dtype`` (default float32) on ``device``; all randomness comes from
    ``numpy.random.default_rng(seed)``.
    """

    def __init__(
        self,
        feature_dim: int = 64,
        *,
        hidden: int = 64,
        latent: int = 16,
        ensemble: int = 5,
        window: int = 12,
        train_every: int = 2,
        lr: float = 2e-3,
        clip: float = 1.0,
        seed: int = 0,
        xp: ModuleType | None = None,
        dtype: Any = None,
        device: Any = None,
        log_loss_slot: int = 1,
        samples: int = 8,
        tolerance: float = 0.1,
    ) -> None:
        sizes = {"feature_dim": feature_dim, "hidden": hidden, "latent": latent, "ensemble": ensemble,
                 "window": window, "samples": samples, "train_every": train_every}
        positives = {"lr": lr, "clip": clip, "tolerance": tolerance}
        problems = _checks.problems(sizes, positives, seed, log_loss_slot)
        if problems:
            raise ConfigError(problems, "Fix the listed arguments of RSSMDynamics; each names its range.")
        self._xp = as_namespace(xp)
        self._device = device
        self._dtype = _checks.resolve_dtype(self._xp, dtype, device)
        self._config = {**sizes, "log_loss_slot": log_loss_slot, "lr": float(lr), "clip": float(clip),
                        "seed": seed, "tolerance": float(tolerance)}
        self._rng = np.random.default_rng(seed)
        # Extra inputs after the feature slots: staleness and Holt's state (see _rollout).
        initial = _network.initial_weights(self._rng, ensemble, feature_dim + _rollout.EXTRA_INPUTS, hidden,
                                           latent)
        self._weights = [self._to_xp(w) for w in initial]
        self._adam = Adam(float(lr), float(clip))
        self._features = RunningNormalizer(feature_dim)
        self._targets = RunningScale(_INITIAL_TARGET_SCALE)
        self._history = {"features": np.zeros((0, feature_dim)), "weight": np.zeros((0, ensemble)),
                         **{k: np.zeros(0) for k in _HISTORY_KEYS[1:-1]}}
        # GRU states before the stored window's first row and after it (the start once that row drops out).
        self._h_start = self._to_xp(np.zeros((ensemble, 1, hidden)))
        self._h_after_first = self._h_start
        self._h_run = self._h_start  # after every observed row: where rollouts start
        self._seen = 0
        self._accuracy = AccuracyTracker(_LOOKAHEAD, _SPAN, _STEP_RATE, _FORECAST_RATE)
        self._last_log_loss = math.nan
        self._holt = (0.0, 0.0)  # Holt's level and trend of log-loss after the last observed loss
        self._confidence: float | None = None

    def observe(self, features: Any, outcome: Outcome) -> None:
        """Learn from one real step; every ``train_every``-th, one Adam step on the window ending with it.

        A non-finite or non-positive loss teaches nothing and is skipped; a missing or
        non-finite ``outcome.step_scale`` trains every head but the step-scale one.
        """
        loss = float(outcome.loss)
        if not (math.isfinite(loss) and loss > 0.0):
            return
        cfg = self._config
        row = _checks.host_features(features, cfg["feature_dim"])
        log_loss = min(math.log(loss), _LOG_BOUND)
        level, trend = (log_loss, 0.0) if self._seen == 0 else self._holt
        residual = float(np.clip(log_loss - level - trend, -_DELTA_BOUND, _DELTA_BOUND))
        scale = None if outcome.step_scale is None else float(outcome.step_scale)
        observed = scale is not None and math.isfinite(scale)
        self._features.update(row)
        prior_scale = self._targets.scale
        self._targets.update(residual)
        new = {"features": row, "log_loss": log_loss, "level": level, "trend": trend, "scale_mask": float(observed),
               "scale_target": min(max(scale, 0.0), 2.0) if observed else 1.0,
               "weight": self._rng.poisson(1.0, cfg["ensemble"]).astype(np.float64)}
        if len(self._history["log_loss"]) == cfg["window"]:
            self._h_start = self._h_after_first
        self._history = {k: _keep_last(self._history[k], new[k], cfg["window"]) for k in _HISTORY_KEYS}
        if self._seen % cfg["train_every"] == 0:
            batch, last_residual = self._window_batch()
            _, grads, states = _network.loss_and_grads(self._xp, self._weights, batch)
            self._h_after_first = states[:, :1, :]
            # Scored before learning from the step; the window's last row is fed as in a rollout.
            self._accuracy.add_step_error(last_residual - prior_scale * self._mean_delta(states))
            self._weights = self._adam.step(self._xp, self._weights, grads)
        else:
            self._h_after_first = _rollout.warm_up(self._xp, self._weights, self._h_start, self._real_inputs(
                self._history["features"][:1], self._history["level"][:1], self._history["trend"][:1]))
        # One GRU step per observe keeps the rollouts' start state, so predict runs no warm-up over the window.
        self._h_run = _rollout.warm_up(self._xp, self._weights, self._h_run,
                                       self._real_inputs(row[None, :], np.array([level]), np.array([trend])))
        self._last_log_loss = log_loss
        self._holt = _holt_update(self._holt, log_loss, self._seen)
        self._seen += 1
        self._accuracy.observed(self._seen, log_loss)
        if self._accuracy.wants_forecast(self._seen):
            self._accuracy.start(self._seen, np.mean(self._forecast(), axis=1).tolist())
        self._confidence = None

    def predict(self, features: Any, horizon: int) -> Prediction:
        """Loss after 1..``horizon`` more steps, its 90% band, the step scales and `confidence`.

        The trajectory is exp of Holt's forecast plus the members' mean correction, shrunk by
        their disagreement (`_shrunk_centre`); the band holds the 5%
        and 95% quantiles over members × latent samples of the trend plus draws of the
        head's one-step noise (batch noise does not accumulate, the trend's uncertainty
        does), widened to contain the trajectory and so that its log-space half-widths
        never shrink with the horizon. The draws are seeded by (seed, observations so
        far), so predicting changes no state.
        """
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ConfigError(f"horizon={horizon!r}: must be an integer >= 1", "Ask for at least one step.")
        xp, cfg = self._xp, self._config
        row = _checks.host_features(features, cfg["feature_dim"])
        latent = cfg["latent"]
        draws = self._to_xp(np.random.default_rng([cfg["seed"], self._seen]).standard_normal(
            (horizon, cfg["ensemble"], cfg["samples"], latent + _NOISE_DRAWS)))
        path = _rollout.rollout(*self._rollout_start(row), draws[..., :latent])
        count = cfg["ensemble"] * cfg["samples"]
        noisy = path.log_loss[..., None] + path.noise_std[..., None] * draws[..., latent:]
        noisy = xp.reshape(noisy, (horizon, count * _NOISE_DRAWS))
        scale = xp.mean(xp.reshape(path.step_scale, (horizon, count)), axis=-1)
        table = xp.concat([xp.stack([_rollout.quantile(xp, noisy, _BAND[0]), _rollout.quantile(xp, noisy, _BAND[1]),
                                     scale]), xp.matrix_transpose(xp.mean(path.log_loss, axis=-1))])
        q_low, q_high, scale, *members = to_numpy(table).astype(np.float64)
        centre = self._shrunk_centre(np.stack(members))
        # Half-widths as running maxima: no step is reported as surer than an earlier one.
        below = np.maximum.accumulate(np.maximum(centre - q_low, 0.0))
        above = np.maximum.accumulate(np.maximum(q_high - centre, 0.0))
        logs = np.clip(np.stack([centre, centre - below, centre + above]), -_LOG_BOUND, _LOG_BOUND)
        loss, low, high = np.exp(logs).tolist()
        return Prediction(tuple(loss), tuple(low), tuple(high), tuple(scale.tolist()), self.confidence())

    def _shrunk_centre(self, members: np.ndarray) -> np.ndarray:
        """The centre (K,) from each member's mean log-loss forecast (E, K): Holt's plus a shrunk correction.

        The members' mean correction c̄ of Holt's forecast is scaled by c̄² / (c̄² + v), v the
        variance across members: where they disagree about the correction, the forecast falls
        back to Holt's.
        """
        level, trend = self._holt
        correction = members - (level + trend * np.arange(1, members.shape[1] + 1))
        mean, spread = correction.mean(axis=0), correction.var(axis=0)
        square = mean * mean
        return members.mean(axis=0) - mean + mean * square / np.maximum(square + spread, 1e-300)

    def confidence(self) -> float:
        """Recent accuracy × ensemble agreement, each exp(−log-space error / tolerance); cached per observe.

        Accuracy: the RMS error of the 10-step forecasts made every 10 steps (members' mean,
        latent at its mean), scored on the mean of their last 5 steps once observed, beyond
        what the batch noise seen in one-step errors explains (see `_accuracy`): noise around
        a well-predicted trend is not held against the model, a drifting forecast or a
        random-walk loss is. Agreement: the standard deviation across members of their
        current 10-step forecasts. 0 before 20 observations and the first scored forecast.
        """
        if self._confidence is None:
            self._confidence = self._compute_confidence()
        return self._confidence

    def _compute_confidence(self) -> float:
        trend_error = self._accuracy.trend_error()
        if self._seen < _MIN_OBSERVATIONS or not math.isfinite(trend_error):
            return 0.0
        tolerance = self._config["tolerance"]
        accuracy = math.exp(-trend_error / tolerance)
        agreement = math.exp(-float(np.std(self._forecast()[-1])) / tolerance)
        return min(1.0, max(0.0, accuracy * agreement))

    def _forecast(self) -> np.ndarray:
        """Each member's log-loss forecast (_LOOKAHEAD, E) from the state after the last observed step."""
        # That state's features: the last observed ones with the realised loss in the log-loss slot.
        row = self._history["features"][-1].copy()
        row[self._config["log_loss_slot"]] = self._last_log_loss
        return to_numpy(_rollout.mean_rollout(*self._rollout_start(row), _LOOKAHEAD))

    def _rollout_start(self, row: np.ndarray) -> tuple[Any, ...]:
        """The leading arguments of the rollouts: the state after the observed rows, then the current ``row``."""
        cfg = self._config
        slot = cfg["log_loss_slot"]
        x = self._real_inputs(row[None, :], np.array([self._holt[0]]), np.array([self._holt[1]]))
        feedback = _rollout.Feedback(slot, float(self._features.mean[slot]), float(self._features.std[slot]),
                                     self._features.bound, cfg["window"] - 1)
        return self._xp, self._weights, self._h_run, x, _rollout.Holt(*self._holt), feedback, self._targets.scale

    def _real_inputs(self, raw: np.ndarray, level: np.ndarray, trend: np.ndarray) -> Any:
        """Network inputs (T, D + 3) of real feature rows ``raw`` whose Holt states before them are given."""
        gap = level + trend - _slot_log_loss(raw, self._config["log_loss_slot"])
        extra = _rollout.holt_inputs(np, np.zeros(len(raw)), trend, gap, self._targets.scale,
                                     self._features.bound)
        return self._to_xp(np.concatenate([self._features.normalize(raw), extra], axis=1))

    def _window_batch(self) -> tuple[_network.WindowBatch, float]:
        """The stored window as a training batch, with fresh latent noise; and its last row's raw residual.

        Windows are fed the way `predict` feeds the future: after a random row j (any but
        the last) every input is blank but for the real log-loss slot, the staleness and the
        Holt inputs, and the targets of rows i > j are the residuals of Holt's (i − j + 1)-step
        forecast from the state before row j. Feeding only half the windows this way learnt
        long rollouts slower: 50-step log errors about twice as large over steps 300–700 of a
        noisy power law.
        """
        h, cfg = self._history, self._config
        dim, steps, slot = cfg["feature_dim"], len(h["log_loss"]), cfg["log_loss_slot"]
        inputs, stale = self._features.normalize(h["features"]), np.zeros(steps)
        last_real = steps - 1
        if steps >= 2:
            last_real = int(self._rng.integers(0, steps - 1))
            blank = np.zeros((steps - 1 - last_real, dim))
            blank[:, slot] = inputs[last_real + 1:, slot]
            inputs = np.concatenate([inputs[:last_real + 1], blank])
            stale = np.array([_rollout.staleness(max(0, i - last_real), cfg["window"] - 1) for i in range(steps)])
        index = np.arange(steps)
        origin = np.minimum(index, last_real)
        trend = h["trend"][origin]
        forecast = h["level"][origin] + (index - origin + 1) * trend
        scale = self._targets.scale
        extra = _rollout.holt_inputs(np, stale, trend, forecast - _slot_log_loss(h["features"], slot), scale,
                                     self._features.bound)
        residual = np.clip(h["log_loss"] - forecast, -_DELTA_BOUND, _DELTA_BOUND)
        target = np.clip(residual / scale, -_TARGET_BOUND, _TARGET_BOUND)
        width = dim + _rollout.EXTRA_INPUTS
        rows = self._to_xp(np.concatenate([inputs, extra, target[:, None], h["scale_target"][:, None],
                                           h["scale_mask"][:, None]], axis=1))
        eps = self._rng.standard_normal((cfg["ensemble"], steps, cfg["latent"]))
        per_member = self._to_xp(np.concatenate([eps, h["weight"].T[:, :, None]], axis=2))
        batch = _network.WindowBatch(self._h_start, rows[:, :width], rows[:, width], rows[:, width + 1],
                                     rows[:, width + 2], per_member[..., -1], per_member[..., :-1])
        return batch, float(residual[-1])

    def _mean_delta(self, states: Any) -> float:
        """The members' mean residual (target units) after the window's last step, latent at its mean."""
        w_mean, b_mean = _heads.mean_head(self._xp, *self._weights[4:])
        return float(np.mean(to_numpy(self._xp.matmul(states[:, -1:, :], w_mean) + b_mean)))

    def _to_xp(self, value: np.ndarray) -> Any:
        return from_numpy(self._xp, value, dtype=self._dtype, device=self._device)

    def state_dict(self) -> dict[str, Any]:
        """Config, weights, Adam moments, carried GRU states, normaliser stats, RNG state, history, scores."""
        xp, adam = self._xp, self._adam

        def copies(arrays: list[Any] | None) -> list[Any] | None:
            return None if arrays is None else [xp.asarray(a, copy=True) for a in arrays]

        return {
            "format": _FORMAT,
            "config": dict(self._config),
            "weights": copies(self._weights),
            "adam_step": adam.step_count,
            "exp_avg": copies(adam.exp_avg),
            "exp_avg_sq": copies(adam.exp_avg_sq),
            "h_start": xp.asarray(self._h_start, copy=True),
            "h_after_first": xp.asarray(self._h_after_first, copy=True),
            "h_run": xp.asarray(self._h_run, copy=True),
            "features": self._features.state_dict(),
            "targets": self._targets.state_dict(),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "history": {k: v.copy() for k, v in self._history.items()},
            "seen": self._seen,
            "accuracy": self._accuracy.state_dict(),
            "last_log_loss": self._last_log_loss,
            "holt": list(self._holt),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; on a mismatch raise `CheckpointError` and change nothing."""
        try:
            loaded = self._read_state(state)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"RSSMDynamics state is malformed ({type(exc).__name__}: {exc})") from exc
        (self._config, self._weights, self._adam, self._h_start, self._h_after_first, self._h_run, self._features,
         self._targets, self._accuracy, self._rng, self._history, self._seen, self._last_log_loss,
         self._holt) = loaded
        self._confidence = None

    def _read_state(self, state: dict[str, Any]) -> tuple[Any, ...]:
        if state.get("format") != _FORMAT:
            raise CheckpointError(f"state format {state.get('format')!r} is not {_FORMAT!r}",
                                  "Load a state_dict() saved by RSSMDynamics.")
        config = dict(state["config"])
        wrong = [k for k in _SHAPE_KEYS if config[k] != self._config[k]]
        if wrong:
            raise CheckpointError(
                "state was saved by an RSSMDynamics with other sizes: "
                + ", ".join(f"{k}={config[k]!r} (here {self._config[k]!r})" for k in wrong),
                "Construct RSSMDynamics with the saved sizes before loading.")
        weights = [self._from_state(w) for w in state["weights"]]
        carried = [self._from_state(state[k]) for k in ("h_start", "h_after_first", "h_run")]
        adam = Adam(float(config["lr"]), float(config["clip"]))
        adam.step_count = int(state["adam_step"])
        if adam.step_count:
            adam.exp_avg = [self._from_state(m) for m in state["exp_avg"]]
            adam.exp_avg_sq = [self._from_state(v) for v in state["exp_avg_sq"]]
        expected = [tuple(w.shape) for w in self._weights]
        groups = [weights, *([adam.exp_avg, adam.exp_avg_sq] if adam.step_count else [])]
        if (any([tuple(a.shape) for a in group] != expected for group in groups)
                or any(tuple(h.shape) != tuple(self._h_start.shape) for h in carried)):
            raise CheckpointError("state arrays have the wrong shapes", "Load a state saved with the sizes.")
        features = RunningNormalizer(config["feature_dim"])
        features.load_state_dict(state["features"])
        targets = RunningScale(_INITIAL_TARGET_SCALE)
        targets.load_state_dict(state["targets"])
        rng = np.random.default_rng()
        rng.bit_generator.state = copy.deepcopy(state["rng"])
        history = {k: np.array(state["history"][k], dtype=np.float64) for k in _HISTORY_KEYS}
        accuracy = AccuracyTracker(_LOOKAHEAD, _SPAN, _STEP_RATE, _FORECAST_RATE)
        accuracy.load_state_dict(state["accuracy"])
        return (config, weights, adam, *carried, features, targets, accuracy, rng, history,
                int(state["seen"]), float(state["last_log_loss"]), _holt_state(state["holt"]))

    def _from_state(self, value: Any) -> Any:
        return self._to_xp(np.asarray(value) if isinstance(value, list) else to_numpy(value))


def _keep_last(stored: np.ndarray, value: Any, keep: int) -> np.ndarray:
    """``stored`` with ``value`` appended as a new row, cut to the last ``keep`` rows."""
    start = max(0, len(stored) + 1 - keep)
    return np.concatenate([stored[start:], np.asarray(value, dtype=np.float64)[None, ...]])


def _slot_log_loss(raw: np.ndarray, slot: int) -> np.ndarray:
    """The raw log-loss slot of feature rows, bounded as the losses are."""
    return np.clip(raw[..., slot], -_LOG_BOUND, _LOG_BOUND)


def _holt_update(holt: tuple[float, float], log_loss: float, seen: int) -> tuple[float, float]:
    """Holt's (level, trend) after one more log-loss, as `TrendDynamics` updates them."""
    if seen == 0:
        return log_loss, 0.0
    level_rate, trend_rate = _HOLT
    level, trend = holt
    new_level = level_rate * log_loss + (1.0 - level_rate) * (level + trend)
    return new_level, trend + trend_rate * (new_level - level - trend)


def _holt_state(value: Any) -> tuple[float, float]:
    level, trend = (float(v) for v in value)
    return level, trend
