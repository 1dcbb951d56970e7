"""`RealSteps`: runs real steps, reads them in batches, and replays them after a late non-finite read.

Three ways to run a real step, chosen once per trainer:

- *fused*: the optimizer's `FusedStep` runs the whole step in one call (torch, JAX adapters);
- *unfused*: ``model.loss_and_grad`` then ``optimizer.step``;
- *eager*: the unfused step, but its loss and gradient statistics are read before the update,
  so a non-finite value never reaches the weights. Used with ``read_every=1``, for a model
  without ``set_parameters`` (no way back from NaN weights), and to replay after a rollback.

In the first two the values stay on the device until the `Ledger` reads them; a non-finite
one then puts the last verified point back and replays the steps since (see `replay`).

While the learning-rate estimate is fed (`LRTuner.searching`) a step takes the unfused path, which
hands its gradients over, and each read also reads the estimate. After every real step the read-out
stages its snapshot; a read that finds every value finite commits it, a rollback drops it. A late
non-finite value with the learning rate raised by the tuner backs the rate off and replays every
step since the verified point at the lower rate, each read before its update.

While the layer-freezing strategy watches the gradient norms (`LayerFreeze.wants`), a measured step also
takes the unfused path: the per-group norms of its gradients ride along in its read, and the part decides
at the regular reads (a change of the trainable groups makes the point reached the verified one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ._checks import call_model, check_loss_and_grads, has_method
from ._config import HybridConfig
from ._cycle import PredictionCycle
from ._directions import ExtrapolateDirection, LinefitDirection
from ._errors import DivergenceError
from ._freeze import LayerFreeze
from ._ledger import Ledger, Pending
from ._lrtune import LRTuner
from ._metrics import MetricsCollector
from ._phase import Phase, PhaseMachine, PhaseState
from ._protocols import Array, FusedStep, Model, Optimizer
from ._readout import ReadOut
from ._recorder import Recorded, Recorder
from ._schedule import advance_schedule
from ._statecheck import arrays_like, fields, integer, optional
from .kernels import fused_stats

__all__ = ["RealSteps"]

_VERIFY_READS = 4
"""Reads between verified points (copies of the weights and optimizer state to roll back to)."""


class RealSteps:
    """The real-step path of one trainer (see the module docstring); its state is the last update."""

    def __init__(self, config: HybridConfig, model: Model, optimizer: Optimizer, ledger: Ledger,
                 recorder: Recorder, directions: ExtrapolateDirection | LinefitDirection, phases: PhaseMachine,
                 metrics: MetricsCollector, xp: Any, readout: ReadOut, tuner: LRTuner, freeze: LayerFreeze,
                 cycle: PredictionCycle) -> None:
        self._config, self._model, self._optimizer, self._cycle = config, model, optimizer, cycle
        self._ledger, self._recorder, self._directions = ledger, recorder, directions
        self._phases, self._metrics, self._xp = phases, metrics, xp
        self._readout, self._tuner, self._freeze = readout, tuner, freeze
        self.extra: list[Array] = []
        """Device values to read with the next read (1-element arrays); their floats land in `extra_values`."""
        self.extra_values: list[float] = []
        self.extra_records: list[Recorded] = []
        """The steps recorded by the read that carried `extra` (kept with `extra_values` until they are taken)."""
        self.eager = config.read_every == 1 or not has_method(model, "set_parameters")
        self.fused = isinstance(optimizer, FusedStep) and optimizer.model is model and not self.eager
        self._hooks = getattr(optimizer, "accepts_before_update", False) is True
        """The fused step takes ``before_update``, so feeding the learning-rate estimate keeps it."""
        self._hook = {"before_update": self._feed_tuner}
        self._last_update: list[Array] | None = None
        """The eager path's previous update (its statistics pair this step's gradient with it)."""
        self._checked = False
        self.skips = 0
        """Real steps skipped in a row for a non-finite value (``on_nonfinite="skip"``; a recorded step resets it)."""

    def run(self, step: int, phase: PhaseState, batch: Any, measure: bool,
            statistics: bool) -> list[Recorded] | None:
        """Run real step ``step`` of ``phase`` on ``batch``; with ``measure`` read everything pending.

        Returns the steps recorded by the read, or None when nothing was read.
        """
        if self.eager:
            self.flush()
            return self._eager_step(Pending(step, phase, batch, None, None, None, math.nan), 0)
        loss, stats, lr = self.compute(batch, statistics, self._tuner.searching(step),
                                       step if self._freeze.wants(step, measure) else None)
        if lr is None and getattr(self._optimizer, "lr_on_device", False) is not True:
            lr = float(self._optimizer.lr)  # a host float: the step's rate for its record, at no read
        self._readout.stage(step, self._model)
        self._ledger.add(Pending(step, phase, batch, loss, stats, lr, math.nan))
        return self.settle() if measure else None

    def flush(self) -> list[Recorded]:
        """Read and record every pending step now."""
        return self.settle() if self._ledger.pending else []

    def compute(self, batch: Any, statistics: bool, feed: bool = False,
                norms_of: int | None = None) -> tuple[Array, Array | None, float | None]:
        """Forward, backward and update; the loss (and statistics when asked) stay on the device.

        With ``feed`` the gradients also feed the learning-rate estimate, with ``norms_of`` (the step's
        index) the layer-freezing strategy's per-group norms (unfused path).
        """
        model, optimizer = self._model, self._optimizer
        if self.fused and (not feed or self._hooks) and norms_of is None:
            # Only a feeding step passes the hook, so a FusedStep without ``before_update`` still works.
            hook = self._hook if feed else _NO_HOOK
            loss, stats = call_model(lambda b: optimizer.fused_step(b, statistics, **hook), batch, "fused_step")
            if not self._checked:
                check_loss_and_grads(self._xp, model, loss, None)
                self._checked = True
            return loss, stats, None
        loss, grads = call_model(model.loss_and_grad, batch, "loss_and_grad")
        grads = list(grads)
        # The loss is checked every step (it reveals a batch from another library); the
        # gradients' library and shapes once, since a model cannot change them silently.
        check_loss_and_grads(self._xp, model, loss, None if self._checked else grads)
        self._checked = True
        if feed:
            self._tuner.accumulate(model.parameters(), grads, self._xp)
        if norms_of is not None:
            self._freeze.stage(norms_of, grads, self._xp)
        update = optimizer.step(grads)
        if not statistics:
            return loss, None, None
        return loss, fused_stats(loss, grads, list(update)), self.read_lr()

    def _feed_tuner(self, grads: list[Array]) -> None:
        """``before_update`` of a fused step: the gradients at the weights before the update feed the estimate."""
        self._tuner.accumulate(self._model.parameters(), grads, self._xp)

    def settle(self) -> list[Recorded]:
        """Read the pending steps and record them; roll back and replay if a value is not finite."""
        ledger = self._ledger
        extra, self.extra = self.extra, []
        last = ledger.pending[-1].step
        due = self._tuner.due(last)
        estimate_arrays = self._tuner.pending(self._xp) if due else []
        values, more = ledger.read(estimate_arrays + self._freeze.pending() + extra)
        estimate, norms, extra_values = _split(more, len(estimate_arrays), self._freeze.pending_size)
        if extra:  # kept until taken: a later read without extras (after a flush) must not drop them
            self.extra_values = extra_values
        if not all(_finite(v) for v in values):
            out = self.replay()
            self.extra_records = out if extra else self.extra_records
            return out
        pending, ledger.pending = ledger.pending, []
        out = [self._recorder.record(p, v) for p, v in zip(pending, values)]
        self.skips = 0
        self.extra_records = out if extra else self.extra_records
        self._readout.commit()
        if due:
            self._tuner.update(last, estimate)
        self._directions.observe(self._recorder.steps_recorded, self._model)
        ledger.settled += pending
        if self._freeze_read(last, out, norms):
            ledger.verify(self._model, self._optimizer)  # later rollbacks replay with the new trainable groups
        if len(ledger.settled) >= _VERIFY_READS * self._config.read_every:
            # With the learning rate tuned, keep the point before too: a raised rate can make the newest
            # point's unread last update the bad one (see `replay`).
            ledger.verify(self._model, self._optimizer, keep_older=self._tuner.enabled)
        return out

    def replay(self) -> list[Recorded]:
        """Back to the last verified point; rerun the steps read since (no reads: they were finite), then
        the pending ones one by one, each read before its update.

        When the learning-rate tuner had raised the rate, it backs off first and every step since the
        verified point is replayed read (the lower rate makes them new steps); a further non-finite
        value at a raised rate backs off again and starts the replay over. If the very first replayed
        step is not finite, the verified point itself is bad (its weights come from an update no read
        had seen): the replay starts again from the point before it, when the ledger keeps one.
        """
        ledger = self._ledger
        pending, ledger.pending = ledger.pending, []
        settled = ledger.settled
        before = ledger.older_settled
        self._readout.discard()
        self._freeze.discard()
        self._tuner.reset_estimate()
        self._metrics.count("late_nonfinite_rollbacks")
        lowered = self._tuner.back_off(pending[0].step if pending else 0, "non-finite value")
        older = False
        while True:
            ledger.restore(self._model, self._optimizer, older=older)
            self._tuner.reapply()
            self._last_update = None
            steps = (before if older else []) + settled
            try:
                if lowered:
                    self._metrics.count("lr_backoff_replays")
                    self._readout.drop_after((steps + pending)[0].step)
                    self._replay_read(steps, record=False, guard_start=not older and ledger.has_older)
                    out = self._replay_read(pending, guard_start=not (older or steps) and ledger.has_older)
                else:
                    for p in settled:
                        self.compute(p.batch, False)
                        ledger.settled.append(p)
                    out = self._replay_read(pending)
            except _LowerRate:
                lowered = True
                continue
            except _BadStart:
                self._metrics.count("rollbacks_to_older_point")
                older = True
                continue
            # The point replayed from was read finite by the replayed steps: it may stay as the older one.
            ledger.verify(self._model, self._optimizer, keep_older=self._tuner.enabled)
            return out

    def _replay_read(self, steps: list[Pending], record: bool = True, guard_start: bool = False) -> list[Recorded]:
        out: list[Recorded] = []
        for i, p in enumerate(steps):
            out += self._eager_step(p, len(steps) - 1 - i, replaying=True, record=record,
                                    bad_start=guard_start and i == 0)
        return out

    def _freeze_read(self, last: int, records: list[Recorded], norms: list[float], decide: bool = True) -> bool:
        """Hand a read to the layer-freezing strategy; count what it changed. Whether the trainable groups changed."""
        event = self._freeze.after_read(last, records, norms, self._recorder.diverging, decide)
        if event is not None:
            self._metrics.count(event)
        return event is not None

    def read_lr(self) -> float:
        """The optimizer's learning rate; counted as a host read when the optimizer says it is one."""
        if getattr(self._optimizer, "lr_on_device", False) is True:
            self._ledger.host_syncs += 1
        return float(self._optimizer.lr)

    def _eager_step(self, p: Pending, later: int, replaying: bool = False, record: bool = True,
                    bad_start: bool = False) -> list[Recorded]:
        """One real step read before its update: a non-finite loss or gradient never reaches the weights."""
        model = self._model
        loss, grads = call_model(model.loss_and_grad, p.batch, "loss_and_grad")
        grads = list(grads)
        check_loss_and_grads(self._xp, model, loss, None if self._checked else grads)
        self._checked = True
        feed = self._tuner.searching(p.step) and not replaying
        if feed:
            self._tuner.accumulate(model.parameters(), grads, self._xp)
        if record and self._freeze.wants(p.step, self.eager or p.stats is not None):
            self._freeze.stage(p.step, grads, self._xp)
        due = feed and self._tuner.due(p.step)
        estimate_arrays = self._tuner.pending(self._xp) if due else []
        extra, self.extra = (self.extra, []) if record else ([], self.extra)
        values = self._ledger.read_arrays([fused_stats(loss, grads, self._last_update), *estimate_arrays,
                                           *self._freeze.pending(), *extra])
        stats, values = values[:6], values[6:]
        estimate, norms, more = _split(values, len(estimate_arrays), self._freeze.pending_size)
        if extra:
            self.extra_values, self.extra_records = more, []
        if not _finite(stats):
            self._freeze.discard()
            self._tuner.reset_estimate()
            if bad_start:
                raise _BadStart
            if self._tuner.back_off(p.step, "non-finite value"):
                self._metrics.count("lr_backoffs_nonfinite")
                if replaying:
                    raise _LowerRate
            if record or self._config.on_nonfinite == "raise":
                self._nonfinite(p, stats, later)
            advance_schedule(self._optimizer)  # skipped, the step still counts for a schedule (see _schedule.py)
            return []
        self._last_update = list(self._optimizer.step(grads))
        if replaying:
            self._ledger.settled.append(p)
        self._readout.stage(p.step, model)
        self._readout.commit()
        if not record:
            return []
        out = [self._recorder.record(p, [*stats, self.read_lr()])]
        self.skips = 0
        if extra:
            self.extra_records = out
        self._freeze_read(p.step, out, norms, decide=not replaying)
        if due:
            self._tuner.update(p.step, estimate)
        self._directions.observe(self._recorder.steps_recorded, model)
        return out

    def _nonfinite(self, p: Pending, values: list[float], later: int) -> None:
        """Step ``p`` read a non-finite value before its update: skip it, or put the trainer back before it
        and raise `DivergenceError` saying exactly where it is."""
        what = f"loss {values[0]}" + (f" and {int(values[5])} non-finite gradient entries" if values[5] else "")
        first_correct = p.phase.phase is Phase.CORRECT and p.phase.steps_in_phase == 0
        cfg = self._config
        skip = cfg.on_nonfinite == "skip"
        limited = skip and self.skips >= cfg.max_consecutive_skips
        if skip and not limited and self._weights_finite():
            self.skips += 1
            if first_correct:
                self._cycle.keep_search()  # the search completed on this batch; only the update is skipped
            self._recorder.record_skipped(p, values[0])
            return
        self._phases.state = p.phase
        where = f"the trainer is back at the state before step {p.step}"
        undone = self._cycle.undo_search(self._model) if first_correct else None
        run = self._cycle.run
        if undone is not None:
            where += " (CORRECT's line search undone" + (")" if undone else
                                                         ", exact up to rounding: the model has no set_parameters)")
        elif first_correct and run is not None and run.best_fraction is not None:
            where += " after CORRECT's line search, which stays (a retry does not search again)"
        if later:
            where += f"; the {later} later step(s) were undone"
        if not self._weights_finite():
            raise DivergenceError(
                f"step {p.step} ({p.phase.phase.value}): {what}; {where}, but its weights themselves are not finite "
                "(an update or move before this step made them so), so skipping or retrying batches cannot help",
                "Load an earlier checkpoint (or re-initialise), then lower the learning rate or clip gradients.",
            )
        if limited:
            raise DivergenceError(
                f"step {p.step} ({p.phase.phase.value}): {what} after {self.skips} batches in a row were skipped "
                f"for non-finite values (HybridConfig.max_consecutive_skips={cfg.max_consecutive_skips}): giving "
                f"up; {where}",
                "Check the data for NaN/Inf and the model for overflow, or lower the learning rate; raise "
                "max_consecutive_skips if such long runs of bad batches are expected. The trainer can continue "
                "with another batch.",
            )
        if skip:  # the weights were not finite before CORRECT's line search was undone, and are now
            where += "; it was not skipped because the line search had left the weights non-finite"
        raise DivergenceError(
            f"step {p.step} ({p.phase.phase.value}): {what}; {where}",
            "Lower the learning rate or clip gradients; HybridConfig(on_nonfinite='skip') skips such "
            "batches instead. The trainer can continue with another batch.",
        )

    def _weights_finite(self) -> bool:
        """Whether every parameter is finite (one host read; only on the way to skipping or raising)."""
        xp = self._xp
        flags = [xp.reshape(xp.astype(xp.all(xp.isfinite(p)), p.dtype), (1,)) for p in self._model.parameters()]
        return all(v == 1.0 for v in self._ledger.read_arrays(flags))

    def state_dict(self) -> dict[str, Any]:
        """The eager path's last update (None on the lagged paths) and the skips in a row."""
        return {"last_update": None if self._last_update is None else list(self._last_update),
                "consecutive_skips": self.skips}

    def check_state_dict(self, state: dict[str, Any]) -> tuple[list[Any] | None, int]:
        """(last update, skips in a row) as `load_state_dict` would keep them; `ValueError` unless the update
        is None or finite arrays lining up with the parameters and the skips a count (a state saved before
        ``consecutive_skips`` existed counts none)."""
        fields(state, ("last_update",), ("consecutive_skips",), what="real-steps state")
        update = optional(arrays_like, state["last_update"], "last_update", self._model.parameters())
        return update, integer(state.get("consecutive_skips", 0), "consecutive_skips")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (`ValueError` naming the field, and no change, if malformed)."""
        self._last_update, self.skips = self.check_state_dict(state)


_NO_HOOK: Mapping[str, Any] = MappingProxyType({})


class _BadStart(Exception):
    """The first step replayed from the verified point was non-finite: go back to the point before it."""


class _LowerRate(Exception):
    """A replayed step was non-finite and the learning rate was lowered: start the replay again."""


def _split(values: list[float], first: int, second: int) -> tuple[list[float], list[float], list[float]]:
    """``values`` cut into its first ``first`` entries, the next ``second`` and the rest."""
    return values[:first], values[first:first + second], values[first + second:]


def _finite(values: list[float]) -> bool:
    if not all(math.isfinite(v) for v in values):
        return False
    return len(values) < 6 or values[5] == 0
