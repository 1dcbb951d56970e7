"""`LayerFreeze`: layer-wise training as a strategy — AutoFreeze on the read schedule, with a guard.

A model that offers `Model.parameter_groups` (groups of parameter indices in forward order, input side
first) and `Model.set_trainable` (a frozen group's gradient is not computed at all), driven by an
optimizer that leaves frozen parameters still (``Optimizer.skips_frozen``), can stop training its
front groups once they have settled (AutoFreeze, Liu et al. 2021):

- **The criterion.** Every ``freeze_every`` steps (an *interval*, by the global step index) the mean
  per-group L1 gradient norm over the interval's measured steps is compared with the previous
  interval's. With r_g = |N_g − N_g'| / N_g' the relative change of each still-trainable group g, the
  groups are frozen front to back up to the first one whose r_g is at or above the median of the
  trainable groups' changes; the last group (the head) never is (`autofreeze_decision`). The norms are
  measured only on the steps that are read anyway (every ``read_every``; the step then takes the unfused
  path, which hands its gradients over) and ride along in that read: no host read is added.
- **The guard.** A freeze is on probation until the next interval boundary. It is undone (the groups
  frozen last are trained again) and the strategy dropped for the rest of the run when, during
  probation, the divergence monitor asks for real steps, or when the loss over the probation falls
  clearly slower than the trend before the freeze predicts (`stall_z`: a least-squares line through
  the log-loss of the last ``freeze_every`` real steps before the freeze against the log of the step —
  a power law, the usual shape of a loss curve: a line against the step itself would read the curve's
  natural flattening as a stall wherever the losses are not noisy; "clearly" = the mean log-loss over
  the probation lies more than `STALL_Z` standard errors of that line's prediction above it, the
  standard error coming from the fit's own residuals, so the bound scales with the run's noise and
  needs no tuned tolerance).
- **Frozen groups are held still**: no gradient, no optimizer update, and a predicted step (PREDICT)
  moves them by zero (`hold`). The read-out and the learning-rate recommendation see parameters that
  simply do not change.

Decisions are taken only at reads after a step ``s`` with ``(s + 1) % read_every == 0`` (the regular
reads, by the step index alone), so a run freezes at the same steps whether or not it was saved,
resumed or flushed in between. The part's state is Python floats and ints: the norms of the current
interval, the previous interval's means, the recent losses, the frozen prefix with the step each group
froze, the probation in force and the drops.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import array_api_compat

from ._checks import has_method
from ._config import HybridConfig
from ._errors import ModelError
from ._inplace import abs_sums
from ._protocols import Array, Model, Optimizer
from ._statecheck import fields, integer, optional, real, sequence, text

__all__ = ["STALL_Z", "LayerFreeze", "autofreeze_decision", "stall_z"]

STALL_Z = 2.0
"""Standard errors above the pre-freeze trend's prediction at which the probation's mean log-loss counts as
a stall (one-sided, about a 2% false alarm under the fitted line's own noise)."""


def autofreeze_decision(previous: Sequence[float], current: Sequence[float], frozen: int) -> int:
    """How many leading groups to freeze: ``frozen`` plus those, front to back, whose relative change of
    gradient norm from ``previous`` to ``current`` is below the median change of the trainable groups
    (``frozen`` … last); never the last group. Non-finite norms freeze nothing."""
    groups = len(current)
    if len(previous) != groups:
        raise ValueError(f"{len(previous)} previous norms for {groups} groups")
    if frozen >= groups - 1:
        return frozen
    live = list(range(frozen, groups))
    if not all(math.isfinite(previous[g]) and math.isfinite(current[g]) for g in live):
        return frozen
    changes = [_relative_change(previous[g], current[g]) for g in live]
    median = statistics.median(changes)
    n = frozen
    while n < groups - 1 and changes[n - frozen] < median:
        n += 1
    return n


def _relative_change(before: float, after: float) -> float:
    if before > 0:
        return abs(after - before) / before
    return 0.0 if after == before else math.inf


def stall_z(before: Sequence[Sequence[float]], after: Sequence[Sequence[float]]) -> float | None:
    """How many standard errors the mean log-loss of ``after`` lies above what the least-squares line
    through ``before`` predicts for it (each a list of ``(step, loss)``; the line is log-loss against
    log(step + 1)). The standard error is that of the line's mean prediction plus that of a mean of
    ``after``'s size, both from the residual variance of the fit. None with fewer than 3 points before
    or none after."""
    pts = [(math.log(s + 1.0), math.log(max(v, 1e-30))) for s, v in before if math.isfinite(v)]
    post = [(math.log(s + 1.0), math.log(max(v, 1e-30))) for s, v in after if math.isfinite(v)]
    n, m = len(pts), len(post)
    if n < 3 or m < 1:
        return None
    x_mean = sum(x for x, _ in pts) / n
    y_mean = sum(y for _, y in pts) / n
    sxx = sum((x - x_mean) ** 2 for x, _ in pts)
    if sxx <= 0:
        return None
    slope = sum((x - x_mean) * (y - y_mean) for x, y in pts) / sxx
    resid = sum((y - y_mean - slope * (x - x_mean)) ** 2 for x, y in pts) / (n - 2)
    x_post = sum(x for x, _ in post) / m
    y_post = sum(y for _, y in post) / m
    predicted = y_mean + slope * (x_post - x_mean)
    # The variance of the line's mean prediction at x_post plus that of the observed mean of m points.
    se = math.sqrt(max(resid, 0.0) * (1.0 / n + (x_post - x_mean) ** 2 / sxx + 1.0 / m))
    diff = y_post - predicted
    if se == 0.0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / se


class LayerFreeze:
    """The layer-freezing strategy of one trainer (see the module docstring)."""

    def __init__(self, config: HybridConfig, model: Model, optimizer: Optimizer) -> None:
        self.strategy = config.layer_freeze
        self._every = config.freeze_every
        self._read_every = config.read_every
        self._model = model
        self.groups: list[list[int]] = []
        self.reason: str | None = None
        """Why the strategy cannot run on this model and optimizer (None when it can, or is off)."""
        if self.strategy != "off":
            self.reason = _why_unavailable(model, optimizer)
            if self.reason is None:
                self.groups = _checked_groups(model)
                if len(self.groups) < 2:
                    self.reason = "the model has a single parameter group (the last group is never frozen)"
        self.enabled = self.strategy != "off" and self.reason is None
        self._reset()

    def _reset(self) -> None:
        self.frozen = 0
        """How many leading groups are frozen."""
        self.froze_at: list[int] = []
        """For each frozen group, the first step it did not train."""
        self.drops: list[list[Any]] = []
        """``[step, reason]`` of the drop of the strategy (at most one)."""
        self._boundary = self._every
        self._norms: dict[int, list[float]] = {}
        self._previous: list[float] | None = None
        self._losses: dict[int, float] = {}
        self._probation: dict[str, Any] | None = None
        self._alarm: str | None = None
        self._staged: list[tuple[int, int, Array]] = []

    # -- what the real steps ask -----------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether the strategy still watches the gradient norms (enabled, not dropped, a group left to freeze)."""
        return self.enabled and not self.drops and (self.frozen < len(self.groups) - 1 or self._probation is not None)

    @property
    def state(self) -> str:
        """``off``, ``unavailable: …``, ``watching``, ``probation``, ``all frozen`` or ``dropped``."""
        if self.strategy == "off":
            return "off"
        if self.reason is not None:
            return f"unavailable: {self.reason}"
        if self.drops:
            return "dropped"
        if self._probation is not None:
            return "probation"
        return "watching" if self.frozen < len(self.groups) - 1 else "all frozen"

    def wants(self, step: int, measured: bool) -> bool:
        """Whether real step ``step`` should hand its gradients over (`stage`): measured steps while active."""
        return measured and self.active and self.frozen < len(self.groups) - 1

    def stage(self, step: int, grads: Sequence[Array], xp: Any) -> None:
        """Keep the L1 norms of the trainable groups' gradients of step ``step`` on the device until the next read."""
        idx = [i for group in self.groups[self.frozen:] for i in group]
        self._staged.append((step, self.frozen, abs_sums(xp, [grads[i] for i in idx])))

    def pending(self) -> list[Array]:
        """The device vectors a read should carry for this part (one per staged step)."""
        return [v for _, _, v in self._staged]

    @property
    def pending_size(self) -> int:
        """How many floats `pending` holds."""
        return sum(sum(len(g) for g in self.groups[frozen:]) for _, frozen, _ in self._staged)

    def discard(self) -> None:
        """A rollback: forget the staged norms (their steps will be replayed)."""
        self._staged = []

    def hold(self, direction: list[Array]) -> list[Array]:
        """``direction`` with the frozen groups' entries zero (a predicted step does not move them)."""
        if not self.frozen:
            return direction
        still = {i for group in self.groups[:self.frozen] for i in group}
        out = list(direction)
        for i in still:
            out[i] = array_api_compat.array_namespace(out[i]).zeros_like(out[i])
        return out

    # -- reads -----------------------------------------------------------------------------------

    def after_read(self, last: int, records: Sequence[Sequence[Any]], values: Sequence[float], diverging: bool,
                   decide: bool = True) -> str | None:
        """Take in a read: ``records`` ``(step, loss, …)`` of the real steps read, ``values`` the floats of
        `pending`, ``diverging`` the monitor's unconsumed signal; at a regular read (``last`` + 1 a multiple
        of ``read_every``) with ``decide``, judge the probation and the criterion.

        Returns ``"freezes"`` or ``"unfreezes"`` when the trainable groups changed, else None.
        """
        self._take(values)
        if not self.enabled or self.drops:
            return None  # nothing to judge: keep no history (it would grow with the run)
        for record in records:
            self._losses[int(record[0])] = float(record[1])
        probation = self._probation
        if probation is not None and diverging and any(int(r[0]) >= probation["start"] for r in records):
            self._alarm = "the divergence monitor asked for real steps"
        if not decide or (last + 1) % self._read_every:
            return None
        if probation is not None and self._alarm is not None:
            return self._drop(last, self._alarm)
        if last + 1 < self._boundary:
            return None
        event = self._boundary_read(last)
        self._boundary = ((last + 1) // self._every + 1) * self._every
        horizon = self._boundary - 2 * self._every
        self._norms = {s: v for s, v in self._norms.items() if s >= self._boundary - self._every}
        self._losses = {s: v for s, v in self._losses.items() if s >= horizon}
        return event

    def _take(self, values: Sequence[float]) -> None:
        at = 0
        for step, frozen, _ in self._staged:
            norms = [math.nan] * len(self.groups)
            for g in range(frozen, len(self.groups)):
                size = len(self.groups[g])
                norms[g] = math.fsum(values[at:at + size])
                at += size
            self._norms[step] = norms
        self._staged = []

    def _boundary_read(self, last: int) -> str | None:
        start = self._boundary - self._every
        probation = self._probation
        if probation is not None and last + 1 >= probation["until"]:
            after = [(s, v) for s, v in sorted(self._losses.items()) if probation["start"] <= s < probation["until"]]
            z = stall_z(probation["before"], after)
            probation["z"] = z
            if z is not None and z > STALL_Z:
                return self._drop(last, f"the loss stalled after the freeze: its mean over steps "
                                        f"{probation['start']}–{probation['until'] - 1} lies {z:.1f} standard errors "
                                        "above the pre-freeze trend")
            self._probation = None
        rows = [v for s, v in self._norms.items() if start <= s < self._boundary]
        current = None
        if rows:
            current = [math.fsum(r[g] for r in rows) / len(rows) for g in range(len(self.groups))]
        previous, self._previous = self._previous, current
        if current is None or previous is None or self._probation is not None or not self.active:
            return None
        frozen = autofreeze_decision(previous, current, self.frozen)
        if frozen == self.frozen:
            return None
        before = [[s, v] for s, v in sorted(self._losses.items()) if last + 1 - self._every <= s <= last]
        until = ((last + 1) // self._every + 1) * self._every  # the next boundary: judged at its read
        self._probation = {"start": last + 1, "until": until, "from": self.frozen,
                           "to": frozen, "before": before, "z": None}
        self.froze_at += [last + 1] * (frozen - self.frozen)
        self._set(frozen)
        return "freezes"

    def _drop(self, last: int, why: str) -> str:
        probation = self._probation
        assert probation is not None
        self.drops.append([last + 1, f"{why}; groups {probation['from']}–{probation['to'] - 1} trained again"])
        del self.froze_at[probation["from"]:]
        self._probation, self._alarm = None, None
        self._set(probation["from"])
        return "unfreezes"

    def _set(self, frozen: int) -> None:
        self.frozen = frozen
        self._model.set_trainable([g >= frozen for g in range(len(self.groups))])

    # -- reporting and state ---------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Strategy, state, the frozen groups with the step each froze, the probation and the drops."""
        probation = self._probation
        return {"strategy": self.strategy, "state": self.state, "groups": len(self.groups),
                "every": self._every,
                "frozen": [{"group": g, "step": s} for g, s in enumerate(self.froze_at)],
                "probation": None if probation is None else {
                    "since": probation["start"], "until": probation["until"],
                    "groups": list(range(probation["from"], probation["to"]))},
                "drops": [{"step": s, "reason": r} for s, r in self.drops]}

    def state_dict(self) -> dict[str, Any]:
        """The frozen prefix, the steps each group froze, the interval's norms, the recent losses, the probation."""
        return {"groups": [list(g) for g in self.groups], "frozen": self.frozen, "froze_at": list(self.froze_at),
                "drops": [list(d) for d in self.drops], "boundary": self._boundary,
                "norms": [[s, _nan_to_none(v)] for s, v in sorted(self._norms.items())],
                "previous": None if self._previous is None else _nan_to_none(self._previous),
                "losses": [[s, v] for s, v in sorted(self._losses.items())],
                "probation": None if self._probation is None else dict(self._probation), "alarm": self._alarm}

    def check_state_dict(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """The attributes `load_state_dict` would set (None: start afresh); `ValueError` naming the field if
        malformed or, with the strategy on here, not fitting this model's groups."""
        fields(state, ("groups", "frozen", "froze_at", "drops", "boundary", "norms", "previous", "losses",
                       "probation", "alarm"), what="freeze state")
        groups = [[integer(i, f"groups[{g}]") for i in sequence(ids, f"groups[{g}]")]
                  for g, ids in enumerate(sequence(state["groups"], "groups"))]
        if not self.enabled or not groups:
            return None  # off or unavailable here, or off in the file: nothing frozen, whatever the file says
        if groups != self.groups:
            raise ValueError("the saved parameter groups differ from this model's")
        n = len(groups)
        frozen = integer(state["frozen"], "frozen", 0, n - 1)
        froze_at = [integer(s, f"froze_at[{i}]") for i, s in enumerate(sequence(state["froze_at"], "froze_at",
                                                                                   frozen, frozen))]
        norms = {}
        for i, item in enumerate(sequence(state["norms"], "norms")):
            step, values = sequence(item, f"norms[{i}]", 2, 2)
            norms[integer(step, f"norms[{i}].step")] = _norms(values, f"norms[{i}]", n)
        probation = state["probation"]
        if probation is not None:
            fields(probation, ("start", "until", "from", "to", "before", "z"), what="probation")
            saved_before = sequence(probation["before"], "probation.before")
            before = [sequence(p, f"probation.before[{i}]", 2, 2) for i, p in enumerate(saved_before)]
            probation = {"start": integer(probation["start"], "probation.start"),
                         "until": integer(probation["until"], "probation.until"),
                         "from": integer(probation["from"], "probation.from", 0, frozen),
                         "to": integer(probation["to"], "probation.to", 0, frozen),
                         "before": [[integer(s, "probation.before.step"),
                                     real(v, "probation.before.loss", finite=False)] for s, v in before],
                         "z": optional(real, probation["z"], "probation.z", finite=False)}
            if probation["from"] >= probation["to"]:
                raise ValueError("probation.from must be below probation.to")
        drops = [sequence(d, f"drops[{i}]", 2, 2) for i, d in enumerate(sequence(state["drops"], "drops"))]
        losses = [sequence(v, f"losses[{i}]", 2, 2) for i, v in enumerate(sequence(state["losses"], "losses"))]
        return {"frozen": frozen, "froze_at": froze_at, "_boundary": integer(state["boundary"], "boundary"),
                "drops": [[integer(s, "drops.step"), text(r, "drops.reason")] for s, r in drops],
                "_norms": norms, "_previous": optional(_norms, state["previous"], "previous", n),
                "_losses": {integer(s, "losses.step"): real(v, "losses.loss", finite=False) for s, v in losses},
                "_probation": probation, "_alarm": optional(text, state["alarm"], "alarm")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned and set the model's trainable groups to match (`ValueError`
        naming the field, and no change, if it does not fit this model)."""
        parsed = self.check_state_dict(state)
        if not self.enabled:
            return
        self._reset()
        for name, value in (parsed or {}).items():
            setattr(self, name, value)
        self._set(self.frozen)


def _norms(values: Any, name: str, groups: int) -> list[float]:
    """One norm per group as kept (a frozen group's None as NaN)."""
    return [math.nan if v is None else real(v, f"{name}[{g}]") for g, v in enumerate(sequence(values, name,
                                                                                              groups, groups))]


def _nan_to_none(values: Sequence[float]) -> list[float | None]:
    """Norms as saved: a group that was frozen (NaN) as None, so equal states compare equal."""
    return [None if math.isnan(v) else v for v in values]


def _why_unavailable(model: Model, optimizer: Optimizer) -> str | None:
    for name in ("parameter_groups", "set_trainable"):
        if not has_method(model, name):
            return f"the model has no {name}"
    if getattr(optimizer, "skips_frozen", False) is not True:
        return "the optimizer does not say it leaves frozen parameters still (Optimizer.skips_frozen)"
    return None


def _checked_groups(model: Model) -> list[list[int]]:
    """The model's parameter groups, checked to split ``range(len(parameters()))`` with no group empty."""
    count = len(model.parameters())
    groups = [[int(i) for i in g] for g in model.parameter_groups()]  # type: ignore[attr-defined]
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(count)) or any(not g for g in groups):
        raise ModelError(f"parameter_groups() must split the {count} parameter indices into non-empty groups, "
                         "each index in exactly one", "Return lists of indices into parameters(), input side first.")
    return groups
