"""Learning-rate schedules and the trainer's steps: every step counts, and none goes past a schedule's end.

An optimizer with a schedule may offer two optional methods (the torch and JAX adapters do):

- ``schedule_step()``: one training step passed without an update from this optimizer (a predicted
  step, or a real step skipped for a non-finite value); advance the schedule as the update would have.
  The trainer calls it after each such step, so a schedule sized to the run (``OneCycleLR``'s
  ``total_steps``, an optax schedule's length) counts the run's steps, predicted ones included.
- ``schedule_left()``: a `Room` (how many more steps the schedule can take before stepping it would fail,
  and what it is), or None when that is unbounded or unknown. The trainer refuses a step with no room
  left (`require_room`) and `fit` refuses, before its first step, a run longer than the room
  (`check_room`), with `ConfigError` either way, instead of the framework's error in the middle of a step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._errors import ConfigError

__all__ = ["Room", "advance_schedule", "check_room", "require_room", "schedule_room"]


class Room(NamedTuple):
    """What a schedule can still take: ``steps`` more steps; ``schedule`` says which schedule, and where it is."""

    steps: int
    schedule: str


def schedule_room(optimizer: Any) -> Room | None:
    """``optimizer.schedule_left()`` when it offers it and answers a `Room`, else None (no known end)."""
    ask = getattr(optimizer, "schedule_left", None)
    room = ask() if callable(ask) else None
    if not isinstance(room, Room):
        return None
    return room


def advance_schedule(optimizer: Any) -> None:
    """Tell ``optimizer`` a step passed without its update (its ``schedule_step``, if it has one)."""
    step = getattr(optimizer, "schedule_step", None)
    if callable(step):
        step()


_HINT = ("Build the schedule for the run's whole length (OneCycleLR(total_steps=...) at least the number of "
         "training steps, predicted steps included), or train fewer steps (fit(max_steps=...)).")


def require_room(optimizer: Any, index: int) -> None:
    """`ConfigError` (nothing run) if the schedule has no step left for step ``index``."""
    room = schedule_room(optimizer)
    if room is not None and room.steps <= 0:
        raise ConfigError(f"step {index}: the learning-rate schedule {room.schedule} has taken all its steps; "
                          "another training step would step it past its end", _HINT)


def check_room(optimizer: Any, needed: int | None, what: str) -> None:
    """`ConfigError` if the run's ``needed`` further steps (``what`` says why so many) exceed the schedule's room."""
    room = schedule_room(optimizer)
    if room is None or needed is None or needed <= room.steps:
        return
    raise ConfigError(f"{what} needs {needed} more training step(s), but the learning-rate schedule "
                      f"{room.schedule} has room for {room.steps}: the trainer would step it past its end "
                      "(every training step steps it, predicted steps included)", _HINT)
