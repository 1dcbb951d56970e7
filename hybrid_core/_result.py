"""`StepResult`: what one trainer step did."""

from __future__ import annotations

from typing import NamedTuple

from ._phase import Phase

__all__ = ["StepResult"]


class StepResult(NamedTuple):
    """What one `HybridTrainer.step` did.

    ``loss`` is the measured loss (``None`` on a predicted step without a check);
    ``predicted_loss`` what the dynamics model expected (``None`` outside
    PREDICT/CORRECT); ``backward`` whether a backward pass ran.
    """

    step: int
    phase: Phase
    loss: float | None
    predicted_loss: float | None
    backward: bool
    confidence: float
    skipped: bool = False
