"""`HardThresholding`: iterative hard thresholding, a dense real step then the model's top-k projection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, final, runtime_checkable

from .._errors import CheckpointError, ConfigError
from .._protocols import Array, Optimizer
from ._wrapping import Wrapping

__all__ = ["HardThresholding", "Thresholded"]


@runtime_checkable
class Thresholded(Protocol):
    """A model with a sparse support it re-applies after every parameter change (e.g. a pruned
    `hybrid_core.models.FastGRNN`)."""

    def unconstrained(self) -> Any:
        """A context manager inside which updates are not projected; on exit they are again."""
        ...

    def threshold(self) -> None:
        """Re-select the support from the current magnitudes and project onto it."""
        ...


@final
class HardThresholding(Wrapping):
    """Wraps an `Optimizer`: θ ← H_k(θ + Δθ), the wrapped step taken densely, then the support re-selected.

    This is IHT (the second stage of FastGRNN's sparse training): a pruned weight can come back
    when its dense update outgrows the smallest kept one. Only real steps move the support; every
    other change the trainer makes (predicted steps, corrections, rollbacks) goes through the model's
    fixed-mask projection, so it never revives a pruned weight and stays exactly undoable. To
    fine-tune on a fixed support, use the wrapped optimizer alone.
    """

    def __init__(self, optimizer: Optimizer, model: Thresholded) -> None:
        problems = []
        if not isinstance(optimizer, Optimizer):
            problems.append(f"optimizer={type(optimizer).__name__}: does not implement hybrid_core.Optimizer")
        if not isinstance(model, Thresholded):
            problems.append(f"model={type(model).__name__}: has no unconstrained() and threshold() "
                            "(prune it first, e.g. FastGRNN.prune)")
        elif getattr(model, "support", True) is None:
            problems.append(f"model={type(model).__name__}: has no support yet (call prune first)")
        if problems:
            raise ConfigError(problems)
        self._inner = optimizer
        self._model = model

    def step(self, grads: Sequence[Array]) -> list[Array]:
        """The wrapped step without projection, then the hard threshold; returns the wrapped step's update."""
        # The threshold runs inside: leaving the block first would project onto the old support, and a
        # pruned weight could never come back. If the step raises, leaving projects onto the old one.
        with self._model.unconstrained():
            update = self._inner.step(grads)
            self._model.threshold()
        return update

    def extrapolate(self) -> list[Array]:
        """The wrapped optimizer's predicted next update (the model projects it when applied)."""
        return self._inner.extrapolate()

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state under ``inner`` (the support is the model's state)."""
        return {"kind": "HardThresholding", "inner": self._inner.state_dict()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """`CheckpointError` exactly when `load_state_dict` would refuse ``state``; changes nothing."""
        if not isinstance(state, Mapping) or set(state) != {"kind", "inner"} or state["kind"] != "HardThresholding":
            raise CheckpointError("optimizer state is not a HardThresholding state",
                                  "Load a state_dict() saved by HardThresholding around the same optimizer.")
        inner = getattr(self._inner, "check_state_dict", None)
        if callable(inner):
            inner(state["inner"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output; on a mismatch raise `CheckpointError` and change nothing here."""
        self.check_state_dict(state)
        self._inner.load_state_dict(state["inner"])

    def __repr__(self) -> str:
        return f"HardThresholding({self._inner!r})"
