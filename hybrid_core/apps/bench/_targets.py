"""The targets of `hybrid-train bench`: one table, each row judged on a statistic over the seeds."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

__all__ = ["TARGETS", "Target", "evaluate_targets", "format_target", "judge"]


class Target(NamedTuple):
    """``metric`` (a key of the document's ``summary``) must have its ``statistic`` over the seeds (``"median"``
    or ``"min"``) ``≤`` or ``≥`` ``bound`` (``direction`` ``"<="`` or ``">="``).

    A ``">="`` target (a speed-up) also needs the figure on every seed: a seed where it does not exist
    (the hybrid did not reach the target) counts against it. ``informative`` rows are judged and printed
    like the others but are figures toward a project-level target that one task cannot settle.
    """

    task: str
    backend: str
    metric: str
    bound: float
    why: str
    direction: Literal["<=", ">="] = "<="
    statistic: Literal["median", "min"] = "median"
    informative: bool = False


def _speedups(task: str, backend: str, schedulefree: bool) -> tuple[Target, ...]:
    rows = [
        Target(task, backend, "speedup_wall_vs_baseline", 1.4,
               "the hybrid reaches the baseline's final validation loss in at most 1/1.4 of its wall-clock", ">="),
        Target(task, backend, "speedup_wall_vs_tuned", 1.0,
               "the hybrid reaches the target no later than the best learning rate of the sweep", ">="),
        Target(task, backend, "speedup_wall_vs_baseline", 0.97,
               "on every seed the hybrid is at most 3% slower to the target than the baseline", ">=", "min"),
        Target(task, backend, "speedup_wall_vs_tuned", 1.05,
               "this task's figure toward the project target: >= 1.05 vs the tuned baseline on at least one task",
               ">=", informative=True),
    ]
    if schedulefree:
        rows.append(Target(task, backend, "speedup_wall_vs_schedulefree", 1.0,
                           "the hybrid reaches the target no later than Schedule-Free AdamW at its best lr", ">=",
                           informative=True))
    return tuple(rows)


TARGETS: tuple[Target, ...] = (
    Target("lm-stdlib", "torch", "overhead_idle_pct", 3.0,
           "an idle FULL step costs at most 3% more than the native torch step"),
    Target("lm-stdlib", "torch", "readout_cost_pct", 1.0,
           "the read-out costs at most 1% of an idle step (interleaved probe with and without it)"),
    Target("lm-stdlib", "torch", "total_wall_vs_native", 1.03,
           "a whole default hybrid run takes at most 1.03x the native run's training wall-clock"),
    Target("digits-mlp", "numpy", "overhead_idle_pct", 30.0,
           "an idle FULL step costs at most 30% more than the reference model and optimizer called directly"),
    Target("jax-mlp", "jax", "overhead_idle_pct", 60.0,
           "an idle FULL step costs at most 60% more than the native jitted train_step"),
    *_speedups("lm-stdlib", "torch", schedulefree=True),
    *_speedups("digits-mlp", "numpy", schedulefree=False),
    *_speedups("digits-mlp", "torch", schedulefree=True),
    Target("lm-finetune", "torch", "speedup_wall_vs_baseline", 1.3,
           "fine-tuning: the hybrid reaches the baseline's final validation loss in at most 1/1.3 of its wall-clock",
           ">="),
    Target("lm-finetune", "torch", "speedup_wall_vs_tuned", 1.0,
           "fine-tuning: this task's figure against the tuned baseline (reported)", ">=", informative=True),
    Target("lm-finetune", "torch", "speedup_wall_vs_schedulefree", 1.0,
           "fine-tuning: against Schedule-Free AdamW at its best lr (reported)", ">=", informative=True),
)
"""Every target: (task, backend, metric, bound, direction, statistic). Figures without a bound are not here."""


def judge(target: Target, spread: dict[str, Any], seeds: int | None = None) -> bool:
    """Whether ``spread`` (``{"median", "min", "max", "n"}`` over the seeds) meets ``target``; with ``seeds``,
    a ``">="`` target also needs the figure on all of them."""
    value = spread[target.statistic]
    if value is None:
        return False
    if target.direction == ">=":
        return value >= target.bound and (seeds is None or spread["n"] == seeds)
    return value <= target.bound


def format_target(row: dict[str, Any]) -> str:
    """``target METRIC [(min over seeds)] <= BOUND (task/backend)``; ``informative …`` for informative rows."""
    stat = " (min over seeds)" if row["statistic"] == "min" else ""
    return (f"{'informative' if row['informative'] else 'target'} {row['metric']}{stat} {row['direction']} "
            f"{row['bound']:g} ({row['task']}/{row['backend']})")


def evaluate_targets(task: str, backend: str, summary: dict[str, Any], seeds: int | None = None
                     ) -> list[dict[str, Any]]:
    """This task × backend's targets with the measured median [min–max] over seeds and whether each is met."""
    out = []
    for t in TARGETS:
        if (t.task, t.backend) != (task, backend):
            continue
        spread = summary[t.metric]
        out.append({"task": t.task, "backend": t.backend, "metric": t.metric, "direction": t.direction,
                    "statistic": t.statistic, "bound": t.bound, "informative": t.informative, "what": t.why,
                    "median": spread["median"], "min": spread["min"], "max": spread["max"], "n": spread["n"],
                    "met": judge(t, spread, seeds)})
    return out
