"""Where a predicted step points: the optimizer's own next update, or a line through snapshots."""

from __future__ import annotations

from typing import Any

from ._protocols import Array, Model, Optimizer

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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """No state."""


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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.count, self.spacing = int(state["count"]), int(state["spacing"])
        self._snapshots = [(int(s), list(arrs)) for s, arrs in state["snapshots"]]


def make_direction(name: str, count: int, spacing: int) -> ExtrapolateDirection | LinefitDirection:
    """The direction source a config names."""
    return LinefitDirection(count, spacing) if name == "linefit" else ExtrapolateDirection()
