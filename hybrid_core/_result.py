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

    ``lr`` and ``grad_norm`` cost no read of their own. ``lr`` is the learning rate a real
    step ran with, given with its loss (``None`` on a predicted step and on a real step not read
    yet; when the optimizer keeps its rate on the device, ``lr_on_device``, only measured steps
    have it). ``grad_norm`` is √Σg² of the gradients of a *measured* real step that computed its
    statistics (every ``read_every``-th step and each step that ends in a decision, outside the
    idle spells), read with them; ``None`` on every other step. The metrics records
    (`MetricsCollector.records`, the JSON Lines of `MetricsCollector.to_jsonl` and of
    `hybrid_core.callbacks.JSONLLogger`) carry the same two values for every step once it is read.
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
