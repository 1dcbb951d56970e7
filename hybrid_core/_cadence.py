"""`Cadence`: which real steps are measured and read, and when the trainer goes idle.

Reads and measurements follow the global step index alone (every ``read_every``-th step,
and the steps where a decision needs fresh values), so a run reads the same statistics
whether or not it was checkpointed, resumed or flushed in between. Idle spells are
counted in steps too, so a resumed run idles exactly as the uninterrupted one.
"""

from __future__ import annotations

from typing import Any

from ._config import HybridConfig
from ._phase import Phase, PhaseState
from ._statecheck import fields, flag, integer

__all__ = ["Cadence"]


class Cadence:
    """Read schedule and idle state (see the module docstring)."""

    def __init__(self, config: HybridConfig) -> None:
        self._config = config
        self.idle_until = 0
        """Global step at which the current idle spell ends (not idle at or after it)."""
        self.fed_since = 0
        """Global step from which the dynamics model has been fed without a gap."""
        self.unconfident = 0
        """FULL-phase decisions in a row whose confidence was below half the threshold."""
        self.idle_spells = 0
        self.asked = True
        """Whether a decision was taken since the last idle spell ended (the first one asks the bandit
        again even if it had given up: that is what re-opening the question means)."""

    def idle(self, step: int) -> bool:
        """Whether step ``step`` runs idle (loss only: no statistics, features or dynamics model)."""
        return step < self.idle_until

    def decision_due(self, phase: PhaseState, step: int) -> bool:
        """Whether the step about to run in ``phase`` ends with a decision that needs fresh values."""
        cfg = self._config
        done = phase.steps_in_phase + 1
        if phase.phase is Phase.FULL:
            if done >= cfg.max_full_steps:
                return True  # the probe PREDICT starts after this step
            return (not self.idle(step) and done >= cfg.min_full_steps
                    and (done - cfg.min_full_steps) % cfg.min_full_steps == 0)
        return phase.phase is Phase.CORRECT and done >= cfg.correct_steps  # the cycle is paid for

    def measured(self, phase: PhaseState, step: int) -> bool:
        """Whether step ``step`` measures its statistics and is read right after it."""
        return (step + 1) % self._config.read_every == 0 or self.decision_due(phase, step)

    def may_decide(self, step: int) -> bool:
        """Whether the dynamics model has been fed long enough since the last idle spell to be asked."""
        return step + 1 - self.fed_since >= self._config.min_full_steps or self.idle_spells == 0

    def after_decision(self, step: int, confidence: float, bandit_gave_up: bool) -> bool:
        """Count one FULL-phase decision; True when it starts an idle spell."""
        cfg = self._config
        if cfg.idle_after == 0:
            return False
        if confidence < 0.5 * cfg.confidence_threshold:
            self.unconfident += 1
        else:
            self.unconfident = 0
        gave_up, self.asked = bandit_gave_up and self.asked, True
        if not (gave_up or self.unconfident >= cfg.idle_after):
            return False
        self.start_idle(step + 1, cfg.idle_steps)
        return True

    def start_idle(self, step: int, steps: int) -> None:
        """Idle from global step ``step`` for ``steps`` steps (the benchmark's probe uses it directly)."""
        self.unconfident = 0
        self.asked = False
        self.idle_spells += 1
        self.idle_until = step + steps
        self.fed_since = self.idle_until

    def state_dict(self) -> dict[str, Any]:
        """The idle spell in force and the decision streak."""
        return {"idle_until": self.idle_until, "fed_since": self.fed_since, "unconfident": self.unconfident,
                "idle_spells": self.idle_spells, "asked": self.asked}

    def check_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """The values `load_state_dict` would set; `ValueError` naming the field if malformed."""
        keys = ("idle_until", "fed_since", "unconfident", "idle_spells")
        fields(state, (*keys, "asked"), what="cadence state")
        return {**{k: integer(state[k], k) for k in keys}, "asked": flag(state["asked"], "asked")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (`ValueError` on a malformed state)."""
        for k, v in self.check_state_dict(state).items():
            setattr(self, k, v)
