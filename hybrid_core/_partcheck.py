"""What the trainer's saved parts must agree on, checked before a checkpoint changes anything.

Each part checks its own state (`check_state_dict`); these are the facts that span parts or need
the model: arrays kept outside the model (the cycle's direction, linefit snapshots, the
learning-rate search's accumulators) must line up with its parameters and be finite, a PREDICT
phase needs a cycle whose forecast covers the rest of the phase, contexts have the bandit's
dimension, an arm in flight is one of the bandit's, and no snapshot is of a step the run has not
taken yet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._config import HybridConfig
from ._errors import CheckpointError
from ._protocols import Array
from ._statecheck import arrays_like

__all__ = ["check_parts_fit"]


def check_parts_fit(states: Mapping[str, Any], params: Sequence[Array], config: HybridConfig, context_dim: int
                    ) -> None:
    """`CheckpointError` naming the parts unless the (each already checked) ``states`` fit together and the model."""
    try:
        _arrays(states, params)
    except ValueError as exc:
        raise CheckpointError(f"an array kept beside the model does not fit it: {exc}",
                              "Load a checkpoint saved from this model (same architecture and dtype).") from exc
    run, chosen = states["cycle"]["run"], states["cycle"]["chosen"]
    phase = states["phase"]
    if phase["phase"] == "predict":
        horizon = min(max(phase["horizon"], 1), config.max_predict_steps)
        needed = max(horizon, phase["steps_in_phase"] + 1)
        if run is None or len(run["prediction"][0]) < needed:
            have = "no cycle" if run is None else f"a forecast of {len(run['prediction'][0])} steps"
            raise CheckpointError(f"part 'cycle' does not fit part 'phase': a PREDICT phase at step "
                                  f"{phase['steps_in_phase']} of {horizon} needs a forecast of {needed} steps, the "
                                  f"cycle holds {have}")
    contexts = [] if run is None else [("run.context", run["context"]), ("run.correct_context",
                                                                          run["correct_context"])]
    contexts += [] if chosen is None else [("chosen.context", chosen[1])]
    for name, context in contexts:
        if context is not None and len(context) != context_dim:
            raise CheckpointError(f"part 'cycle' does not fit part 'bandit': {name} has {len(context)} entries, "
                                  f"the bandit's context {context_dim}")
    done = states["state"]["step"]
    readout = states.get("readout")
    seen = [("directions", "snapshots", s) for s, _ in states["directions"].get("snapshots") or []]
    if readout is not None:
        seen += [("readout", "ema_step", readout["ema_step"])]
        seen += [("readout", "snapshots", s) for s, _ in readout["snapshots"]]
    for part, name, step in seen:
        if step > done:
            raise CheckpointError(f"part {part!r} does not fit part 'state': {name} holds step {step}, after the "
                                  f"{done} steps the run has taken")
    arms = states["bandit"]["arms"]
    for name, arm in (("run.arm", None if run is None else run["arm"]), ("chosen.arm", chosen and chosen[0])):
        if arm is not None and arm not in arms:
            raise CheckpointError(f"part 'cycle' does not fit part 'bandit': {name}={arm} is not one of the "
                                  f"bandit's arms {arms}")


def _arrays(states: Mapping[str, Any], params: Sequence[Array]) -> None:
    run = states["cycle"]["run"]
    if run is not None:
        arrays_like(run["direction"], "cycle: run.direction", params)
    for i, (_, snapshot) in enumerate(states["directions"].get("snapshots") or []):
        arrays_like(snapshot, f"directions: snapshots[{i}]", params)
    lr = states.get("lr")
    for name in ("x0", "s"):
        if lr is not None and lr[name] is not None:
            arrays_like(lr[name], f"lr: {name}", params)
