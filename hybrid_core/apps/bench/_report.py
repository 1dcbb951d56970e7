"""Turns benchmark runs into the reported figures, a JSON document, a table and a plot."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_core import __version__

from . import _runner
from ._runner import PROBE_KINDS, RunResult, median_step, probe_overhead_pct
from ._targets import evaluate_targets

__all__ = ["SCHEMA", "format_table", "plot", "summarize", "time_to_target"]

SCHEMA = "hybrid-bench/2"
"""Version tag of the JSON document (docs/benchmarks.md describes every field)."""


def _source() -> dict[str, Any] | None:
    """The git commit of the library's source tree and whether it had uncommitted changes (None outside git)."""
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: git status must not refresh the index

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True, env=env).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"git_commit": head, "uncommitted_changes": bool(dirty)}


def time_to_target(result: RunResult, target: float) -> tuple[float, float] | None:
    """(wall seconds, backward passes) at the first evaluation with validation loss ≤ ``target``."""
    for wall, backward, _, val in result.curve:
        if val <= target:
            return wall, backward
    return None


def val_at_wall(result: RunResult, wall: float) -> float:
    """Validation loss of the last evaluation made within ``wall`` seconds of training."""
    within = [row[3] for row in result.curve if row[0] <= wall]
    return within[-1] if within else result.curve[0][3]


def _spread(values: Sequence[float | None]) -> dict[str, float | None]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": float(np.median(finite)), "min": float(min(finite)), "max": float(max(finite)),
            "n": len(finite)}


def _finite(value: float) -> float | None:
    """``value``, or None when it is NaN or infinite (a cost with no step of that kind): JSON has no NaN."""
    return value if math.isfinite(value) else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def summarize(results: list[RunResult], task: str, backend: str, steps: int, command: str,
              dynamics: str = "rssm", eval_every: int | None = None) -> dict[str, Any]:
    """The benchmark document: every run, per-seed comparisons and their median and min–max."""
    seeds = sorted({r.seed for r in results})
    per_seed = []
    for seed in seeds:
        runs = [r for r in results if r.seed == seed]
        base = next(r for r in runs if r.kind == "baseline")
        hybrid = next(r for r in runs if r.kind == "hybrid")
        tuned = min((r for r in runs if r.kind in ("baseline", "tuned")), key=lambda r: r.final_val)
        target = base.final_val
        ttt = {k: time_to_target(r, target) for k, r in (("baseline", base), ("tuned", tuned), ("hybrid", hybrid))}
        plain_step = median_step(base, "plain")
        total_wall = base.curve[-1][0]
        real_steps = hybrid.curve[-1][1]
        per_seed.append({
            "seed": seed,
            "target_val": target,
            "tuned_lr": tuned.lr,
            "final_val": {"baseline": base.final_val, "tuned": tuned.final_val, "hybrid": hybrid.final_val},
            "time_to_target_s": {k: None if v is None else v[0] for k, v in ttt.items()},
            "backward_to_target": {k: None if v is None else v[1] for k, v in ttt.items()},
            "speedup_wall_vs_baseline": _ratio(*_pair(ttt, "baseline", 0)),
            "speedup_wall_vs_tuned": _ratio(*_pair(ttt, "tuned", 0)),
            "speedup_backward_vs_baseline": _ratio(*_pair(ttt, "baseline", 1)),
            "speedup_backward_vs_tuned": _ratio(*_pair(ttt, "tuned", 1)),
            "val_at_baseline_wall": {"baseline": base.final_val, "tuned": val_at_wall(tuned, total_wall),
                                     "hybrid": val_at_wall(hybrid, total_wall)},
            "overhead_idle_pct": _finite(probe_overhead_pct(hybrid.probe_seconds, "idle")),
            "overhead_active_pct": _finite(probe_overhead_pct(hybrid.probe_seconds, "active")),
            "total_wall_vs_native": _ratio(hybrid.curve[-1][0], total_wall),
            "host_syncs_per_real_step": _ratio(hybrid.events.get("host_syncs"), real_steps),
            "predict_cost_vs_full_no_check": _finite(median_step(hybrid, "predict") / plain_step),
            "predict_cost_vs_full_with_check": _finite(median_step(hybrid, "predict_checked") / plain_step),
            "peak_memory_overhead_pct": 100.0 * (hybrid.peak_bytes / max(base.peak_bytes, 1) - 1.0),
            "predicted_fraction": sum(len(v) for k, v in hybrid.step_seconds.items() if k.startswith("predict"))
            / steps,
        })
    keys = ["speedup_wall_vs_baseline", "speedup_wall_vs_tuned", "speedup_backward_vs_baseline",
            "speedup_backward_vs_tuned", "overhead_idle_pct", "overhead_active_pct", "total_wall_vs_native",
            "host_syncs_per_real_step",
            "predict_cost_vs_full_no_check",
            "predict_cost_vs_full_with_check", "peak_memory_overhead_pct", "predicted_fraction"]
    summary = {k: _spread([s[k] for s in per_seed]) for k in keys}
    for kind in ("baseline", "tuned", "hybrid"):
        summary[f"final_val_{kind}"] = _spread([s["final_val"][kind] for s in per_seed])
        summary[f"val_at_baseline_wall_{kind}"] = _spread([s["val_at_baseline_wall"][kind] for s in per_seed])
    baseline_loop = next(r.loop for r in results if r.kind == "baseline")
    hybrid_loop = next(r.loop for r in results if r.kind == "hybrid")
    return {
        "schema": SCHEMA,
        "task": task,
        "backend": backend,
        "steps": steps,
        "eval_every": eval_every,
        "seeds": seeds,
        "command": command,
        "dynamics": dynamics,
        "baseline_loop": baseline_loop,
        "hybrid_loop": hybrid_loop,
        "overhead_probe": {"kinds": list(PROBE_KINDS), "blocks": len(next(
            r for r in results if r.kind == "hybrid").probe_seconds.get("native", [])),
                           "block_steps": _runner.OVERHEAD_BLOCK_STEPS},
        "targets": evaluate_targets(task, backend, summary),
        "process_warmup_s": results[0].process_warmup or None,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(), "library": __version__,
                    "source": _source()},
        "summary": summary,
        "per_seed": per_seed,
        "runs": [_run_dict(r) for r in results],
    }


def _pair(ttt: dict[str, tuple[float, float] | None], peer: str, index: int) -> tuple[float | None, float | None]:
    a, b = ttt[peer], ttt["hybrid"]
    return (None if a is None else a[index]), (None if b is None else b[index])


def _run_dict(r: RunResult) -> dict[str, Any]:
    return {"seed": r.seed, "kind": r.kind, "lr": r.lr, "loop": r.loop, "final_val": r.final_val, "curve": r.curve,
            "median_step_s": {k: median_step(r, k) for k in r.step_seconds},
            "mean_step_s": {k: float(np.mean(v)) for k, v in r.step_seconds.items()},
            "steps_by_kind": {k: len(v) for k, v in r.step_seconds.items()},
            "peak_traced_bytes": r.peak_bytes, "predict_spans": r.predict_spans,
            "overhead_probe_s": r.probe_seconds or None, "overhead_probe_end": r.probe_checks or None,
            "hybrid": r.events or None}


def _fmt(spread: dict[str, float | None], pattern: str = "{:.2f}") -> str:
    if spread["median"] is None:
        return "not reached"
    if spread["n"] == 1:
        return pattern.format(spread["median"])
    return f"{pattern.format(spread['median'])} [{pattern.format(spread['min'])}–{pattern.format(spread['max'])}]"


def format_table(doc: dict[str, Any]) -> str:
    """The headline figures as text: median and [min–max] over seeds."""
    s = doc["summary"]
    rows = [
        ("time-to-target speed-up vs same-settings baseline (wall)", _fmt(s["speedup_wall_vs_baseline"])),
        ("time-to-target speed-up vs tuned baseline (wall)", _fmt(s["speedup_wall_vs_tuned"])),
        ("backward-pass speed-up vs same-settings baseline", _fmt(s["speedup_backward_vs_baseline"])),
        ("backward-pass speed-up vs tuned baseline", _fmt(s["speedup_backward_vs_tuned"])),
        ("final val loss: baseline", _fmt(s["final_val_baseline"], "{:.4f}")),
        ("final val loss: tuned baseline", _fmt(s["final_val_tuned"], "{:.4f}")),
        ("final val loss: hybrid", _fmt(s["final_val_hybrid"], "{:.4f}")),
        ("val loss at the baseline's wall-clock: hybrid", _fmt(s["val_at_baseline_wall_hybrid"], "{:.4f}")),
        ("val loss at the baseline's wall-clock: tuned", _fmt(s["val_at_baseline_wall_tuned"], "{:.4f}")),
        ("overhead of an idle FULL step vs the native step (%), interleaved", _fmt(s["overhead_idle_pct"], "{:.1f}")),
        ("overhead of an active FULL step vs the native step (%), interleaved",
         _fmt(s["overhead_active_pct"], "{:.1f}")),
        ("whole default run: hybrid wall-clock / native wall-clock", _fmt(s["total_wall_vs_native"], "{:.3f}")),
        ("host reads per real step (hybrid run)", _fmt(s["host_syncs_per_real_step"], "{:.3f}")),
        ("PREDICT step cost / FULL step, no check", _fmt(s["predict_cost_vs_full_no_check"])),
        ("PREDICT step cost / FULL step, with check", _fmt(s["predict_cost_vs_full_with_check"])),
        ("peak traced memory overhead (%)", _fmt(s["peak_memory_overhead_pct"], "{:.1f}")),
        ("fraction of steps predicted", _fmt(s["predicted_fraction"])),
    ]
    width = max(len(a) for a, _ in rows)
    head = (f"{doc['task']} on {doc['backend']}, {doc['steps']} steps, seeds {doc['seeds']} "
            "(speed-up > 1 = hybrid faster)\n"
            f"  baseline loop: {doc['baseline_loop']}\n  hybrid: {doc['hybrid_loop']}")
    lines = [head, *(f"  {a.ljust(width)}  {b}" for a, b in rows)]
    for t in doc["targets"]:
        pattern = "{:.1f}" if t["metric"].endswith("_pct") else "{:.3f}"
        lines.append(f"  target {t['metric']} <= {t['bound']:g} ({t['task']}/{t['backend']}): "
                     f"{'met' if t['met'] else 'NOT met'}, measured {_fmt(t, pattern)} over {t['n']} seed(s)")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: str) -> bool:
    """Validation loss against wall-clock and backward passes, PREDICT spans shaded; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    seed = doc["seeds"][0]
    runs = [r for r in doc["runs"] if r["seed"] == seed]
    best_tuned = min((r for r in runs if r["kind"] in ("baseline", "tuned")), key=lambda r: r["final_val"])
    shown = [("baseline", next(r for r in runs if r["kind"] == "baseline")),
             (f"tuned (lr {best_tuned['lr']:g})", best_tuned),
             ("hybrid", next(r for r in runs if r["kind"] == "hybrid"))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, col, label in ((axes[0], 0, "wall-clock seconds (training only)"), (axes[1], 1, "backward passes")):
        for name, run in shown:
            curve = np.asarray(run["curve"])
            axis.plot(curve[:, col], curve[:, 3], label=name)
        hybrid = np.asarray(shown[2][1]["curve"])
        for first, last in shown[2][1]["predict_spans"]:
            lo = np.interp(first, hybrid[:, 2], hybrid[:, col])
            hi = np.interp(last + 1, hybrid[:, 2], hybrid[:, col])
            axis.axvspan(lo, hi, color="tab:green", alpha=0.15, lw=0)
        axis.set_xlabel(label)
        axis.set_ylabel("validation loss")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{doc['task']} / {doc['backend']} (seed {seed}); shaded: PREDICT phases")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
