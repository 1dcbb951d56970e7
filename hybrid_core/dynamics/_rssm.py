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

The per-step work is kept small because the trainer calls `observe` and
`confidence` on every real step. An `observe` moves the running GRU state on by
one step. Every ``train_every``-th observe takes one Adam step (each member's
gradient clipped to norm ``clip``) on the Gaussian NLL of ``windows`` windows of
``window`` rows ending at evenly spaced recent observations, batched into one
truncated BPTT pass with hand-written gradients (`_network`, `_windows`); each
window starts from the GRU state carried before its first row (a constant of the
pass, as in truncated BPTT). Every 10th observe makes one 10-step forecast that
serves both confidence factors, and the one-step predictions of the rows seen
since are scored. The network only corrects Holt's forecast as far as scored
forecasts show the correction helps (`_accuracy`'s trust, 0 at the start), so a
young or useless network leaves Holt's forecast, the baseline's, as it is.
Features are standardised online per slot and the targets by their running RMS
(`_normalizer`, host-side), since slot magnitudes differ by orders of magnitude.
Host reads: two per 10 observes (one-step scores, forecast), one more per Adam step, one per `predict`.
"""

from __future__ import annotations

import math
from collections import deque
from types import ModuleType
from typing import Any, final

import numpy as np

from .._backend import as_namespace, from_numpy, to_numpy
from .._errors import ConfigError
from .._features import FEATURE_DIM, LOG_LOSS_SLOT
from .._protocols import Outcome, Prediction
from . import _checks, _network, _rollout, _rssm_state
from ._accuracy import AccuracyTracker
from ._adam import Adam
from ._normalizer import RunningNormalizer, RunningScale
from ._threads import one_blas_thread
from ._windows import DELTA_BOUND, LOG_BOUND, Rows, window_batch

__all__ = ["RSSMDynamics"]

_MIN_OBSERVATIONS = 20  # below this the error averages mean little: confidence stays 0
_LOOKAHEAD = 10  # horizon of the forecasts behind confidence (see _accuracy)
_SPAN = 10  # a forecast is scored on the mean of its last this many steps
_STEP_RATE = 0.05  # EMA rate of the squared one-step error (≈ the last 20 steps)
_FORECAST_RATE = 0.2  # EMA rate of the scored forecasts' squared errors (≈ the last 5 scored)
_BAND = (0.05, 0.95)
_NOISE_DRAWS = 4  # one-step noise draws per trend sample: smoother band quantiles at little cost
_INITIAL_TARGET_SCALE = 0.1  # prior RMS of the residual before the first observation
_HOLT = (0.05, 0.02)  # Holt's level and trend rates, as in TrendDynamics


@final
class RSSMDynamics:
    """Ensemble RSSM-lite `DynamicsModel` trained online by truncated BPTT; runs on any array-API namespace.

    The trainer's default dynamics model. Every ``train_every``-th `observe` takes one Adam
    step (``lr``, per-member gradient norm ≤ ``clip``) on ``windows`` windows of ``window``
    rows; ``samples`` latent draws per member are rolled out by `predict`; ``tolerance`` is
    the log-space error (≈ relative error) at which each confidence factor falls to 1/e.
    Weights are ``dtype`` (default float32) on ``device``; all randomness comes from
    ``numpy.random.default_rng(seed)``.
    """

    def __init__(
        self,
        feature_dim: int = FEATURE_DIM,
        *,
        hidden: int = 64,
        latent: int = 16,
        ensemble: int = 5,
        window: int = 12,
        train_every: int = 16,
        windows: int = 4,
        lr: float = 1.2e-2,
        clip: float = 1.0,
        seed: int = 0,
        xp: ModuleType | None = None,
        dtype: Any = None,
        device: Any = None,
        log_loss_slot: int = LOG_LOSS_SLOT,
        samples: int = 8,
        tolerance: float = 0.1,
    ) -> None:
        sizes = {"feature_dim": feature_dim, "hidden": hidden, "latent": latent, "ensemble": ensemble,
                 "window": window, "samples": samples, "train_every": train_every, "windows": windows}
        positives = {"lr": lr, "clip": clip, "tolerance": tolerance}
        problems = _checks.problems(sizes, positives, seed, log_loss_slot)
        if _checks.is_int(windows) and _checks.is_int(train_every) and 1 <= train_every < windows:
            problems.append(f"windows={windows!r}: must be <= train_every ({train_every})")
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
        self._shapes = [tuple(w.shape[1:]) for w in initial]
        self._set_weights(_network.flatten(self._xp, [self._to_xp(w) for w in initial]))
        self._adam = Adam(float(lr), float(clip))
        self._features = RunningNormalizer(feature_dim)
        self._targets = RunningScale(_INITIAL_TARGET_SCALE)
        # The newest rows (enough for a tick's windows) and the carried GRU state before each of them.
        keep = window + train_every - 1
        self._rows: deque[tuple[Any, ...]] = deque(maxlen=keep)
        self._h_before: deque[Any] = deque(maxlen=keep)
        self._h_run = self._to_xp(np.zeros((ensemble, 1, hidden)))  # after every observed row: rollouts start here
        # (residual, target scale) of each row since the last scoring (every Adam step and 10th observe).
        self._unscored: list[tuple[float, float]] = []
        self._seen = 0
        self._accuracy = AccuracyTracker(_LOOKAHEAD, _SPAN, _STEP_RATE, _FORECAST_RATE)
        self._spread = math.nan  # the members' disagreement that enters the last 10-step forecast (agreement)
        self._last_log_loss = math.nan
        self._holt = (0.0, 0.0)  # Holt's level and trend of log-loss after the last observed loss
        self._confidence: float | None = None

    def observe(self, features: Any, outcome: Outcome) -> None:
        """Learn from one real step: one GRU step, and every ``train_every``-th observe a training tick.

        A non-finite or non-positive loss teaches nothing and is skipped; a missing or
        non-finite ``outcome.step_scale`` trains every head but the step-scale one.
        """
        loss = float(outcome.loss)
        if not (math.isfinite(loss) and loss > 0.0):
            return
        cfg = self._config
        row = _checks.host_features(features, cfg["feature_dim"])
        log_loss = min(math.log(loss), LOG_BOUND)
        level, trend = (log_loss, 0.0) if self._seen == 0 else self._holt
        residual = float(np.clip(log_loss - level - trend, -DELTA_BOUND, DELTA_BOUND))
        scale = None if outcome.step_scale is None else float(outcome.step_scale)
        observed = scale is not None and math.isfinite(scale)
        self._features.update(row)
        prior_scale = self._targets.scale
        self._targets.update(residual)
        self._rows.append((row, log_loss, level, trend, min(max(scale, 0.0), 2.0) if observed else 1.0,
                           float(observed), self._rng.poisson(1.0, cfg["ensemble"]).astype(np.float64)))
        self._h_before.append(self._h_run)
        self._h_run = _rollout.warm_up(self._xp, self._net.weights, self._h_run, self._row_inputs(row, level, trend))
        self._unscored.append((residual, prior_scale))
        self._last_log_loss = log_loss
        self._holt = _holt_update(self._holt, log_loss, self._seen)
        self._seen += 1
        self._accuracy.observed(self._seen, log_loss)
        if self._seen % cfg["train_every"] == 0:
            with one_blas_thread(self._xp):
                self._score_one_step()  # before the weights that made those predictions change
                self._train()
        if self._seen % _LOOKAHEAD == 0:
            self._score_one_step()
            self._start_forecast()
        self._confidence = None

    def _score_one_step(self) -> None:
        """Score the one-step predictions of the rows since the last scoring (one host read)."""
        if not self._unscored:
            return
        xp, net, count = self._xp, self._net, len(self._unscored)
        # The states after each unscored row (the last is the running state), read by the mean head: the
        # predictions of those losses made before learning from them, as no weight has changed since.
        after = [*list(self._h_before)[len(self._h_before) - count + 1:], self._h_run]
        predicted = to_numpy(xp.mean(xp.concat(after, axis=1) @ net.w_mean + net.b_mean, axis=(0, 2)))
        trust = self._accuracy.trust
        for (residual, prior_scale), mean in zip(self._unscored, predicted.tolist(), strict=True):
            self._accuracy.add_step_error(residual - prior_scale * trust * mean)
        self._unscored = []

    def _train(self) -> None:
        """One Adam step on the windows ending at every (train_every / windows)-th of the newest rows."""
        cfg, xp = self._config, self._xp
        stride = cfg["train_every"] // cfg["windows"]
        ends = [len(self._rows) - 1 - stride * i for i in reversed(range(cfg["windows"]))]
        batch = window_batch(xp, self._to_xp, self._stored_rows(), self._h_before, ends,
                             min(cfg["window"], ends[0] + 1), features=self._features,
                             target_scale=self._targets.scale, slot=cfg["log_loss_slot"],
                             stale_cap=cfg["window"] - 1, latent=cfg["latent"], rng=self._rng)
        _, grads = _network.loss_and_grads(xp, self._net.weights, batch)
        self._set_weights(self._adam.step(xp, self._flat, _network.flatten(xp, grads)))

    def _start_forecast(self) -> None:
        """The 10-step forecast behind both confidence factors (one host read): agreement now, accuracy later."""
        members = to_numpy(self._forecast()).astype(np.float64).T  # (E, _LOOKAHEAD)
        holt, correction, kept = self._shrinkage(members)
        self._spread = self._accuracy.trust * float(kept[-1])
        if self._accuracy.idle:  # scored as `predict` delivers it: Holt's plus the trusted, shrunk correction
            self._accuracy.start(self._seen, holt.tolist(), correction.tolist())

    def predict(self, features: Any, horizon: int) -> Prediction:
        """Loss after 1..``horizon`` more steps, its 90% band, the step scales and `confidence`.

        The trajectory is exp of Holt's forecast plus the members' mean correction, shrunk by
        their disagreement (`_shrinkage`); the band holds the 5%
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
        holt, correction, _ = self._shrinkage(np.stack(members))
        centre = holt + self._accuracy.trust * correction
        # The samples' spread around the members' mean, recentred on the delivered centre.
        shift = centre - np.mean(members, axis=0)
        q_low, q_high = q_low + shift, q_high + shift
        # Half-widths as running maxima: no step is reported as surer than an earlier one.
        below = np.maximum.accumulate(np.maximum(centre - q_low, 0.0))
        above = np.maximum.accumulate(np.maximum(q_high - centre, 0.0))
        logs = np.clip(np.stack([centre, centre - below, centre + above]), -LOG_BOUND, LOG_BOUND)
        loss, low, high = np.exp(logs).tolist()
        return Prediction(tuple(loss), tuple(low), tuple(high), tuple(scale.tolist()), self.confidence())

    def _shrinkage(self, members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """From each member's mean log-loss forecast (E, K): Holt's forecast, the shrunk correction, and the
        disagreement that correction keeps, each (K,).

        The members' mean correction c̄ of Holt's forecast is scaled by s = c̄² / (c̄² + v), v the
        variance across members: where they disagree about the correction, the forecast falls
        back to Holt's. The disagreement kept is s·√v (at most |c̄|/2): members that disagree
        about a correction the forecast drops do not make it less certain. The delivered
        forecast adds the shrunk correction weighted by the trust it has earned (`_accuracy`).
        """
        level, trend = self._holt
        holt = level + trend * np.arange(1, members.shape[1] + 1)
        correction = members - holt
        mean, spread = correction.mean(axis=0), correction.var(axis=0)
        square = mean * mean
        shrink = square / np.maximum(square + spread, 1e-300)
        return holt, mean * shrink, shrink * np.sqrt(spread)

    def confidence(self) -> float:
        """Recent accuracy × ensemble agreement, each exp(−log-space error / tolerance); cached per observe.

        Accuracy: the RMS error of the 10-step forecasts made every 10th observe (latent at its
        mean, delivered as `predict` delivers them: Holt's plus the trusted, shrunk correction),
        scored on the mean of the 10 losses once observed, beyond what the batch noise seen in
        one-step errors explains (see `_accuracy`): noise around a well-predicted trend is not
        held against the model, a drifting forecast or a random-walk loss is. Agreement: how
        much of the members' disagreement about the last such forecast its delivered centre
        keeps (`_shrinkage`). 0 before 20 observations and the first scored forecast. No array
        work: both factors are kept up to date by `observe`.
        """
        if self._confidence is None:
            self._confidence = self._compute_confidence()
        return self._confidence

    def _compute_confidence(self) -> float:
        trend_error = self._accuracy.trend_error()
        if self._seen < _MIN_OBSERVATIONS or not (math.isfinite(trend_error) and math.isfinite(self._spread)):
            return 0.0
        tolerance = self._config["tolerance"]
        accuracy = math.exp(-trend_error / tolerance)
        agreement = math.exp(-self._spread / tolerance)
        return min(1.0, max(0.0, accuracy * agreement))

    def _forecast(self) -> Any:
        """Each member's log-loss forecast (_LOOKAHEAD, E) from the state after the last observed step."""
        # That state's features: the last observed ones with the realised loss in the log-loss slot.
        row = self._rows[-1][0].copy()
        row[self._config["log_loss_slot"]] = self._last_log_loss
        return _rollout.mean_rollout(*self._rollout_start(row), _LOOKAHEAD)

    def _rollout_start(self, row: np.ndarray) -> tuple[Any, ...]:
        """The leading arguments of the rollouts: the state after the observed rows, then the current ``row``."""
        cfg = self._config
        slot = cfg["log_loss_slot"]
        x = self._row_inputs(row, *self._holt)
        feedback = _rollout.Feedback(slot, float(self._features.mean[slot]), float(self._features.std[slot]),
                                     self._features.bound, cfg["window"] - 1)
        return self._xp, self._net, self._h_run, x, _rollout.Holt(*self._holt), feedback, self._targets.scale

    def _row_inputs(self, raw: np.ndarray, level: float, trend: float) -> Any:
        """Network inputs (1, D + 3) of one real feature row whose Holt state before it is (level, trend).

        The same values `_rollout.holt_inputs` gives a stack of rows, in Python floats: this runs on
        every step, where each NumPy call on tiny arrays costs more than its arithmetic.
        """
        bound, scale = self._features.bound, self._targets.scale
        logged = min(max(float(raw[self._config["log_loss_slot"]]), -LOG_BOUND), LOG_BOUND)
        extra = (0.0, min(max(_rollout.TREND_HORIZON * trend / scale, -bound), bound),
                 min(max((level + trend - logged) / scale, -bound), bound))
        return self._to_xp(np.concatenate([self._features.normalize(raw), extra])[None, :])

    def _stored_rows(self) -> Rows:
        """The stored rows as arrays, oldest first."""
        columns = list(zip(*self._rows, strict=True))
        return Rows(*(np.asarray(c, dtype=np.float64) for c in columns))

    def _set_weights(self, flat: Any) -> None:
        self._flat = flat
        self._net = _rollout.prepare(self._xp, _network.unflatten(self._xp, flat, self._shapes))

    def _to_xp(self, value: np.ndarray) -> Any:
        return from_numpy(self._xp, value, dtype=self._dtype, device=self._device)

    def state_dict(self) -> dict[str, Any]:
        """Config, weights, Adam moments, carried GRU states, normaliser stats, RNG state, rows, scores."""
        return _rssm_state.dump(self)

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """`CheckpointError` exactly when `load_state_dict` would refuse ``state``; changes nothing."""
        _rssm_state.check(self, state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; on a mismatch raise `CheckpointError` and change nothing."""
        _rssm_state.load(self, state)
        self._set_weights(self._flat)
        self._confidence = None


def _holt_update(holt: tuple[float, float], log_loss: float, seen: int) -> tuple[float, float]:
    """Holt's (level, trend) after one more log-loss, as `TrendDynamics` updates them."""
    if seen == 0:
        return log_loss, 0.0
    level_rate, trend_rate = _HOLT
    level, trend = holt
    new_level = level_rate * log_loss + (1.0 - level_rate) * (level + trend)
    return new_level, trend + trend_rate * (new_level - level - trend)
