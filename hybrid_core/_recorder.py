"""`Recorder`: turns the read values of real steps into the run's history, in step order.

For each read real step it takes the feature vector as it stood before the step, asks the
divergence monitor, records the history, CORRECT's residual, feeds the dynamics model and
writes the metrics record — as if the step had been read at once. It owns what the phase
machine needs next from those reads: the dynamics model's confidence and whether a read
step asked for real steps (``diverging``, consumed by the next measured step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._cadence import Cadence
from ._config import HybridConfig
from ._corrector import ResidualCorrector, ResidualStore
from ._cycle import PredictionCycle
from ._features import FEATURE_DIM, encode_features
from ._ledger import Pending
from ._metrics import MetricsCollector, StepRecord
from ._monitor import DivergenceMonitor, Level
from ._phase import Phase, PhaseState
from ._protocols import DynamicsModel, Outcome
from ._state import Measured, TrainingState
from ._statecheck import fields, flag, real

__all__ = ["Recorded", "Recorder"]

_NO_FEATURES = np.zeros(FEATURE_DIM)
_NO_FEATURES.flags.writeable = False

Recorded = tuple[int, float, float | None]
"""(step, loss, predicted loss) of a recorded real step."""


class Recorder:
    """Records read real steps into the parts given at construction (see the module docstring)."""

    def __init__(self, config: HybridConfig, state: TrainingState, cadence: Cadence, cycle: PredictionCycle,
                 monitor: DivergenceMonitor, residuals: ResidualStore, corrector: ResidualCorrector,
                 dynamics: DynamicsModel, metrics: MetricsCollector, param_count: int,
                 lr_now: Callable[[], float | None] = lambda: None) -> None:
        self._config = config
        self._state = state
        self._cadence = cadence
        self._cycle = cycle
        self._monitor = monitor
        self._residuals = residuals
        self._corrector = corrector
        self._dynamics = dynamics
        self._metrics = metrics
        self._param_count = param_count
        self._lr_now = lr_now
        # A model may declare that `observe` ignores the features: they are then not encoded.
        self._observes_features = getattr(dynamics, "observes_features", True) is not False
        self.confidence = 0.0
        """The dynamics model's confidence after the last step it was fed."""
        self.diverging = False
        """A read step asked for real steps; the next measured step passes it to the phase machine."""
        self._features: tuple[tuple[int, PhaseState], np.ndarray] | None = None

    @property
    def steps_recorded(self) -> int:
        """Steps recorded so far (real, skipped and predicted)."""
        return self._state.step

    def features(self, phase: PhaseState) -> np.ndarray:
        """The feature vector of the history as recorded so far, in ``phase`` (encoded once per key)."""
        key = (self._state.step, phase)
        if self._features is None or self._features[0] != key:
            self._features = (key, encode_features(self._state, phase, self._config.max_predict_steps))
        return self._features[1]

    def record(self, p: Pending, values: list[float]) -> Recorded:
        """Record one read real step (``values``: [loss] or the statistics vector, lr last if measured)."""
        state, cycle = self._state, self._cycle
        loss = values[0]
        feeding = not self._cadence.idle(p.step)
        features = self.features(p.phase) if feeding and self._observes_features else _NO_FEATURES
        measured = None
        lr = p.lr if p.lr is not None else self._lr_now()
        if len(values) > 1:
            lr = values[6] if len(values) > 6 else p.lr
            measured = Measured(values[1], values[2], values[3], values[4], self._param_count, float(lr))
        grad_norm = None if measured is None else math.sqrt(max(measured.grad_sq, 0.0))
        # Idle steps skip the monitor: its signals shape PREDICT phases, and non-finite values are
        # caught by the read itself.
        level = (self._monitor.assess(state, loss, grad_norm, oscillation=measured is not None).level
                 if feeding else Level.OK)
        self.diverging = self.diverging or level >= Level.FORCE_FULL
        if level >= Level.SHRINK:
            # Not cumulative: one bad reading halves the next horizon, a worse one quarters it.
            cycle.shrink(0.25 if level >= Level.FORCE_FULL else 0.5)
            self._metrics.count("monitor_" + ("force_full" if level >= Level.FORCE_FULL else "shrink"))
        state.record_real(loss, warmup=p.phase.phase is Phase.WARMUP, measured=measured)
        predicted, step_scale = None, None
        if p.phase.phase is Phase.CORRECT:
            expected = cycle.expected_in_correct(p.phase.steps_in_phase)
            if expected is not None:
                predicted, raw, context = expected
                self._corrector.update(context, self._residuals.add(p.step, context, raw, loss).residual)
                state.record_prediction_error(predicted, loss)
            if p.phase.steps_in_phase == 0:
                step_scale = cycle.step_scale_seen()
                cycle.keep_search()  # read finite: its line search can no longer be taken back
        if feeding:
            self._dynamics.observe(features, Outcome(loss, step_scale))
            self.confidence = float(self._dynamics.confidence())
        self._metrics.record(StepRecord(p.step, p.phase.phase.value, loss, predicted, True, p.seconds,
                                        self.confidence, False, None if lr is None else float(lr), grad_norm))
        return p.step, loss, predicted

    def record_skipped(self, p: Pending, loss: float) -> None:
        """Record a real step whose batch was skipped for a non-finite loss or gradient."""
        self._state.record_skip()
        self._metrics.count("skipped_nonfinite")
        self._metrics.record(StepRecord(p.step, p.phase.phase.value, loss, None, True, p.seconds,
                                        self.confidence, True))

    def take_diverging(self) -> bool:
        """Whether a step read since the last call asked for real steps (and forget it)."""
        diverging, self.diverging = self.diverging, False
        return diverging

    def state_dict(self) -> dict[str, Any]:
        """The confidence last read and the unconsumed divergence signal."""
        return {"confidence": self.confidence, "diverging": self.diverging}

    def check_state_dict(self, state: dict[str, Any]) -> tuple[float, bool]:
        """(confidence in [0, 1] or NaN, diverging) as `load_state_dict` would set them; `ValueError` if malformed."""
        fields(state, ("confidence", "diverging"), what="recorder state")
        return real(state["confidence"], "confidence", 0.0, 1.0, finite=False), flag(state["diverging"], "diverging")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (`ValueError` on a malformed state)."""
        self.confidence, self.diverging = self.check_state_dict(state)
        self._features = None
