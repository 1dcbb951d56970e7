"""The overhead targets of `hybrid-train bench`: one table, judged on the median over seeds."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["TARGETS", "Target", "evaluate_targets"]


class Target(NamedTuple):
    """``metric`` (a key of the document's ``summary``) must have a median over seeds ≤ ``bound``."""

    task: str
    backend: str
    metric: str
    bound: float
    why: str


TARGETS: tuple[Target, ...] = (
    Target("lm-stdlib", "torch", "overhead_idle_pct", 3.0,
           "an idle FULL step costs at most 3% more than the native torch step"),
    Target("lm-stdlib", "torch", "total_wall_vs_native", 1.03,
           "a whole default hybrid run takes at most 1.03x the native run's training wall-clock"),
    Target("digits-mlp", "numpy", "overhead_idle_pct", 30.0,
           "an idle FULL step costs at most 30% more than the reference model and optimizer called directly"),
    Target("jax-mlp", "jax", "overhead_idle_pct", 60.0,
           "an idle FULL step costs at most 60% more than the native jitted train_step"),
)
"""Every target: (task, backend, metric, bound). Informative figures without a bound are not here."""


def evaluate_targets(task: str, backend: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """This task × backend's targets with the measured median [min–max] over seeds and whether each is met."""
    out = []
    for t in TARGETS:
        if (t.task, t.backend) != (task, backend):
            continue
        spread = summary[t.metric]
        median = spread["median"]
        out.append({"task": t.task, "backend": t.backend, "metric": t.metric, "bound": t.bound, "what": t.why,
                    "median": median, "min": spread["min"], "max": spread["max"], "n": spread["n"],
                    "met": median is not None and median <= t.bound})
    return out
