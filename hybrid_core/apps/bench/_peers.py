"""The peers a user would pick instead of the hybrid trainer: LAWA read-out of the native runs, Schedule-Free AdamW.

- **LAWA** (latest weight averaging): the mean of the last `LAWA_SNAPSHOTS` parameter snapshots, one
  taken after the optimizer step of every `LAWA_EVERY`-th step. Every native sweep run keeps them
  (`Lawa.snapshot`, inside the timed step) and is validated on their mean too (untimed), which
  gives "tuned + LAWA" without extra training runs.
- **Schedule-Free AdamW** (``schedulefree.AdamWScheduleFree``, torch tasks only): its own
  learning-rate sweep, ×`LR_FACTORS` of the package's default rate `SCHEDULEFREE_LR`.
"""

from __future__ import annotations

import functools
import importlib.util
import operator
from collections.abc import Sequence
from typing import Any

__all__ = ["LAWA_EVERY", "LAWA_SNAPSHOTS", "LR_FACTORS", "SCHEDULEFREE_LR", "SCHEDULEFREE_WARMUP", "Lawa",
           "mean_of", "schedulefree_available"]

LR_FACTORS = (0.5, 1.0, 2.0, 4.0)
"""Learning-rate multipliers of every sweep: the native loop's (of the task's rate) and Schedule-Free's (of its own)."""

LAWA_EVERY = 10
"""A LAWA snapshot is taken after the optimizer step of every this-many-th step."""

LAWA_SNAPSHOTS = 5
"""LAWA averages the last this-many snapshots (fewer while fewer exist; the raw weights before the first)."""

SCHEDULEFREE_LR = 0.0025
"""``schedulefree.AdamWScheduleFree``'s default learning rate (its signature's ``lr=0.0025``)."""

SCHEDULEFREE_WARMUP = 0
"""``warmup_steps`` of the Schedule-Free runs: the package's default, no warm-up."""


def schedulefree_available() -> bool:
    """Whether the ``schedulefree`` package is installed (the Schedule-Free peer is skipped without it)."""
    return importlib.util.find_spec("schedulefree") is not None


def _library(array: Any) -> str:
    return type(array).__module__.split(".", 1)[0]


def mean_of(snapshots: Sequence[Sequence[Any]]) -> list[Any]:
    """Element-wise mean of parameter lists (same shapes and library; any of NumPy, PyTorch, JAX arrays)."""
    n = len(snapshots)
    return [functools.reduce(operator.add, arrays) / n for arrays in zip(*snapshots, strict=True)]


class Lawa:
    """The last ``keep`` snapshots of a run's parameters and their mean.

    A snapshot copies the parameters as cheaply as the library allows: PyTorch tensors by one
    ``torch._foreach_copy_`` into a recycled buffer (fresh clones for the first ``keep``), NumPy
    (and other mutable) arrays by ``copy()``; JAX arrays are immutable, so the list of the
    current ones is kept as it is.
    """

    def __init__(self, keep: int = LAWA_SNAPSHOTS) -> None:
        self.keep = keep
        self._ring: list[list[Any]] = []
        self._next = 0
        self.taken = 0
        """Snapshots taken so far."""

    def snapshot(self, parameters: Sequence[Any]) -> None:
        """Store a copy of ``parameters``, replacing the oldest once ``keep`` are stored."""
        library = _library(parameters[0]) if parameters else ""
        if library in ("jax", "jaxlib"):
            copy: list[Any] = list(parameters)
        elif library == "torch":
            import torch

            with torch.no_grad():
                if len(self._ring) == self.keep:
                    copy = self._ring[self._next]
                    torch._foreach_copy_(copy, list(parameters))
                else:
                    copy = [p.detach().clone() for p in parameters]
        else:
            copy = [p.copy() for p in parameters]
        if len(self._ring) < self.keep:
            self._ring.append(copy)
        else:
            self._ring[self._next] = copy
        self._next = (self._next + 1) % self.keep
        self.taken += 1

    def snapshots(self) -> list[list[Any]]:
        """The stored snapshots, oldest first."""
        if len(self._ring) < self.keep:
            return list(self._ring)
        return self._ring[self._next:] + self._ring[:self._next]

    def average(self) -> list[Any] | None:
        """Mean of the stored snapshots; None before the first."""
        if not self._ring:
            return None
        return mean_of(self._ring)
