"""`hybrid-train bench` with a tiny budget: schema, finiteness, consistency of the stored figures."""

import contextlib
import dataclasses
import importlib.util
import itertools
import json
import math
import statistics

import numpy as np
import pytest
from _namespaces import available

from hybrid_core import ConfigError, HybridConfig, HybridTrainer
from hybrid_core.apps.bench import SCHEMA, TARGETS, TASKS, _probe, _runner
from hybrid_core.apps.bench._peers import SCHEDULEFREE_LR, Lawa, schedulefree_available
from hybrid_core.apps.bench._report import CURVES, PEERS, summarize, time_to_target
from hybrid_core.apps.bench._runner import PROBE_KINDS, RunResult, active_config, run_plan
from hybrid_core.apps.bench._targets import Target, evaluate_targets, format_target, judge
from hybrid_core.apps.cli import main

# What each backend's native loop must say it is (the baseline is the framework's own loop).
NATIVE_WORDS = {"torch": ("zero_grad()", ".backward()", "opt.step()", "torch.optim.Adam"),
                "jax": ("jax.jit", "jax.value_and_grad", "optax.apply_updates"),
                "numpy": ("model.loss_and_grad", "optimizer.step", "called directly")}

CASES = [(task, backend) for task in TASKS for backend in TASKS[task].backends]
# The lm-stdlib case trains a transformer nine times over (sweep, Schedule-Free sweep, hybrid): > 10 s.
RUN_CASES = [pytest.param(task, backend, marks=pytest.mark.slow) if task == "lm-stdlib" else (task, backend)
             for task, backend in CASES]
# The torch tasks with a Schedule-Free peer (the package installed).
SCHEDULEFREE = ({("digits-mlp", "torch"), ("lm-stdlib", "torch"), ("lm-finetune", "torch")}
                if schedulefree_available() else set())
FACTORS = (0.5, 1.0, 2.0, 4.0)


@pytest.mark.parametrize("task,backend", RUN_CASES)
def test_every_task_runs_and_its_json_is_consistent(task, backend, tmp_path, capsys, monkeypatch):
    if not available(backend):
        pytest.skip(f"{backend} is not installed")
    if backend == "jax" and importlib.util.find_spec("optax") is None:
        pytest.skip("optax is not installed (the jax tasks train with it)")
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    seeds = 2 if backend == "numpy" else 1  # medians over seeds are exercised once; the rest stays fast
    steps = 40 if task == "lm-stdlib" else 120
    # Short phases so even the tiny budget has PREDICT steps, checked and not, to report on.
    short = HybridConfig(warmup_steps=10, min_full_steps=10, max_predict_steps=20, check_interval=4,
                         horizon_arms=(0, 5, 10, 20), lr_search_steps=10)
    monkeypatch.setitem(TASKS, task, dataclasses.replace(TASKS[task], config=short))
    monkeypatch.setattr(_probe, "OVERHEAD_BLOCKS", 6)  # six of the rotating orders; the rest stays fast
    args = ["bench", "--task", task, "--backend", backend, "--seeds", str(seeds), "--steps", str(steps), "--quiet",
            "--out", str(out), "--plot", str(png)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "tuned baseline" in text and "speed-up" in text
    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON document"))
    assert doc["schema"] == SCHEMA and doc["task"] == task and doc["backend"] == backend
    assert doc["seeds"] == list(range(seeds)) and "hybrid-train bench" in doc["command"]
    assert doc["eval_every"] == TASKS[task].eval_every
    # The baseline is the framework's native loop, named in the document and on every native run.
    # The FastGRNN has no nn.Module twin: on every backend its native loop is the reference one, and says so.
    words = (*NATIVE_WORDS["numpy"], "no nn.Module twin") if task == "fastgrnn-router" else NATIVE_WORDS[backend]
    assert all(word in doc["baseline_loop"] for word in words), doc["baseline_loop"]
    assert "HybridTrainer" in doc["hybrid_loop"] and "HybridTrainer" not in doc["baseline_loop"]
    sf = doc["peers"]["schedulefree"]
    assert (sf is not None) == ((task, backend) in SCHEDULEFREE)
    loops = {"hybrid": doc["hybrid_loop"], "baseline": doc["baseline_loop"], "tuned": doc["baseline_loop"],
             "schedulefree": sf and sf["loop"]}
    for run in doc["runs"]:
        assert run["loop"] == loops[run["kind"]]
    if sf is not None:
        assert "schedulefree.AdamWScheduleFree" in sf["loop"] and "opt.eval()" in sf["loop"]
        assert sf["lrs"] == [SCHEDULEFREE_LR * f for f in FACTORS] and sf["warmup_steps"] == 0
    assert doc["peers"]["lawa"] == {"every": 10, "snapshots": 5}
    assert "baseline loop: " + doc["baseline_loop"] in text
    source = doc["machine"]["source"]  # provenance: the commit measured (None outside a git checkout)
    assert source is None or (len(source["git_commit"]) == 40 and isinstance(source["uncommitted_changes"], bool))
    warm = doc["process_warmup_s"]
    assert warm["steps"] > 0 and warm["native"] > 0 and warm["hybrid"] > 0
    kinds = sorted({r["kind"] for r in doc["runs"]})
    assert kinds == sorted(["baseline", "hybrid", "tuned", *(["schedulefree"] if sf else [])])
    assert sorted({r["lr"] for r in doc["runs"] if r["kind"] in ("baseline", "tuned")}) == sorted(
        TASKS[task].lr * f for f in FACTORS)
    for run in doc["runs"]:
        curve = run["curve"]
        assert curve[0][2] == 0 and curve[-1][2] == steps
        assert all(math.isfinite(v) for row in curve for v in row)
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(curve))  # time, backward grow
        if run["kind"] != "hybrid":
            assert curve[-1][1] == steps  # every plain step has a backward pass
        # Second curves: LAWA on every sweep run, raw weights on the hybrid; the same evaluations.
        second = {"baseline": "lawa_curve", "tuned": "lawa_curve", "hybrid": "raw_curve"}.get(run["kind"])
        for name in ("lawa_curve", "raw_curve"):
            assert (run[name] is not None) == (name == second), (run["kind"], name)
        if second is not None:
            other = run[second]
            assert [row[1:3] for row in other] == [row[1:3] for row in curve]
            assert all(math.isfinite(row[3]) for row in other)
        if second == "lawa_curve":
            # The snapshots' time counts toward the LAWA curve only; no snapshot yet at step 0, and at step
            # 10 the one snapshot is the raw weights.
            assert run["lawa_snapshot_s"] > 0
            assert run["lawa_curve"][-1][0] == pytest.approx(curve[-1][0] + run["lawa_snapshot_s"])
            assert all(a[0] <= b[0] for a, b in zip(curve, run["lawa_curve"]))
            assert run["lawa_curve"][0][3] == curve[0][3] and run["lawa_curve"][1][3] == pytest.approx(
                curve[1][3], rel=1e-6)
            assert any(a[3] != b[3] for a, b in zip(curve[2:], run["lawa_curve"][2:]))  # a mean of several
        if run["kind"] == "hybrid":
            assert run["raw_curve"][0][3] == curve[0][3]
            assert [row[0] for row in run["raw_curve"]] == [row[0] for row in curve]
    for seed_doc in doc["per_seed"]:
        mine = [r for r in doc["runs"] if r["seed"] == seed_doc["seed"]]
        runs = {r["kind"]: r for r in mine if r["kind"] in ("baseline", "hybrid")}
        base, hybrid = runs["baseline"], runs["hybrid"]
        sweep = [r for r in mine if r["kind"] in ("baseline", "tuned")]
        tuned = min(sweep, key=lambda r: r["final_val"])
        lawa = min(sweep, key=lambda r: r["lawa_curve"][-1][3])
        free = min((r for r in mine if r["kind"] == "schedulefree"), key=lambda r: r["final_val"], default=None)
        target = seed_doc["target_val"]
        assert target == base["final_val"] == base["curve"][-1][3]
        # The native baseline and the hybrid start from the same weights: same initial validation loss.
        assert hybrid["curve"][0][3] == pytest.approx(base["curve"][0][3], rel=1e-6)
        assert seed_doc["tuned_lr"] == tuned["lr"] and seed_doc["tuned_lawa_lr"] == lawa["lr"]
        assert seed_doc["schedulefree_lr"] == (free and free["lr"])
        curves = {"baseline": base["curve"], "tuned": tuned["curve"], "tuned_lawa": lawa["lawa_curve"],
                  "schedulefree": free and free["curve"], "hybrid": hybrid["curve"], "hybrid_raw": hybrid["raw_curve"]}
        assert seed_doc["final_val"] == {k: c and c[-1][3] for k, c in curves.items()}
        assert seed_doc["final_val"]["tuned"] <= seed_doc["final_val"]["baseline"]
        # Time-to-target is recomputed from the stored curves: the first evaluation at or below the target.
        for kind, curve in curves.items():
            first = None if curve is None else next((row for row in curve if row[3] <= target), None)
            assert seed_doc["time_to_target_s"][kind] == (None if first is None else first[0])
            assert seed_doc["backward_to_target"][kind] == (None if first is None else first[1])
        # The sweep with its cost: the three other sweep runs whole, plus the chosen one to the target.
        others = [r for r in sweep if r is not tuned]
        assert len(others) == 3
        assert seed_doc["time_to_target_s"]["sweep_with_cost"] == pytest.approx(
            seed_doc["time_to_target_s"]["tuned"] + sum(r["curve"][-1][0] for r in others))
        assert seed_doc["backward_to_target"]["sweep_with_cost"] == seed_doc["backward_to_target"]["tuned"] + 3 * steps
        assert seed_doc["hybrid_lr_multiplier"] == hybrid["hybrid"]["lr_multiplier"]
        # The baseline reaches its own final loss, at the latest at its own final time (earlier only
        # if an earlier evaluation was already as low).
        ttt = seed_doc["time_to_target_s"]
        assert ttt["baseline"] is not None and ttt["baseline"] <= base["curve"][-1][0]
        if all(row[3] > target for row in base["curve"][:-1]):
            assert ttt["baseline"] == base["curve"][-1][0]
            assert seed_doc["backward_to_target"]["baseline"] == steps
        # Ratios recomputed from the stored times and backward counts.
        for unit, stored in (("wall", ttt), ("backward", seed_doc["backward_to_target"])):
            for peer in PEERS:
                ratio = seed_doc[f"speedup_{unit}_vs_{peer}"]
                if stored["hybrid"] is None or stored[peer] is None or stored["hybrid"] <= 0:
                    assert ratio is None
                else:
                    assert ratio == pytest.approx(stored[peer] / stored["hybrid"])
        # Costs recomputed from the stored median step times.
        plain = base["median_step_s"]["plain"]
        for run in runs.values():  # the step times add up to the run's training wall-clock
            assert set(run["mean_step_s"]) == set(run["median_step_s"]) == set(run["steps_by_kind"])
            assert sum(run["mean_step_s"][k] * n for k, n in run["steps_by_kind"].items()) == pytest.approx(
                run["curve"][-1][0])
        assert plain > 0 and all(math.isfinite(v) and v >= 0 for r in runs.values()
                                 for v in r["median_step_s"].values())
        for key, kind in (("predict_cost_vs_full_no_check", "predict"), ("predict_cost_vs_full_with_check",
                                                                           "predict_checked")):
            if kind in hybrid["median_step_s"]:
                assert seed_doc[key] == pytest.approx(hybrid["median_step_s"][kind] / plain)
        # The overhead probe: per-block ratios against the native step of the same block, their median.
        probe = hybrid["overhead_probe_s"]
        assert set(probe) == set(PROBE_KINDS) and len({len(v) for v in probe.values()}) == 1
        assert len(probe["native"]) == doc["overhead_probe"]["blocks"] == 6
        assert all(v > 0 for kind in probe.values() for v in kind)
        for kind in ("idle", "active"):
            ratios = [k / n for k, n in zip(probe[kind], probe["native"])]
            assert seed_doc[f"overhead_{kind}_pct"] == pytest.approx(100 * (float(np.median(ratios)) - 1))
            assert math.isfinite(seed_doc[f"overhead_{kind}_pct"])
        # The idle trainer idled in FULL to the end; the active one stayed in FULL, never idle, never predicting.
        ratios = [k / n for k, n in zip(probe["idle"], probe["idle_no_readout"])]
        assert seed_doc["readout_cost_pct"] == pytest.approx(100 * (float(np.median(ratios)) - 1))
        end = hybrid["overhead_probe_end"]
        assert end["idle"] == {**end["idle"], "phase": "full", "idle": True, "predicted_steps": 0}
        assert end["idle_no_readout"] == {**end["idle_no_readout"], "phase": "full", "idle": True}
        assert end["active"] == {**end["active"], "phase": "full", "idle": False, "predicted_steps": 0}
        assert base["overhead_probe_s"] is None and base["overhead_probe_end"] is None
        # A whole default run against the native run, and the hybrid run's host reads.
        assert seed_doc["total_wall_vs_native"] == pytest.approx(hybrid["curve"][-1][0] / base["curve"][-1][0])
        assert math.isfinite(seed_doc["total_wall_vs_native"]) and seed_doc["total_wall_vs_native"] > 0
        assert seed_doc["host_syncs_per_real_step"] == pytest.approx(
            hybrid["hybrid"]["host_syncs"] / hybrid["curve"][-1][1])
        assert 0 < seed_doc["host_syncs_per_real_step"] <= 1
        for key in ("predict_cost_vs_full_no_check", "predict_cost_vs_full_with_check"):
            assert seed_doc[key] is None or (math.isfinite(seed_doc[key]) and seed_doc[key] > 0)
        assert seed_doc["peak_memory_overhead_pct"] == pytest.approx(
            100 * (hybrid["peak_traced_bytes"] / max(base["peak_traced_bytes"], 1) - 1))
        assert base["peak_traced_bytes"] > 0 and hybrid["peak_traced_bytes"] > 0
        predicted = sum(n for k, n in hybrid["steps_by_kind"].items() if k.startswith("predict"))
        assert hybrid["curve"][-1][1] == steps - predicted
        assert seed_doc["predicted_fraction"] == pytest.approx(predicted / steps)
        assert sum(hybrid["steps_by_kind"].values()) == steps == sum(base["steps_by_kind"].values())
        for first, last in hybrid["predict_spans"]:
            assert 0 <= first <= last < steps
    # The summary is the median and min–max of the per-seed figures.
    assert {f"{field}_{kind}" for field in ("final_val", "val_at_baseline_wall") for kind in CURVES} <= set(
        doc["summary"])
    for key, spread in doc["summary"].items():
        field = next((f for f in ("final_val", "val_at_baseline_wall") if key.startswith(f + "_")), None)
        if field is not None:
            values = [s[field][key.removeprefix(field + "_")] for s in doc["per_seed"]]
        else:
            values = [s[key] for s in doc["per_seed"]]
        values = [v for v in values if v is not None and math.isfinite(v)]
        assert spread["n"] == len(values)
        if values:
            assert spread["median"] == pytest.approx(statistics.median(values))
            assert (spread["min"], spread["max"]) == (min(values), max(values))
            assert all(math.isfinite(spread[k]) for k in ("median", "min", "max"))
    for key in ("overhead_idle_pct", "overhead_active_pct", "total_wall_vs_native", "host_syncs_per_real_step"):
        assert doc["summary"][key]["n"] == seeds
    # Targets: exactly this pair's rows of the one table, judged on their statistic over seeds, printed.
    mine = [t for t in TARGETS if (t.task, t.backend) == (task, backend)]
    assert [(t["metric"], t["bound"], t["direction"], t["statistic"]) for t in doc["targets"]] == [
        (t.metric, t.bound, t.direction, t.statistic) for t in mine]
    for t in doc["targets"]:
        spread = doc["summary"][t["metric"]]
        assert (t["median"], t["min"], t["max"], t["n"]) == (spread["median"], spread["min"], spread["max"],
                                                             spread["n"])
        value = t[t["statistic"]]
        expect = value is not None and (value <= t["bound"] if t["direction"] == "<=" else
                                        value >= t["bound"] and t["n"] == seeds)
        assert isinstance(t["met"], bool) and t["met"] == expect
        assert f"{format_target(t)}: {'met' if t['met'] else 'NOT met'}" in text
    assert png.stat().st_size > 10_000


def test_every_target_names_a_task_backend_and_summary_figure():
    speedups = {f"speedup_{unit}_vs_{peer}" for unit in ("wall", "backward") for peer in PEERS}
    for t in TARGETS:
        assert t.backend in TASKS[t.task].backends
        assert t.direction in ("<=", ">=") and t.statistic in ("median", "min") and t.bound > 0
        if t.direction == "<=":
            assert t.metric in ("overhead_idle_pct", "overhead_active_pct", "readout_cost_pct", "total_wall_vs_native")
        else:
            assert t.metric in speedups
        if t.metric == "speedup_wall_vs_schedulefree":  # only where there is a Schedule-Free peer
            assert TASKS[t.task].has_schedulefree(t.backend) and t.informative
    rows = {(t.task, t.backend, t.metric, t.direction, t.bound, t.statistic, t.informative) for t in TARGETS}
    assert rows >= {
        ("lm-stdlib", "torch", "overhead_idle_pct", "<=", 3.0, "median", False),
        ("lm-stdlib", "torch", "total_wall_vs_native", "<=", 1.03, "median", False),
        ("lm-stdlib", "torch", "readout_cost_pct", "<=", 1.0, "median", False),
        ("lm-finetune", "torch", "speedup_wall_vs_baseline", ">=", 1.3, "median", False),
        ("digits-mlp", "numpy", "overhead_idle_pct", "<=", 30.0, "median", False),
        ("jax-mlp", "jax", "overhead_idle_pct", "<=", 60.0, "median", False)}
    for task, backend in (("lm-stdlib", "torch"), ("digits-mlp", "numpy"), ("digits-mlp", "torch")):
        assert rows >= {(task, backend, "speedup_wall_vs_baseline", ">=", 1.4, "median", False),
                        (task, backend, "speedup_wall_vs_tuned", ">=", 1.0, "median", False),
                        (task, backend, "speedup_wall_vs_baseline", ">=", 0.97, "min", False),
                        (task, backend, "speedup_wall_vs_tuned", ">=", 1.05, "median", True)}
    assert {(t.task, t.backend) for t in TARGETS if t.metric == "speedup_wall_vs_schedulefree"} == {
        ("lm-stdlib", "torch"), ("digits-mlp", "torch"), ("lm-finetune", "torch")}


def _spread(median, lo, hi, n):
    return {"median": median, "min": lo, "max": hi, "n": n}


def test_targets_are_judged_in_their_direction_on_their_statistic():
    at_least = Target("t", "b", "speedup_wall_vs_baseline", 1.4, "", ">=")
    assert judge(at_least, _spread(1.5, 1.2, 1.6, 3), seeds=3)
    assert judge(at_least, _spread(1.4, 1.4, 1.4, 1), seeds=1)  # at the bound
    assert not judge(at_least, _spread(1.39, 1.2, 2.0, 3), seeds=3)
    assert not judge(at_least, _spread(1.5, 1.5, 1.5, 2), seeds=3)  # one seed never reached the target
    assert not judge(at_least, _spread(None, None, None, 0), seeds=3)
    worst = Target("t", "b", "speedup_wall_vs_baseline", 0.97, "", ">=", "min")
    assert judge(worst, _spread(1.5, 0.98, 2.0, 3), seeds=3)
    assert not judge(worst, _spread(1.5, 0.96, 2.0, 3), seeds=3)  # the median is fine, one seed is not
    at_most = Target("t", "b", "overhead_idle_pct", 3.0, "")
    assert at_most.direction == "<=" and at_most.statistic == "median"
    assert judge(at_most, _spread(2.9, 1.0, 9.0, 2), seeds=3) and not judge(at_most, _spread(3.1, 0.0, 3.1, 3))
    # The rows of a task as the document stores them.
    names = {"speedup_wall_vs_baseline": _spread(1.5, 0.96, 1.7, 2),
             "speedup_wall_vs_tuned": _spread(1.02, 1.0, 1.04, 2), "overhead_idle_pct": _spread(25.0, 20.0, 31.0, 2)}
    rows = evaluate_targets("digits-mlp", "numpy", names, seeds=2)
    met = {(r["metric"], r["statistic"], r["bound"]): r["met"] for r in rows}
    assert met == {("overhead_idle_pct", "median", 30.0): True, ("speedup_wall_vs_baseline", "median", 1.4): True,
                   ("speedup_wall_vs_tuned", "median", 1.0): True, ("speedup_wall_vs_baseline", "min", 0.97): False,
                   ("speedup_wall_vs_tuned", "median", 1.05): False}
    texts = {format_target(r) for r in rows}
    assert "target speedup_wall_vs_baseline (min over seeds) >= 0.97 (digits-mlp/numpy)" in texts
    assert "informative speedup_wall_vs_tuned >= 1.05 (digits-mlp/numpy)" in texts
    assert "target overhead_idle_pct <= 30 (digits-mlp/numpy)" in texts


def _synthetic(kind, lr, rows, lawa=None, raw=None):
    """A run whose curve is ``rows`` of (wall, validation loss), evaluations every 10 steps."""
    def curve(pairs):
        return [[wall, 10 * i, 10 * i, val] for i, (wall, val) in enumerate(pairs)]

    run = RunResult(0, kind, lr, curve=curve(rows))
    run.curves = {name: curve(c) for name, c in (("lawa", lawa), ("raw", raw)) if c is not None}
    return run


def test_sweep_with_its_cost_and_every_peer_from_synthetic_runs():
    runs = [
        _synthetic("baseline", 1.0, [(0, 2.0), (1.0, 1.5), (2.0, 1.0)], lawa=[(0, 2.0), (1.1, 1.4), (2.2, 0.95)]),
        _synthetic("tuned", 0.5, [(0, 2.0), (1.5, 1.8), (3.0, 1.6)], lawa=[(0, 2.0), (1.6, 1.7), (3.2, 1.5)]),
        # The chosen rate: lowest final loss, reaches the target (1.0) at 2.5 s of its 5 s.
        _synthetic("tuned", 2.0, [(0, 2.0), (2.5, 0.9), (5.0, 0.7)], lawa=[(0, 2.0), (2.6, 1.2), (5.2, 0.8)]),
        _synthetic("tuned", 4.0, [(0, 2.0), (0.7, 1.2), (1.4, 1.1)], lawa=[(0, 2.0), (0.8, 0.6), (2.4, 0.5)]),
        _synthetic("schedulefree", 0.0025, [(0, 2.0), (0.6, 1.1), (1.2, 0.99)]),
        _synthetic("schedulefree", 0.005, [(0, 2.0), (0.6, 1.3), (1.2, 1.2)]),
        _synthetic("hybrid", 1.0, [(0, 2.0), (0.5, 1.0), (1.0, 0.8)], raw=[(0, 2.0), (0.5, 1.1), (1.0, 0.9)]),
    ]
    doc = summarize(runs, "digits-mlp", "numpy", 20, "test")
    seed = doc["per_seed"][0]
    assert seed["target_val"] == 1.0 and seed["tuned_lr"] == 2.0
    assert seed["tuned_lawa_lr"] == 4.0 and seed["schedulefree_lr"] == 0.0025
    # The sweep user trains all four rates: the three others whole (2.0 + 3.0 + 1.4 s), the chosen one
    # to the target (2.5 s).
    assert seed["time_to_target_s"]["sweep_with_cost"] == pytest.approx(2.5 + 2.0 + 3.0 + 1.4)
    assert seed["backward_to_target"]["sweep_with_cost"] == 10 + 3 * 20
    assert seed["time_to_target_s"] == pytest.approx({
        "baseline": 2.0, "tuned": 2.5, "tuned_lawa": 0.8, "schedulefree": 1.2, "hybrid": 0.5, "hybrid_raw": 1.0,
        "sweep_with_cost": 8.9})
    assert seed["final_val"] == {"baseline": 1.0, "tuned": 0.7, "tuned_lawa": 0.5, "schedulefree": 0.99,
                                 "hybrid": 0.8, "hybrid_raw": 0.9}
    for peer, seconds in (("baseline", 2.0), ("tuned", 2.5), ("tuned_lawa", 0.8), ("schedulefree", 1.2),
                          ("sweep_with_cost", 8.9)):
        assert seed[f"speedup_wall_vs_{peer}"] == pytest.approx(seconds / 0.5)
        assert doc["summary"][f"speedup_wall_vs_{peer}"]["median"] == pytest.approx(seconds / 0.5)
    assert seed["val_at_baseline_wall"]["tuned_lawa"] == 0.6  # last LAWA evaluation within 2.0 s
    assert doc["summary"]["final_val_hybrid_raw"]["median"] == 0.9
    assert doc["summary"]["hybrid_lr_multiplier"]["n"] == 0  # not reported by this (synthetic) trainer
    # Without the peers (`--no-peers`) their figures are absent, not made up.
    plain = [r for r in runs if r.kind != "schedulefree"]
    for r in plain:
        r.curves.pop("lawa", None)
    seed = summarize(plain, "digits-mlp", "numpy", 20, "test")["per_seed"][0]
    assert seed["speedup_wall_vs_tuned_lawa"] is None and seed["speedup_wall_vs_schedulefree"] is None
    assert seed["speedup_wall_vs_sweep_with_cost"] == pytest.approx(8.9 / 0.5)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_lawa_keeps_the_last_five_snapshots_as_copies(backend):
    if not available(backend):
        pytest.skip(f"{backend} is not installed")
    no_grad, to_float = contextlib.nullcontext, float
    if backend == "numpy":
        def make(v):
            return np.full(3, v, dtype=np.float32)
    elif backend == "torch":
        import torch

        no_grad = torch.no_grad

        def make(v):
            return torch.full((3,), float(v), requires_grad=True)
    else:
        import jax.numpy as jnp

        def make(v):
            return jnp.full(3, v, dtype=jnp.float32)
    lawa = Lawa()
    assert lawa.average() is None
    live = [make(0.0), make(0.0)]
    for v in range(1, 8):
        live = [make(v), make(10 * v)]
        lawa.snapshot(live)
        expect = sum(range(max(1, v - 4), v + 1)) / min(v, 5)
        mean = lawa.average()
        assert [to_float(m[0]) for m in mean] == pytest.approx([expect, 10 * expect])
    assert [to_float(s[0][0]) for s in lawa.snapshots()] == [3, 4, 5, 6, 7]
    if backend != "jax":  # a snapshot is a copy: a later in-place update of the live arrays leaves it alone
        with no_grad():
            live[0][0] = 100.0
        assert to_float(lawa.snapshots()[-1][0][0]) == 7


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_the_lawa_curve_is_the_mean_of_the_last_snapshots(backend):
    """A native run's LAWA curve against a hand computation: the same run stepped by hand, its parameters
    copied after every 10th step, the mean of the last five put into a fresh run's weights and validated."""
    if not available(backend):
        pytest.skip(f"{backend} is not installed")
    task, steps = TASKS["digits-mlp"], 70
    run = _runner._native(task.native_setup(backend, 0, task.lr), "baseline", 0, task.lr, steps, 10, lawa=True)
    run.advance(steps)
    lawa = run.result.curves["lawa"]
    by_hand = task.native_setup(backend, 0, task.lr)
    copy = (lambda p: p.copy()) if backend == "numpy" else (lambda p: p.detach().clone())
    snapshots, expected = [], [by_hand.validate()]
    for i in range(steps):
        by_hand.step(by_hand.batch(i))
        if (i + 1) % 10 == 0:
            snapshots.append([copy(p) for p in by_hand.parameters()])
            last = snapshots[-5:]
            mean = [sum(ps[1:], ps[0]) / len(last) for ps in zip(*last)]
            fresh = task.native_setup(backend, 0, task.lr)
            for p, m in zip(fresh.parameters(), mean):  # in place: the fresh run validates its own arrays
                if backend == "numpy":
                    np.copyto(p, m)
                else:
                    import torch

                    with torch.no_grad():
                        p.copy_(m)
            expected.append(fresh.validate())
    assert [row[2] for row in lawa] == list(range(0, steps + 1, 10))
    assert [row[3] for row in lawa] == pytest.approx(expected, rel=1e-5)
    raw = [row[3] for row in run.result.curve]
    assert raw[:2] == pytest.approx([row[3] for row in lawa[:2]], rel=1e-6)  # step 0: raw; step 10: one snapshot
    assert all(abs(a - b) > 1e-4 for a, b in zip(raw[2:], [row[3] for row in lawa[2:]]))
    # The live weights were put back after each LAWA validation: the run trained as the hand one did.
    assert raw[-1] == pytest.approx(by_hand.validate(), rel=1e-6)


@pytest.mark.parametrize("task,backend", CASES)
def test_the_schedulefree_peer_runs_on_the_torch_tasks_only(task, backend):
    kinds = [(kind, lr) for kind, lr in run_plan(TASKS[task], backend)]
    free = [lr for kind, lr in kinds if kind == "schedulefree"]
    if (task, backend) in SCHEDULEFREE:
        assert free == [SCHEDULEFREE_LR * f for f in FACTORS]
    else:
        assert free == []
    assert [k for k, _ in kinds if k != "schedulefree"] == ["baseline", "tuned", "tuned", "tuned", "hybrid"]
    assert not any(k == "schedulefree" for k, _ in run_plan(TASKS[task], backend, peers=False))


@pytest.mark.skipif(not schedulefree_available() or not available("torch"), reason="needs torch and schedulefree")
def test_a_schedulefree_run_validates_in_eval_mode_and_trains_on():
    task = TASKS["digits-mlp"]
    run = task.schedulefree_setup("torch", 0, SCHEDULEFREE_LR)
    assert run.parameters is None and run.validate_at is None  # no LAWA on top of its own averaging
    start = run.validate()
    for i in range(30):
        run.step(run.batch(i))  # raises if validate() left the optimizer in eval mode
        if i % 10 == 9:
            assert run.validate() == run.validate()
    assert run.validate() < start
    with pytest.raises(ConfigError):
        task.schedulefree_setup("numpy", 0, SCHEDULEFREE_LR)


@pytest.mark.skipif(not available("torch"), reason="torch is not installed")
def test_torch_digits_native_and_hybrid_train_the_same_network():
    """The nn.Sequential of the native loop carries the reference MLP's weights (transposed into nn.Linear),
    and the hybrid run wraps the same network: same initial validation loss as the NumPy MLP, and the same
    trajectory as the native loop while the trainer takes only real steps."""
    task = TASKS["digits-mlp"]
    for seed in (0, 1):
        native = task.native_setup("torch", seed, task.lr)
        hybrid = task.setup("torch", seed, task.lr)
        reference = task.native_setup("numpy", seed, task.lr)
        assert hybrid.validate() == native.validate()
        assert native.validate() == pytest.approx(reference.validate(), rel=1e-5)
    # No learning-rate recommendation: the trainer then changes nothing of the real steps.
    config = active_config(HybridConfig(warmup_steps=5, min_full_steps=5, lr_recommend=False))
    trainer = HybridTrainer(hybrid.model, hybrid.optimizer, config)
    for i in range(40):
        native.step(native.batch(i))
        reference.step(reference.batch(i))
        trainer.step(hybrid.batch(i))
    trainer.flush()
    assert trainer.metrics.summary()["steps_per_phase"]["predict"] == 0
    assert hybrid.validate() == pytest.approx(native.validate(), rel=1e-6)
    assert native.validate() == pytest.approx(reference.validate(), rel=1e-4)
    assert native.validate() < 0.8 * task.native_setup("torch", 1, task.lr).validate()  # it trained


def test_time_to_target_is_the_first_evaluation_at_or_below_target():
    curve = [[0, 0, 0, 2.0], [1.0, 10, 10, 1.0], [2.0, 20, 20, 0.5], [3.0, 30, 30, 0.7]]
    run = RunResult(0, "hybrid", 0.1, curve=curve)
    assert time_to_target(run, 0.7) == (2.0, 20)
    assert time_to_target(run, 0.4) is None


def test_the_hybrid_run_uses_the_chosen_dynamics_model(tmp_path, monkeypatch):
    from hybrid_core import HybridTrainer
    from hybrid_core.dynamics import RSSMDynamics, TrendDynamics

    seen = []
    original = HybridTrainer.__init__

    def spy(self, model, optimizer, config=None, dynamics=None):
        original(self, model, optimizer, config, dynamics)
        seen.append(type(self.dynamics))

    monkeypatch.setattr(HybridTrainer, "__init__", spy)
    short = HybridConfig(warmup_steps=10, min_full_steps=10, max_predict_steps=10, horizon_arms=(0, 5, 10))
    monkeypatch.setitem(TASKS, "digits-mlp", dataclasses.replace(TASKS["digits-mlp"], config=short))
    for name, cls in ((None, TrendDynamics), ("rssm", RSSMDynamics), ("trend", TrendDynamics)):
        seen.clear()
        out = tmp_path / f"{name}.json"
        args = ["bench", "--task", "digits-mlp", "--backend", "numpy", "--seeds", "1", "--steps", "30", "--quiet",
                *([] if name is None else ["--dynamics", name]), "--out", str(out)]
        assert main(args) == 0
        assert json.loads(out.read_text())["dynamics"] == (name or "trend")
        assert seen and set(seen) == {cls}  # the timed run, the overhead probe and the traced run


def test_the_hybrid_run_is_validated_on_its_read_out_and_on_its_raw_weights(monkeypatch):
    """The main curve is evaluated inside ``trainer.evaluation_parameters()``, the raw curve outside it."""
    entered = []

    @contextlib.contextmanager
    def zeroed(self, kind=None):  # a stand-in read-out: all-zero weights, the raw ones restored after
        entered.append(self.steps_done)
        raw = self.model.parameters()
        self.model.set_parameters([p * 0 for p in raw])
        try:
            yield "zeros"
        finally:
            self.model.set_parameters(raw)

    monkeypatch.setattr(HybridTrainer, "evaluation_parameters", zeroed)
    task = TASKS["digits-mlp"]
    run = _runner._hybrid(task.setup("numpy", 0, task.lr), 0, task.lr, 30, 10, HybridConfig(warmup_steps=10))
    run.advance(30)
    curve, raw = run.result.curve, run.result.curves["raw"]
    assert len(entered) == len(curve) == len(raw) == 4
    assert curve[0][3] == pytest.approx(math.log(10))  # zero weights: uniform logits over the 10 classes
    assert all(row[3] == curve[0][3] for row in curve)
    assert raw[0][3] != curve[0][3] and raw[-1][3] < raw[0][3]  # the raw weights trained
