"""What SGD and the Adam family share: validation, bookkeeping, state round trips."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat

from .._backend import library_name
from .._errors import BackendError, BatchError, CheckpointError, ConfigError
from .._protocols import Model

__all__ = ["OptimizerBase", "positive", "unit_interval"]


def positive(name: str, value: Any, *, allow_zero: bool = False) -> str | None:
    """A problem line unless ``value`` is a finite number > 0 (or >= 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > 0 or (allow_zero and value == 0)):
        return None
    return f"{name}={value!r}: must be a finite number {'>=' if allow_zero else '>'} 0"


def unit_interval(name: str, value: Any) -> str | None:
    """A problem line unless 0 <= ``value`` < 1."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0
    return None if ok else f"{name}={value!r}: must be in [0, 1)"


class OptimizerBase:
    """Holds the model, the learning rate and the step count; checks gradients."""

    _buffers: tuple[str, ...] = ()
    _hyper: tuple[str, ...] = ()

    def __init__(self, model: Model, lr: float, problems: list[str | None]) -> None:
        found = [p for p in [positive("lr", lr), *problems] if p is not None]
        if found:
            raise ConfigError(found)
        self.model = model
        self._lr = float(lr)
        self.step_count = 0
        self.last_update: list[Any] | None = None
        params = model.parameters()
        self._xp = array_api_compat.array_namespace(*params)
        self._shapes = [tuple(p.shape) for p in params]

    @property
    def lr(self) -> float:
        """The learning rate."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        problem = positive("lr", value)
        if problem:
            raise ConfigError(problem)
        self._lr = float(value)

    def _check_grads(self, grads: Sequence[Any]) -> list[Any]:
        grads = list(grads)
        if len(grads) != len(self._shapes):
            raise BatchError(f"got {len(grads)} gradients for {len(self._shapes)} parameters")
        for i, (g, shape) in enumerate(zip(grads, self._shapes)):
            if tuple(g.shape) != shape:
                raise BatchError(f"gradient {i} has shape {tuple(g.shape)}; parameter {i} has {shape}")
            try:
                got = array_api_compat.array_namespace(g)
            except TypeError as exc:
                raise BackendError(f"gradient {i} is a {type(g).__name__}, not an array") from exc
            if got is not self._xp:
                raise BackendError(
                    f"gradient {i} is a {library_name(got)} array; the parameters are {library_name(self._xp)}"
                )
        return grads

    def _zeros(self) -> list[Any]:
        return [self._xp.zeros_like(p) for p in self.model.parameters()]

    def _apply(self, update: list[Any]) -> list[Any]:
        self.model.apply_update(update, 1.0)
        self.step_count += 1
        self.last_update = update
        return update

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters, step count and buffers (lists of arrays or ``None``)."""
        state: dict[str, Any] = {"kind": type(self).__name__, "lr": self._lr, "step": self.step_count}
        state.update({name: getattr(self, name) for name in self._hyper})
        state.update({name: getattr(self, name) for name in self._buffers})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output; on any mismatch raise `CheckpointError` and change nothing."""
        expected = {"kind", "lr", "step", *self._hyper, *self._buffers}
        missing = sorted(expected - set(state))
        if missing:
            raise CheckpointError(f"optimizer state lacks {', '.join(missing)}")
        if state["kind"] != type(self).__name__:
            raise CheckpointError(f"optimizer state is for {state['kind']}, not {type(self).__name__}")
        for name in self._buffers:
            buf = state[name]
            if buf is None:
                continue
            if len(buf) != len(self._shapes) or any(
                tuple(b.shape) != s for b, s in zip(buf, self._shapes)
            ):
                raise CheckpointError(f"optimizer buffer {name!r} does not match the parameter shapes")
        self._lr = float(state["lr"])
        self.step_count = int(state["step"])
        for name in self._hyper:
            value = state[name]
            setattr(self, name, tuple(value) if isinstance(value, list) else value)
        for name in self._buffers:
            setattr(self, name, None if state[name] is None else list(state[name]))
