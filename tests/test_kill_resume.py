"""A run killed at step 350 of `fit(max_steps=600, checkpoint=...)` and run again ends as if never killed.

Each case runs `tests/_kill_child.py` three times in fresh processes: uninterrupted; with a SIGKILL right after
step 350's callbacks (the last checkpoint is step 300's, so the validation and step logs hold rows past it); and
the same command again, which resumes and finishes. Predicted steps (PREDICT/CORRECT cycles, failed checks and
their rollbacks) happen before and after the kill point.
"""

import json
import pathlib
import signal
import subprocess
import sys

import pytest

CHILD = pathlib.Path(__file__).with_name("_kill_child.py")


def run(backend, mode, workdir, kill_at):
    workdir.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, str(CHILD), backend, mode, str(workdir), str(kill_at)],
                          capture_output=True, text=True, timeout=300, check=False)
    return done


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def kill_and_rerun(backend, mode, tmp_path):
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = run(backend, mode, straight_dir, 0)
    assert straight.returncode == 0, straight.stderr
    first = run(backend, mode, killed_dir, 350)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert not (killed_dir / "result.json").exists()
    saved = sorted(p.name for p in (killed_dir / "ckpts").iterdir())
    assert saved[-1] == "step-000000300-r.ckpt", saved
    assert [r["step"] for r in rows(killed_dir / "val.jsonl")][-2:] == [325, 350]  # past the checkpoint
    assert rows(killed_dir / "run.jsonl")[-1]["step"] > 300
    again = run(backend, mode, killed_dir, 350)  # the same command
    assert again.returncode == 0, again.stderr
    expected = f"hybrid_core: resumed from step 300 (file {killed_dir / 'ckpts' / 'step-000000300-r.ckpt'})"
    assert expected in again.stderr.splitlines(), again.stderr
    a = json.loads((straight_dir / "result.json").read_text())
    b = json.loads((killed_dir / "result.json").read_text())
    return a, b, straight_dir, killed_dir


def same_rows(straight_dir, killed_dir, name, drop):
    a, b = rows(straight_dir / name), rows(killed_dir / name)
    return [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_killed_at_350_and_rerun_ends_at_600_bit_identical(backend, tmp_path):
    if backend == "torch":
        pytest.importorskip("torch")
    a, b, straight_dir, killed_dir = kill_and_rerun(backend, "plain", tmp_path)
    assert a["steps_done"] == b["steps_done"] == 600
    assert a["params"] == b["params"]  # bit for bit
    assert a["steps_per_phase"]["predict"] > 0 and a["steps_per_phase"]["correct"] > 0
    assert a["steps_per_phase"] == b["steps_per_phase"]
    assert (b["epochs"], b["epoch_batches"]) == (a["epochs"], a["epoch_batches"]) == (27, 6)  # 22 batches a pass
    assert b["events"]["resumed"] == 1
    if backend == "torch":
        assert a["last_epoch"] == b["last_epoch"] == 600  # OneCycleLR stepped by every step, to its end
    val = rows(killed_dir / "val.jsonl")
    assert [r["step"] for r in val] == list(range(25, 601, 25))  # every row once
    assert same_rows(straight_dir, killed_dir, "val.jsonl", drop=("seconds",))
    steps = [r["step"] for r in rows(killed_dir / "run.jsonl")]
    assert steps == list(range(600))
    assert same_rows(straight_dir, killed_dir, "run.jsonl", drop=("wall_seconds",))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_early_stopping_stops_at_the_same_step_after_a_kill(backend, tmp_path):
    if backend == "torch":
        pytest.importorskip("torch")
    a, b, straight_dir, killed_dir = kill_and_rerun(backend, "stop", tmp_path)
    assert a["best_step"] <= 300 < 350 < a["stopped"] < 600  # its patience runs across the kill
    assert (b["stopped"], b["best_step"], b["steps_done"]) == (a["stopped"], a["best_step"], a["steps_done"])
    assert a["params"] == b["params"]  # the best weights, put back from the saved copy
    assert same_rows(straight_dir, killed_dir, "val.jsonl", drop=("seconds",))
