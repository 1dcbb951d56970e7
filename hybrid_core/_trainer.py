"""`HybridTrainer`: runs real and predicted steps through the phase machine."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import array_api_compat
import numpy as np

from ._backend import library_name, namespace_of
from ._bandit import LinUCBBandit
from ._checks import call_model, check_loss_and_grads, read_host, require_protocol
from ._codec import DEFAULT_MAX_BYTES
from ._config import HybridConfig
from ._corrector import ResidualCorrector, ResidualStore
from ._cycle import PredictCycle, corrected
from ._directions import make_direction
from ._errors import CheckpointError, ConfigError, DivergenceError, ModelError
from ._features import CONTEXT_NAMES, FEATURE_DIM, compact_context, encode_features
from ._metrics import MetricsCollector, StepRecord
from ._monitor import DivergenceMonitor, Level
from ._persist import CheckpointPolicy, checkpoint_path, load_trainer, newest_checkpoint, save_trainer
from ._phase import Phase, PhaseState, Signals, initial_phase_state, next_phase
from ._predicting import PredictingMixin
from ._progress import Progress
from ._protocols import Array, DynamicsModel, Model, Optimizer, Outcome
from ._result import StepResult
from ._state import TrainingState
from .dynamics._rssm import RSSMDynamics
from .kernels import fused_stats

__all__ = ["HybridTrainer", "StepResult"]

_NO_FEATURES = np.zeros(FEATURE_DIM)
_NO_FEATURES.flags.writeable = False


Callback = Callable[["HybridTrainer", StepResult], "bool | None"]
"""Called after every `fit` step; returning True stops the loop."""


class HybridTrainer(PredictingMixin):
    """Trains ``model`` with ``optimizer``, predicting some steps instead of computing them.

    Real steps (WARMUP, FULL, CORRECT) run forward + backward + optimizer step and
    teach ``dynamics`` the loss trajectory (default: `RSSMDynamics` seeded with
    ``config.seed``; `TrendDynamics` is the cheaper choice for models whose step
    takes well under a few milliseconds, see docs/dynamics.md). In FULL a LinUCB
    bandit picks the next PREDICT horizon, 0 (keep training normally) included. A PREDICT step runs no
    backward pass: it applies ``step_scale · direction`` (the optimizer's predicted
    next update, or a line fitted through parameter snapshots) and every
    ``check_interval`` steps a forward-only check compares the loss with the
    predicted band; leaving it rolls back to the last good point. CORRECT first
    line-searches how much of the predicted displacement to keep, then runs real
    steps whose residuals train a corrector; the cycle's reward (time saved minus
    loss above the trend) teaches the bandit.

    Host reads: one per real step (loss and gradient statistics in one transfer),
    one per forward check and one per CORRECT line search; `host_syncs` counts them.
    """

    def __init__(
        self,
        model: Model,
        optimizer: Optimizer,
        config: HybridConfig | None = None,
        dynamics: DynamicsModel | None = None,
    ) -> None:
        config = HybridConfig() if config is None else config
        if not isinstance(config, HybridConfig):
            raise ConfigError(f"config must be a HybridConfig, got {type(config).__name__}")
        require_protocol(model, Model, "model")
        require_protocol(optimizer, Optimizer, "optimizer")
        dynamics = RSSMDynamics(seed=config.seed) if dynamics is None else dynamics
        require_protocol(dynamics, DynamicsModel, "dynamics")
        params = list(model.parameters())
        if not params:
            raise ModelError("model.parameters() is empty: nothing to train")
        self._xp = namespace_of(params, what="model.parameters()")
        for i, p in enumerate(params):
            if array_api_compat.size(p) == 0:
                raise ModelError(
                    f"parameter {i} has shape {tuple(p.shape)} with no elements",
                    "Remove zero-size parameters from Model.parameters().",
                )
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.dynamics = dynamics
        self._observes_features = getattr(dynamics, "observes_features", True) is not False
        self.state = TrainingState(config.history_size)
        self.metrics = MetricsCollector(config.metrics_max_records)
        self.monitor = DivergenceMonitor(config.divergence_sigma, config.explode_ratio)
        arms = [a for a in config.horizon_arms if a <= config.max_predict_steps]
        self.bandit = LinUCBBandit(arms, len(CONTEXT_NAMES), alpha=config.bandit_alpha,
                                   ladder=config.horizon_ladder)
        self.residuals = ResidualStore()
        self.corrector = ResidualCorrector(len(CONTEXT_NAMES))
        self.directions = make_direction(config.direction, config.linefit_snapshots, config.linefit_spacing)
        self.host_syncs = 0
        self._param_count = sum(int(array_api_compat.size(p)) for p in params)
        self._phase = initial_phase_state()
        self._last_update: list[Array] | None = None
        self._cycle: PredictCycle | None = None
        self._pending: tuple[int, Any] | None = None  # (arm, context) chosen for the next PREDICT
        self._horizon_scale = 1.0
        self._grads_checked = False

    @property
    def phase(self) -> Phase:
        """The phase the next step will run in."""
        return self._phase.phase

    @property
    def phase_state(self) -> PhaseState:
        """The phase, steps done in it and the PREDICT horizon in force."""
        return self._phase

    @property
    def xp(self) -> Any:
        """The array namespace of the model's parameters."""
        return self._xp

    def step(self, batch: Any) -> StepResult:
        """Run one step in the current phase and advance the phase machine."""
        start = time.perf_counter()
        current = self._phase
        if current.phase is Phase.PREDICT:
            result, signals = self._predicted_step(batch, current)
        else:
            result, signals = self._real_step(batch, current)
        self._advance(current, next_phase(current, self.config, signals))
        seconds = time.perf_counter() - start
        self.metrics.record(StepRecord(result.step, result.phase.value, result.loss, result.predicted_loss,
                                       result.backward, seconds, result.confidence, result.skipped))
        return result

    def fit(
        self,
        batches: Iterable[Any] | Callable[[int], Any],
        steps: int | None = None,
        *,
        progress: bool | None = None,
        callbacks: Sequence[Callback] = (),
        checkpoint: CheckpointPolicy | None = None,
    ) -> dict[str, Any]:
        """Step through ``batches`` and return the metrics summary.

        ``batches`` is an iterable, or a function of the global step index (so a resumed
        run gets the batches it would have seen). Stops after ``steps`` steps, when the
        iterable ends, or when a callback returns True. ``progress`` shows a progress
        line on stderr (default: when stderr is a terminal). ``checkpoint`` saves the
        whole trainer every ``checkpoint.every`` steps, keeps the newest
        ``checkpoint.keep`` files, and first resumes from the newest good one.
        """
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ConfigError(f"steps={steps!r}: must be an integer >= 0 or None")
        if checkpoint is not None and checkpoint.resume:
            self._resume_from(checkpoint.directory)
        if callable(batches) and not isinstance(batches, Iterable):
            if steps is None:
                raise ConfigError("steps is required when batches is a function of the step index")
            first = self.state.step
            source: Iterator[Any] = (batches(first + i) for i in range(steps))
        else:
            source = iter(batches)
        show = Progress(steps, "train") if progress or (progress is None and _stderr_is_tty()) else None
        done = 0
        try:
            while steps is None or done < steps:
                try:
                    batch = next(source)
                except StopIteration:
                    break
                result = self.step(batch)
                done += 1
                if show is not None:
                    show.update(done, self._progress_text(result))
                if checkpoint is not None and self.state.step % checkpoint.every == 0:
                    self._auto_save(checkpoint)
                if any(cb(self, result) for cb in callbacks):
                    break
        finally:
            if show is not None:
                show.close()
        return self.metrics.summary()

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole trainer (model, optimizer, dynamics, bandit, metrics, …) to ``path`` atomically."""
        save_trainer(self, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: Model,
        optimizer: Optimizer,
        dynamics: DynamicsModel | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> HybridTrainer:
        """A trainer restored from ``path`` around ``model`` and ``optimizer``.

        Their states are overwritten with the saved ones; the run then continues exactly
        as if it had never stopped (bit for bit on deterministic CPU backends). A
        truncated, corrupted, foreign or newer file raises `CheckpointError` before
        anything is changed; ``max_bytes`` bounds what is read.
        """
        return load_trainer(cls, path, model, optimizer, dynamics, max_bytes)

    def _auto_save(self, policy: CheckpointPolicy) -> None:
        os.makedirs(policy.directory, exist_ok=True)
        self.save(checkpoint_path(policy.directory, self.state.step))
        for old in newest_checkpoint(policy.directory)[policy.keep:]:
            old.unlink(missing_ok=True)
        self.metrics.count("checkpoints_saved")

    def _resume_from(self, directory: str | os.PathLike[str]) -> None:
        for path in newest_checkpoint(directory):
            try:
                loaded = load_trainer(type(self), path, self.model, self.optimizer, self.dynamics)
            except CheckpointError as err:
                print(f"hybrid_core: skipping unreadable checkpoint {path}: {err.message}", file=sys.stderr)
                continue
            self.__dict__.update(loaded.__dict__)
            self.metrics.count("resumed")
            return

    # -- real steps ----------------------------------------------------------------------------

    def _real_step(self, batch: Any, current: PhaseState) -> tuple[StepResult, Signals]:
        # Taken before the step, as `observe` expects; skipped for models that declare they
        # ignore them (the encoder is a fair share of the bookkeeping on a tiny model).
        features = (encode_features(self.state, current, self.config.max_predict_steps)
                    if self._observes_features else _NO_FEATURES)
        cycle = self._cycle
        first_correct = current.phase is Phase.CORRECT and current.steps_in_phase == 0 and cycle is not None
        if first_correct:
            self._line_search(batch, cycle)
        loss, grads = call_model(self.model.loss_and_grad, batch, "loss_and_grad")
        grads = list(grads)
        # The loss is checked every step (it reveals a batch from another library); the
        # gradients' library and shapes once, since a model cannot change them silently.
        check_loss_and_grads(self._xp, self.model, loss, None if self._grads_checked else grads)
        self._grads_checked = True
        stats = self._read(fused_stats(loss, grads, self._last_update))
        loss_f, grad_sq, update_sq, grad_dot, grad_max, nonfinite = stats
        step_index = self.state.step
        verdict = self.monitor.assess(self.state, loss_f, math.sqrt(grad_sq) if nonfinite == 0 else math.nan)
        if verdict.level is Level.FATAL:
            return self._nonfinite(step_index, current, loss_f, int(nonfinite))
        diverging = verdict.level >= Level.FORCE_FULL
        if verdict.level >= Level.SHRINK:
            # Not cumulative: one bad reading halves the next horizon, a worse one quarters it,
            # and a cycle that pays restores it.
            self._horizon_scale = min(self._horizon_scale, 0.25 if diverging else 0.5)
            self.metrics.count("monitor_" + ("force_full" if diverging else "shrink"))
        update = list(self.optimizer.step(grads))
        self._last_update = update
        self.state.record_real(loss_f, grad_sq, update_sq, grad_dot, grad_max, self._param_count,
                               float(self.optimizer.lr), warmup=current.phase is Phase.WARMUP)
        self.directions.observe(self.state.step, self.model)
        predicted = None
        step_scale = None
        if current.phase is Phase.CORRECT and cycle is not None and cycle.correct_prediction is not None:
            predicted = self._record_residual(cycle, current.steps_in_phase, loss_f)
            if first_correct and cycle.best_fraction is not None and cycle.applied:
                step_scale = (1.0 - cycle.best_fraction) * cycle.prediction.step_scale[0]
        self.dynamics.observe(features, Outcome(loss_f, step_scale))
        confidence = float(self.dynamics.confidence())
        horizon = 0
        if current.phase is Phase.FULL and not diverging:
            horizon = self._choose_horizon(current, confidence)
        result = StepResult(step_index, current.phase, loss_f, predicted, True, confidence)
        return result, Signals(confidence, horizon, False, diverging)

    def _choose_horizon(self, current: PhaseState, confidence: float) -> int:
        done = current.steps_in_phase + 1
        cfg = self.config
        if done < cfg.min_full_steps or (done - cfg.min_full_steps) % cfg.min_full_steps:
            return 0
        if confidence < cfg.confidence_threshold:
            return 0
        if not cfg.use_bandit:
            arm, context = cfg.max_predict_steps, None
        else:
            features = encode_features(self.state, current, cfg.max_predict_steps)
            context = compact_context(features, confidence)
            arm = self.bandit.choose(context)
            if arm == 0:
                self.bandit.update(0, context, 0.0)
                self.metrics.record_decision(self.state.step, 0, 0.0)
                return 0
        self._pending = (arm, context)
        return max(1, round(arm * self._horizon_scale))

    def _record_residual(self, cycle: PredictCycle, k: int, loss: float) -> float:
        assert cycle.correct_prediction is not None and cycle.correct_raw is not None
        k = min(k, len(cycle.correct_prediction.loss) - 1)
        predicted = cycle.correct_prediction.loss[k]
        context = cycle.correct_context if cycle.correct_context is not None else cycle.context
        res = self.residuals.add(self.state.step, context, cycle.correct_raw.loss[k], loss)
        self.corrector.update(context, res.residual)
        self.state.record_prediction_error(predicted, loss)
        cycle.correct_losses.append(loss)
        return predicted

    def _nonfinite(self, step_index: int, current: PhaseState, loss: float, count: int
                   ) -> tuple[StepResult, Signals]:
        what = f"loss {loss}" + (f" and {count} non-finite gradient entries" if count else "")
        if self.config.on_nonfinite == "raise":
            raise DivergenceError(
                f"step {step_index} ({current.phase.value}): {what}; parameters were not updated",
                "Lower the learning rate or clip gradients; HybridConfig(on_nonfinite='skip') skips such "
                "batches instead. The trainer is unchanged and can continue with another batch.",
            )
        self.state.record_skip()
        self.metrics.count("skipped_nonfinite")
        confidence = float(self.dynamics.confidence())
        result = StepResult(step_index, current.phase, loss, None, True, confidence, skipped=True)
        return result, Signals(confidence, 0, False, True)

    # -- phase changes -------------------------------------------------------------------------

    def _advance(self, current: PhaseState, nxt: PhaseState) -> None:
        if nxt.phase is Phase.PREDICT and current.phase is not Phase.PREDICT:
            self._start_cycle(nxt)
        elif nxt.phase is Phase.CORRECT and current.phase is not Phase.CORRECT and self._cycle is not None:
            features = encode_features(self.state, nxt, self.config.max_predict_steps)
            context = compact_context(features, float(self.dynamics.confidence()))
            raw = self.dynamics.predict(features, self.config.correct_steps)
            self._cycle.correct_raw = raw
            self._cycle.correct_context = context
            self._cycle.correct_prediction = corrected(raw, math.exp(self.corrector.log_correction(context)))
        elif current.phase is Phase.CORRECT and nxt.phase is not Phase.CORRECT:
            self._finish_cycle()
        self._phase = nxt

    # -- host reads ----------------------------------------------------------------------------

    def _read(self, values: Array) -> list[float]:
        self.host_syncs += 1
        return read_host(values)

    def _progress_text(self, result: StepResult) -> str:
        s = self.metrics.summary()
        loss = "-" if result.loss is None else f"{result.loss:.4f}"
        return (f"{result.phase.value:<7} loss {loss} conf {result.confidence:.2f} "
                f"backward skipped {s['backward_passes_skipped']}")

    def __repr__(self) -> str:
        return (f"HybridTrainer(step={self.state.step}, phase={self.phase.value}, "
                f"backend={library_name(self._xp)})")


def _stderr_is_tty() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())
