"""Kernel selection and the trainer on sharded JAX arrays (2 host CPU devices, in a child process)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hybrid_core import BackendError
from hybrid_core.kernels import select
from hybrid_core.kernels._registry import device_kind

HERE = Path(__file__).parent
needs_jax = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("jax", "optax")),
                               reason="jax/optax are not installed")


class _Device:
    def __init__(self, platform):
        self.platform = platform


class _Sharding:  # what array_api_compat.device gives for an array over several devices: no .platform
    def __init__(self, *platforms):
        self.device_set = {_Device(p) for p in platforms}


def test_the_kind_of_a_sharding_is_the_one_platform_of_its_devices():
    assert device_kind("jax", _Sharding("cpu", "cpu")) == "cpu"
    assert device_kind("jax", _Sharding("gpu", "gpu", "gpu")) == "gpu"
    assert select("fused_stats", "jax", _Sharding("cpu", "cpu"), np.float32).name == "jit"


@pytest.mark.parametrize("device", [_Sharding("cpu", "gpu"), _Sharding(), object(), _Device(None)],
                         ids=["two platforms", "no devices", "opaque", "platform None"])
def test_a_placement_whose_kind_cannot_be_told_is_a_backend_error_with_a_hint(device):
    with pytest.raises(BackendError) as err:
        select("fused_stats", "jax", device, np.float32)
    assert "Sharding" in err.value.recovery


def test_a_torch_device_without_a_type_is_a_backend_error():
    with pytest.raises(BackendError, match="torch device"):
        device_kind("torch", object())


@needs_jax
def test_a_real_single_device_sharding_is_its_devices_kind():
    import jax
    from jax.sharding import SingleDeviceSharding

    assert device_kind("jax", SingleDeviceSharding(jax.devices()[0])) == jax.devices()[0].platform


@needs_jax
@pytest.mark.slow
def test_trainer_and_kernels_run_on_arrays_sharded_over_two_host_devices(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    env.pop("HYBRID_KERNELS", None)
    run = subprocess.run([sys.executable, str(HERE / "_sharded_child.py"), "120", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=HERE, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert found["devices"] == 2
    runs = found["runs"]
    for every in (1, 8):
        one, sharded = runs[f"one-{every}"], runs[f"sharded-{every}"]
        assert all("NamedSharding" in s for s in sharded["params_sharding"]), sharded["params_sharding"]
        assert sharded["log"] == one["log"], f"read_every={every}: the phase logs differ"
        assert {"warmup", "full", "predict", "correct"} <= {r[1] for r in one["log"]}
        # Saved midway and loaded into a fresh trainer: the same weights, still laid out over both devices.
        assert sharded["resumed_same"] and sharded["resumed_sharding"] == sharded["params_sharding"]
    # read_every=1 reads every step through kernels.fused_stats, so selection saw the shardings.
    assert runs["sharded-1"]["selections"]["sharding"] > 100 and runs["sharded-1"]["selections"]["device"] == 0
    for choice, results in found["kernels"].items():
        for got, want in zip(results["sharded"], results["one"]):
            np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float),
                                       rtol=1e-6, atol=1e-6, err_msg=choice)
    assert len(found["mixed"]) == 6
    for message in found["mixed"]:
        assert message.startswith("BackendError: ") and "committed to different devices" in message, message
        assert "jax.device_put" in message, message
