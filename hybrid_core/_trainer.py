"""`HybridTrainer`: runs real and predicted steps through the phase machine."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import array_api_compat

from ._backend import library_name, namespace_of, same_namespace, to_numpy
from ._baseline import TrendDynamics
from ._config import HybridConfig
from ._errors import BatchError, ConfigError, DivergenceError, HybridError, ModelError
from ._features import encode_features
from ._metrics import MetricsCollector, StepRecord
from ._phase import Phase, PhaseState, Signals, initial_phase_state, next_phase
from ._progress import Progress
from ._protocols import Array, DynamicsModel, Model, Optimizer, Outcome, Prediction
from ._state import TrainingState
from .kernels import fused_stats

__all__ = ["HybridTrainer", "StepResult"]


class StepResult(NamedTuple):
    """What one `HybridTrainer.step` did.

    ``loss`` is the measured loss (``None`` on a predicted step without a check);
    ``predicted_loss`` what the dynamics model expected (``None`` outside
    PREDICT/CORRECT); ``backward`` whether a backward pass ran.
    """

    step: int
    phase: Phase
    loss: float | None
    predicted_loss: float | None
    backward: bool
    confidence: float
    skipped: bool = False


Callback = Callable[["HybridTrainer", StepResult], "bool | None"]
"""Called after every `fit` step; returning True stops the loop."""


class HybridTrainer:
    """Trains ``model`` with ``optimizer``, predicting some steps instead of computing them.

    Real steps (WARMUP, FULL, CORRECT) run forward + backward + optimizer step and
    teach ``dynamics`` the loss trajectory. A PREDICT step runs no backward pass: it
    applies ``step_scale · direction`` where the direction is the optimizer's own
    predicted next update (`Optimizer.extrapolate`), and every ``check_interval``
    steps a forward-only check compares the loss with the predicted band; leaving
    the band rolls the unchecked predicted steps back and ends the phase.

    Host reads: one per real step (loss and gradient statistics in one transfer)
    and one per forward check; `host_syncs` counts them.
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
        _require(model, Model, "model")
        _require(optimizer, Optimizer, "optimizer")
        dynamics = TrendDynamics() if dynamics is None else dynamics
        _require(dynamics, DynamicsModel, "dynamics")
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
        self.state = TrainingState(config.history_size)
        self.metrics = MetricsCollector(config.metrics_max_records)
        self.host_syncs = 0
        self._param_count = sum(int(array_api_compat.size(p)) for p in params)
        self._phase = initial_phase_state()
        self._last_update: list[Array] | None = None
        self._direction: list[Array] | None = None
        self._prediction: Prediction | None = None
        self._unchecked_scale = 0.0

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
        self.metrics.record(
            StepRecord(
                step=result.step,
                phase=result.phase.value,
                loss=result.loss,
                predicted_loss=result.predicted_loss,
                backward=result.backward,
                wall_seconds=time.perf_counter() - start,
                confidence=result.confidence,
                skipped=result.skipped,
            )
        )
        return result

    def fit(
        self,
        batches: Iterable[Any] | Callable[[int], Any],
        steps: int | None = None,
        *,
        progress: bool | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> dict[str, Any]:
        """Step through ``batches`` (an iterable, or a function of the step index) and return the summary.

        Stops after ``steps`` steps, when the iterable ends, or when a callback
        returns True. ``progress`` shows a progress line on stderr (default: when
        stderr is a terminal).
        """
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ConfigError(f"steps={steps!r}: must be an integer >= 0 or None")
        if callable(batches) and not isinstance(batches, Iterable):
            if steps is None:
                raise ConfigError("steps is required when batches is a function of the step index")
            source: Iterator[Any] = (batches(i) for i in range(steps))
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
                if any(cb(self, result) for cb in callbacks):
                    break
        finally:
            if show is not None:
                show.close()
        return self.metrics.summary()

    # -- real steps ----------------------------------------------------------------------------

    def _real_step(self, batch: Any, current: PhaseState) -> tuple[StepResult, Signals]:
        features = encode_features(self.state, current, self.config.max_predict_steps)
        loss, grads = _call_model(self.model.loss_and_grad, batch, "loss_and_grad")
        grads = list(grads)
        self._check_loss_and_grads(loss, grads)
        stats = self._read(fused_stats(loss, grads, self._last_update))
        loss_f, grad_sq, update_sq, grad_dot, grad_max, nonfinite = stats
        step_index = self.state.step
        if nonfinite > 0 or not math.isfinite(loss_f):
            return self._nonfinite(step_index, current, loss_f, int(nonfinite))
        diverging = self._is_diverging(loss_f)
        update = list(self.optimizer.step(grads))
        self._last_update = update
        self.state.record_real(
            loss_f, grad_sq, update_sq, grad_dot, grad_max, self._param_count,
            float(self.optimizer.lr), warmup=current.phase is Phase.WARMUP,
        )
        predicted = None
        if current.phase is Phase.CORRECT and self._prediction is not None:
            predicted = self._prediction.loss[min(current.steps_in_phase, len(self._prediction.loss) - 1)]
            self.state.record_prediction_error(predicted, loss_f)
        self.dynamics.observe(features, Outcome(loss_f))
        confidence = float(self.dynamics.confidence())
        if diverging:
            self.metrics.count("divergence_warnings")
        result = StepResult(step_index, current.phase, loss_f, predicted, True, confidence)
        return result, Signals(confidence, self.config.max_predict_steps, False, diverging)

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

    def _is_diverging(self, loss: float) -> bool:
        st = self.state
        if not st.warmup_done or st.loss_var_ema <= 0.0:
            return False
        return loss > st.loss_ema_fast + self.config.divergence_sigma * math.sqrt(st.loss_var_ema)

    # -- predicted steps -----------------------------------------------------------------------

    def _predicted_step(self, batch: Any, current: PhaseState) -> tuple[StepResult, Signals]:
        assert self._prediction is not None and self._direction is not None
        k = current.steps_in_phase
        pred = self._prediction
        predicted = pred.loss[k]
        interval = 1 if current.probe else self.config.check_interval
        step_index = self.state.step
        confidence = float(pred.confidence)
        loss_f: float | None = None
        if interval and k > 0 and k % interval == 0:
            loss_f = self._read(self._forward_loss(batch))[0]
            self.metrics.count("checks")
            self.state.record_prediction_error(predicted, loss_f)
            if not (math.isfinite(loss_f) and loss_f <= pred.upper[k]):
                self._roll_back_unchecked()
                self.state.record_check(False)
                self.state.record_predicted()
                self.metrics.count("checks_failed")
                result = StepResult(step_index, Phase.PREDICT, loss_f, predicted, False, confidence)
                return result, Signals(confidence, 0, True, False)
            self.state.record_check(True)
            self._unchecked_scale = 0.0
        scale = pred.step_scale[k]
        self.model.apply_update(self._direction, scale)
        self._unchecked_scale += scale
        self.state.record_predicted()
        result = StepResult(step_index, Phase.PREDICT, loss_f, predicted, False, confidence)
        return result, Signals(confidence, 0, False, False)

    def _forward_loss(self, batch: Any) -> Array:
        loss = _call_model(self.model.loss, batch, "loss")
        self._check_loss_and_grads(loss, None)
        return self._xp.reshape(loss, (1,))

    def _roll_back_unchecked(self) -> None:
        if self._unchecked_scale != 0.0 and self._direction is not None:
            self.model.apply_update(self._direction, -self._unchecked_scale)
            self.metrics.count("rollbacks")
        self._unchecked_scale = 0.0

    # -- phase changes -------------------------------------------------------------------------

    def _advance(self, current: PhaseState, nxt: PhaseState) -> None:
        if nxt.phase is Phase.PREDICT and current.phase is not Phase.PREDICT:
            features = encode_features(self.state, nxt, self.config.max_predict_steps)
            self._direction = list(self.optimizer.extrapolate())
            self._prediction = self.dynamics.predict(features, nxt.horizon)
            self._unchecked_scale = 0.0
            self.state.start_predict(nxt.horizon)
            self.metrics.count("probes" if nxt.probe else "predict_phases")
        elif nxt.phase is Phase.CORRECT and current.phase is not Phase.CORRECT:
            self._direction = None
            features = encode_features(self.state, nxt, self.config.max_predict_steps)
            self._prediction = self.dynamics.predict(features, self.config.correct_steps)
        elif current.phase is Phase.CORRECT and nxt.phase is not Phase.CORRECT:
            self._prediction = None
            self.state.mark_correction()
        self._phase = nxt

    # -- checks and host reads -----------------------------------------------------------------

    def _read(self, values: Array) -> list[float]:
        self.host_syncs += 1
        return [float(v) for v in to_numpy(values).tolist()]

    def _check_loss_and_grads(self, loss: Any, grads: list[Any] | None) -> None:
        same_namespace(self._xp, [loss], "the loss")
        if tuple(loss.shape) not in ((), (1,)):
            raise BatchError(
                f"the model returned a loss of shape {tuple(loss.shape)}; a scalar was expected",
                "Reduce the loss to a scalar (e.g. mean over the batch) inside Model.loss/loss_and_grad.",
            )
        if grads is None:
            return
        params = self.model.parameters()
        if len(grads) != len(params):
            raise ModelError(f"loss_and_grad returned {len(grads)} gradients for {len(params)} parameters")
        same_namespace(self._xp, grads, "the gradients")
        for i, (g, p) in enumerate(zip(grads, params)):
            if tuple(g.shape) != tuple(p.shape):
                raise ModelError(
                    f"gradient {i} has shape {tuple(g.shape)} but parameter {i} has {tuple(p.shape)}"
                )

    def _progress_text(self, result: StepResult) -> str:
        s = self.metrics.summary()
        loss = "-" if result.loss is None else f"{result.loss:.4f}"
        return (f"{result.phase.value:<7} loss {loss} conf {result.confidence:.2f} "
                f"backward skipped {s['backward_passes_skipped']}")

    def __repr__(self) -> str:
        return (f"HybridTrainer(step={self.state.step}, phase={self.phase.value}, "
                f"backend={library_name(self._xp)})")


def _call_model(method: Callable[[Any], Any], batch: Any, name: str) -> Any:
    """Call a model method on a batch; the model's own errors become `BatchError` (chained)."""
    try:
        return method(batch)
    except HybridError:
        raise
    except Exception as exc:
        raise BatchError(
            f"Model.{name} failed on this batch: {type(exc).__name__}: {exc}",
            "Check the batch's shapes, dtypes and device against the model; the trainer was not changed.",
        ) from exc


def _require(obj: Any, protocol: type, what: str) -> None:
    if not isinstance(obj, protocol):
        missing = [name for name in _protocol_members(protocol) if not hasattr(obj, name)]
        raise ModelError(
            f"{what} ({type(obj).__name__}) does not implement {protocol.__name__}: missing {', '.join(missing)}",
            f"Implement {', '.join(missing)} (see hybrid_core.{protocol.__name__}).",
        )


def _protocol_members(protocol: type) -> list[str]:
    return sorted(n for n in vars(protocol) if not n.startswith("_"))


def _stderr_is_tty() -> bool:
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())
