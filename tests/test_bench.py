"""`hybrid-train bench` with a tiny budget: schema, finiteness, consistency of the stored figures."""

import dataclasses
import importlib.util
import itertools
import json
import math
import statistics

import numpy as np
import pytest
from _namespaces import available

from hybrid_core import HybridConfig, HybridTrainer
from hybrid_core.apps.bench import SCHEMA, TARGETS, TASKS, _runner
from hybrid_core.apps.bench._report import time_to_target
from hybrid_core.apps.bench._runner import PROBE_KINDS, RunResult, active_config
from hybrid_core.apps.cli import main

# What each backend's native loop must say it is (the baseline is the framework's own loop).
NATIVE_WORDS = {"torch": ("zero_grad()", ".backward()", "opt.step()", "torch.optim.Adam"),
                "jax": ("jax.jit", "jax.value_and_grad", "optax.apply_updates"),
                "numpy": ("model.loss_and_grad", "optimizer.step", "called directly")}

CASES = [(task, backend) for task in TASKS for backend in TASKS[task].backends]


@pytest.mark.parametrize("task,backend", CASES)
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
                         horizon_arms=(0, 5, 10, 20))
    monkeypatch.setitem(TASKS, task, dataclasses.replace(TASKS[task], config=short))
    monkeypatch.setattr(_runner, "OVERHEAD_BLOCKS", 6)  # every order of the three kinds once; the rest stays fast
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
    for run in doc["runs"]:
        assert run["loop"] == (doc["hybrid_loop"] if run["kind"] == "hybrid" else doc["baseline_loop"])
    assert "baseline loop: " + doc["baseline_loop"] in text
    source = doc["machine"]["source"]  # provenance: the commit measured (None outside a git checkout)
    assert source is None or (len(source["git_commit"]) == 40 and isinstance(source["uncommitted_changes"], bool))
    warm = doc["process_warmup_s"]
    assert warm["steps"] > 0 and warm["native"] > 0 and warm["hybrid"] > 0
    kinds = sorted({r["kind"] for r in doc["runs"]})
    assert kinds == ["baseline", "hybrid", "tuned"]
    assert sorted({r["lr"] for r in doc["runs"] if r["kind"] in ("baseline", "tuned")}) == sorted(
        TASKS[task].lr * f for f in (0.5, 1.0, 2.0, 4.0))
    for run in doc["runs"]:
        curve = run["curve"]
        assert curve[0][2] == 0 and curve[-1][2] == steps
        assert all(math.isfinite(v) for row in curve for v in row)
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(curve))  # time, backward grow
        if run["kind"] != "hybrid":
            assert curve[-1][1] == steps  # every plain step has a backward pass
    for seed_doc in doc["per_seed"]:
        runs = {r["kind"]: r for r in doc["runs"] if r["seed"] == seed_doc["seed"] and r["kind"] != "tuned"}
        base, hybrid = runs["baseline"], runs["hybrid"]
        tuned = min((r for r in doc["runs"] if r["seed"] == seed_doc["seed"] and r["kind"] in ("baseline", "tuned")),
                    key=lambda r: r["final_val"])
        target = seed_doc["target_val"]
        assert target == base["final_val"] == base["curve"][-1][3]
        # The native baseline and the hybrid start from the same weights: same initial validation loss.
        assert hybrid["curve"][0][3] == pytest.approx(base["curve"][0][3], rel=1e-6)
        assert seed_doc["tuned_lr"] == tuned["lr"] and seed_doc["final_val"] == {
            "baseline": base["final_val"], "tuned": tuned["final_val"], "hybrid": hybrid["final_val"]}
        assert seed_doc["final_val"]["tuned"] <= seed_doc["final_val"]["baseline"]
        # Time-to-target is recomputed from the stored curves: the first evaluation at or below the target.
        for kind, run in (("baseline", base), ("tuned", tuned), ("hybrid", hybrid)):
            first = next((row for row in run["curve"] if row[3] <= target), None)
            assert seed_doc["time_to_target_s"][kind] == (None if first is None else first[0])
            assert seed_doc["backward_to_target"][kind] == (None if first is None else first[1])
        # The baseline reaches its own final loss, at the latest at its own final time (earlier only
        # if an earlier evaluation was already as low).
        ttt = seed_doc["time_to_target_s"]
        assert ttt["baseline"] is not None and ttt["baseline"] <= base["curve"][-1][0]
        if all(row[3] > target for row in base["curve"][:-1]):
            assert ttt["baseline"] == base["curve"][-1][0]
            assert seed_doc["backward_to_target"]["baseline"] == steps
        # Ratios recomputed from the stored times and backward counts.
        for unit, stored in (("wall", ttt), ("backward", seed_doc["backward_to_target"])):
            for peer in ("baseline", "tuned"):
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
        end = hybrid["overhead_probe_end"]
        assert end["idle"] == {**end["idle"], "phase": "full", "idle": True, "predicted_steps": 0}
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
    for key, spread in doc["summary"].items():
        if key.startswith(("final_val_", "val_at_baseline_wall_")):
            kind = key.rsplit("_", 1)[1]
            field = "final_val" if key.startswith("final_val_") else "val_at_baseline_wall"
            values = [s[field][kind] for s in doc["per_seed"]]
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
    # Targets: exactly this pair's rows of the one table, judged on the median over seeds, printed.
    mine = [t for t in TARGETS if (t.task, t.backend) == (task, backend)]
    assert [(t["metric"], t["bound"]) for t in doc["targets"]] == [(t.metric, t.bound) for t in mine]
    for t in doc["targets"]:
        spread = doc["summary"][t["metric"]]
        assert (t["median"], t["min"], t["max"], t["n"]) == (spread["median"], spread["min"], spread["max"],
                                                             spread["n"])
        assert isinstance(t["met"], bool) and t["met"] == (t["median"] <= t["bound"])
        assert f"target {t['metric']} <= {t['bound']:g} ({task}/{backend}): {'met' if t['met'] else 'NOT met'}" in text
    assert png.stat().st_size > 10_000


def test_every_target_names_a_task_backend_and_summary_figure():
    for t in TARGETS:
        assert t.backend in TASKS[t.task].backends
        assert t.metric in ("overhead_idle_pct", "overhead_active_pct", "total_wall_vs_native") and t.bound > 0
    assert {(t.task, t.backend, t.metric) for t in TARGETS} >= {
        ("lm-stdlib", "torch", "overhead_idle_pct"), ("lm-stdlib", "torch", "total_wall_vs_native"),
        ("digits-mlp", "numpy", "overhead_idle_pct"), ("jax-mlp", "jax", "overhead_idle_pct")}


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
    trainer = HybridTrainer(hybrid.model, hybrid.optimizer, active_config(HybridConfig(warmup_steps=5,
                                                                                         min_full_steps=5)))
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
    for name, cls in ((None, RSSMDynamics), ("rssm", RSSMDynamics), ("trend", TrendDynamics)):
        seen.clear()
        out = tmp_path / f"{name}.json"
        args = ["bench", "--task", "digits-mlp", "--backend", "numpy", "--seeds", "1", "--steps", "30", "--quiet",
                *([] if name is None else ["--dynamics", name]), "--out", str(out)]
        assert main(args) == 0
        assert json.loads(out.read_text())["dynamics"] == (name or "rssm")
        assert seen and set(seen) == {cls}  # the timed run, the overhead probe and the traced run
