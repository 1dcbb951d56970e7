"""`HybridTrainer`: one step path through the phase machine, composed of parts that own their state."""

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
from ._cadence import Cadence
from ._checks import call_model, check_loss_and_grads, has_method, require_protocol
from ._codec import DEFAULT_MAX_BYTES
from ._config import HybridConfig
from ._corrector import ResidualCorrector, ResidualStore
from ._cycle import PredictionCycle, corrected
from ._directions import make_direction
from ._errors import CheckpointError, ConfigError, DivergenceError, ModelError
from ._features import CONTEXT_NAMES, FEATURE_DIM, compact_context, encode_features
from ._ledger import Ledger, Pending
from ._metrics import MetricsCollector, StepRecord
from ._monitor import DivergenceMonitor, Level
from ._persist import (
    CheckpointPolicy,
    ModelState,
    Part,
    checkpoint_path,
    newest_checkpoint,
    read_checkpoint,
    restore_parts,
    write_checkpoint,
)
from ._phase import Phase, PhaseMachine, PhaseState, Signals
from ._progress import Progress
from ._protocols import Array, DynamicsModel, FusedStep, Model, Optimizer, Outcome
from ._result import StepResult
from ._state import Measured, TrainingState
from .dynamics import RSSMDynamics
from .kernels import fused_stats

__all__ = ["HybridTrainer", "StepResult"]

_NO_FEATURES = np.zeros(FEATURE_DIM)
_NO_FEATURES.flags.writeable = False

_VERIFY_READS = 4
"""Reads between verified points (copies of the weights and optimizer state to roll back to)."""

Callback = Callable[["HybridTrainer", StepResult], "bool | None"]
"""Called after every `fit` step; returning True stops the loop."""


class HybridTrainer:
    """Trains ``model`` with ``optimizer``, predicting some steps instead of computing them.

    Real steps (WARMUP, FULL, CORRECT) run forward + backward + optimizer step (in one call
    when the optimizer offers `FusedStep`) and leave their loss on the device; every
    ``config.read_every`` steps, and before each decision, the pending values are read in one
    transfer, and the statistics of that step are measured too. Read values teach
    ``dynamics`` the loss trajectory (default `RSSMDynamics` seeded with ``config.seed``). In
    FULL a LinUCB bandit picks the next PREDICT horizon, 0 (keep training normally) included.
    A PREDICT step runs no backward pass: it applies ``step_scale · direction`` and every
    ``check_interval`` steps a forward-only check compares the loss with the predicted band;
    leaving it rolls back to the last good point. CORRECT line-searches how much of the
    predicted displacement to keep, then runs real steps whose residuals train a corrector;
    the cycle's reward teaches the bandit. When predicting cannot pay (confidence stays low,
    or every horizon tried lost) the trainer idles for ``idle_steps``: it reads the loss only.

    A non-finite value found by a read rolls the model and optimizer back to the last read
    that was all finite and replays the steps since from their kept batches, reading each, so
    the failing step is handled as if it had been read at once (`DivergenceError`, or skipped).
    `host_syncs` counts every device→host read.

    Parts (each with ``state_dict``/``load_state_dict``; a checkpoint is ``{name: state}``):
    see `parts`.
    """

    def __init__(self, model: Model, optimizer: Optimizer, config: HybridConfig | None = None,
                 dynamics: DynamicsModel | None = None) -> None:
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
                raise ModelError(f"parameter {i} has shape {tuple(p.shape)} with no elements",
                                 "Remove zero-size parameters from Model.parameters().")
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.dynamics = dynamics
        self.state = TrainingState(config.history_size)
        self.metrics = MetricsCollector(config.metrics_max_records)
        self.monitor = DivergenceMonitor(config.divergence_sigma, config.explode_ratio)
        arms = [a for a in config.horizon_arms if a <= config.max_predict_steps]
        self.bandit = LinUCBBandit(arms, len(CONTEXT_NAMES), alpha=config.bandit_alpha, ladder=config.horizon_ladder)
        self.residuals = ResidualStore()
        self.corrector = ResidualCorrector(len(CONTEXT_NAMES))
        self.directions = make_direction(config.direction, config.linefit_snapshots, config.linefit_spacing)
        self.phases = PhaseMachine(config)
        self.cycle = PredictionCycle(config)
        self.cadence = Cadence(config)
        self.ledger = Ledger(self._xp)
        self._observes_features = getattr(dynamics, "observes_features", True) is not False
        # Lagged reads need a way back from non-finite weights (`Model.set_parameters`); without
        # it every real step is read before its update, as with read_every=1.
        self._eager = config.read_every == 1 or not has_method(model, "set_parameters")
        self._fused = isinstance(optimizer, FusedStep) and optimizer.model is model and not self._eager
        self._last_update: list[Array] | None = None
        self._param_count = sum(int(array_api_compat.size(p)) for p in params)
        self._checked = False
        self._confidence = 0.0
        self._diverging = False  # a read step asked for real steps; consumed by the next measured step
        self._features: tuple[tuple[int, PhaseState], np.ndarray] | None = None
        self.ledger.verify(model, optimizer)

    # -- public views --------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """The phase the next step will run in."""
        return self.phases.state.phase

    @property
    def phase_state(self) -> PhaseState:
        """The phase, steps done in it and the PREDICT horizon in force."""
        return self.phases.state

    @property
    def xp(self) -> Any:
        """The array namespace of the model's parameters."""
        return self._xp

    @property
    def host_syncs(self) -> int:
        """Device→host reads so far (losses and statistics in batches, checks, line searches)."""
        return self.ledger.host_syncs

    @property
    def steps_done(self) -> int:
        """Steps taken so far, read or still pending."""
        return self.state.step + len(self.ledger.pending)

    @property
    def idle(self) -> bool:
        """Whether the next step runs idle (loss only; see `HybridConfig.idle_after`)."""
        return self.cadence.idle(self.steps_done)

    def parts(self) -> dict[str, Part]:
        """The parts whose states make up a checkpoint, in the order they are restored."""
        return {"optimizer": self.optimizer, "dynamics": self.dynamics, "model": ModelState(self.model),
                "state": self.state, "phase": self.phases, "cycle": self.cycle, "cadence": self.cadence,
                "bandit": self.bandit, "residuals": self.residuals, "corrector": self.corrector,
                "directions": self.directions, "metrics": self.metrics, "ledger": self.ledger}

    # -- stepping ------------------------------------------------------------------------------

    def step(self, batch: Any) -> StepResult:
        """Run one step in the current phase and advance the phase machine.

        A real step's ``loss`` is ``None`` until it is read (see `flush`).
        """
        start = time.perf_counter()
        current = self.phases.state
        index = self.steps_done
        if current.phase is Phase.PREDICT:
            result, signals = self._predicted_step(batch, current, index)
        else:
            result, signals = self._real_step(batch, current, index, start)
        self._advance(current, signals)
        seconds = time.perf_counter() - start
        if current.phase is Phase.PREDICT:
            self.metrics.record(StepRecord(index, Phase.PREDICT.value, result.loss, result.predicted_loss,
                                           False, seconds, result.confidence))
        elif self.ledger.pending and self.ledger.pending[-1].step == index:
            self.ledger.pending[-1] = self.ledger.pending[-1]._replace(seconds=seconds)
        else:
            self.metrics.add_seconds(index, seconds)
        return result

    def flush(self) -> None:
        """Read and record every pending real step now (one host read); `fit` and `save` call it."""
        if self.ledger.pending:
            self._settle()

    def _real_step(self, batch: Any, current: PhaseState, index: int,
                   start: float) -> tuple[StepResult, Signals]:
        measure = self._eager or self.cadence.measured(current, index)
        if current.phase is Phase.CORRECT and current.steps_in_phase == 0 and self.cycle.active:
            search = self.cycle.line_search(self.model, batch, self._forward, self._read_list)
            if search is not None:
                self.metrics.count("line_searches")
                self.metrics.count("line_search_forwards", search.forwards)
                self.metrics.count("line_search_rollback_pct", round(100 * search.best_fraction))
                if not search.finite:
                    self.metrics.count("nonfinite_in_predict")
            # Predicted steps and the search moved the weights outside a step: a rollback must not
            # replay across them, so the point reached becomes the verified one.
            self.ledger.verify(self.model, self.optimizer)
        if self._eager:
            self.flush()
            settled = self._eager_step(Pending(index, current, batch, None, None, None, math.nan), 0)
        else:
            loss, stats, lr = self._compute(batch, measure and not self.cadence.idle(index))
            self.ledger.add(Pending(index, current, batch, loss, stats, lr, math.nan))
            if not measure:
                return (StepResult(index, current.phase, None, None, True, self._confidence),
                        Signals(self._confidence, 0, False, False))
            settled = self._settle()
        last = settled[-1] if settled and settled[-1][0] == index else None
        diverging, self._diverging = self._diverging, False
        horizon = 0
        if last is not None and current.phase is Phase.FULL and not diverging:
            horizon = self._decide(current, index)
        loss_f = None if last is None else last[1]
        predicted = None if last is None else last[2]
        skipped = last is None
        result = StepResult(index, current.phase, loss_f, predicted, True, self._confidence, skipped=skipped)
        return result, Signals(self._confidence, horizon, False, diverging or skipped)

    def _eager_step(self, p: Pending, later: int) -> list[tuple[int, float, float | None]]:
        """One real step read before its update: a non-finite loss or gradient never reaches the weights."""
        loss, grads = call_model(self.model.loss_and_grad, p.batch, "loss_and_grad")
        grads = list(grads)
        check_loss_and_grads(self._xp, self.model, loss, None if self._checked else grads)
        self._checked = True
        values = self._read_list([fused_stats(loss, grads, self._last_update)])
        if not _finite(values):
            self._nonfinite(p, values, later)
            return []
        self._last_update = list(self.optimizer.step(grads))
        out = [self._record(p, [*values, self._read_lr()])]
        self.directions.observe(self.state.step, self.model)
        return out

    def _compute(self, batch: Any, measure: bool) -> tuple[Array, Array | None, float | None]:
        """Forward, backward and update; the loss (and statistics when ``measure``) stay on the device."""
        if self._fused:
            loss, stats = call_model(lambda b: self.optimizer.fused_step(b, measure), batch, "fused_step")
            if not self._checked:
                check_loss_and_grads(self._xp, self.model, loss, None)
                self._checked = True
            return loss, stats, None
        loss, grads = call_model(self.model.loss_and_grad, batch, "loss_and_grad")
        grads = list(grads)
        # The loss is checked every step (it reveals a batch from another library); the
        # gradients' library and shapes once, since a model cannot change them silently.
        check_loss_and_grads(self._xp, self.model, loss, None if self._checked else grads)
        self._checked = True
        update = self.optimizer.step(grads)
        if not measure:
            return loss, None, None
        return loss, fused_stats(loss, grads, list(update)), self._read_lr()

    # -- reading and recording real steps -------------------------------------------------------

    def _settle(self) -> list[tuple[int, float, float | None]]:
        """Read the pending steps and record them; roll back and replay if a value is not finite."""
        values = self.ledger.read()
        if not all(_finite(v) for v in values):
            return self._replay()
        pending, self.ledger.pending = self.ledger.pending, []
        out = [self._record(p, v) for p, v in zip(pending, values)]
        self.directions.observe(self.state.step, self.model)
        self.ledger.settled += pending
        if len(self.ledger.settled) >= _VERIFY_READS * self.config.read_every:
            self.ledger.verify(self.model, self.optimizer)
        return out

    def _record(self, p: Pending, values: list[float]) -> tuple[int, float, float | None]:
        """Record one read real step: monitor, history, CORRECT's residual, dynamics model, metrics."""
        loss = values[0]
        feeding = not self.cadence.idle(p.step)
        features = self._features_now(p.phase) if feeding and self._observes_features else _NO_FEATURES
        measured = None
        if len(values) > 1:
            lr = values[6] if len(values) > 6 else p.lr
            measured = Measured(values[1], values[2], values[3], values[4], self._param_count, float(lr))
        grad_norm = None if measured is None else math.sqrt(max(measured.grad_sq, 0.0))
        # Idle steps skip the monitor: its signals shape PREDICT phases, and non-finite values are
        # caught by the read itself.
        level = (self.monitor.assess(self.state, loss, grad_norm, oscillation=measured is not None).level
                 if feeding else Level.OK)
        self._diverging = self._diverging or level >= Level.FORCE_FULL
        if level >= Level.SHRINK:
            # Not cumulative: one bad reading halves the next horizon, a worse one quarters it.
            self.cycle.shrink(0.25 if level >= Level.FORCE_FULL else 0.5)
            self.metrics.count("monitor_" + ("force_full" if level >= Level.FORCE_FULL else "shrink"))
        self.state.record_real(loss, warmup=p.phase.phase is Phase.WARMUP, measured=measured)
        predicted, step_scale = None, None
        if p.phase.phase is Phase.CORRECT:
            expected = self.cycle.expected_in_correct(p.phase.steps_in_phase)
            if expected is not None:
                predicted, raw, context = expected
                self.corrector.update(context, self.residuals.add(p.step, context, raw, loss).residual)
                self.state.record_prediction_error(predicted, loss)
            if p.phase.steps_in_phase == 0:
                step_scale = self.cycle.step_scale_seen()
        if feeding:
            self.dynamics.observe(features, Outcome(loss, step_scale))
            self._confidence = float(self.dynamics.confidence())
        self.metrics.record(StepRecord(p.step, p.phase.phase.value, loss, predicted, True, p.seconds,
                                       self._confidence))
        return p.step, loss, predicted

    def _replay(self) -> list[tuple[int, float, float | None]]:
        """Back to the last verified point; rerun the steps read since (no reads: they were finite), then
        the pending ones one by one, each read before its update."""
        pending, self.ledger.pending = self.ledger.pending, []
        settled = self.ledger.settled
        self.ledger.restore(self.model, self.optimizer)
        self.metrics.count("late_nonfinite_rollbacks")
        for p in settled:
            self._compute(p.batch, False)
        self._last_update = None
        out = []
        for i, p in enumerate(pending):
            out += self._eager_step(p, len(pending) - 1 - i)
        self.ledger.verify(self.model, self.optimizer)
        return out

    def _nonfinite(self, p: Pending, values: list[float], later: int) -> None:
        what = f"loss {values[0]}" + (f" and {int(values[5])} non-finite gradient entries" if values[5] else "")
        if self.config.on_nonfinite == "raise":
            self.phases.state = p.phase
            undone = f"; the {later} later step(s) were undone" if later else ""
            raise DivergenceError(
                f"step {p.step} ({p.phase.phase.value}): {what}; the trainer is back at the state before "
                f"step {p.step}{undone}",
                "Lower the learning rate or clip gradients; HybridConfig(on_nonfinite='skip') skips such "
                "batches instead. The trainer can continue with another batch.",
            )
        self.state.record_skip()
        self.metrics.count("skipped_nonfinite")
        self.metrics.record(StepRecord(p.step, p.phase.phase.value, values[0], None, True, p.seconds,
                                       self._confidence, True))

    def _features_now(self, phase: PhaseState) -> np.ndarray:
        """The feature vector of the history as recorded so far (computed once per recorded step)."""
        key = (self.state.step, phase)
        if self._features is None or self._features[0] != key:
            self._features = (key, encode_features(self.state, phase, self.config.max_predict_steps))
        return self._features[1]

    # -- decisions and phase changes ------------------------------------------------------------

    def _decide(self, current: PhaseState, index: int) -> int:
        """The PREDICT horizon wanted after this FULL step (0: keep training normally)."""
        cfg = self.config
        done = current.steps_in_phase + 1
        regular = done >= cfg.min_full_steps and (done - cfg.min_full_steps) % cfg.min_full_steps == 0
        if not regular or self.cadence.idle(index) or not self.cadence.may_decide(index):
            return 0
        confidence = self._confidence
        if self.cadence.after_decision(index, confidence, cfg.use_bandit and self.bandit.gave_up()):
            self.metrics.count("idle_spells")
            return 0
        if confidence < cfg.confidence_threshold:
            return 0
        if not cfg.use_bandit:
            self.cycle.chosen = None
            return max(1, round(cfg.max_predict_steps * self.cycle.horizon_scale))
        context = compact_context(self._features_now(current), confidence)
        arm = self.bandit.choose(context)
        if arm == 0:
            self.bandit.update(0, context, 0.0)
            self.metrics.record_decision(index, 0, 0.0)
            return 0
        self.cycle.chosen = (arm, context)
        return max(1, round(arm * self.cycle.horizon_scale))

    def _advance(self, current: PhaseState, signals: Signals) -> None:
        nxt = self.phases.advance(signals)
        if nxt.phase is Phase.PREDICT and current.phase is not Phase.PREDICT:
            self._start_cycle(current, nxt)
        elif nxt.phase is Phase.CORRECT and current.phase is not Phase.CORRECT and self.cycle.active:
            features = self._features_now(nxt)
            context = compact_context(features, self._confidence)
            raw = self.dynamics.predict(features, self.config.correct_steps)
            self.cycle.enter_correct(raw, math.exp(self.corrector.log_correction(context)), context)
        elif current.phase is Phase.CORRECT and nxt.phase is not Phase.CORRECT:
            self._finish_cycle()

    def _start_cycle(self, current: PhaseState, nxt: PhaseState) -> None:
        self.flush()  # a probe can start after a step that was not read
        features = self._features_now(current)
        context = compact_context(features, self._confidence)
        raw = self.dynamics.predict(features, nxt.horizon)
        _, slope, slope_stderr = self.state.trend(self.config.history_size, stderr=True)
        self.cycle.start(self.directions.direction(self.model, self.optimizer),
                         corrected(raw, math.exp(self.corrector.log_correction(context))), context,
                         (slope, slope_stderr), nxt.probe)
        self.state.start_predict(nxt.horizon)
        self.metrics.count("probes" if nxt.probe else "predict_phases")

    def _finish_cycle(self) -> None:
        self.flush()
        self.state.mark_correction()
        end = self.cycle.finish()
        if end is not None and end.arm is not None and self.config.use_bandit:
            self.bandit.update(end.arm, end.context, end.reward)
            self.metrics.record_decision(self.steps_done, end.arm, end.reward)

    # -- predicted steps -----------------------------------------------------------------------

    def _predicted_step(self, batch: Any, current: PhaseState, index: int) -> tuple[StepResult, Signals]:
        k = current.steps_in_phase
        prediction = self.cycle.prediction
        confidence = float(prediction.confidence)
        predicted, loss = prediction.loss[k], None
        if self.cycle.check_due(k):
            loss = self._read_list([self._forward(batch)])[0]
            self.metrics.count("checks")
            verdict = self.monitor.assess(self.state, loss, None)
            check = self.cycle.check(self.model, k, loss, verdict.level >= Level.FORCE_FULL)
            predicted = check.predicted
            if math.isfinite(loss):
                self.state.record_prediction_error(predicted, loss)
            else:
                self.metrics.count("nonfinite_in_predict")
            self.state.record_check(check.passed)
            if not check.passed:
                self.metrics.count("rollbacks" if check.undone else "checks_failed_at_good_point")
                self.metrics.count("checks_failed")
                self.cycle.count_failed_step()
                self.state.record_predicted()
                return (StepResult(index, Phase.PREDICT, loss, predicted, False, confidence),
                        Signals(confidence, 0, True, False))
        self.cycle.advance(self.model, k)
        self.state.record_predicted()
        return StepResult(index, Phase.PREDICT, loss, predicted, False, confidence), Signals(confidence)

    def _read_lr(self) -> float:
        """The optimizer's learning rate; counted as a host read when the optimizer says it is one."""
        if getattr(self.optimizer, "lr_on_device", False) is True:
            self.ledger.host_syncs += 1
        return float(self.optimizer.lr)

    def _forward(self, batch: Any) -> Array:
        loss = call_model(self.model.loss, batch, "loss")
        check_loss_and_grads(self._xp, self.model, loss, None)
        return self._xp.reshape(loss, (1,))

    def _read_list(self, arrays: list[Array]) -> list[float]:
        return self.ledger.read_floats(arrays[0] if len(arrays) == 1 else self._xp.concat(arrays))

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, batches: Iterable[Any] | Callable[[int], Any], steps: int | None = None, *,
            progress: bool | None = None, callbacks: Sequence[Callback] = (),
            checkpoint: CheckpointPolicy | None = None) -> dict[str, Any]:
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
            first = self.steps_done
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
                if checkpoint is not None and self.steps_done % checkpoint.every == 0:
                    self._auto_save(checkpoint)
                if any(cb(self, result) for cb in callbacks):
                    break
            self.flush()
        finally:
            if show is not None:
                show.close()
        return self.metrics.summary()

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole trainer (every part's state) to ``path`` atomically; pending steps are read first."""
        self.flush()
        write_checkpoint(path, self.config.to_dict(), self.parts(),
                         {"dynamics_type": type(self.dynamics).__name__})

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: Model, optimizer: Optimizer,
             dynamics: DynamicsModel | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> HybridTrainer:
        """A trainer restored from ``path`` around ``model`` and ``optimizer`` (their states are overwritten).

        The run then continues exactly as if it had never stopped (bit for bit on deterministic
        CPU backends). A truncated, corrupted, foreign, older-format or newer file raises
        `CheckpointError`; a part that refuses its state puts the earlier ones back.
        """
        raw = read_checkpoint(path, max_bytes)
        try:
            config = HybridConfig.from_dict(raw["config"])
        except (ConfigError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{os.fspath(path)}: the saved config is not valid ({exc})") from exc
        trainer = cls(model, optimizer, config, dynamics)
        trainer._load_parts(path, raw)
        return trainer

    def _load_parts(self, path: str | os.PathLike[str], raw: dict[str, Any]) -> None:
        saved_dyn = raw.get("dynamics_type")
        if type(self.dynamics).__name__ != saved_dyn:
            raise CheckpointError(f"{os.fspath(path)}: saved with dynamics {saved_dyn}, "
                                  f"not {type(self.dynamics).__name__}", f"Pass dynamics={saved_dyn}(...) to load it.")
        device = array_api_compat.device(self.model.parameters()[0])
        restore_parts(self.parts(), raw["parts"], self._xp, device, f"{os.fspath(path)}: ")
        self._features = None
        self.ledger.verify(self.model, self.optimizer)

    def _auto_save(self, policy: CheckpointPolicy) -> None:
        os.makedirs(policy.directory, exist_ok=True)
        self.save(checkpoint_path(policy.directory, self.steps_done))
        for old in newest_checkpoint(policy.directory)[policy.keep:]:
            old.unlink(missing_ok=True)
        self.metrics.count("checkpoints_saved")

    def _resume_from(self, directory: str | os.PathLike[str]) -> None:
        for path in newest_checkpoint(directory):
            try:
                raw = read_checkpoint(path)
                self._load_parts(path, raw)
            except CheckpointError as err:
                print(f"hybrid_core: skipping unreadable checkpoint {path}: {err.message}", file=sys.stderr)
                continue
            changed = sorted(k for k, v in raw["config"].items() if self.config.to_dict().get(k) != _plain(v))
            if changed:
                print(f"hybrid_core: resumed from {path} with this run's config, which differs from the saved "
                      f"one in {', '.join(changed)}", file=sys.stderr)
            self.metrics.count("resumed")
            return

    def _progress_text(self, result: StepResult) -> str:
        s = self.metrics.summary()
        loss = "-" if result.loss is None else f"{result.loss:.4f}"
        return (f"{result.phase.value:<7} loss {loss} conf {result.confidence:.2f} "
                f"backward skipped {s['backward_passes_skipped']}")

    def __repr__(self) -> str:
        return (f"HybridTrainer(step={self.steps_done}, phase={self.phase.value}, "
                f"backend={library_name(self._xp)})")


def _finite(values: list[float]) -> bool:
    if not all(math.isfinite(v) for v in values):
        return False
    return len(values) < 6 or values[5] == 0


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _stderr_is_tty() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())
