"""`hybrid-train bench` with a tiny budget: schema, finiteness, consistency of the stored figures."""

import itertools
import json
import math

import pytest
from _namespaces import available

from hybrid_core.bench import SCHEMA, TASKS
from hybrid_core.bench._report import time_to_target
from hybrid_core.bench._runner import RunResult
from hybrid_core.cli import main

CASES = [(task, backend) for task in TASKS for backend in TASKS[task].backends]


@pytest.mark.parametrize("task,backend", CASES)
def test_every_task_runs_and_its_json_is_consistent(task, backend, tmp_path, capsys):
    if not available(backend):
        pytest.skip(f"{backend} is not installed")
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    seeds = 2 if backend == "numpy" else 1  # medians over seeds are exercised once; the rest stays fast
    steps = 40 if task == "lm-stdlib" else 120
    args = ["bench", "--task", task, "--backend", backend, "--seeds", str(seeds), "--steps", str(steps), "--quiet",
            "--out", str(out), "--plot", str(png)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "tuned baseline" in text and "speed-up" in text
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA and doc["task"] == task and doc["backend"] == backend
    assert doc["seeds"] == list(range(seeds)) and "hybrid-train bench" in doc["command"]
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
        base = next(r for r in doc["runs"] if r["seed"] == seed_doc["seed"] and r["kind"] == "baseline")
        hybrid = next(r for r in doc["runs"] if r["seed"] == seed_doc["seed"] and r["kind"] == "hybrid")
        assert seed_doc["target_val"] == base["final_val"]
        ttt = seed_doc["time_to_target_s"]
        assert ttt["baseline"] is not None and ttt["baseline"] <= base["curve"][-1][0]
        if ttt["hybrid"] is not None:
            assert seed_doc["speedup_wall_vs_baseline"] == pytest.approx(ttt["baseline"] / ttt["hybrid"])
            assert seed_doc["speedup_wall_vs_tuned"] == pytest.approx(ttt["tuned"] / ttt["hybrid"])
        else:
            assert seed_doc["speedup_wall_vs_baseline"] is None
        assert seed_doc["final_val"]["tuned"] <= seed_doc["final_val"]["baseline"]
        assert hybrid["curve"][-1][1] == steps - sum(
            n for k, n in hybrid["steps_by_kind"].items() if k.startswith("predict"))
        assert math.isfinite(seed_doc["overhead_full_step_pct"])
    assert png.stat().st_size > 10_000


def test_time_to_target_is_the_first_evaluation_at_or_below_target():
    curve = [[0, 0, 0, 2.0], [1.0, 10, 10, 1.0], [2.0, 20, 20, 0.5], [3.0, 30, 30, 0.7]]
    run = RunResult(0, "hybrid", 0.1, curve=curve)
    assert time_to_target(run, 0.7) == (2.0, 20)
    assert time_to_target(run, 0.4) is None
