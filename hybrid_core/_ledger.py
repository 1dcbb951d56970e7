"""`Ledger`: real steps whose values are still on the device, the last verified point, and host reads.

A real step leaves its loss (and, on a measured step, its statistics vector) on the device
and its batch here. `read` turns every pending value into Python floats with ONE
device→host transfer. `verify` keeps a copy of the parameters, the optimizer state and the
model's extra state at a point whose steps were all read finite (every few reads, and
before anything but a real step moves the weights), so a non-finite value found by a
later read can be undone exactly (`restore`) and the steps since replayed from their kept
batches. Every device→host read of the trainer goes through
`read_arrays`, which counts it (`host_syncs`) and, in a run of several processes, hands every rank
the mean over ranks (`hybrid_core._collective.agree`), so they all take the same decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import array_api_compat

from ._backend import to_host_floats
from ._checks import has_method
from ._collective import Collective, SingleProcess, agree, lost_rank
from ._errors import BackendError, CheckpointError, DivergenceError, HybridError
from ._phase import PhaseState
from ._protocols import Array, Model, Optimizer
from ._statecheck import fields, integer

__all__ = ["Ledger", "Pending"]


class Pending(NamedTuple):
    """One real step whose loss has not been read yet."""

    step: int
    phase: PhaseState
    batch: Any
    loss: Array
    stats: Array | None
    """The statistics vector of a measured step (see `hybrid_core.kernels.STATS_FIELDS`, plus lr
    for a fused step), else None."""
    lr: float | None
    """The learning rate, read on the host at a measured step of the unfused path."""
    seconds: float


class Ledger:
    """Pending real steps, the copy of the last verified point, and the count of host reads."""

    def __init__(self, xp: Any) -> None:
        self._xp = xp
        self.pending: list[Pending] = []
        self.settled: list[Pending] = []
        """Steps read (all finite) since the last verified point: replayed without reads on a rollback."""
        self.host_syncs = 0
        """Every device→host read the trainer made (losses, statistics, checks, line searches)."""
        self._verified: tuple[list[Array], dict[str, Any], Any] | None = None
        self._older: tuple[list[Array], dict[str, Any], Any] | None = None
        self.older_settled: list[Pending] = []
        """Steps between the verified point before the last one and the last one (see `keep_older`)."""
        self.verifies = 0
        """How many verified points were copied (each: the parameters and the optimizer state)."""
        self.collective: Collective = SingleProcess()
        """The run's processes: every read is agreed among them (one collective per read)."""
        self.fingerprint: Callable[[], Sequence[float]] = tuple
        """Where the run is (the trainer sets it: step, phase, reads), compared across ranks at every read."""

    def add(self, item: Pending) -> None:
        """Keep one real step until the next `read`."""
        self.pending.append(item)

    def read_arrays(self, arrays: list[Array]) -> list[float]:
        """The entries of 0-d or 1-D device arrays, in order, as floats: one counted host read (in a run of
        several processes, the mean over ranks, the same on every rank: one collective)."""
        self.host_syncs += 1
        if self.collective.world_size == 1:
            return to_host_floats(arrays)
        try:
            values = to_host_floats(arrays)
        except HybridError:
            raise
        except Exception as exc:  # the engine's own error: a collective inside the step failed (a rank is gone)
            raise BackendError(lost_rank(self.collective, f"read {self.host_syncs}", exc), _LOST_HINT) from exc
        return agree(self.collective, values, self.fingerprint(), f"read {self.host_syncs}")

    def read(self, extra: Sequence[Array] = ()) -> tuple[list[list[float]], list[float]]:
        """The pending steps' values as floats, [loss] or the statistics vector each, and the entries of
        ``extra`` 1-element arrays read in the same transfer (one host read)."""
        flat = self.read_arrays([p.loss if p.stats is None else p.stats for p in self.pending] + list(extra))
        out, at = [], 0
        for p in self.pending:
            size = 1 if p.stats is None else int(p.stats.shape[0])
            out.append(flat[at:at + size])
            at += size
        return out, flat[at:]

    def verify(self, model: Model, optimizer: Optimizer, keep_older: bool = False) -> None:
        """Copy the point reached (parameters, optimizer state, model state): the new rollback target.

        With ``keep_older`` the previous point is kept too (one more copy) with the steps read between the
        two: its weights were read finite by those steps, while the new point's weights come from an
        update nothing has read yet. Only a point reached by real steps alone may keep the one before.
        """
        params = [_copy(p) for p in model.parameters()]
        model_state = model.state_dict() if has_method(model, "state_dict") else None
        if keep_older and self._verified is not None:
            self._older, self.older_settled = self._verified, self.settled
        else:
            self._older, self.older_settled = None, []
        self._verified = (params, optimizer.state_dict(), model_state)
        self.settled = []
        self.verifies += 1

    @property
    def has_older(self) -> bool:
        """Whether the verified point before the last one is kept."""
        return self._older is not None

    def restore(self, model: Model, optimizer: Optimizer, older: bool = False) -> None:
        """Put the last verified point (or, with ``older``, the one before it) back, through
        `Model.set_parameters` (the weights may be NaN); it becomes the only verified point."""
        point = self._older if older else self._verified
        if point is None:
            raise CheckpointError("there is no verified point to go back to")
        kept = (None, []) if older else (self._older, self.older_settled)
        params, opt_state, model_state = point
        try:
            optimizer.load_state_dict(opt_state)
        except CheckpointError as exc:  # an optimizer that checks its state found its own copy non-finite
            raise DivergenceError(
                f"the last verified point cannot be put back: its optimizer state is not usable ({exc.message})",
                "The optimizer's state went non-finite before the point was verified (its loss read finite); "
                "load an earlier checkpoint and lower the learning rate.") from exc
        if model_state is not None:
            model.load_state_dict(model_state)
        model.set_parameters(params)
        self.verify(model, optimizer)  # the restored arrays now belong to the live objects
        self._older, self.older_settled = kept

    def state_dict(self) -> dict[str, Any]:
        """The host-read count (a checkpoint is written with nothing pending)."""
        return {"host_syncs": self.host_syncs}

    def check_state_dict(self, state: dict[str, Any]) -> int:
        """The host-read count `load_state_dict` would set; `ValueError` naming the field if malformed."""
        fields(state, ("host_syncs",), what="ledger state")
        return integer(state["host_syncs"], "host_syncs")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.host_syncs = self.check_state_dict(state)
        self.pending = []


_LOST_HINT = ("A run of several processes cannot go on without one of them: check the other ranks' logs, then "
              "restart every rank from the last checkpoint.")


def _copy(array: Array) -> Array:
    """A fresh array with ``array``'s values, detached from any autograd graph (JAX arrays are
    immutable: the array itself)."""
    if array_api_compat.is_jax_array(array):
        return array
    if array_api_compat.is_torch_array(array):
        return array.detach().clone()
    return array_api_compat.array_namespace(array).asarray(array, copy=True)


def copies(arrays: Sequence[Array]) -> list[Array]:
    """Fresh copies of ``arrays`` (see `_copy`)."""
    return [_copy(a) for a in arrays]
