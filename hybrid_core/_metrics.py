"""`MetricsCollector`: per-step records (bounded) and exact running totals."""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple

from ._phase import Phase

__all__ = ["Decision", "MetricsCollector", "StepRecord", "json_line", "write_jsonl"]


class StepRecord(NamedTuple):
    """What one trainer step did and how long it took."""

    step: int
    phase: str
    loss: float | None
    predicted_loss: float | None
    backward: bool
    wall_seconds: float
    confidence: float
    skipped: bool = False
    lr: float | None = None
    """The learning rate of a real step (a rate kept on the device: measured steps only); None on predicted steps."""
    grad_norm: float | None = None
    """√Σg² of a measured real step's gradients (read with its statistics); None on the other steps."""


class Decision(NamedTuple):
    """A horizon the bandit chose and the reward it got (``None`` until the cycle ends)."""

    step: int
    horizon: int
    reward: float | None


class MetricsCollector:
    """Keeps the newest ``max_records`` step records and exact totals over the whole run.

    Totals (steps, backward passes, steps and seconds per phase, event counts) never
    drop anything, so `summary` stays exact for runs far longer than the record buffer.
    """

    def __init__(self, max_records: int = 100_000) -> None:
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 0:
            raise ValueError(f"max_records must be an integer >= 0, got {max_records!r}")
        self._records: deque[StepRecord] = deque(maxlen=max_records)
        self._last: StepRecord | None = None
        self._steps = 0
        self._backward = 0
        self._phase_steps = {p.value: 0 for p in Phase}
        self._phase_seconds = {p.value: 0.0 for p in Phase}
        self._events: dict[str, int] = {}
        self._decisions: deque[Decision] = deque(maxlen=max(max_records, 1))
        self._arm_pulls: dict[int, int] = {}
        self._arm_reward_sum: dict[int, float] = {}

    def record_decision(self, step: int, horizon: int, reward: float | None) -> None:
        """Record a bandit choice; ``reward`` once known (arm 0 gets its 0 at once)."""
        self._decisions.append(Decision(step, horizon, reward))
        if reward is not None:
            self._arm_pulls[horizon] = self._arm_pulls.get(horizon, 0) + 1
            self._arm_reward_sum[horizon] = self._arm_reward_sum.get(horizon, 0.0) + reward

    @property
    def decisions(self) -> list[Decision]:
        """The kept bandit decisions, oldest first."""
        return list(self._decisions)

    def record(self, rec: StepRecord) -> None:
        """Add one step's record and update the totals."""
        self._records.append(rec)
        self._last = rec
        self._steps += 1
        self._backward += int(rec.backward)
        self._phase_steps[rec.phase] += 1
        if math.isfinite(rec.wall_seconds):  # NaN: the step's call is still running (see add_seconds)
            self._phase_seconds[rec.phase] += rec.wall_seconds

    def add_seconds(self, step: int, seconds: float) -> None:
        """Set the wall seconds of step ``step``, recorded before its step call ended (with NaN seconds)."""
        if self._records and self._records[-1].step == step:
            last = self._records[-1]
            self._records[-1] = self._last = last._replace(wall_seconds=seconds)
            self._phase_seconds[last.phase] += seconds
        elif self._last is not None and self._last.step == step:  # max_records=0 keeps none
            self._last = self._last._replace(wall_seconds=seconds)
            self._phase_seconds[self._last.phase] += seconds

    def count(self, event: str, n: int = 1) -> None:
        """Add ``n`` to the counter of ``event`` (checks, failed checks, rollbacks, skips, …)."""
        self._events[event] = self._events.get(event, 0) + n

    @property
    def records(self) -> list[StepRecord]:
        """The kept records, oldest first."""
        return list(self._records)

    @property
    def last(self) -> StepRecord | None:
        """The newest record, kept even with ``max_records=0`` (None before the first)."""
        return self._last

    def since(self, step: int) -> list[StepRecord]:
        """The kept records of steps after ``step``, oldest first (costs only the records returned)."""
        newer: list[StepRecord] = []
        for rec in reversed(self._records):
            if rec.step <= step:
                break
            newer.append(rec)
        newer.reverse()
        return newer

    @property
    def backward_passes_skipped(self) -> int:
        """Steps recorded without a backward pass (predicted steps), over the whole run."""
        return self._steps - self._backward

    def summary(self) -> dict[str, Any]:
        """Totals of the run: steps, backward passes, steps and wall seconds per phase, events."""
        return {
            "steps": self._steps,
            "backward_passes": self._backward,
            "backward_passes_skipped": self._steps - self._backward,
            "steps_per_phase": dict(self._phase_steps),
            "wall_seconds_per_phase": dict(self._phase_seconds),
            "wall_seconds": sum(self._phase_seconds.values()),
            "events": dict(sorted(self._events.items())),
            "bandit": {
                str(arm): {"pulls": n, "mean_reward": self._arm_reward_sum[arm] / n}
                for arm, n in sorted(self._arm_pulls.items())
            },
            "records_kept": len(self._records),
        }

    def to_jsonl(self, path: str | os.PathLike[str]) -> int:
        """Write the kept records as JSON Lines (one object per step); returns how many."""
        return write_jsonl(path, (r._asdict() for r in self._records))

    def state_dict(self) -> dict[str, Any]:
        """Totals and kept records as plain Python values."""
        return {
            "max_records": self._records.maxlen,
            "records": [list(r) for r in self._records],
            "steps": self._steps,
            "backward": self._backward,
            "phase_steps": dict(self._phase_steps),
            "phase_seconds": dict(self._phase_seconds),
            "events": dict(self._events),
            "decisions": [list(d) for d in self._decisions],
            "arm_pulls": {str(k): v for k, v in self._arm_pulls.items()},
            "arm_reward_sum": {str(k): v for k, v in self._arm_reward_sum.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._records = deque((StepRecord(*r) for r in state["records"]), maxlen=state["max_records"])
        self._last = self._records[-1] if self._records else None
        self._steps = int(state["steps"])
        self._backward = int(state["backward"])
        self._phase_steps = {k: int(v) for k, v in state["phase_steps"].items()}
        self._phase_seconds = {k: float(v) for k, v in state["phase_seconds"].items()}
        self._events = {k: int(v) for k, v in state["events"].items()}
        self._decisions = deque((Decision(*d) for d in state["decisions"]), maxlen=self._decisions.maxlen)
        self._arm_pulls = {int(k): int(v) for k, v in state["arm_pulls"].items()}
        self._arm_reward_sum = {int(k): float(v) for k, v in state["arm_reward_sum"].items()}


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` as JSON Lines through a temporary file renamed into place."""
    tmp = f"{os.fspath(path)}.tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json_line(row))
            n += 1
    os.replace(tmp, path)
    return n


def json_line(row: dict[str, Any]) -> str:
    """One JSON Lines row (newline included); NaN and ±Inf become null, as JSON has no such numbers."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean) + "\n"
