"""The conformance plugin: built-in cases pass, a broken third-party case fails naming its contract."""

import os
import subprocess
import sys
import textwrap

import pytest

from hybrid_core import ConfigError
from hybrid_core.conformance import ConformanceCase, builtin_cases, load_cases

BROKEN = textwrap.dedent('''
    import numpy as np
    from hybrid_core.conformance import ConformanceCase
    from hybrid_core.models import MLP
    from hybrid_core.optim import Adam


    class WrongSign(MLP):
        def loss_and_grad(self, batch):
            loss, grads = super().loss_and_grad(batch)
            return loss, [-g for g in grads]


    def batches(seed):
        rng = np.random.default_rng(seed)
        while True:
            y = rng.integers(0, 3, size=16)
            yield rng.normal(size=(16, 5)) + y[:, None], y


    def make_case():
        return ConformanceCase("wrong-sign", lambda s: WrongSign([5, 6, 3], seed=s, dtype=np.float64),
                               lambda m: Adam(m, lr=0.01), batches)
''')


def _pytest(*args, env_path=None):
    env = dict(os.environ)
    if env_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(env_path), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "hybrid_core.conformance", "-q",
                           "-p", "no:cacheprovider", *args], capture_output=True, text=True, env=env, cwd="/")


def test_builtin_cases_pass():
    run = _pytest()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "passed" in run.stdout and "skipped" in run.stdout  # cupy: no GPU here


def test_broken_gradient_fails_naming_the_gradient_contract(tmp_path):
    (tmp_path / "broken_case.py").write_text(BROKEN)
    run = _pytest("--hybrid-case", "broken_case:make_case", "-k", "finite_differences", env_path=tmp_path)
    assert run.returncode == 1, run.stdout[-3000:]
    assert "contract 'loss_and_grad agrees with a finite-difference directional derivative'" in run.stdout


def test_builtin_cases_cover_every_backend():
    names = [c.name for c in builtin_cases()]
    assert names == [f"reference-mlp-{b}" for b in ("numpy", "array_api_strict", "torch", "jax", "cupy")] + [
        "torch-adapter", "jax-adapter", "equinox-module", "nnx-module", "optax-chain-schedule"]
    assert all(isinstance(c, ConformanceCase) for c in builtin_cases())


def test_load_cases_rejects_bad_specs():
    with pytest.raises(ConfigError, match="MODULE:FACTORY"):
        load_cases("no_colon")
    with pytest.raises(ConfigError, match="cannot load"):
        load_cases("no_such_module_xyz:make")
    with pytest.raises(ConfigError, match="ConformanceCase"):
        load_cases("builtins:list")  # returns no case


def test_cli_conformance_command(tmp_path):
    (tmp_path / "broken_case.py").write_text(BROKEN)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "hybrid_core.apps.cli", "conformance", "broken_case:make_case"],
                         capture_output=True, text=True, env=env, cwd="/")
    assert run.returncode == 1 and "finite-difference" in run.stdout


EXAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "custom_model_conformance"


def _example(spec):
    env = dict(os.environ, PYTHONPATH=str(EXAMPLE))
    return subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "hybrid_core.conformance", "--hybrid-case",
                           spec, "-q", "-p", "no:cacheprovider"], capture_output=True, text=True, env=env,
                          cwd=EXAMPLE)


def test_third_party_example_passes_with_one_command():
    run = _example("cases:make_cases")
    assert run.returncode == 0, run.stdout[-3000:]
    assert "numpy-linear" in run.stdout or "passed" in run.stdout


def test_third_party_broken_gradient_is_named():
    run = _example("cases:broken_case")
    assert run.returncode == 1
    assert "contract 'loss_and_grad agrees with a finite-difference directional derivative'" in run.stdout
