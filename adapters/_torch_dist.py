"""`TorchCollective`: the trainer's decision collectives over ``torch.distributed`` (see docs/distributed.md).

The trainer agrees every value it reads with the other ranks (`hybrid_core._collective.agree`): one
all-gather per read, of a small float64 row. Those collectives run on a process group of their own,
always gloo on the CPU, whatever backend trains the model: with NCCL on GPUs the decision values are
host floats already (the read put them there), so they go over gloo without a device copy, and the
decision collectives never interleave with the model's gradient all-reduces on the training group.

Each exchange is ONE gloo all-gather of a fixed-size byte block (`_BLOCK` bytes: the payload's
length and its first 1024 bytes). Only when some rank's payload does not fit is a second all-gather run,
sized by the longest payload, which every rank knows from the first. So ranks sending payloads of
different lengths never meet in a collective of mismatched sizes (gloo aborts the process on that),
and a read (up to 128 float64) costs one collective.

A collective that fails (a rank died: gloo reports the closed connection at once; a rank stalled:
gloo's timeout, ``timeout``) raises `BackendError` naming the collective and the rank that did not
answer, on every surviving rank. The group is unusable afterwards: every later call fails at once.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from hybrid_core._errors import BackendError

__all__ = ["TorchCollective"]

_LEN = 8
_BLOCK = _LEN + 1024
"""Bytes of the first all-gather of every exchange: an 8-byte length and up to 1024 payload bytes (128 float64:
the widest row `agree` sends for a read of up to 123 values)."""
_DEFAULT_TIMEOUT = timedelta(minutes=10)


class TorchCollective:
    """The ranks of a ``torch.distributed`` process group, as a `hybrid_core.Collective`.

    ``group``: the process group the trainer's ranks form (None: the default group, every process).
    ``timeout``: how long a decision collective waits for a rank (a ``timedelta`` or seconds) before it
    raises `BackendError`; a rank that died is reported at once. It bounds the wait at the trainer's
    reads only: the model's own collectives (DDP's gradient all-reduce) wait for the training group's
    timeout, set by ``torch.distributed.init_process_group(timeout=...)``.

    Construction creates a gloo subgroup (``torch.distributed.new_group``), itself a collective: every
    process of the default group must construct it at the same point, in the same order as any other
    group. ``torch.distributed`` must be initialized first (`BackendError` otherwise).
    """

    def __init__(self, group: Any = None, timeout: timedelta | float = _DEFAULT_TIMEOUT) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise BackendError("torch.distributed is not initialized: there is no process group to agree over",
                               "Call torch.distributed.init_process_group(...) on every rank first "
                               "(torchrun sets the environment it reads).")
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
            raise BackendError(f"timeout={timeout!r}: must be a positive timedelta or number of seconds",
                               "e.g. TorchCollective(timeout=timedelta(minutes=5)).")
        self._dist = dist
        self.timeout = float(seconds)
        """Seconds a decision collective waits for a rank before raising `BackendError`."""
        ranks = None if group is None else dist.get_process_group_ranks(group)
        self._rank = dist.get_rank(group)
        self._world = dist.get_world_size(group)
        self._group = dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=self.timeout))
        self._broken: str | None = None
        self.calls = 0
        """Collectives run so far (all-gathers of the gloo group)."""

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return self._rank

    @property
    def world_size(self) -> int:
        """The number of ranks in the group."""
        return self._world

    def all_gather(self, values: np.ndarray, what: str) -> np.ndarray:
        """Every rank's 1-D float64 ``values`` as a ``(world_size, n)`` array in rank order (one gloo all-gather
        for up to 128 values); `BackendError` if the ranks sent different lengths or a rank did not answer."""
        row = np.ascontiguousarray(np.asarray(values, dtype="<f8").reshape(-1))
        rows = self._exchange(row.tobytes(), what)
        sizes = [len(r) for r in rows]
        if len(set(sizes)) != 1:
            raise BackendError(
                f"{what}: the ranks sent rows of different lengths "
                f"({', '.join(f'rank {r}: {n // 8}' for r, n in enumerate(sizes))} values)",
                "Every rank must run the same trainer code and config from the same checkpoint.")
        return np.stack([np.frombuffer(r, dtype="<f8") for r in rows]).astype(np.float64)

    def gather_bytes(self, data: bytes, what: str) -> list[bytes]:
        """Every rank's ``data`` (any length) in rank order (one gloo all-gather, two when one is over 1024 bytes)."""
        return self._exchange(bytes(data), what)

    def _exchange(self, payload: bytes, what: str) -> list[bytes]:
        if self._broken is not None:
            raise BackendError(f"{what}: the process group failed earlier ({self._broken}) and cannot be used again",
                               _HINT)
        head = np.zeros(_BLOCK, dtype=np.uint8)
        head[:_LEN] = np.frombuffer(np.int64(len(payload)).astype("<i8").tobytes(), dtype=np.uint8)
        first = payload[:_BLOCK - _LEN]
        head[_LEN:_LEN + len(first)] = np.frombuffer(first, dtype=np.uint8)
        heads = self._gather(torch.from_numpy(head), what)
        lengths = [int(np.frombuffer(h[:_LEN].tobytes(), dtype="<i8")[0]) for h in heads]
        out = [h[_LEN:_LEN + min(n, _BLOCK - _LEN)].tobytes() for h, n in zip(heads, lengths)]
        rest = max(lengths) - (_BLOCK - _LEN)
        if rest > 0:  # every rank knows the lengths: they all run this second all-gather, of one size
            tail = np.zeros(rest, dtype=np.uint8)
            mine = payload[_BLOCK - _LEN:]
            tail[:len(mine)] = np.frombuffer(mine, dtype=np.uint8)
            tails = self._gather(torch.from_numpy(tail), what)
            out = [o + t[:max(0, n - (_BLOCK - _LEN))].tobytes() for o, t, n in zip(out, tails, lengths)]
        return out

    def _gather(self, tensor: torch.Tensor, what: str) -> list[np.ndarray]:
        parts = [torch.empty_like(tensor) for _ in range(self._world)]
        self.calls += 1
        try:
            self._dist.all_gather(parts, tensor, group=self._group)
        except RuntimeError as exc:  # gloo: peer closed / timed out (DistBackendError is a RuntimeError)
            self._broken = f"{type(exc).__name__}: {_first_line(exc)}"
            raise BackendError(f"{what}: {self._who()} {_cause(exc, self.timeout)} "
                               f"(all-gather over {self._world} ranks, on rank {self._rank}; "
                               f"{type(exc).__name__}: {_first_line(exc)})", _HINT) from exc
        return [p.numpy() for p in parts]

    def _who(self) -> str:
        others = [r for r in range(self._world) if r != self._rank]
        if len(others) == 1:
            return f"rank {others[0]}"
        return f"a rank other than {self._rank}"

    def __repr__(self) -> str:
        return f"TorchCollective(rank {self._rank} of {self._world}, gloo, timeout={self.timeout:g}s)"


def _cause(exc: BaseException, timeout: float) -> str:
    text = str(exc).lower()
    if "closed" in text or "reset by peer" in text or "broken pipe" in text:
        return "did not answer: it closed its connection (it died or exited)"
    if "timed out" in text or "timeout" in text:
        return f"did not answer within the {timeout:g} s timeout (it stalled, or is far behind)"
    return "did not answer: the collective failed"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else ""


_HINT = ("A rank died or stalled: read its log. The process group cannot be used any more: stop every rank, "
         "restart them all (torchrun --max-restarts restarts the group) and resume from the last checkpoint "
         "(HybridTrainer.load). If a rank is only slow (a first step compiling, a long checkpoint write), raise "
         "TorchCollective(timeout=...) and the training group's init_process_group(timeout=...).")
