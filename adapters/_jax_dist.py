"""`JaxCollective`: the processes of a multi-process JAX run (``jax.distributed.initialize``) as a
`hybrid_core._collective.Collective`, so every rank takes the trainer's decisions from the same numbers.

`hybrid_core._collective.discover` builds one when the model's arrays are JAX arrays and
``jax.process_count() > 1``. Each collective is one ``multihost_utils.process_allgather`` over all
processes, through whatever JAX uses across processes on the platform (tested: CPU hosts with
``jax_cpu_collectives_implementation="gloo"``). Values travel as their raw 64-bit patterns (two
``uint32`` words each), so every rank sees every other rank's float64 values bit for bit whether or
not ``jax_enable_x64`` is set.

Failures: a rank that died makes the collective fail on the others (the transport reports a
closed connection); a rank that does not answer makes it wait. Either way the survivors raise
`BackendError` naming the collective and the ranks, the latter after ``timeout`` seconds (the
collective runs in a worker thread that is watched; the thread is left behind, and this
collective refuses every later call). JAX's own coordination service then ends the surviving
processes once their heartbeat timeout passes (``jax.distributed.initialize(...,
heartbeat_timeout_seconds=...)``, 100 s by default): see docs/distributed.md.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from hybrid_core._collective import lost_rank
from hybrid_core._errors import BackendError

__all__ = ["JaxCollective"]

_HINT = ("Every process must keep calling trainer.step() in lockstep; check the other processes' logs (a crash, "
         "an exception, a different number of batches). A multi-process run cannot continue without one of its "
         "processes: restart all of them from the last checkpoint.")


class JaxCollective:
    """The processes of a ``jax.distributed`` run: rank ``jax.process_index()`` of ``jax.process_count()``.

    ``timeout`` (seconds, > 0) bounds how long one collective waits for the other ranks before
    `BackendError`. Construct it after ``jax.distributed.initialize``; every process must.
    """

    def __init__(self, timeout: float = 300.0) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise BackendError(f"timeout={timeout!r}: must be a finite number of seconds > 0",
                               "Pass e.g. JaxCollective(timeout=300).")
        import jax

        self._rank = int(jax.process_index())
        self._world = int(jax.process_count())
        self.timeout = float(timeout)
        """Seconds one collective waits for the other ranks."""
        self.calls = 0
        """Collectives this object ran (each one ``process_allgather``)."""
        self._broken: str | None = None
        self._worker = _Worker()
        self._lock = threading.Lock()

    @property
    def rank(self) -> int:
        """This process's index, ``jax.process_index()``."""
        return self._rank

    @property
    def world_size(self) -> int:
        """``jax.process_count()``."""
        return self._world

    def all_gather(self, values: np.ndarray, what: str) -> np.ndarray:
        """Every rank's float64 ``values`` as a ``(world_size, n)`` array in rank order, bit for bit."""
        row = np.ascontiguousarray(np.asarray(values, dtype=np.float64).reshape(-1))
        words = self._gather(row.view(np.uint32), what)
        return np.ascontiguousarray(words).view(np.float64).reshape(self._world, row.shape[0])

    def gather_bytes(self, data: bytes, what: str) -> list[bytes]:
        """Every rank's ``data`` in rank order (two collectives: the lengths, then the padded bytes)."""
        data = bytes(data)
        sizes = self._gather(np.array([len(data)], dtype=np.uint32), f"{what} (sizes)")[:, 0]
        width = max(4, int(-(-int(sizes.max()) // 4) * 4))
        padded = np.zeros(width, dtype=np.uint8)
        padded[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows = self._gather(padded.view(np.uint32), what)
        return [np.ascontiguousarray(rows[r]).view(np.uint8)[:int(sizes[r])].tobytes() for r in range(self._world)]

    def _gather(self, words: np.ndarray, what: str) -> np.ndarray:
        """``process_allgather`` of one uint32 row, watched: (world, n) uint32, or `BackendError`."""
        from jax.experimental import multihost_utils

        with self._lock:
            if self._broken is not None:
                raise BackendError(f"{what}: rank {self._rank} cannot take part in collectives any more "
                                   f"(an earlier one failed: {self._broken})", _HINT)
            self.calls += 1
            try:
                out = self._worker.run(multihost_utils.process_allgather, words, self.timeout)
            except TimeoutError:
                self._broken = f"{what} timed out"
                others = ", ".join(str(r) for r in range(self._world) if r != self._rank)
                raise BackendError(
                    f"{what}: rank {self._rank} waited {self.timeout:g} s for rank(s) {others} in a "
                    f"process_allgather; at least one of them is not answering", _HINT) from None
            except Exception as exc:  # the transport's error (a peer's connection closed): jax's own type
                self._broken = f"{what}: {type(exc).__name__}"
                raise BackendError(lost_rank(self, what, exc, "failed in a process_allgather"), _HINT) from exc
        out = np.asarray(out)
        if out.shape != (self._world, words.shape[0]) or out.dtype != np.uint32:
            self._broken = f"{what}: malformed result"
            raise BackendError(f"{what}: process_allgather gave {out.shape} {out.dtype} for {self._world} rows "
                               f"of {words.shape[0]} uint32 words (the ranks sent rows of different lengths?)",
                               _HINT)
        return out

    def __repr__(self) -> str:
        return f"JaxCollective(rank={self._rank}, world_size={self._world})"


class _Worker:
    """One daemon thread that runs the collectives, so the caller can stop waiting for one that does not end.

    A daemon thread (not a ``concurrent.futures`` pool, whose threads are joined at interpreter exit): a
    collective stuck for good must not keep the process from exiting.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[..., Any], Any, queue.Queue[tuple[bool, Any]]]] = queue.Queue()
        self._thread: threading.Thread | None = None

    def run(self, fn: Callable[..., Any], arg: Any, timeout: float) -> Any:
        """``fn(arg)`` on the worker: its result, its exception re-raised, or `TimeoutError` after ``timeout``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jax-collective", daemon=True)
            self._thread.start()
        answer: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)
        self._jobs.put((fn, arg, answer))
        try:
            ok, value = answer.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if not ok:
            raise value
        return value

    def _loop(self) -> None:
        while True:
            fn, arg, answer = self._jobs.get()
            try:
                answer.put((True, fn(arg)))
            except BaseException as exc:  # handed to the caller, which raises it as a BackendError
                answer.put((False, exc))
