"""The predicted side of a trainer step: deciding to predict, starting a prediction cycle, its PREDICT steps, ending it.

`Predictor` coordinates the parts a cycle touches (the cycle itself, the training state, the
dynamics model, the corrector, the bandit, the monitor, the metrics) and owns no state of its
own: everything it changes lives in a part with its own ``state_dict``. The trainer calls it at
the phase boundaries and for every PREDICT step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ._bandit import LinUCBBandit
from ._batchcheck import BatchCheck
from ._cadence import Cadence
from ._config import HybridConfig
from ._corrector import ResidualCorrector
from ._cycle import PredictionCycle, corrected
from ._directions import ExtrapolateDirection, LinefitDirection
from ._features import compact_context
from ._freeze import LayerFreeze
from ._ledger import Ledger
from ._metrics import MetricsCollector
from ._monitor import DivergenceMonitor, Level
from ._phase import Phase, PhaseState, Signals
from ._protocols import Array, DynamicsModel, Model, Optimizer
from ._recorder import Recorder
from ._result import StepResult
from ._state import TrainingState

__all__ = ["Predictor"]


class Predictor:
    """Runs prediction cycles over the trainer's parts (see the module docstring)."""

    def __init__(self, config: HybridConfig, model: Model, optimizer: Optimizer, state: TrainingState,
                 cycle: PredictionCycle, recorder: Recorder, dynamics: DynamicsModel, corrector: ResidualCorrector,
                 bandit: LinUCBBandit, monitor: DivergenceMonitor, metrics: MetricsCollector, ledger: Ledger,
                 directions: ExtrapolateDirection | LinefitDirection, freeze: LayerFreeze, batch_check: BatchCheck,
                 forward: Callable[[Any], Array], flush: Callable[[], None], cadence: Cadence) -> None:
        self._config, self._model, self._optimizer, self._state = config, model, optimizer, state
        self._cycle, self._recorder, self._dynamics, self._corrector = cycle, recorder, dynamics, corrector
        self._bandit, self._monitor, self._metrics, self._ledger = bandit, monitor, metrics, ledger
        self._directions, self._freeze, self._batch_check = directions, freeze, batch_check
        self._forward, self._flush, self._cadence = forward, flush, cadence

    def decide(self, current: PhaseState, index: int) -> int:
        """The PREDICT horizon wanted after this FULL step (0: keep training normally)."""
        cfg = self._config
        done = current.steps_in_phase + 1
        regular = done >= cfg.min_full_steps and (done - cfg.min_full_steps) % cfg.min_full_steps == 0
        if not regular or self._cadence.idle(index) or not self._cadence.may_decide(index):
            return 0
        confidence = self._recorder.confidence
        if self._cadence.after_decision(index, confidence, cfg.use_bandit and self._bandit.gave_up()):
            self._metrics.count("idle_spells")
            return 0
        if confidence < cfg.confidence_threshold:
            return 0
        if not cfg.use_bandit:
            self._cycle.chosen = None
            return max(1, round(cfg.max_predict_steps * self._cycle.horizon_scale))
        context = compact_context(self._recorder.features(current), confidence)
        arm = self._bandit.choose(context)
        if arm == 0:
            self._bandit.update(0, context, 0.0)
            self._metrics.record_decision(index, 0, 0.0)
            return 0
        self._cycle.chosen = (arm, context)
        return max(1, round(arm * self._cycle.horizon_scale))

    def start(self, current: PhaseState, nxt: PhaseState) -> None:
        """Enter PREDICT: the direction, the corrected forecast and the context of the cycle."""
        self._flush()  # a probe can start after a step that was not read
        features = self._recorder.features(current)
        context = compact_context(features, self._recorder.confidence)
        raw = self._dynamics.predict(features, nxt.horizon)
        _, slope, slope_stderr = self._state.trend(self._config.history_size, stderr=True)
        self._cycle.start(self._freeze.hold(self._directions.direction(self._model, self._optimizer)),
                          corrected(raw, math.exp(self._corrector.log_correction(context))), context,
                          (slope, slope_stderr), nxt.probe)
        self._state.start_predict(nxt.horizon)
        self._metrics.count("probes" if nxt.probe else "predict_phases")

    def enter_correct(self, nxt: PhaseState) -> None:
        """Enter CORRECT: the forecast of the correction steps, scaled by the corrector."""
        features = self._recorder.features(nxt)
        context = compact_context(features, self._recorder.confidence)
        raw = self._dynamics.predict(features, self._config.correct_steps)
        self._cycle.enter_correct(raw, math.exp(self._corrector.log_correction(context)), context)

    def finish(self, steps_done: int) -> None:
        """Leave CORRECT: the cycle's reward teaches the bandit."""
        self._flush()
        self._state.mark_correction()
        end = self._cycle.finish()
        if end is not None and end.arm is not None and self._config.use_bandit:
            self._bandit.update(end.arm, end.context, end.reward)
            self._metrics.record_decision(steps_done, end.arm, end.reward)

    def step(self, batch: Any, current: PhaseState, index: int) -> tuple[StepResult, Signals]:
        """One PREDICT step: move along the direction, check with a forward pass when one is due."""
        k = current.steps_in_phase
        cycle, state, metrics = self._cycle, self._state, self._metrics
        prediction = cycle.prediction
        confidence = float(prediction.confidence)
        predicted, loss = prediction.loss[k], None
        if cycle.check_due(k):
            loss = self._ledger.read_arrays([self._forward(batch)])[0]
            self._batch_check.accepted(batch, widen=True)
            metrics.count("checks")
            verdict = self._monitor.assess(state, loss, None)
            check = cycle.check(self._model, k, loss, verdict.level >= Level.FORCE_FULL)
            predicted = check.predicted
            if math.isfinite(loss):
                state.record_prediction_error(predicted, loss)
            else:
                metrics.count("nonfinite_in_predict")
            state.record_check(check.passed)
            if not check.passed:
                metrics.count("rollbacks" if check.undone else "checks_failed_at_good_point")
                metrics.count("checks_failed")
                cycle.count_failed_step()
                state.record_predicted()
                return (StepResult(index, Phase.PREDICT, loss, predicted, False, confidence),
                        Signals(confidence, 0, True, False))
        elif self._batch_check.unchecked(batch, index, self._forward):
            metrics.count("batch_check_forwards")
        cycle.advance(self._model, k)
        state.record_predicted()
        return StepResult(index, Phase.PREDICT, loss, predicted, False, confidence), Signals(confidence)
