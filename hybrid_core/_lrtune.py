"""`LRTuner`: the learning-rate recommendation, a Prodigy-style step-size estimate seeded with the user's rate.

For an Adam-family optimizer (``Optimizer.adaptive is True``) the tuner estimates, during the
first ``lr_search_steps`` real steps (or until five scheduled reads in a row bring no rise of the
estimate), how
far the weights have to travel compared with the gradients seen, as Prodigy does (Mishchenko &
Defazio 2023), with d₀ = the user's learning rate and Adam's bias correction: with x₀ the weights
at the start, g_k the gradient at x_k, d the rate
in force, bc_k = √(1−β₂ᵏ⁺¹)/(1−β₁ᵏ⁺¹) and β₃ = √β₂,

    r ← β₃·r + (d/d₀)·d·bc_k·⟨g_k, x₀ − x_k⟩,    s ← β₃·s + (d/d₀)·d·bc_k·g_k,    d̂ = r / ‖s‖₁.

r, s and the running maximum of d̂ live on the device and are updated every real step of the search
(the step then takes the unfused path, which hands the gradients over). Every ``read_every`` steps
(by the step index, so extra reads change nothing) the maximum is read with the step's values and
the rate becomes max(d, max d̂) — never above the ceiling left by a back-off — set
through ``optimizer.lr`` (all groups scaled alike). The estimate can only raise the rate; the
way down is the divergence guard: a non-finite read (the trainer rolls back to the last
verified point and replays at the lower rate) or the monitor's FORCE_FULL while the multiplier is
above 1 halves the multiplier and remembers the rate that failed as a ceiling. After the search the
accumulators are freed and the multiplier stays, backed off if the run diverges later.

It is off (and says why in the summary) for optimizers that are not Adam-like, when a scheduler
drives the rate (it would overwrite the multiplier), and with ``HybridConfig.lr_recommend=False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat

from ._config import HybridConfig
from ._inplace import abs_sum, copy_into, dot, scale_add_
from ._protocols import Array, Optimizer
from ._statecheck import all_finite, fields, flag, integer, optional, real, sequence, text

__all__ = ["LRTuner"]

_BETA1, _BETA2 = 0.9, 0.999
"""Adam's default moments, used for the estimate's bias correction and its decay β₃ = √β₂."""

_TINY = 1e-30
"""Added to ‖s‖₁: with all gradients zero so far, r is 0 too and d̂ is 0, not 0/0."""

_MIN_CHANGE = 1.01
"""The rate is set only when the estimate moved it by more than 1% (each set is a Python call)."""

_PATIENCE = 5
"""The search also ends after this many scheduled reads in a row in which the estimate's maximum did not rise
by more than 1%: it has settled, and the steps of the search cost a little more than the others. A rise
counts whether or not the estimate has reached the rate in force yet (from pretrained weights it starts
far below it and climbs for tens of steps)."""


class LRTuner:
    """The learning-rate multiplier of one trainer (see the module docstring)."""

    def __init__(self, config: HybridConfig, optimizer: Optimizer) -> None:
        self._optimizer = optimizer
        self._search_steps = config.lr_search_steps
        self._every = config.read_every
        self._off = _why_off(config, optimizer)
        self.reason = self._off
        self.enabled = self.reason is None
        self.base_lr = float(optimizer.lr) if self.enabled else math.nan
        self.multiplier = 1.0
        self.ceiling = math.inf
        self.history: list[list[Any]] = []
        """``[step, multiplier, why]`` for every change."""
        self.backoffs = 0
        self._d_max = 0.0
        self._k = 0
        self._x0: list[Array] | None = None
        self._s: list[Array] | None = None
        self._r: Array | None = None
        self._d_hat_max: Array | None = None
        self._flat = 0
        """Scheduled reads in a row without a rise (see `_PATIENCE`)."""
        self._searching = self.enabled

    @property
    def lr(self) -> float:
        """The rate in force (the user's rate times the multiplier)."""
        return self.base_lr * self.multiplier

    def searching(self, step: int) -> bool:
        """Whether real step ``step`` feeds the estimate (and so needs its gradients)."""
        return self._searching and step < self._search_steps

    def accumulate(self, params: Sequence[Array], grads: Sequence[Array], xp: Any) -> None:
        """Fold one real step's gradients at ``params`` (the weights before its update) into r and s."""
        if self._x0 is None:
            self._x0 = copy_into(None, params)
            self._s = [xp.zeros_like(p) for p in params]
        assert self._s is not None
        d, k = self.lr, self._k
        weight = self.multiplier * d * math.sqrt(1 - _BETA2 ** (k + 1)) / (1 - _BETA1 ** (k + 1))
        beta3 = math.sqrt(_BETA2)
        moved = dot(xp, grads, self._x0) - dot(xp, grads, params)  # ⟨g, x₀ − x⟩ without a temporary
        self._r = weight * moved if self._r is None else beta3 * self._r + weight * moved
        self._s = scale_add_(self._s, beta3, grads, weight)
        # d̂ of this step, and its running maximum, stay on the device until the next read (as in
        # Prodigy, every step's d̂ counts, not only those of the steps that are read).
        d_hat = self._r / (abs_sum(xp, self._s) + _TINY)
        self._d_hat_max = d_hat if self._d_hat_max is None else xp.maximum(self._d_hat_max, d_hat)
        self._k = k + 1

    def due(self, step: int) -> bool:
        """Whether the read after real step ``step`` updates the rate: every ``read_every`` steps, by the step
        index alone, so extra reads (a flush, a save) change nothing."""
        return self._searching and (step + 1) % self._every == 0

    def pending(self, xp: Any) -> list[Array]:
        """The device values a read needs for the estimate: [max d̂ since the last read] (or nothing)."""
        if self._d_hat_max is None:
            return []
        return [xp.reshape(self._d_hat_max, (1,))]

    def update(self, step: int, values: list[float]) -> None:
        """At a read after real step ``step``: raise the rate to the estimate (``values`` = [max d̂])."""
        if self._taken_over(step):
            return
        self._d_hat_max = None
        self._flat += 1
        if values and math.isfinite(values[0]):
            if values[0] > self._d_max * _MIN_CHANGE:  # the estimate still rises (below the rate in force or not)
                self._flat = 0
            self._d_max = max(self._d_max, values[0])
            wanted = min(max(self.multiplier, self._d_max / self.base_lr), self.ceiling)
            if wanted > self.multiplier * _MIN_CHANGE:
                self._set(step, wanted, "estimate")
        if (step + 1 >= self._search_steps or self._flat >= _PATIENCE) and self._searching:
            self._searching = False
            self._x0 = self._s = self._r = None
            self.history.append([step + 1, self.multiplier, "search ended"])

    def reapply(self) -> None:
        """Set the optimizer's rate to the tuner's again (a rollback loaded an optimizer state holding an older one)."""
        if self.enabled:
            self._optimizer.lr = self.lr

    def reset_estimate(self) -> None:
        """A rollback undid steps the estimate saw: start r and s again from the weights reached."""
        self._x0 = self._s = self._r = self._d_hat_max = None
        self._k = 0

    def back_off(self, step: int, why: str) -> bool:
        """The run diverged at multiplier > 1: halve it and never go back up to the rate that failed.

        Returns whether the rate was lowered (False at the user's own rate: nothing to back off).
        """
        if not self.enabled or self.multiplier <= 1.0 or self._taken_over(step):
            return False
        failed = self.multiplier
        self.ceiling = min(self.ceiling, max(1.0, failed / 2))
        self.backoffs += 1
        self._set(step, max(1.0, failed / 2), f"back-off: {why}")
        return True

    def _taken_over(self, step: int) -> bool:
        """Whether something else (a callback, the user) set the rate since the tuner did: it then stops."""
        if not self.enabled:
            return True
        now = float(self._optimizer.lr)
        if math.isclose(now, self.lr, rel_tol=1e-9):
            return False
        self.enabled, self._searching = False, False
        self.reason = f"the learning rate was set from outside ({now:g}, the tuner had {self.lr:g})"
        self._x0 = self._s = self._r = self._d_hat_max = None
        self.history.append([step + 1, self.multiplier, "stopped: " + self.reason])
        return True

    def _set(self, step: int, multiplier: float, why: str) -> None:
        self.multiplier = multiplier
        self._optimizer.lr = self.base_lr * multiplier
        self.history.append([step + 1, multiplier, why])

    def summary(self) -> dict[str, Any]:
        """The multiplier, the user's rate and the history (for the metrics summary)."""
        return {"recommend": self.enabled, "off_because": self.reason, "base": self.base_lr,
                "multiplier": self.multiplier, "lr": self.lr if self.enabled else None,
                "ceiling": None if math.isinf(self.ceiling) else self.ceiling, "backoffs": self.backoffs,
                "searching": self._searching, "history": [list(h) for h in self.history]}

    def state_dict(self) -> dict[str, Any]:
        """Multiplier, ceiling, history and the estimate's accumulators."""
        return {"enabled": self.enabled, "reason": self.reason, "base_lr": self.base_lr, "multiplier": self.multiplier,
                "ceiling": self.ceiling, "history": [list(h) for h in self.history], "backoffs": self.backoffs,
                "d_max": self._d_max, "k": self._k, "searching": self._searching, "flat": self._flat,
                "x0": self._x0, "s": self._s, "r": self._r, "d_hat_max": self._d_hat_max}

    def check_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """The attributes `load_state_dict` would set; `ValueError` naming the field if malformed. That the
        accumulators ``x0`` and ``s`` fit the model is checked by the trainer."""
        fields(state, ("enabled", "reason", "base_lr", "multiplier", "ceiling", "history", "backoffs", "d_max", "k",
                       "searching", "x0", "s", "r"), ("flat", "d_hat_max"), what="learning-rate state")
        enabled = flag(state["enabled"], "enabled")
        multiplier = real(state["multiplier"], "multiplier", finite=enabled)
        ceiling = real(state["ceiling"], "ceiling", finite=False)
        base = real(state["base_lr"], "base_lr", finite=enabled)
        if enabled and not (1.0 <= multiplier <= ceiling and math.isfinite(base) and base > 0):
            raise ValueError(f"multiplier={multiplier!r}, ceiling={ceiling!r}, base_lr={base!r}: the rate is only "
                             "ever raised (1 <= multiplier <= ceiling) from a finite base rate > 0")
        history = []
        for i, item in enumerate(sequence(state["history"], "history")):
            step, value, why = sequence(item, f"history[{i}]", 3, 3)
            history.append([integer(step, f"history[{i}].step"), real(value, f"history[{i}].multiplier", finite=False),
                            text(why, f"history[{i}].why")])
        # Off here (config, optimizer) stays off whatever the file says; off in the file stays off.
        mine = self._off is None
        return {"enabled": enabled if mine else self.enabled,
                "reason": optional(text, state["reason"], "reason") if mine else self.reason,
                "base_lr": base, "multiplier": multiplier, "ceiling": ceiling, "history": history,
                "backoffs": integer(state["backoffs"], "backoffs"),
                "_d_max": real(state["d_max"], "d_max", finite=False),
                "_k": integer(state["k"], "k"),
                "_searching": flag(state["searching"], "searching") and enabled and mine,
                "_flat": integer(state.get("flat", 0), "flat"),
                "_x0": optional(sequence, state["x0"], "x0"), "_s": optional(sequence, state["s"], "s"),
                "_r": optional(_scalar, state["r"], "r"), "_d_hat_max": optional(_scalar, state.get("d_hat_max"),
                                                                                 "d_hat_max")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned and set the optimizer's rate to match (`ValueError` naming the
        field, and no change, if malformed)."""
        for name, value in self.check_state_dict(state).items():
            setattr(self, name, value)
        if self.enabled:
            self._optimizer.lr = self.lr


def _scalar(value: Any, name: str) -> Array | float:
    """``value`` if it is a finite number, or a finite array of one element (an accumulator kept on the device)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return real(value, name)
    try:
        size = array_api_compat.size(value)
    except (TypeError, AttributeError) as exc:
        raise ValueError(f"{name} is a {type(value).__name__}, not an array") from exc
    if size != 1 or not all_finite([value]):
        raise ValueError(f"{name} must be one finite number (an array of shape {tuple(value.shape)} was saved)")
    return value


def _why_off(config: HybridConfig, optimizer: Optimizer) -> str | None:
    if not config.lr_recommend:
        return "HybridConfig.lr_recommend=False"
    if getattr(optimizer, "adaptive", False) is not True:
        return "the optimizer is not Adam-like (Optimizer.adaptive is not True)"
    if getattr(optimizer, "scheduler", None) is not None:
        return "a scheduler drives the learning rate"
    if getattr(optimizer, "lr_on_device", False) is True:
        return "the learning rate lives on the device (a schedule)"
    return None
