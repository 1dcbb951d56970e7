"""`hybrid-train plot`: a run's loss against step and against wall-clock, its phases shaded.

Reads the step records of a run as JSON Lines (`MetricsCollector.to_jsonl`, ``hybrid-train
demo --jsonl``, `hybrid_core.callbacks.JSONLLogger`: one object per step with ``step``,
``phase``, ``loss``, ``wall_seconds``) and, optionally, the rows of a `ValidationLogger`
(``step`` = steps done, and the metrics). Draws two panels side by side: the loss of every step
with a loss (real steps, checked predicted steps) against steps done (``step + 1``), and against
the training wall-clock (the running sum of ``wall_seconds``); each phase's spans shaded in its
colour (`PHASE_COLORS`); the validation metric, when given, as a second curve (placed on the
wall-clock axis at the training time its step was reached).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, NamedTuple

import numpy as np

from hybrid_core import BackendError, ConfigError

__all__ = ["PHASE_COLORS", "Run", "load_jsonl", "load_run", "plot_run", "require_matplotlib"]

PHASE_COLORS = {"warmup": "#9e9e9e", "full": "#8ecae6", "predict": "#fb8500", "correct": "#52b788"}
"""The shading of each phase."""

FIGSIZE = (11.0, 4.0)
DPI = 100
"""The image is ``FIGSIZE × DPI`` pixels: 1100 × 400."""


class Run(NamedTuple):
    """A run's step records as arrays, in record order."""

    steps: np.ndarray
    """Steps done after each record (its ``step`` + 1)."""
    seconds: np.ndarray
    """Training wall-clock when each record's step ended (running sum of ``wall_seconds``)."""
    loss: np.ndarray
    """Each record's loss (NaN where it has none)."""
    phases: list[str]


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` with the file-only Agg backend; `BackendError` with the install hint if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BackendError("drawing needs matplotlib, which is not installed",
                           'pip install matplotlib (or pip install "hybrid-predict-trainer[plot]")') from exc
    return plt


def load_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file (blank lines skipped); `ConfigError` naming the first bad line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{os.fspath(path)}:{number}: not JSON ({exc.args[0][:60]})",
                                  "Pass a JSON Lines file, one object per line.") from exc
            if not isinstance(row, dict):
                raise ConfigError(f"{os.fspath(path)}:{number}: not a JSON object",
                                  "Pass a JSON Lines file, one object per line.")
            rows.append(row)
    return rows


def load_run(path: str | os.PathLike[str]) -> Run:
    """The step records of ``path``; `ConfigError` when a row is not a step record or no step has a loss."""
    rows = load_jsonl(path)
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("step"), int) or row.get("phase") not in PHASE_COLORS:
            raise ConfigError(f"{os.fspath(path)}: row {number} is not a step record (needs an integer step and "
                              f"a phase of {', '.join(PHASE_COLORS)})",
                              "Pass the file of `hybrid-train demo --jsonl`, JSONLLogger or MetricsCollector.to_jsonl.")
    loss = np.array([_number(r.get("loss")) for r in rows], dtype=float)
    if not np.isfinite(loss).any():
        raise ConfigError(f"{os.fspath(path)}: no step has a finite loss, so there is nothing to draw",
                          "Pass the records of a run that trained (its real steps carry their loss).")
    wall = np.array([_number(r.get("wall_seconds")) for r in rows], dtype=float)
    seconds = np.cumsum(np.where(np.isfinite(wall), wall, 0.0))
    steps = np.array([r["step"] + 1 for r in rows], dtype=float)
    return Run(steps, seconds, loss, [r["phase"] for r in rows])


def validation_curve(path: str | os.PathLike[str], metric: str | None) -> tuple[str, np.ndarray, np.ndarray]:
    """(metric name, steps, values) of a `ValidationLogger` file; `ConfigError` when there is no such metric."""
    rows = load_jsonl(path)
    meta = {"step", "lr", "seconds", "weights"}
    if metric is None:
        numeric = [k for row in rows[:1] for k, v in row.items() if k not in meta and _is_number(v)]
        metric = next((k for k in ("value", "loss") if k in numeric), numeric[0] if numeric else None)
    if metric is None or not rows or any(not isinstance(r.get("step"), int) or metric not in r for r in rows):
        raise ConfigError(f"{os.fspath(path)}: not ValidationLogger rows with an integer step and "
                          f"{'a number' if metric is None else repr(metric)} in every row",
                          "Pass the file a ValidationLogger(path=...) wrote; --metric names the column.")
    return metric, np.array([r["step"] for r in rows], dtype=float), np.array(
        [_number(r[metric]) for r in rows], dtype=float)


def plot_run(run_path: str | os.PathLike[str], out: str | os.PathLike[str],
             validation: str | os.PathLike[str] | None = None, metric: str | None = None,
             yscale: str = "log") -> dict[str, Any]:
    """Draw the run at ``run_path`` (and the ``validation`` rows) into the PNG ``out``; what was drawn."""
    if yscale not in ("log", "linear"):
        raise ConfigError(f"yscale={yscale!r}: must be 'log' or 'linear'")
    plt = require_matplotlib()
    run = load_run(run_path)
    curve = validation_curve(validation, metric) if validation is not None else None
    has = np.isfinite(run.loss)
    if yscale == "log" and (run.loss[has] <= 0).any():
        yscale = "linear"  # a zero or negative loss has no logarithm
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    spans = _spans(run)
    try:
        for axis, x, label in ((axes[0], run.steps, "steps"), (axes[1], run.seconds, "training wall-clock (s)")):
            starts = run.steps - 1 if x is run.steps else run.seconds - _durations(run)
            for phase, first, last in spans:
                axis.axvspan(starts[first], x[last], color=PHASE_COLORS[phase], alpha=0.25, lw=0)
            axis.plot(x[has], run.loss[has], color="#023047", lw=1, label="training loss (per step)")
            if curve is not None:
                name, steps, values = curve
                where = steps if x is run.steps else np.interp(steps, run.steps, run.seconds)
                axis.plot(where, values, "o-", color="#d62828", ms=3, lw=1.5, label=f"validation {name}")
            axis.set_xlabel(label)
            axis.set_yscale(yscale)
        axes[0].set_ylabel("loss")
        from matplotlib.patches import Patch

        seen = [p for p in PHASE_COLORS if p in set(run.phases)]
        handles, _ = axes[0].get_legend_handles_labels()
        axes[0].legend(handles=handles + [Patch(color=PHASE_COLORS[p], alpha=0.25, label=p) for p in seen],
                       fontsize=8, loc="best")
        fig.suptitle(f"{os.path.basename(os.fspath(run_path))}: {len(run.steps)} steps, "
                     f"{sum(1 for p in run.phases if p == 'predict')} predicted", fontsize=10)
        fig.tight_layout()
        fig.savefig(out, dpi=DPI)
    finally:
        plt.close(fig)
    return {"steps": len(run.steps), "losses": int(has.sum()), "spans": len(spans),
            "phases": seen, "validation_points": 0 if curve is None else len(curve[1])}


def _spans(run: Run) -> list[tuple[str, int, int]]:
    """(phase, first record, last record) of each run of consecutive records in one phase."""
    spans: list[tuple[str, int, int]] = []
    for i, phase in enumerate(run.phases):
        if spans and spans[-1][0] == phase and run.steps[i] == run.steps[spans[-1][2]] + 1:
            spans[-1] = (phase, spans[-1][1], i)
        else:
            spans.append((phase, i, i))
    return spans


def _durations(run: Run) -> np.ndarray:
    return np.diff(run.seconds, prepend=0.0)


def _number(value: Any) -> float:
    return float(value) if _is_number(value) else math.nan


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
