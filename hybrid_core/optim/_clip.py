"""`ClipGradNorm`: rescale the gradients to a global norm bound before another optimizer's step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, final

from .._backend import namespace_of
from .._errors import CheckpointError, ConfigError
from .._protocols import Array, Optimizer
from . import _common as common
from ._wrapping import Wrapping

__all__ = ["ClipGradNorm"]


@final
class ClipGradNorm(Wrapping):
    """Wraps an `Optimizer`: g ← g·min(1, max_norm/(‖g‖ + eps)), ‖g‖ over all gradients, then step.

    Clipping has to happen between the backward pass and the update, so it is an optimizer,
    not a fit callback. The scale stays a device array (no host read per step); `last_norm`
    exposes the unclipped global norm the same way. `extrapolate`, ``lr`` and the state go
    to the wrapped optimizer, whose moments already hold clipped gradients.
    """

    def __init__(self, optimizer: Optimizer, max_norm: float, eps: float = 1e-6) -> None:
        problems = [p for p in (common.positive("max_norm", max_norm), common.positive("eps", eps)) if p]
        if not isinstance(optimizer, Optimizer):
            problems.append(f"optimizer={type(optimizer).__name__}: does not implement hybrid_core.Optimizer")
        if problems:
            raise ConfigError(problems)
        self._inner = optimizer
        self._max_norm = float(max_norm)
        self._eps = float(eps)
        self._last_norm: Array | None = None

    @property
    def max_norm(self) -> float:
        """The bound on the global gradient norm."""
        return self._max_norm

    @property
    def last_norm(self) -> Array | None:
        """The global norm of the last gradients before clipping, a 0-d device array (None before a step)."""
        return self._last_norm

    def step(self, grads: Sequence[Array]) -> list[Array]:
        """Clip ``grads`` to the global norm bound, then apply the wrapped optimizer's step."""
        grads = list(grads)
        xp = namespace_of(grads, what="the gradients")
        total = xp.sum(grads[0] * grads[0])
        for g in grads[1:]:
            total = total + xp.sum(g * g)
        norm = xp.sqrt(total)
        scale = self._max_norm / (norm + self._eps)
        scale = xp.minimum(scale, xp.ones_like(scale))
        clipped = [g * xp.astype(scale, g.dtype) for g in grads]
        update = self._inner.step(clipped)
        self._last_norm = norm
        return update

    def extrapolate(self) -> list[Array]:
        """The wrapped optimizer's predicted next update."""
        return self._inner.extrapolate()

    def state_dict(self) -> dict[str, Any]:
        """``max_norm``, ``eps`` and the wrapped optimizer's state under ``inner``."""
        return {"kind": "ClipGradNorm", "max_norm": self._max_norm, "eps": self._eps,
                "inner": self._inner.state_dict()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """`CheckpointError` exactly when `load_state_dict` would refuse ``state`` (the wrapped optimizer's part
        included, if it offers ``check_state_dict``); changes nothing."""
        if not isinstance(state, Mapping) or set(state) != {"kind", "max_norm", "eps", "inner"} or (
                state["kind"] != "ClipGradNorm"):
            raise CheckpointError("optimizer state is not a ClipGradNorm state",
                                  "Load a state_dict() saved by ClipGradNorm around the same optimizer class.")
        max_norm, eps = state["max_norm"], state["eps"]
        if common.positive("max_norm", max_norm) or common.positive("eps", eps):
            raise CheckpointError(f"ClipGradNorm state has max_norm={max_norm!r}, eps={eps!r}; both must be > 0")
        inner = getattr(self._inner, "check_state_dict", None)
        if callable(inner):
            inner(state["inner"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output; on a mismatch raise `CheckpointError` and change nothing here."""
        self.check_state_dict(state)
        max_norm, eps = state["max_norm"], state["eps"]
        self._inner.load_state_dict(state["inner"])
        self._max_norm, self._eps, self._last_norm = float(max_norm), float(eps), None

    def __repr__(self) -> str:
        return f"ClipGradNorm({self._inner!r}, max_norm={self._max_norm!r}, eps={self._eps!r})"

