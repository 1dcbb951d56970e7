"""Where a predicted step points: the optimizer's own next update, or a line through snapshots."""

from __future__ import annotations

from typing import Any

from ._protocols import Array, Model, Optimizer
from ._statecheck import fields, integer, sequence

__all__ = ["ExtrapolateDirection", "LinefitDirection", "make_direction"]


class ExtrapolateDirection:
    """``Optimizer.extrapolate()``: the update the optimizer would take next; no extra memory."""

    name = "extrapolate"
    memory_copies = 0

    def observe(self, step: int, model: Model) -> None:
        """Nothing to remember."""

    def direction(self, model: Model, optimizer: Optimizer) -> list[Array]:
        """The optimizer's predicted next update."""
        return list(optimizer.extrapolate())

    def state_dict(self) -> dict[str, Any]:
        """No state."""
        return {}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """`ValueError` unless ``state`` is a dict (a linefit state, saved under another config, is ignored)."""
        if not isinstance(state, dict):
            raise ValueError(f"directions state is a {type(state).__name__}, not a dict")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """No state (``state`` is checked only)."""
        self.check_state_dict(state)


class LinefitDirection:
    """Per-parameter least-squares line through the last ``count`` snapshots, at least ``spacing`` steps apart.

    The direction is the fitted slope per step (θ units per step), the weight-nowcasting
    idea with a linear model. Memory: ``count`` copies of the parameters. Until two
    snapshots exist it falls back to the optimizer's extrapolation.
    """

    name = "linefit"

    def __init__(self, count: int = 5, spacing: int = 10) -> None:
        self.count = count
        self.spacing = spacing
        self.memory_copies = count
        self._snapshots: list[tuple[int, list[Array]]] = []

    def observe(self, step: int, model: Model) -> None:
        """Snapshot the parameters at ``step`` if ``spacing`` steps passed since the last snapshot.

        The trainer calls it at each read of its real steps (every ``read_every`` steps), so
        snapshots are at least ``spacing`` steps apart and labelled with their true step.
        """
        if self._snapshots and step - self._snapshots[-1][0] < self.spacing:
            return
        params = model.parameters()
        copy = [p * 1 for p in params]  # a fresh array in every namespace (torch, jax, numpy alike)
        self._snapshots.append((step, copy))
        del self._snapshots[:-self.count]

    def direction(self, model: Model, optimizer: Optimizer) -> list[Array]:
        """The least-squares slope per step through the snapshots."""
        if len(self._snapshots) < 2:
            return list(optimizer.extrapolate())
        steps = [s for s, _ in self._snapshots]
        mean_t = sum(steps) / len(steps)
        weights = [t - mean_t for t in steps]
        denom = sum(w * w for w in weights)
        out = []
        for i in range(len(self._snapshots[0][1])):
            acc = None
            for w, (_, snap) in zip(weights, self._snapshots):
                term = (w / denom) * snap[i]
                acc = term if acc is None else acc + term
            out.append(acc)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Snapshot steps and arrays."""
        return {"count": self.count, "spacing": self.spacing,
                "snapshots": [[s, list(arrs)] for s, arrs in self._snapshots]}

    def check_state_dict(self, state: dict[str, Any]) -> list[tuple[int, list[Array]]]:
        """The snapshots `load_state_dict` would keep (the newest ``count``); `ValueError` naming the field if
        malformed. Steps must increase; that the arrays fit the model is checked by the trainer."""
        fields(state, ("count", "spacing", "snapshots"), what="linefit state")
        saved_count = integer(state["count"], "count", 1)
        integer(state["spacing"], "spacing", 1)
        snapshots = []
        for i, item in enumerate(sequence(state["snapshots"], "snapshots", saved_count)):
            step, arrays = sequence(item, f"snapshots[{i}]", 2, 2)
            snapshots.append((integer(step, f"snapshots[{i}].step"), sequence(arrays, f"snapshots[{i}].arrays")))
        steps = [s for s, _ in snapshots]
        if steps != sorted(set(steps)):
            raise ValueError(f"snapshot steps {steps} do not increase")
        return snapshots[len(snapshots) - self.count:] if len(snapshots) > self.count else snapshots

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the snapshots of what `state_dict` returned (this direction keeps its own count and spacing)."""
        self._snapshots = self.check_state_dict(state)


def make_direction(name: str, count: int, spacing: int) -> ExtrapolateDirection | LinefitDirection:
    """The direction source a config names."""
    return LinefitDirection(count, spacing) if name == "linefit" else ExtrapolateDirection()
