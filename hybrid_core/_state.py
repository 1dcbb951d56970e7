"""`TrainingState`: bounded history of the run that the feature encoder reads."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ._statecheck import fields, flag, integer, real, reals

__all__ = ["Measured", "RingBuffer", "TrainingState"]

_FAST, _SLOW = 0.1, 0.01


class RingBuffer:
    """A fixed-capacity float64 history; appending past capacity drops the oldest value."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._data = np.zeros(capacity, dtype=np.float64)
        self._next = 0
        self._size = 0

    @property
    def capacity(self) -> int:
        """How many values the buffer holds at most."""
        return self._data.shape[0]

    def __len__(self) -> int:
        return self._size

    def append(self, value: float) -> None:
        """Add ``value``, overwriting the oldest one when full."""
        self._data[self._next] = value
        self._next = (self._next + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)

    def last(self, n: int | None = None) -> np.ndarray:
        """The newest ``n`` values (all when ``None``), oldest first, as a copy."""
        n = self._size if n is None else max(0, min(n, self._size))
        idx = (self._next - n + np.arange(n)) % self.capacity
        return self._data[idx]

    def get(self, age: int) -> float:
        """The value ``age`` appends ago (0 = newest); requires ``age < len(self)``."""
        if not 0 <= age < self._size:
            raise IndexError(f"age {age} outside history of {self._size}")
        return float(self._data[(self._next - 1 - age) % self.capacity])

    def state_dict(self) -> dict[str, Any]:
        """The values (oldest first) and capacity."""
        return {"capacity": self.capacity, "values": self.last().tolist()}

    def check_state_dict(self, state: dict[str, Any], what: str = "ring buffer") -> list[float]:
        """The values `load_state_dict` would keep; `ValueError` naming the field if ``state`` is malformed.

        The saved capacity is only checked (an integer >= 1, at least the number of values): the buffer
        keeps its own capacity, so a file never decides how much memory is allocated.
        """
        fields(state, ("capacity", "values"), what=what)
        capacity = integer(state["capacity"], f"{what}.capacity", 1)
        values = reals(state["values"], f"{what}.values", max_len=capacity, finite=False)
        return values[-self.capacity:]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the newest values of what `state_dict` returned (as many as this buffer's capacity)."""
        values = self.check_state_dict(state)
        self._data[:] = 0.0
        self._next = self._size = 0
        for v in values:
            self.append(v)


class Measured(NamedTuple):
    """The statistics of a measured real step: its gradient, the update it applied, the learning rate."""

    grad_sq: float
    update_sq: float
    grad_dot_update: float
    grad_max: float
    param_count: int
    lr: float


class TrainingState:
    """Running statistics and bounded histories of one training run.

    Only Python floats live here (read from the device in batches, see `Ledger`), so the
    whole state is small: ``history_size`` values per buffer, whatever the run length.
    ``grad_norms`` holds one value per measured step, ``losses`` one per real step.
    """

    def __init__(self, history_size: int = 256) -> None:
        self.losses = RingBuffer(history_size)
        """Loss of each real step (finite only)."""
        self.grad_norms = RingBuffer(history_size)
        """Gradient L2 norm of each real step."""
        self.step = 0
        self.real_steps = 0
        self.skipped_steps = 0
        self.first_loss = math.nan
        self.min_loss = math.inf
        self.steps_since_min = 0
        self.loss_ema_fast = math.nan
        self.loss_ema_slow = math.nan
        self.loss_var_ema = 0.0
        self.delta_ema = 0.0
        self.abs_delta_ema = 0.0
        self.grad_norm = 0.0
        self.grad_norm_ema = math.nan
        self.grad_max = 0.0
        self.grad_rms = 0.0
        self.warmup_grad_norm = math.nan
        self.warmup_measured = 0
        self.update_norm = 0.0
        self.update_norm_ema = 0.0
        self.cos_grad_update = 0.0
        self.cos_ema = 0.0
        self.lr = 0.0
        self.initial_lr = math.nan
        self.param_count = 0
        self.steps_since_correction = 0
        self.pred_err_last = 0.0
        self.pred_err_ema = 0.0
        self.last_horizon = 0
        self.last_check = 0.5
        self.nonfinite_ema = 0.0
        self.warmup_done = False

    # -- recording -------------------------------------------------------------------------

    def record_real(self, loss: float, warmup: bool, measured: Measured | None = None) -> None:
        """Record one real step: its loss and, when it was measured, its gradient and update statistics.

        Statistics are measured on some steps only (every ``read_every``-th and before decisions);
        on the others the gradient and update fields keep their last measured values.
        """
        prev_loss = self.losses.get(0) if len(self.losses) else loss
        self.losses.append(loss)
        if self.real_steps == 0:
            self.first_loss = loss
            self.loss_ema_fast = self.loss_ema_slow = loss
        if loss < self.min_loss:
            self.min_loss, self.steps_since_min = loss, 0
        else:
            self.steps_since_min += 1
        delta = _log(loss) - _log(prev_loss)
        self.delta_ema += _FAST * (delta - self.delta_ema)
        self.abs_delta_ema += _FAST * (abs(delta) - self.abs_delta_ema)
        dev = loss - self.loss_ema_fast
        self.loss_var_ema += _FAST * (dev * dev - self.loss_var_ema)
        self.loss_ema_fast += _FAST * (loss - self.loss_ema_fast)
        self.loss_ema_slow += _SLOW * (loss - self.loss_ema_slow)
        if measured is not None:
            self._record_measured(measured, warmup)
        self.nonfinite_ema *= 1.0 - _FAST
        self.real_steps += 1
        self.step += 1
        self.steps_since_correction += 1
        self.warmup_done = self.warmup_done or not warmup

    def _record_measured(self, m: Measured, warmup: bool) -> None:
        gnorm = math.sqrt(max(m.grad_sq, 0.0))
        self.grad_norms.append(gnorm)
        if math.isnan(self.grad_norm_ema):
            self.grad_norm_ema = gnorm
            self.initial_lr = m.lr
        if warmup:
            self.warmup_measured += 1
            base = 0.0 if math.isnan(self.warmup_grad_norm) else self.warmup_grad_norm
            self.warmup_grad_norm = base + (gnorm - base) / self.warmup_measured
        self.grad_norm = gnorm
        self.grad_norm_ema += _FAST * (gnorm - self.grad_norm_ema)
        self.grad_max = m.grad_max
        self.grad_rms = gnorm / math.sqrt(max(m.param_count, 1))
        self.update_norm = math.sqrt(max(m.update_sq, 0.0))
        self.update_norm_ema += _FAST * (self.update_norm - self.update_norm_ema)
        denom = gnorm * self.update_norm
        self.cos_grad_update = m.grad_dot_update / denom if denom > 0 else 0.0
        self.cos_ema += _FAST * (self.cos_grad_update - self.cos_ema)
        self.lr = m.lr
        self.param_count = m.param_count

    @property
    def predicted_steps(self) -> int:
        """Predicted steps so far (every step is real, skipped or predicted)."""
        return self.step - self.real_steps - self.skipped_steps

    def record_skip(self) -> None:
        """Record a real step whose batch was skipped for a NaN/Inf loss or gradient."""
        self.skipped_steps += 1
        self.step += 1
        self.nonfinite_ema += _FAST * (1.0 - self.nonfinite_ema)

    def record_predicted(self) -> None:
        """Record one predicted (backward-free) step."""
        self.step += 1
        self.steps_since_correction += 1

    def record_prediction_error(self, predicted: float, actual: float) -> None:
        """Record how far a predicted loss was from the measured one (in log space)."""
        err = abs(_log(actual) - _log(predicted))
        self.pred_err_last = err
        self.pred_err_ema += _FAST * (err - self.pred_err_ema)

    def record_check(self, passed: bool) -> None:
        """Record the result of a forward-only check during PREDICT."""
        self.last_check = 1.0 if passed else 0.0

    def start_predict(self, horizon: int) -> None:
        """Record that a PREDICT phase of ``horizon`` steps starts."""
        self.last_horizon = horizon

    def mark_correction(self) -> None:
        """Record that a CORRECT phase ended."""
        self.steps_since_correction = 0

    def trend(self, window: int = 32, stderr: bool = False) -> tuple[float, float, float]:
        """Least-squares line through the last ``window`` log-losses.

        Returns (log-loss level at the newest step, slope per step, residual standard
        deviation — or, with ``stderr``, the slope's standard error); (level, 0, 0)
        before two real steps.
        """
        y = np.log(np.maximum(self.losses.last(window), 1e-30))
        n = y.size
        if n < 2:
            return (float(y[-1]) if n else 0.0), 0.0, 0.0
        t = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        slope = float(np.dot(t, y - y.mean()) / np.dot(t, t))
        resid = y - y.mean() - slope * t
        spread = float(np.sqrt(np.mean(resid * resid)))
        if stderr:
            spread /= float(np.sqrt(np.dot(t, t)))
        return float(y.mean() + slope * (n - 1) / 2.0), slope, spread

    # -- persistence ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """All fields as plain Python values."""
        out: dict[str, Any] = {}
        for key, value in vars(self).items():
            out[key] = value.state_dict() if isinstance(value, RingBuffer) else value
        return out

    def check_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """The values `load_state_dict` would set; `ValueError` naming the field if ``state`` is malformed.

        Each field must have the type it has here: counts are integers >= 0, flags bools, statistics
        numbers (NaN and ±Inf allowed: a minimum starts at Inf, averages at NaN), histories ring buffers.
        """
        fields(state, vars(self), what="training state")
        out: dict[str, Any] = {}
        for key, current in vars(self).items():
            value = state[key]
            if isinstance(current, RingBuffer):
                out[key] = current.check_state_dict(value, key)
            elif isinstance(current, bool):
                out[key] = flag(value, key)
            elif isinstance(current, int):
                out[key] = integer(value, key)
            else:
                out[key] = real(value, key, finite=False)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (`ValueError` naming the field, and no change, if malformed)."""
        for key, value in self.check_state_dict(state).items():
            current = getattr(self, key)
            if isinstance(current, RingBuffer):
                current.load_state_dict({"capacity": current.capacity, "values": value})
            else:
                setattr(self, key, value)


def _log(x: float) -> float:
    return math.log(max(x, 1e-30))
