"""`StepResult`: what one trainer step did."""

from __future__ import annotations

from typing import NamedTuple

from ._phase import Phase

__all__ = ["StepResult"]


class StepResult(NamedTuple):
    """What one `HybridTrainer.step` did.

    ``loss`` is the measured loss (``None`` on a predicted step without a check, and on a
    real step not read yet: see `HybridTrainer.flush`); ``predicted_loss`` what the dynamics
    model expected (``None`` outside PREDICT/CORRECT); ``backward`` whether a backward pass ran.

    ``lr`` and ``grad_norm`` are what the step's read brought to the host, so they cost no
    read of their own: ``lr`` is the learning rate of a real step read at once (``None`` on a
    predicted step, on a real step not read yet, and when the rate lives on the device and the
    step was not measured); ``grad_norm`` is √Σg² of the gradients of a *measured* real step
    (every ``read_every``-th step and each step that ends in a decision), ``None`` on every
    other step. The metrics records (`MetricsCollector.records`, the JSON Lines of
    `MetricsCollector.to_jsonl` and of `hybrid_core.callbacks.JSONLLogger`) carry both for every
    real step once it is read.
    """

    step: int
    phase: Phase
    loss: float | None
    predicted_loss: float | None
    backward: bool
    confidence: float
    skipped: bool = False
    lr: float | None = None
    grad_norm: float | None = None
