"""The PyTorch and JAX examples run as scripts (in a subprocess, tiny budgets) and print what they promise."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None or importlib.util.find_spec("optax") is None,
                               reason="jax or optax is not installed")


def _run(script, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _floats(pattern, text):
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return [float(g) for g in match.groups()]


@needs_torch
def test_torch_mlp(tmp_path):
    out = _run("torch_mlp.py", "--steps", "120", cwd=tmp_path)
    assert "steps per phase: {'warmup': 50" in out and "backward passes:" in out
    assert "plain, same backward passes" in out
    hybrid, plain = _floats(r"final validation loss: hybrid ([\d.]+) vs plain ([\d.]+)", out)
    assert 0 < hybrid < 2.0 and 0 < plain < 2.0  # ln 10 = 2.30 at chance


@needs_torch
def test_torch_char_lm(tmp_path):
    out = _run("torch_char_lm.py", "--steps", "60", "--files", "2", "--sample", "20", cwd=tmp_path)
    assert "bytes from 2 standard-library files" in out
    assert "steps per phase: {'warmup': 50" in out
    (val,) = _floats(r"\nvalidation loss: ([\d.]+) nats/byte", out)
    (plain,) = _floats(r"plain Adam, same steps and batches: validation loss ([\d.]+)", out)
    assert 0 < val < 5.0 and 0 < plain < 5.0  # ln 256 = 5.55 at chance
    assert out.split("sample:\n", 1)[1].startswith("def ")


@needs_torch
def test_torch_char_lm_without_comparison(tmp_path):
    out = _run("torch_char_lm.py", "--steps", "3", "--files", "1", "--sample", "0", "--no-compare", cwd=tmp_path)
    assert "plain Adam" not in out and "sample:" not in out
    assert "backward passes: 3 of 3 steps" in out


@needs_jax
def test_jax_mlp(tmp_path):
    out = _run("jax_mlp.py", "--steps", "120", cwd=tmp_path)
    assert "steps per phase: {'warmup': 50" in out and "backward passes:" in out
    hybrid, plain = _floats(r"final validation loss: hybrid ([\d.]+) vs plain ([\d.]+)", out)
    assert 0 < hybrid < 2.0 and 0 < plain < 2.0


@pytest.mark.parametrize("script", ["torch_mlp.py", "torch_char_lm.py", "jax_mlp.py"])
def test_examples_reject_bad_budgets(tmp_path, script):
    library = "jax" if script.startswith("jax") else "torch"
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--steps", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "must be >= 1" in proc.stderr
