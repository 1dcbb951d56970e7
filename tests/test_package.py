"""The installed package: public names, module mapping, command line."""

import importlib
import importlib.util
import json
import subprocess
import sys

import pytest

import hybrid_core
from hybrid_core.apps.cli import main

PUBLIC = {
    "HybridTrainer", "HybridConfig", "Phase", "StepResult", "Model", "Optimizer", "DynamicsModel",
    "HybridError", "ConfigError", "DivergenceError", "CheckpointError", "BackendError",
}


def test_public_names_are_exported_and_exist():
    assert PUBLIC <= set(hybrid_core.__all__)
    for name in hybrid_core.__all__:
        assert getattr(hybrid_core, name) is not None
        assert getattr(hybrid_core, name).__doc__ or not callable(getattr(hybrid_core, name)), name
    private = {n for n in dir(hybrid_core) if n[0] not in "_@"} - set(hybrid_core.__all__)  # @: pytest rewrite
    # Only submodules may be public without being listed.
    assert all(importlib.util.find_spec(f"hybrid_core.{n}") for n in private), private


def test_error_hierarchy_and_hints():
    for name in ("ConfigError", "DivergenceError", "CheckpointError", "BackendError", "BatchError", "ModelError"):
        cls = getattr(hybrid_core, name)
        assert issubclass(cls, hybrid_core.HybridError)
        err = cls("boom") if name != "ConfigError" else cls(["boom"])
        assert err.recovery and "recovery:" in str(err)


def test_subpackages_map_into_hybrid_core_only():
    for sub in ("adapters", "kernels", "conformance", "models", "optim", "dynamics", "apps", "apps.data"):
        assert importlib.import_module(f"hybrid_core.{sub}")
    import hybrid_core.adapters.numpy as np_adapter

    assert np_adapter.MLP is hybrid_core.models.MLP
    code = ("import importlib.util, sys; "
            "sys.exit(any(importlib.util.find_spec(m) for m in ('adapters', 'kernels', 'conformance')))")
    assert subprocess.run([sys.executable, "-c", code], cwd="/", check=False).returncode == 0


def test_demo_command_prints_the_runs_the_rate_and_the_comparison(tmp_path, capsys):
    out_json = tmp_path / "demo.json"
    args = ["demo", "--steps", "400", "--quiet", "--json", str(out_json), "--jsonl", str(tmp_path / "s.jsonl")]
    assert main(args) == 0
    out = capsys.readouterr().out
    for word in ("hybrid", "hybrid, raw weights", "plain, same steps", "plain, same backward passes", "warmup",
                 "predict", "correct", "val loss", "backward passes skipped", "learning rate: x", "evaluated weights"):
        assert word in out
    data = json.loads(out_json.read_text())
    hybrid, raw, plain, same_backward = data["rows"]
    assert hybrid["steps"] == 400 and hybrid["steps_per_phase"]["warmup"] > 0
    assert same_backward["steps"] == hybrid["backward_passes"]
    # The rate the hybrid ended with is the recommendation's, shown in the table and the summary line.
    assert hybrid["lr"] > plain["lr"] == 3e-3
    assert hybrid["weights"] in ("raw", "lawa", "ema") and raw["weights"] == "raw"
    # One run at the given rate beats plain training at that rate on these digits.
    assert hybrid["val_loss"] < plain["val_loss"]
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 400


def test_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--backend", "tensorflow"])
    assert "invalid" in capsys.readouterr().err


def test_console_script_runs():
    exe = subprocess.run([sys.executable, "-m", "hybrid_core.apps.cli", "--help"], capture_output=True, text=True)
    assert exe.returncode == 0 and "demo" in exe.stdout
