"""`SGD` with optional momentum, Nesterov and L2 weight decay (torch.optim.SGD's formula)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._protocols import Model
from ._base import OptimizerBase, positive, unit_interval

__all__ = ["SGD"]


class SGD(OptimizerBase):
    """Stochastic gradient descent; implements `Optimizer`.

    ``extrapolate()`` predicts the next update as if the next gradient equalled the
    last one (with weight decay from the current parameters).
    """

    _buffers = ("momentum_buffer", "last_grad")
    _hyper = ("momentum", "weight_decay", "nesterov")

    def __init__(self, model: Model, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        problems = [unit_interval("momentum", momentum), positive("weight_decay", weight_decay, allow_zero=True)]
        if nesterov and not (isinstance(momentum, (int, float)) and momentum > 0):
            problems.append("nesterov=True: needs momentum > 0")
        super().__init__(model, lr, problems)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self.momentum_buffer: list[Any] | None = None
        self.last_grad: list[Any] | None = None

    def step(self, grads: Sequence[Any]) -> list[Any]:
        """Apply one SGD update and return Δθ."""
        grads = self._check_grads(grads)
        self.last_grad = grads
        update, buffer = self._update(grads, self.momentum_buffer)
        self.momentum_buffer = buffer
        return self._apply(update)

    def extrapolate(self) -> list[Any]:
        """The next update if the next gradient equalled the last one; zeros before any step."""
        if self.last_grad is None:
            return self._zeros()
        return self._update(self.last_grad, self.momentum_buffer)[0]

    def _update(self, grads: list[Any], buffer: list[Any] | None) -> tuple[list[Any], list[Any] | None]:
        params = self.model.parameters()
        if self.weight_decay:
            grads = [g + self.weight_decay * p for g, p in zip(grads, params)]
        if not self.momentum:
            return [-self._lr * g for g in grads], None
        mu = self.momentum
        buffer = list(grads) if buffer is None else [mu * b + g for b, g in zip(buffer, grads)]
        direction = [g + mu * b for g, b in zip(grads, buffer)] if self.nesterov else buffer
        return [-self._lr * d for d in direction], buffer
