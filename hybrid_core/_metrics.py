"""`MetricsCollector`: per-step records (bounded) and exact running totals."""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from ._phase import Phase
from ._statecheck import fields, flag, integer, optional, real, sequence

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

    def check_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """The attributes `load_state_dict` would set; `ValueError` naming the field if malformed.

        The collector keeps its own bounds on records and decisions (the newest that fit are kept);
        the saved ``max_records`` is only checked.
        """
        fields(state, ("max_records", "records", "steps", "backward", "phase_steps", "phase_seconds", "events",
                       "decisions", "arm_pulls", "arm_reward_sum"), what="metrics state")
        most = integer(state["max_records"], "max_records")
        records = [_record(r, f"records[{i}]") for i, r in enumerate(sequence(state["records"], "records", most))]
        decisions = [_decision(d, f"decisions[{i}]")
                     for i, d in enumerate(sequence(state["decisions"], "decisions", max(most, 1)))]
        steps = integer(state["steps"], "steps")
        phases = [p.value for p in Phase]
        return {
            "_records": deque(records, maxlen=self._records.maxlen),
            "_steps": steps, "_backward": integer(state["backward"], "backward", 0, steps),
            "_phase_steps": _table(state["phase_steps"], "phase_steps", phases, integer),
            "_phase_seconds": _table(state["phase_seconds"], "phase_seconds", phases, real, finite=False),
            "_events": _table(state["events"], "events", None, integer),
            "_decisions": deque(decisions, maxlen=self._decisions.maxlen),
            "_arm_pulls": {int(k): v for k, v in _table(state["arm_pulls"], "arm_pulls", _ARM, integer).items()},
            "_arm_reward_sum": {int(k): v for k, v in _table(state["arm_reward_sum"], "arm_reward_sum", _ARM,
                                                             real).items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (`ValueError` naming the field, and no change, if malformed)."""
        for name, value in self.check_state_dict(state).items():
            setattr(self, name, value)


_ARM = "an arm"


def _table(value: Any, name: str, keys: list[str] | str | None, read: Callable[..., Any], **kwargs: Any
           ) -> dict[str, Any]:
    """A dict of strings to values read by ``read``: with exactly ``keys``, any string keys (None), or arms."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} is a {type(value).__name__}, not a dict")
    if isinstance(keys, list):
        fields(value, keys, what=name)
    for k in value:
        if not isinstance(k, str) or (keys == _ARM and not k.isdigit()):
            raise ValueError(f"{name} has the key {k!r}; expected {'an arm' if keys == _ARM else 'a string'}")
    return {k: read(v, f"{name}[{k!r}]", **kwargs) for k, v in value.items()}


def _record(value: Any, name: str) -> StepRecord:
    r = sequence(value, name, len(StepRecord._fields), 7)
    if r[1] not in [p.value for p in Phase]:
        raise ValueError(f"{name}.phase={r[1]!r}: not a phase")
    loss, predicted = (optional(real, v, f"{name}.{n}", finite=False)
                       for v, n in ((r[2], "loss"), (r[3], "predicted_loss")))
    tail = [flag(r[7], f"{name}.skipped")] if len(r) > 7 else []
    tail += [optional(real, r[8], f"{name}.lr")] if len(r) > 8 else []
    tail += [optional(real, r[9], f"{name}.grad_norm", finite=False)] if len(r) > 9 else []
    return StepRecord(integer(r[0], f"{name}.step"), r[1], loss, predicted, flag(r[4], f"{name}.backward"),
                      real(r[5], f"{name}.wall_seconds", finite=False),
                      real(r[6], f"{name}.confidence", finite=False), *tail)


def _decision(value: Any, name: str) -> Decision:
    step, horizon, reward = sequence(value, name, 3, 3)
    return Decision(integer(step, f"{name}.step"), integer(horizon, f"{name}.horizon"),
                    optional(real, reward, f"{name}.reward", finite=False))


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
