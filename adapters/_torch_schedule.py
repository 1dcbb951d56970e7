"""The end of a torch learning-rate scheduler: how many more ``step()`` calls it takes before torch refuses."""

from __future__ import annotations

from typing import Any

import torch

from hybrid_core._schedule import Room

__all__ = ["SCHEDULE_COUNTS", "scheduler_room"]

SCHEDULE_COUNTS = ("steps", "updates")
"""What `TorchOptimizer`'s scheduler counts: every training step, or optimizer updates only."""


def scheduler_room(scheduler: Any) -> Room | None:
    """The steps ``scheduler`` can still take, or None when it has no end.

    ``OneCycleLR`` raises ``ValueError("Tried to step N times ...")`` once stepped more than ``total_steps``
    times after construction (its ``last_epoch`` counts them); a ``ChainedScheduler`` steps every scheduler
    it holds, so its room is the least of theirs. Other schedulers (cosine, linear, step, exponential, ...)
    keep going past their nominal length (periodic or clamped) and have no end here.
    """
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        total, taken = int(scheduler.total_steps), int(scheduler.last_epoch)
        return Room(total - taken, f"OneCycleLR(total_steps={total}) at step {taken}")
    if isinstance(scheduler, torch.optim.lr_scheduler.ChainedScheduler):
        rooms = [r for r in (scheduler_room(s) for s in scheduler._schedulers) if r is not None]
        if rooms:
            least = min(rooms, key=lambda r: r.steps)
            return Room(least.steps, f"{least.schedule} in a ChainedScheduler")
    return None
