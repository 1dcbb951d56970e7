"""The core examples run as scripts (in a subprocess, tiny budgets) and print what they promise."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _run(script, *args, cwd):
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_quickstart_numpy(tmp_path):
    out = _run("quickstart_numpy.py", "--steps", "60", cwd=tmp_path)
    assert "steps per phase: {'warmup': 50" in out
    assert "backward passes:" in out and "validation accuracy:" in out
    accuracy = float(out.split("validation accuracy:")[1].split("%")[0])
    assert 20.0 < accuracy <= 100.0  # ten classes: far above chance after 60 steps


@pytest.mark.parametrize("backend", [
    "numpy",
    pytest.param("torch", marks=pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                                   reason="torch is not installed")),
])
def test_fastgrnn_router_on_synthetic_logs(tmp_path, backend):
    out = _run("fastgrnn_router.py", "--backend", backend, "--data", "synthetic", "--windows", "300",
               "--epochs", "2", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert "synthetic: 300 windows of 12 steps x 6 features" in out
    assert "identical predictions on 60 validation windows: yes" in out
    assert "best epoch" in out and "MLP teacher" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "epochs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["epochs"] == 2
    assert (tmp_path / "run" / "router.ckpt").stat().st_size > 0


def test_fastgrnn_router_on_digits(tmp_path):
    out = _run("fastgrnn_router.py", "--data", "digits", "--epochs", "1", "--out", "d", cwd=tmp_path)
    assert "digits: 1797 windows of 8 steps x 8 features" in out
    assert "identical predictions on 359 validation windows: yes" in out
    assert (tmp_path / "d" / "router.ckpt").exists()


def test_fastgrnn_router_compresses_to_int8(tmp_path):
    out = _run("fastgrnn_router.py", "--data", "digits", "--epochs", "2", "--compress", "--out", "d", cwd=tmp_path)
    assert "| int8 sparse |" in out and "| float low-rank |" in out
    assert "identical integer predictions on 359 validation windows: yes" in out
    assert (tmp_path / "d" / "router.fgq").exists() and (tmp_path / "d" / "compression.json").exists()


def test_fastgrnn_router_rejects_bad_flags(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "fastgrnn_router.py"), "--backend", "tensorflow"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
