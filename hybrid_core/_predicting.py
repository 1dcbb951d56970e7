"""The PREDICT → CORRECT cycle of `HybridTrainer`: predicted steps, the line search, cycle start and end.

A mixin so the trainer's module keeps the real-step loop and this one the predicted side;
the methods use the trainer's attributes (model, optimizer, dynamics, state, metrics, …).
"""

from __future__ import annotations

import math
from typing import Any

from ._checks import call_model, check_loss_and_grads
from ._cycle import PredictCycle, corrected, cycle_reward
from ._features import compact_context, encode_features
from ._monitor import Level
from ._phase import Phase, PhaseState, Signals
from ._result import StepResult

__all__ = ["PredictingMixin"]


class PredictingMixin:
    """Predicted steps and the weight correction that follows them (mixed into `HybridTrainer`)."""

    # -- predicted steps -----------------------------------------------------------------------

    def _predicted_step(self, batch: Any, current: PhaseState) -> tuple[StepResult, Signals]:
        cycle = self._cycle
        assert cycle is not None
        k = current.steps_in_phase
        pred = cycle.prediction
        predicted = pred.loss[k]
        interval = 1 if current.probe else self.config.check_interval
        step_index = self.state.step
        confidence = float(pred.confidence)
        loss_f: float | None = None
        if interval and k > 0 and k % interval == 0:
            loss = call_model(self.model.loss, batch, "loss")
            check_loss_and_grads(self._xp, self.model, loss, None)
            loss_f = self._read(self._xp.reshape(loss, (1,)))[0]
            self.metrics.count("checks")
            cycle.forward_passes += 1
            verdict = self.monitor.assess(self.state, loss_f, None)
            # The check runs before this step's update: k steps are applied, and the forecast
            # for "after k steps" is entry k − 1 (entry k is after k + 1 steps).
            predicted = pred.loss[k - 1]
            if math.isfinite(loss_f):
                self.state.record_prediction_error(predicted, loss_f)
            else:
                self.metrics.count("nonfinite_in_predict")
            if verdict.level >= Level.FORCE_FULL or loss_f > pred.upper[k - 1]:
                undone = cycle.roll_back_to(self.model, cycle.good)
                self.metrics.count("rollbacks" if undone else "checks_failed_at_good_point")
                self.state.record_check(False)
                self.state.record_predicted()
                cycle.predicted_steps += 1
                self.metrics.count("checks_failed")
                result = StepResult(step_index, Phase.PREDICT, loss_f, predicted, False, confidence)
                return result, Signals(confidence, 0, True, False)
            self.state.record_check(True)
            cycle.good = len(cycle.applied)
        scale = pred.step_scale[k]
        self.model.apply_update(cycle.direction, scale)
        cycle.applied.append(scale)
        cycle.predicted_steps += 1
        self.state.record_predicted()
        result = StepResult(step_index, Phase.PREDICT, loss_f, predicted, False, confidence)
        return result, Signals(confidence, 0, False, False)

    # -- CORRECT's weight correction ---------------------------------------------------------

    def _line_search(self, batch: Any, cycle: PredictCycle) -> None:
        """Roll back the fraction of the PREDICT displacement that fits ``batch`` best (forward passes only)."""
        total = cycle.net_scale()
        if not cycle.applied or total == 0.0:
            cycle.paired_gain = 0.0
            return
        # 0 (keep everything) and 1 (back to the entry point) are always measured: their
        # paired difference on one batch is what the bandit's reward is made of.
        fractions = sorted({0.0, 1.0, *self.config.correction_fractions})
        losses = []
        at = 0.0
        for f in fractions:
            self.model.apply_update(cycle.direction, -(f - at) * total)
            at = f
            loss = call_model(self.model.loss, batch, "loss")
            check_loss_and_grads(self._xp, self.model, loss, None)
            losses.append(self._xp.reshape(loss, (1,)))
        values = self._read(self._xp.concat(losses))
        self.metrics.count("line_searches")
        self.metrics.count("line_search_forwards", len(fractions))
        cycle.forward_passes += len(fractions)
        finite = [(v, f) for v, f in zip(values, fractions) if math.isfinite(v)]
        best = min(finite)[1] if finite else 1.0
        if not finite:
            self.metrics.count("nonfinite_in_predict")
        self.model.apply_update(cycle.direction, -(best - at) * total)
        cycle.best_fraction = best
        entry, predicted_end = values[-1], values[0]
        if math.isfinite(entry) and entry > 0:
            cycle.paired_gain = (math.log(entry) - math.log(predicted_end)
                                 if math.isfinite(predicted_end) and predicted_end > 0 else -math.inf)
        self.metrics.count("line_search_rollback_pct", round(100 * best))


    def _start_cycle(self, nxt: PhaseState) -> None:
        features = encode_features(self.state, nxt, self.config.max_predict_steps)
        confidence = float(self.dynamics.confidence())
        arm, context = self._pending if (self._pending and not nxt.probe) else (None, None)
        self._pending = None
        context = compact_context(features, confidence) if context is None else context
        raw = self.dynamics.predict(features, nxt.horizon)
        _, slope, slope_stderr = self.state.trend(self.config.history_size, stderr=True)
        self._cycle = PredictCycle(
            horizon=nxt.horizon,
            arm=arm,
            direction=self.directions.direction(self.model, self.optimizer),
            prediction=corrected(raw, math.exp(self.corrector.log_correction(context))),
            context=context,
            entry_slope=slope,
            slope_stderr=slope_stderr,
        )
        self.state.start_predict(nxt.horizon)
        self.metrics.count("probes" if nxt.probe else "predict_phases")

    def _finish_cycle(self) -> None:
        cycle = self._cycle
        self._cycle = None
        self.state.mark_correction()
        if cycle is None:
            return
        reward = cycle_reward(cycle, self.config.forward_cost, self.config.predict_step_cost)
        if cycle.arm is not None and self.config.use_bandit:
            self.bandit.update(cycle.arm, cycle.context, reward)
            self.metrics.record_decision(self.state.step, cycle.arm, reward)
        if reward > 0:
            self._horizon_scale = 1.0
