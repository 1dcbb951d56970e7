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

from ._peers import LAWA_EVERY, LAWA_SNAPSHOTS, SCHEDULEFREE_LR, SCHEDULEFREE_WARMUP
from ._probe import OVERHEAD_BLOCK_STEPS, PROBE_KINDS, probe_overhead_pct
from ._runner import RunResult, median_step
from ._targets import evaluate_targets, format_target

__all__ = ["CURVES", "PEERS", "SCHEMA", "format_table", "plot", "summarize", "sweep_with_cost", "time_to_target",
           "val_at_wall"]

SCHEMA = "hybrid-bench/3"
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


def time_to_target(result: RunResult, target: float, curve: str | None = None) -> tuple[float, float] | None:
    """(wall seconds, backward passes) at the first evaluation with validation loss ≤ ``target``, on the main
    curve or on the second curve called ``curve`` (``"lawa"``, ``"raw"``)."""
    for wall, backward, _, val in result.curve if curve is None else result.curves[curve]:
        if val <= target:
            return wall, backward
    return None


def val_at_wall(result: RunResult, wall: float, curve: str | None = None) -> float:
    """Validation loss of the last evaluation made within ``wall`` seconds of training (main or named curve)."""
    rows = result.curve if curve is None else result.curves[curve]
    within = [row[3] for row in rows if row[0] <= wall]
    return within[-1] if within else rows[0][3]


def sweep_with_cost(sweep: Sequence[RunResult], chosen: RunResult,
                    target: float) -> tuple[float, float] | None:
    """Time-to-target of a user who runs every learning rate of ``sweep`` before picking ``chosen``: the total
    training wall-clock (and backward passes) of the other sweep runs plus ``chosen``'s time-to-target."""
    own = time_to_target(chosen, target)
    if own is None:
        return None
    others = [r for r in sweep if r is not chosen]
    return own[0] + sum(r.curve[-1][0] for r in others), own[1] + sum(r.curve[-1][1] for r in others)


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


PEERS = ("baseline", "tuned", "tuned_lawa", "schedulefree", "sweep_with_cost")
"""What the hybrid's time-to-target is compared with: ``speedup_{wall,backward}_vs_<peer>`` per seed."""

CURVES = ("baseline", "tuned", "tuned_lawa", "schedulefree", "hybrid", "hybrid_raw")
"""The curves each seed reports a final loss, a time-to-target and a loss at the baseline's wall-clock for."""


def _best(runs: Sequence[RunResult], curve: str | None = None) -> RunResult | None:
    """The run with the lowest final loss on its main curve or on its second curve ``curve`` (None if none)."""
    having = [r for r in runs if curve is None or curve in r.curves]
    return min(having, key=lambda r: r.final(curve)) if having else None


def _seed_figures(runs: Sequence[RunResult], steps: int) -> dict[str, Any]:
    """The per-seed comparisons of one seed's runs."""
    base = next(r for r in runs if r.kind == "baseline")
    hybrid = next(r for r in runs if r.kind == "hybrid")
    sweep = [r for r in runs if r.kind in ("baseline", "tuned")]
    tuned = _best(sweep)
    assert tuned is not None  # the baseline is in the sweep
    picks: dict[str, tuple[RunResult | None, str | None]] = {
        "baseline": (base, None), "tuned": (tuned, None), "tuned_lawa": (_best(sweep, "lawa"), "lawa"),
        "schedulefree": (_best([r for r in runs if r.kind == "schedulefree"]), None),
        "hybrid": (hybrid, None), "hybrid_raw": (hybrid if "raw" in hybrid.curves else None, "raw")}
    target = base.final_val
    ttt = {k: None if r is None else time_to_target(r, target, c) for k, (r, c) in picks.items()}
    ttt["sweep_with_cost"] = sweep_with_cost(sweep, tuned, target)
    plain_step = median_step(base, "plain")
    total_wall = base.curve[-1][0]
    real_steps = hybrid.curve[-1][1]
    speedups = {f"speedup_{unit}_vs_{peer}": _ratio(*_pair(ttt, peer, index))
                for unit, index in (("wall", 0), ("backward", 1)) for peer in PEERS}
    return {
        "seed": base.seed,
        "target_val": target,
        "tuned_lr": tuned.lr,
        "tuned_lawa_lr": None if picks["tuned_lawa"][0] is None else picks["tuned_lawa"][0].lr,
        "schedulefree_lr": None if picks["schedulefree"][0] is None else picks["schedulefree"][0].lr,
        "final_val": {k: None if r is None else r.final(c) for k, (r, c) in picks.items()},
        "time_to_target_s": {k: None if v is None else v[0] for k, v in ttt.items()},
        "backward_to_target": {k: None if v is None else v[1] for k, v in ttt.items()},
        **speedups,
        "val_at_baseline_wall": {k: None if r is None else val_at_wall(r, total_wall, c)
                                 for k, (r, c) in picks.items()},
        "hybrid_lr_multiplier": hybrid.events.get("lr_multiplier"),
        "overhead_idle_pct": _finite(probe_overhead_pct(hybrid.probe_seconds, "idle")),
        "overhead_active_pct": _finite(probe_overhead_pct(hybrid.probe_seconds, "active")),
        "readout_cost_pct": _finite(probe_overhead_pct(hybrid.probe_seconds, "idle", "idle_no_readout")),
        "total_wall_vs_native": _ratio(hybrid.curve[-1][0], total_wall),
        "host_syncs_per_real_step": _ratio(hybrid.events.get("host_syncs"), real_steps),
        "predict_cost_vs_full_no_check": _finite(median_step(hybrid, "predict") / plain_step),
        "predict_cost_vs_full_with_check": _finite(median_step(hybrid, "predict_checked") / plain_step),
        "peak_memory_overhead_pct": 100.0 * (hybrid.peak_bytes / max(base.peak_bytes, 1) - 1.0),
        "predicted_fraction": sum(len(v) for k, v in hybrid.step_seconds.items() if k.startswith("predict"))
        / steps,
    }


def summarize(results: list[RunResult], task: str, backend: str, steps: int, command: str,
              dynamics: str = "rssm", eval_every: int | None = None) -> dict[str, Any]:
    """The benchmark document: every run, per-seed comparisons and their median and min–max."""
    seeds = sorted({r.seed for r in results})
    per_seed = [_seed_figures([r for r in results if r.seed == seed], steps) for seed in seeds]
    keys = [k for k in per_seed[0] if k.startswith("speedup_")] + [
        "hybrid_lr_multiplier", "overhead_idle_pct", "overhead_active_pct", "readout_cost_pct", "total_wall_vs_native",
        "host_syncs_per_real_step", "predict_cost_vs_full_no_check", "predict_cost_vs_full_with_check",
        "peak_memory_overhead_pct", "predicted_fraction"]
    summary = {k: _spread([s[k] for s in per_seed]) for k in keys}
    for kind in CURVES:
        summary[f"final_val_{kind}"] = _spread([s["final_val"][kind] for s in per_seed])
        summary[f"val_at_baseline_wall_{kind}"] = _spread([s["val_at_baseline_wall"][kind] for s in per_seed])
    baseline_loop = next(r.loop for r in results if r.kind == "baseline")
    hybrid_loop = next(r.loop for r in results if r.kind == "hybrid")
    sf_loop = next((r.loop for r in results if r.kind == "schedulefree"), None)
    lawa = any("lawa" in r.curves for r in results)
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
        "peers": {"lawa": {"every": LAWA_EVERY, "snapshots": LAWA_SNAPSHOTS} if lawa else None,
                  "schedulefree": None if sf_loop is None else {
                      "loop": sf_loop, "default_lr": SCHEDULEFREE_LR, "warmup_steps": SCHEDULEFREE_WARMUP,
                      "lrs": sorted({r.lr for r in results if r.kind == "schedulefree"})}},
        "overhead_probe": {"kinds": list(PROBE_KINDS), "blocks": len(next(
            r for r in results if r.kind == "hybrid").probe_seconds.get("native", [])),
                           "block_steps": OVERHEAD_BLOCK_STEPS},
        "targets": evaluate_targets(task, backend, summary, len(seeds)),
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
            "lawa_curve": r.curves.get("lawa"), "raw_curve": r.curves.get("raw"),
            "lawa_snapshot_s": r.side_seconds if "lawa" in r.curves else None,
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
    """The headline figures as text: median and [min–max] over seeds; rows of absent peers are left out."""
    s = doc["summary"]
    lawa, sf = doc["peers"]["lawa"] is not None, doc["peers"]["schedulefree"] is not None
    rows = [
        ("time-to-target speed-up vs same-settings baseline (wall)", _fmt(s["speedup_wall_vs_baseline"]), True),
        ("time-to-target speed-up vs tuned baseline (wall)", _fmt(s["speedup_wall_vs_tuned"]), True),
        ("time-to-target speed-up vs tuned baseline + LAWA (wall)", _fmt(s["speedup_wall_vs_tuned_lawa"]), lawa),
        ("time-to-target speed-up vs Schedule-Free AdamW, best lr (wall)", _fmt(s["speedup_wall_vs_schedulefree"]),
         sf),
        ("time-to-target speed-up vs the lr sweep, its cost included (wall)",
         _fmt(s["speedup_wall_vs_sweep_with_cost"]), True),
        ("backward-pass speed-up vs same-settings baseline", _fmt(s["speedup_backward_vs_baseline"]), True),
        ("backward-pass speed-up vs tuned baseline", _fmt(s["speedup_backward_vs_tuned"]), True),
        ("final val loss: baseline", _fmt(s["final_val_baseline"], "{:.4f}"), True),
        ("final val loss: tuned baseline", _fmt(s["final_val_tuned"], "{:.4f}"), True),
        ("final val loss: tuned baseline + LAWA", _fmt(s["final_val_tuned_lawa"], "{:.4f}"), lawa),
        ("final val loss: Schedule-Free AdamW, best lr", _fmt(s["final_val_schedulefree"], "{:.4f}"), sf),
        ("final val loss: hybrid (read-out weights)", _fmt(s["final_val_hybrid"], "{:.4f}"), True),
        ("final val loss: hybrid (raw weights)", _fmt(s["final_val_hybrid_raw"], "{:.4f}"), True),
        ("val loss at the baseline's wall-clock: hybrid", _fmt(s["val_at_baseline_wall_hybrid"], "{:.4f}"), True),
        ("val loss at the baseline's wall-clock: tuned", _fmt(s["val_at_baseline_wall_tuned"], "{:.4f}"), True),
        ("hybrid's learning-rate multiplier at the end", _fmt(s["hybrid_lr_multiplier"], "{:.3g}"),
         s["hybrid_lr_multiplier"]["n"] > 0),
        ("overhead of an idle FULL step vs the native step (%), interleaved", _fmt(s["overhead_idle_pct"], "{:.1f}"),
         True),
        ("cost of the read-out: idle step vs the same without it (%), interleaved",
         _fmt(s["readout_cost_pct"], "{:.1f}"), True),
        ("overhead of an active FULL step vs the native step (%), interleaved",
         _fmt(s["overhead_active_pct"], "{:.1f}"), True),
        ("whole default run: hybrid wall-clock / native wall-clock", _fmt(s["total_wall_vs_native"], "{:.3f}"),
         True),
        ("host reads per real step (hybrid run)", _fmt(s["host_syncs_per_real_step"], "{:.3f}"), True),
        ("PREDICT step cost / FULL step, no check", _fmt(s["predict_cost_vs_full_no_check"]), True),
        ("PREDICT step cost / FULL step, with check", _fmt(s["predict_cost_vs_full_with_check"]), True),
        ("peak traced memory overhead (%)", _fmt(s["peak_memory_overhead_pct"], "{:.1f}"), True),
        ("fraction of steps predicted", _fmt(s["predicted_fraction"]), True),
    ]
    shown = [(a, b) for a, b, keep in rows if keep]
    width = max(len(a) for a, _ in shown)
    head = (f"{doc['task']} on {doc['backend']}, {doc['steps']} steps, seeds {doc['seeds']} "
            "(speed-up > 1 = hybrid faster)\n"
            f"  baseline loop: {doc['baseline_loop']}\n  hybrid: {doc['hybrid_loop']}")
    if sf:
        head += f"\n  schedule-free loop: {doc['peers']['schedulefree']['loop']}"
    lines = [head, *(f"  {a.ljust(width)}  {b}" for a, b in shown)]
    for t in doc["targets"]:
        pattern = "{:.1f}" if t["metric"].endswith("_pct") else "{:.3f}"
        lines.append(f"  {format_target(t)}: {'met' if t['met'] else 'NOT met'}, measured {_fmt(t, pattern)} "
                     f"over {t['n']} seed(s)")
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
    sweep = [r for r in runs if r["kind"] in ("baseline", "tuned")]
    best_tuned = min(sweep, key=lambda r: r["final_val"])
    hybrid_run = next(r for r in runs if r["kind"] == "hybrid")
    shown = [("baseline", next(r for r in runs if r["kind"] == "baseline")["curve"], "-"),
             (f"tuned (lr {best_tuned['lr']:g})", best_tuned["curve"], "-")]
    with_lawa = [r for r in sweep if r["lawa_curve"]]
    if with_lawa:
        best = min(with_lawa, key=lambda r: r["lawa_curve"][-1][3])
        shown.append((f"tuned + LAWA (lr {best['lr']:g})", best["lawa_curve"], "--"))
    free = [r for r in runs if r["kind"] == "schedulefree"]
    if free:
        best = min(free, key=lambda r: r["final_val"])
        shown.append((f"Schedule-Free (lr {best['lr']:g})", best["curve"], "-"))
    shown.append(("hybrid (read-out)", hybrid_run["curve"], "-"))
    if hybrid_run["raw_curve"]:
        shown.append(("hybrid (raw weights)", hybrid_run["raw_curve"], ":"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, col, label in ((axes[0], 0, "wall-clock seconds (training only)"), (axes[1], 1, "backward passes")):
        for name, rows, style in shown:
            curve = np.asarray(rows)
            axis.plot(curve[:, col], curve[:, 3], style, label=name)
        hybrid = np.asarray(hybrid_run["curve"])
        for first, last in hybrid_run["predict_spans"]:
            lo = np.interp(first, hybrid[:, 2], hybrid[:, col])
            hi = np.interp(last + 1, hybrid[:, 2], hybrid[:, col])
            axis.axvspan(lo, hi, color="tab:green", alpha=0.15, lw=0)
        axis.set_xlabel(label)
        axis.set_ylabel("validation loss")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{doc['task']} / {doc['backend']} (seed {seed}); shaded: PREDICT phases")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
