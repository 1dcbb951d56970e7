"""`Adam` (L2 decay added to the gradient) and `AdamW` (decoupled decay), with torch.optim's formulas."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, final

from .._errors import CheckpointError, ConfigError
from .._protocols import Model
from . import _common as common

__all__ = ["Adam", "AdamW"]

_HYPER = ("beta1", "beta2", "eps", "weight_decay")
_BUFFERS = ("exp_avg", "exp_avg_sq")


def _problems(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> list[str]:
    problems = [common.positive("lr", lr), common.positive("eps", eps),
                common.positive("weight_decay", weight_decay, allow_zero=True)]
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        problems += [common.unit_interval("betas[0]", betas[0]), common.unit_interval("betas[1]", betas[1])]
    else:
        problems.append(f"betas={betas!r}: must be a pair (beta1, beta2), each in [0, 1)")
    return [p for p in problems if p is not None]


class _AdamFamily:
    """The Adam arithmetic; `Adam` and `AdamW` differ only in where weight decay enters.

    With t the step, g the gradient (plus weight_decay·θ for `Adam`):
    m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², Δθ = −lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + eps)
    (− lr·weight_decay·θ for `AdamW`). `extrapolate` is that update at t+1 for g = m̂ = m/(1−β₁ᵗ),
    decay taken from the current θ.
    """

    _decoupled: ClassVar[bool]
    adaptive: ClassVar[bool] = True
    """Adam-like: the update is normalised per coordinate (the learning-rate recommendation applies)."""

    lr = common.LR
    step_count = common.STEP_COUNT
    last_update = common.LAST_UPDATE

    def __init__(self, model: Model, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float) -> None:
        problems = _problems(lr, betas, eps, weight_decay)
        if problems:
            raise ConfigError(problems)
        self._xp = common.model_namespace(model)
        self._model = model
        self._lr = float(lr)
        self._betas = (float(betas[0]), float(betas[1]))
        self._eps = float(eps)
        self._weight_decay = float(weight_decay)
        self._step = 0
        self._exp_avg: list[Any] | None = None
        self._exp_avg_sq: list[Any] | None = None
        self._last_update: list[Any] | None = None

    def step(self, grads: Sequence[Any]) -> list[Any]:
        """Apply one update for ``grads`` to the model and return the Δθ it applied."""
        params = self._model.parameters()
        grads = common.check_grads(self._xp, params, grads)
        update, m, v = self._update(params, grads, self._step + 1)
        self._model.apply_update(update, 1.0)
        self._exp_avg, self._exp_avg_sq, self._last_update = m, v, update
        self._step += 1
        return list(update)

    def extrapolate(self) -> list[Any]:
        """The next Δθ if the next gradient equalled m̂ (zeros before any step); changes nothing."""
        params = self._model.parameters()
        if self._exp_avg is None:
            return [self._xp.zeros_like(p) for p in params]
        correction = 1.0 - self._betas[0] ** self._step
        return self._update(params, [m / correction for m in self._exp_avg], self._step + 1)[0]

    def _update(self, params: list[Any], grads: list[Any], t: int) -> tuple[list[Any], list[Any], list[Any]]:
        """Δθ and the new moments for ``grads`` at step ``t``, without storing any of them."""
        xp = self._xp
        b1, b2 = self._betas
        wd = self._weight_decay
        if wd and not self._decoupled:
            grads = [g + wd * p for g, p in zip(grads, params, strict=True)]
        if self._exp_avg is None or self._exp_avg_sq is None:
            m = [(1.0 - b1) * g for g in grads]
            v = [(1.0 - b2) * (g * g) for g in grads]
        else:
            # m + (1−β₁)(g − m) is torch's lerp form of β₁m + (1−β₁)g; it keeps float64 runs bit-close.
            m = [mp + (1.0 - b1) * (g - mp) for mp, g in zip(self._exp_avg, grads, strict=True)]
            v = [b2 * vp + (1.0 - b2) * (g * g) for vp, g in zip(self._exp_avg_sq, grads, strict=True)]
        step_size = self._lr / (1.0 - b1**t)
        root_correction = math.sqrt(1.0 - b2**t)
        decay = self._lr * wd if self._decoupled else 0.0
        update = []
        for mi, vi, p in zip(m, v, params, strict=True):
            u = -step_size * (mi / (xp.sqrt(vi) / root_correction + self._eps))
            update.append(u - decay * p if decay else u)
        return update, m, v

    def _hyper(self) -> dict[str, Any]:
        return {"beta1": self._betas[0], "beta2": self._betas[1], "eps": self._eps,
                "weight_decay": self._weight_decay}

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters, ``step`` and the moments ``exp_avg`` and ``exp_avg_sq`` (lists or None)."""
        return common.export_state(type(self).__name__, self._lr, self._step, self._hyper(),
                                   {"exp_avg": self._exp_avg, "exp_avg_sq": self._exp_avg_sq})

    def check_state_dict(self, state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(step, values) as `load_state_dict` would set them; `CheckpointError` on any mismatch (keys, hyper-
        parameters, buffers that do not line up with the parameters or hold NaN/Inf), nothing changed."""
        kind = type(self).__name__
        step, v = common.read_state(state, kind, _HYPER, _BUFFERS, self._xp, self._model.parameters())
        problems = _problems(v["lr"], (v["beta1"], v["beta2"]), v["eps"], v["weight_decay"])
        if problems:
            raise CheckpointError(f"optimizer state has invalid hyper-parameters: {'; '.join(problems)}")
        common.require_buffers(v, {"exp_avg": step > 0, "exp_avg_sq": step > 0}, step)
        return step, v

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output; on any mismatch raise `CheckpointError` and change nothing."""
        step, v = self.check_state_dict(state)
        self._lr, self._eps, self._weight_decay = float(v["lr"]), float(v["eps"]), float(v["weight_decay"])
        self._betas, self._step = (float(v["beta1"]), float(v["beta2"])), step
        self._exp_avg, self._exp_avg_sq, self._last_update = v["exp_avg"], v["exp_avg_sq"], None

    def __repr__(self) -> str:
        return common.describe(type(self).__name__, self._lr, self._hyper(), self._step)


@final
class Adam(_AdamFamily):
    """Adam with L2 weight decay added to the gradient (torch.optim.Adam); implements `Optimizer`."""

    _decoupled = False

    def __init__(self, model: Model, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(model, lr, betas, eps, weight_decay)


@final
class AdamW(_AdamFamily):
    """Adam with decoupled weight decay θ ← θ − lr·weight_decay·θ (torch.optim.AdamW); an `Optimizer`."""

    _decoupled = True

    def __init__(self, model: Model, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(model, lr, betas, eps, weight_decay)
