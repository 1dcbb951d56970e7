"""The phase machine WARMUP → FULL → PREDICT → CORRECT → FULL …, as a pure function.

`next_phase` takes the current `PhaseState`, the config and this step's `Signals`
and returns the next `PhaseState`. It reads nothing else, so the same inputs give
the same output, and every phase has a bound it cannot outlast:

- WARMUP lasts exactly ``warmup_steps`` and never comes back;
- FULL lasts at least ``min_full_steps`` and at most ``max_full_steps``; at that
  bound a short *probe* PREDICT (``probe_steps``, checked every step) is tried, so
  a trainer that cannot earn the right to predict still re-measures now and then
  instead of staying in FULL forever — the probe costs forward passes only;
- PREDICT lasts its horizon (≤ ``max_predict_steps``) unless a check fails or the
  monitor reports divergence;
- CORRECT lasts exactly ``correct_steps``.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

from ._config import HybridConfig
from ._statecheck import fields, flag, integer

__all__ = ["Phase", "PhaseMachine", "PhaseState", "Signals", "initial_phase_state", "next_phase", "phase_bound"]


class Phase(enum.Enum):
    """Where the trainer is in its cycle."""

    WARMUP = "warmup"
    FULL = "full"
    PREDICT = "predict"
    CORRECT = "correct"

    @property
    def backward(self) -> bool:
        """Whether steps of this phase run a backward pass."""
        return self is not Phase.PREDICT


class PhaseState(NamedTuple):
    """The phase, how many steps of it are done, and the PREDICT horizon in force."""

    phase: Phase
    steps_in_phase: int = 0
    horizon: int = 0
    probe: bool = False


class Signals(NamedTuple):
    """What the step just taken reported to the phase machine."""

    confidence: float = 0.0
    """The dynamics model's confidence in [0, 1] (NaN counts as 0)."""
    horizon: int = 0
    """The PREDICT horizon wanted if a PREDICT starts now (0 = do not predict)."""
    check_failed: bool = False
    """A forward-only check left the predicted band."""
    diverging: bool = False
    """The divergence monitor asks for real steps."""


def initial_phase_state() -> PhaseState:
    """Every run starts in WARMUP."""
    return PhaseState(Phase.WARMUP)


def phase_bound(state: PhaseState, config: HybridConfig) -> int:
    """The most steps ``state.phase`` may last under ``config``."""
    if state.phase is Phase.WARMUP:
        return config.warmup_steps
    if state.phase is Phase.FULL:
        return config.max_full_steps
    if state.phase is Phase.PREDICT:
        return config.max_predict_steps
    return config.correct_steps


def next_phase(state: PhaseState, config: HybridConfig, signals: Signals) -> PhaseState:
    """The state after one more step of ``state.phase``; pure and total."""
    done = state.steps_in_phase + 1
    confidence = signals.confidence if math.isfinite(signals.confidence) else 0.0
    phase = state.phase

    if phase is Phase.WARMUP:
        return PhaseState(Phase.FULL) if done >= config.warmup_steps else state._replace(steps_in_phase=done)

    if phase is Phase.FULL:
        wanted = min(max(int(signals.horizon), 0), config.max_predict_steps)
        earned = (
            done >= config.min_full_steps
            and confidence >= config.confidence_threshold
            and wanted > 0
            and not signals.diverging
        )
        if earned:
            return PhaseState(Phase.PREDICT, 0, wanted, probe=False)
        if done >= config.max_full_steps:
            return PhaseState(Phase.PREDICT, 0, config.probe_steps, probe=True)
        return state._replace(steps_in_phase=done)

    if phase is Phase.PREDICT:
        horizon = min(max(state.horizon, 1), config.max_predict_steps)
        if signals.check_failed or signals.diverging or done >= horizon:
            return PhaseState(Phase.CORRECT)
        return state._replace(steps_in_phase=done, horizon=horizon)

    return PhaseState(Phase.FULL) if done >= config.correct_steps else state._replace(steps_in_phase=done)


class PhaseMachine:
    """The phase in force: the trainer's part that `next_phase` advances (its `state`)."""

    def __init__(self, config: HybridConfig) -> None:
        self._config = config
        self.state = initial_phase_state()

    def advance(self, signals: Signals) -> PhaseState:
        """Move on by one step with ``signals``; returns the new state."""
        self.state = next_phase(self.state, self._config, signals)
        return self.state

    def state_dict(self) -> dict[str, object]:
        """The phase (by name), steps done in it, the horizon in force and the probe flag."""
        ps = self.state
        return {"phase": ps.phase.value, "steps_in_phase": ps.steps_in_phase, "horizon": ps.horizon,
                "probe": ps.probe}

    def check_state_dict(self, state: dict[str, object]) -> PhaseState:
        """The `PhaseState` `load_state_dict` would set; `ValueError` naming the field if malformed."""
        fields(state, ("phase", "steps_in_phase", "horizon", "probe"), what="phase state")
        names = [p.value for p in Phase]
        if state["phase"] not in names:
            raise ValueError(f"phase={state['phase']!r}: must be one of {', '.join(names)}")
        return PhaseState(Phase(state["phase"]), integer(state["steps_in_phase"], "steps_in_phase"),
                          integer(state["horizon"], "horizon"), flag(state["probe"], "probe"))

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what `state_dict` returned (`ValueError` on a malformed state)."""
        self.state = self.check_state_dict(state)
