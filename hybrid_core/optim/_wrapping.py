"""`Wrapping`: what an optimizer that wraps another passes through unchanged (its rate, whether it is Adam-like)."""

from __future__ import annotations

from .._protocols import Optimizer

__all__ = ["Wrapping"]


class Wrapping:
    """The wrapped optimizer, its learning rate (read and set) and its ``adaptive`` flag, passed through."""

    _inner: Optimizer

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._inner

    @property
    def adaptive(self) -> bool:
        """Whether the wrapped optimizer is Adam-like."""
        return getattr(self._inner, "adaptive", False) is True

    @property
    def lr(self) -> float:
        """The wrapped optimizer's learning rate."""
        return self._inner.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._inner.lr = value
