"""What SGD and the Adam family share: argument and gradient checks, the lr property, state round trips."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from .._backend import namespace_of
from .._errors import BackendError, BatchError, CheckpointError, ConfigError, ModelError
from .._protocols import Model
from .._statecheck import first_nonfinite
from ..models._checks import check_like_parameters

__all__ = [
    "LAST_UPDATE",
    "LR",
    "STEP_COUNT",
    "check_grads",
    "checked_lr",
    "describe",
    "export_state",
    "model_namespace",
    "positive",
    "read_state",
    "require_buffers",
    "unit_interval",
]

_STATE_HINT = "Load a state_dict() saved by the same optimizer class for a model with the same parameters."


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive(name: str, value: Any, *, allow_zero: bool = False) -> str | None:
    """A problem line unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``)."""
    if _is_real(value) and (value > 0 or (allow_zero and value == 0)):
        return None
    return f"{name}={value!r}: must be a finite number {'>=' if allow_zero else '>'} 0"


def unit_interval(name: str, value: Any) -> str | None:
    """A problem line unless 0 <= ``value`` < 1."""
    return None if _is_real(value) and 0 <= value < 1 else f"{name}={value!r}: must be in [0, 1)"


def checked_lr(value: Any) -> float:
    """``value`` as a float if it is a valid learning rate, else `ConfigError`."""
    problem = positive("lr", value)
    if problem:
        raise ConfigError(problem)
    return float(value)


def _get_lr(opt: Any) -> float:
    return opt._lr


def _set_lr(opt: Any, value: float) -> None:
    opt._lr = checked_lr(value)


LR = property(_get_lr, _set_lr, doc="The learning rate: a finite number > 0 (`ConfigError` otherwise).")
STEP_COUNT = property(lambda opt: opt._step, doc="How many real steps the optimizer has taken.")
LAST_UPDATE = property(
    lambda opt: None if opt._last_update is None else list(opt._last_update),
    doc="The Δθ of the last real step (``None`` before the first step or after `load_state_dict`).",
)


def model_namespace(model: Any) -> ModuleType:
    """The one array namespace of ``model``'s parameters (`ModelError` / `BackendError` otherwise)."""
    if not isinstance(model, Model):
        raise ModelError(f"{type(model).__name__} does not implement hybrid_core.Model")
    params = model.parameters()
    if not params:
        raise ModelError("model.parameters() is empty: there is nothing to optimize",
                         "Give the model at least one parameter array.")
    return namespace_of(params, what="model.parameters()")


def check_grads(xp: ModuleType, params: Sequence[Any], grads: Sequence[Any]) -> list[Any]:
    """``grads`` as a list once count, library, device, shapes and dtypes match ``params``."""
    return check_like_parameters(xp, params, grads, "the gradients")


def describe(kind: str, lr: float, hyper: Mapping[str, Any], step: int) -> str:
    """A repr: class name, learning rate, hyper-parameters and step count."""
    fields = ", ".join(f"{k}={v!r}" for k, v in hyper.items())
    return f"{kind}(lr={lr!r}, {fields}, step={step})"


def export_state(kind: str, lr: float, step: int, hyper: Mapping[str, Any],
                 buffers: Mapping[str, list[Any] | None]) -> dict[str, Any]:
    """The plain state dict: Python scalars, and a fresh list of arrays (or ``None``) per buffer."""
    state: dict[str, Any] = {"kind": kind, "lr": lr, "step": step, **hyper}
    state.update({name: None if buf is None else list(buf) for name, buf in buffers.items()})
    return state


def read_state(state: Any, kind: str, hyper: Sequence[str], buffers: Sequence[str], xp: ModuleType,
               params: Sequence[Any]) -> tuple[int, dict[str, Any]]:
    """The step count and every other entry of ``state``, checked; `CheckpointError` on any mismatch.

    Checks the keys, the kind, the step count and that each buffer is ``None`` or lines up with
    ``params``; the hyper-parameter values are left for the optimizer's own checks.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"optimizer state is a {type(state).__name__}, not a dict", _STATE_HINT)
    expected = {"kind", "lr", "step", *hyper, *buffers}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        parts = [f"lacks {', '.join(missing)}"] if missing else []
        parts += [f"has unexpected {', '.join(extra)}"] if extra else []
        raise CheckpointError(f"optimizer state for {kind} {' and '.join(parts)}", _STATE_HINT)
    if state["kind"] != kind:
        raise CheckpointError(f"optimizer state is for {state['kind']!r}, not {kind!r}", _STATE_HINT)
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise CheckpointError(f"optimizer state has step={step!r}; expected an integer >= 0", _STATE_HINT)
    values = {name: state[name] for name in ("lr", *hyper)}
    for name in buffers:
        buf = state[name]
        if buf is not None and not isinstance(buf, (list, tuple)):
            raise CheckpointError(f"optimizer buffer {name!r} is a {type(buf).__name__}; expected a list of "
                                  "arrays or None", _STATE_HINT)
        try:
            values[name] = None if buf is None else check_like_parameters(xp, params, buf, name)
        except (BatchError, BackendError) as exc:
            raise CheckpointError(f"optimizer buffer {exc.message}", exc.recovery) from exc
        bad = None if values[name] is None else first_nonfinite(values[name])
        if bad is not None:
            raise CheckpointError(f"optimizer buffer {name!r}[{bad}] holds NaN or Inf",
                                  "Load an earlier checkpoint, saved before the run diverged.")
    return int(step), values


def require_buffers(values: Mapping[str, Any], present: Mapping[str, bool], step: int) -> None:
    """`CheckpointError` unless each named buffer is present exactly when ``present`` says so."""
    for name, needed in present.items():
        if needed != (values[name] is not None):
            raise CheckpointError(
                f"optimizer buffer {name!r} is {'missing' if needed else 'set'} at step {step}, which "
                "does not fit the hyper-parameters",
                _STATE_HINT,
            )
