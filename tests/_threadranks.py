"""Ranks as threads of one process: a `Collective` test double with the semantics of a real one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from hybrid_core import BackendError


class Group:
    """The shared meeting point of ``world_size`` thread ranks: numbered rounds, with a timeout.

    A round every rank reached returns to all of them even if one rank fails right after;
    `abort` (a rank raised) makes the ranks still waiting fail at once.
    """

    def __init__(self, world_size: int, timeout: float = 20.0) -> None:
        self.world_size, self.timeout = world_size, timeout
        self.cond = threading.Condition()
        self.rounds: dict[int, list[Any]] = {}
        self.arrived: dict[int, int] = {}
        self.next_round = [0] * world_size
        self.aborted = False
        self.calls = 0

    def exchange(self, rank: int, value: Any, what: str) -> list[Any]:
        with self.cond:
            n = self.next_round[rank]
            self.next_round[rank] += 1
            self.rounds.setdefault(n, [None] * self.world_size)[rank] = value
            self.arrived[n] = self.arrived.get(n, 0) + 1
            if self.arrived[n] == self.world_size:
                self.calls += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.arrived[n] == self.world_size or self.aborted, self.timeout)
            if self.arrived[n] == self.world_size:
                return list(self.rounds[n])
        raise BackendError(f"{what}: a rank did not answer (thread ranks)")

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify_all()


class ThreadCollective:
    """One rank of a `Group`."""

    def __init__(self, group: Group, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def all_gather(self, values: np.ndarray, what: str) -> np.ndarray:
        rows = self.group.exchange(self.rank, np.asarray(values, dtype=np.float64).copy(), what)
        if len({r.shape for r in rows}) != 1:
            raise BackendError(f"{what}: rows of different lengths")
        return np.stack(rows)

    def gather_bytes(self, data: bytes, what: str) -> list[bytes]:
        return self.group.exchange(self.rank, bytes(data), what)


def run_ranks(world_size: int, body: Callable[[ThreadCollective], Any], timeout: float = 60.0) -> list[Any]:
    """``body(collective)`` on ``world_size`` thread ranks; each rank's result or raised exception."""
    group = Group(world_size)
    results: list[Any] = [None] * world_size

    def run(rank: int) -> None:
        try:
            results[rank] = body(ThreadCollective(group, rank))
        except BaseException as exc:  # returned to the test, which asserts on it
            results[rank] = exc
            group.abort()

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        group.abort()
        raise TimeoutError("a thread rank did not finish")
    return results
