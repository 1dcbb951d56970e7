"""`Collective`: how the processes of one data-parallel run take every decision together.

Each rank of a data-parallel run trains on its own shard of the data, so its losses differ from
the other ranks'. If every rank decided its phase from its own values, one would predict while
another runs a backward pass, the engine's gradient all-reduces would pair up across different
steps and the run would hang. The trainer's decisions depend on nothing but the values it reads
from the device (costs are counted, not timed), and every such read goes through
`Ledger.read_arrays`. So the ranks agree by construction if that one place hands every rank the
same numbers: `agree` all-gathers each rank's values (ONE collective per read, whatever it
holds: losses, statistics, check and line-search losses, read-out losses, flags), checks that
every rank is at the same point of the run (a fingerprint: step, phase, read count), and returns
the mean over ranks, summed in rank order so every rank computes the same bits. A non-finite
value on any rank makes the mean non-finite on all of them, so they roll back together.

A `Collective` is found from the engine the model's arrays belong to (`discover`: an initialized
``torch.distributed`` process group, or ``jax.process_count() > 1``) or passed to `HybridTrainer`
explicitly. `SingleProcess` is the one-process case: no communication at all.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ._errors import BackendError

__all__ = ["Collective", "SingleProcess", "agree", "discover", "gather_flags", "lost_rank"]

_HEADER = 2
"""Leading entries of every gathered row: the number of values, then the fingerprint's length."""


@runtime_checkable
class Collective(Protocol):
    """The processes of one run. Every method is a collective: every rank calls it at the same point."""

    @property
    def rank(self) -> int:
        """This process's index, 0 … world_size - 1."""
        ...

    @property
    def world_size(self) -> int:
        """How many processes the run has."""
        ...

    def all_gather(self, values: np.ndarray, what: str) -> np.ndarray:
        """Every rank's 1-D float64 ``values`` (the same length on every rank) as a ``(world_size, n)`` array,
        in rank order, on every rank. ``what`` names the decision point for errors. A rank that died or did
        not answer within the timeout raises `BackendError` naming the collective and the rank."""
        ...

    def gather_bytes(self, data: bytes, what: str) -> list[bytes]:
        """Every rank's ``data`` (any length), in rank order, on every rank; errors as `all_gather`."""
        ...


class SingleProcess:
    """The one-process run: rank 0 of 1, and every collective is the identity."""

    rank = 0
    world_size = 1

    def all_gather(self, values: np.ndarray, what: str) -> np.ndarray:
        """``values`` as the only row."""
        return np.asarray(values, dtype=np.float64).reshape(1, -1)

    def gather_bytes(self, data: bytes, what: str) -> list[bytes]:
        """``[data]``."""
        return [bytes(data)]

    def __repr__(self) -> str:
        return "SingleProcess()"


def agree(collective: Collective, values: Sequence[float], fingerprint: Sequence[float], what: str) -> list[float]:
    """The mean over ranks of every rank's ``values`` (one collective), the same bits on every rank.

    ``fingerprint`` says where this rank is in the run (step, phase, reads so far): a rank at
    another point raises `BackendError` on every rank instead of pairing values of different
    steps. Rows are padded to a power of two (at least 64 entries) so that ranks asking for a few
    more or fewer values still meet in the same collective and see the disagreement.
    """
    if collective.world_size == 1:
        return [float(v) for v in values]
    size = _HEADER + len(fingerprint) + len(values)
    width = max(64, 1 << (size - 1).bit_length())
    row = np.zeros(width, dtype=np.float64)
    row[0], row[1] = len(values), len(fingerprint)
    row[_HEADER:_HEADER + len(fingerprint)] = fingerprint
    row[_HEADER + len(fingerprint):size] = values
    rows = collective.all_gather(row, what)
    if rows.shape != (collective.world_size, width):
        raise BackendError(f"{what}: the ranks sent rows of different lengths ({rows.shape} for {width} entries)",
                           _DESYNC_HINT)
    for rank in range(collective.world_size):
        if not np.array_equal(rows[rank, :_HEADER + len(fingerprint)], row[:_HEADER + len(fingerprint)]):
            raise BackendError(
                f"{what}: rank {rank} is at another point of the run than rank {collective.rank} "
                f"(step, phase, reads: {_point(rows[rank])} vs {_point(row)})", _DESYNC_HINT)
    data = rows[:, _HEADER + len(fingerprint):size]
    total = data[0].copy()
    for rank in range(1, collective.world_size):  # in rank order: the same bits on every rank
        total += data[rank]
    return (total / collective.world_size).tolist()


def gather_flags(collective: Collective, ok: bool, what: str) -> list[bool]:
    """Every rank's ``ok``, in rank order (one collective; also a barrier)."""
    if collective.world_size == 1:
        return [ok]
    return [bool(v) for v in collective.all_gather(np.array([1.0 if ok else 0.0]), what)[:, 0]]


def discover(namespace: Any) -> Collective:
    """The process group of the engine behind ``namespace`` (the model's array namespace), if it has
    more than one process: an initialized ``torch.distributed`` group for torch arrays, ``jax.process_count()``
    for JAX arrays; else `SingleProcess`."""
    import array_api_compat

    if array_api_compat.is_torch_namespace(namespace):
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from hybrid_core.adapters._torch_dist import TorchCollective

            return TorchCollective()
    elif array_api_compat.is_jax_namespace(namespace):
        jax = sys.modules.get("jax")
        if jax is not None and jax.process_count() > 1:
            from hybrid_core.adapters._jax_dist import JaxCollective

            return JaxCollective()
    return SingleProcess()


def require_collective(collective: Any) -> Collective:
    """``collective`` if it is one (`BackendError` otherwise)."""
    if not isinstance(collective, Collective):
        raise BackendError(f"collective must provide rank, world_size, all_gather and gather_bytes, "
                           f"got {type(collective).__name__}",
                           "Pass None (the process group is found from the engine) or a Collective.")
    if not (isinstance(collective.world_size, int) and collective.world_size >= 1
            and isinstance(collective.rank, int) and 0 <= collective.rank < collective.world_size):
        raise BackendError(f"collective has rank {collective.rank!r} of world size {collective.world_size!r}",
                           "rank must be an int in [0, world_size).")
    return collective


def lost_rank(collective: Collective, what: str, exc: BaseException,
              doing: str = "could not read the step's values from the device") -> str:
    """The message for an engine error met while the ranks run together: this rank, the point ``what``, the
    engine's own words (a peer's connection reset: the rank that died is named when there is only one other)."""
    others = [r for r in range(collective.world_size) if r != collective.rank]
    who = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {', '.join(map(str, others))}"
    text = " ".join(str(exc).split())
    return (f"{what}: rank {collective.rank} of {collective.world_size} {doing}; {who} probably died or dropped "
            f"its connection ({type(exc).__name__}: {text[:300]})")


def _point(row: np.ndarray) -> str:
    n = int(row[1])
    return ", ".join(f"{v:g}" for v in row[_HEADER:_HEADER + n])


_DESYNC_HINT = ("Every rank must call step() the same number of times with the same config and start from the "
                "same checkpoint; give each rank the same number of batches (drop the last uneven ones).")
