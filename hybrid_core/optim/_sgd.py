"""`SGD` with optional momentum, Nesterov and L2 weight decay (torch.optim.SGD's formula, no dampening)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, final

from .._errors import CheckpointError, ConfigError
from .._protocols import Model
from . import _common as common

__all__ = ["SGD"]

_HYPER = ("momentum", "weight_decay", "nesterov")
_BUFFERS = ("momentum_buffer", "last_grad")


def _problems(lr: Any, momentum: Any, weight_decay: Any, nesterov: Any) -> list[str]:
    problems = [common.positive("lr", lr), common.unit_interval("momentum", momentum),
                common.positive("weight_decay", weight_decay, allow_zero=True)]
    if not isinstance(nesterov, bool):
        problems.append(f"nesterov={nesterov!r}: must be True or False")
    elif nesterov and common.unit_interval("momentum", momentum) is None and momentum == 0:
        problems.append("nesterov=True: needs momentum > 0")
    return [p for p in problems if p is not None]


@final
class SGD:
    """Stochastic gradient descent; implements `Optimizer`.

    With g = grad + weight_decay·θ, buf ← momentum·buf + g (buf = g on the first step), the update
    is Δθ = −lr·buf, or −lr·(g + momentum·buf) with ``nesterov``; without momentum Δθ = −lr·g.
    `extrapolate` predicts the next update as if the next gradient equalled the last one.
    Gradients are kept by reference for that, so do not write into them after `step`.
    """

    adaptive: ClassVar[bool] = False
    """Not Adam-like: the learning-rate recommendation does not apply."""

    lr = common.LR
    step_count = common.STEP_COUNT
    last_update = common.LAST_UPDATE

    def __init__(self, model: Model, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        problems = _problems(lr, momentum, weight_decay, nesterov)
        if problems:
            raise ConfigError(problems)
        self._xp = common.model_namespace(model)
        self._model = model
        self._lr = float(lr)
        self._momentum = float(momentum)
        self._weight_decay = float(weight_decay)
        self._nesterov = nesterov
        self._step = 0
        self._buffer: list[Any] | None = None
        self._last_grad: list[Any] | None = None
        self._last_update: list[Any] | None = None

    def step(self, grads: Sequence[Any]) -> list[Any]:
        """Apply one update for ``grads`` to the model and return the Δθ it applied."""
        params = self._model.parameters()
        grads = common.check_grads(self._xp, params, grads)
        update, buffer = self._update(params, grads)
        self._model.apply_update(update, 1.0)
        self._buffer, self._last_grad, self._last_update = buffer, grads, update
        self._step += 1
        return list(update)

    def extrapolate(self) -> list[Any]:
        """The next Δθ if the next gradient equalled the last one (zeros before any step); changes nothing."""
        params = self._model.parameters()
        if self._last_grad is None:
            return [self._xp.zeros_like(p) for p in params]
        return self._update(params, self._last_grad)[0]

    def _update(self, params: list[Any], grads: list[Any]) -> tuple[list[Any], list[Any] | None]:
        """Δθ and the new momentum buffer for ``grads``, without storing either."""
        if self._weight_decay:
            grads = [g + self._weight_decay * p for g, p in zip(grads, params, strict=True)]
        if not self._momentum:
            return [-self._lr * g for g in grads], None
        mu = self._momentum
        if self._buffer is None:
            buffer = list(grads)
        else:
            buffer = [mu * b + g for b, g in zip(self._buffer, grads, strict=True)]
        direction = [g + mu * b for g, b in zip(grads, buffer, strict=True)] if self._nesterov else buffer
        return [-self._lr * d for d in direction], buffer

    def _hyper(self) -> dict[str, Any]:
        return {"momentum": self._momentum, "weight_decay": self._weight_decay, "nesterov": self._nesterov}

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters, ``step`` and the buffers ``momentum_buffer``, ``last_grad`` (lists or None)."""
        return common.export_state("SGD", self._lr, self._step, self._hyper(),
                                   {"momentum_buffer": self._buffer, "last_grad": self._last_grad})

    def check_state_dict(self, state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(step, values) as `load_state_dict` would set them; `CheckpointError` on any mismatch (keys, hyper-
        parameters, buffers that do not line up with the parameters or hold NaN/Inf), nothing changed."""
        step, v = common.read_state(state, "SGD", _HYPER, _BUFFERS, self._xp, self._model.parameters())
        problems = _problems(v["lr"], v["momentum"], v["weight_decay"], v["nesterov"])
        if problems:
            raise CheckpointError(f"optimizer state has invalid hyper-parameters: {'; '.join(problems)}")
        needed = {"last_grad": step > 0, "momentum_buffer": step > 0 and v["momentum"] > 0}
        common.require_buffers(v, needed, step)
        return step, v

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output; on any mismatch raise `CheckpointError` and change nothing."""
        step, v = self.check_state_dict(state)
        self._lr, self._momentum = float(v["lr"]), float(v["momentum"])
        self._weight_decay, self._nesterov, self._step = float(v["weight_decay"]), v["nesterov"], step
        self._buffer, self._last_grad, self._last_update = v["momentum_buffer"], v["last_grad"], None

    def __repr__(self) -> str:
        return common.describe("SGD", self._lr, self._hyper(), self._step)
