"""Data-parallel JAX: one process over 2 host devices (single-controller sharding) and 2 processes on
127.0.0.1 (``jax.distributed``, gloo). Every run is a child process (JAX's device count and its
distributed runtime are fixed when it starts): tests/_jax_dist_child.py and tests/_jax_coll_child.py."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("jax", "optax")),
                                reason="jax/optax are not installed")
STEPS = 500


def _env(devices: int | None) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("HYBRID_KERNELS", None)
    env.pop("JAX_ENABLE_X64", None)
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process(tmp: Path, name: str, *args: str, devices: int = 2, timeout: float = 300) -> dict:
    out = tmp / f"{name}.json"
    run = subprocess.run([sys.executable, str(HERE / "_jax_dist_child.py"), str(out), *args],
                         capture_output=True, text=True, cwd=HERE, env=_env(devices), timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def _processes(tmp: Path, script: str, args_of, timeout: float,
               wait_for: tuple[int, ...] = (0, 1)) -> tuple[list[int | None], list[str], float]:
    """Start 2 processes of ``script`` (``args_of(rank, port)``), wait at most ``timeout`` s for those of
    ``wait_for``, kill what is left. Their return codes (None: still running when waiting ended), their
    outputs, and the seconds taken."""
    port = _free_port()
    logs = [open(tmp / f"{script}-{r}.log", "w+") for r in range(2)]
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(HERE / script), *args_of(r, port)], stdout=logs[r],
                              stderr=subprocess.STDOUT, cwd=HERE, env=_env(None)) for r in range(2)]
    codes: list[int | None] = []
    try:
        for r, p in enumerate(procs):
            try:
                left = max(1.0, timeout - (time.monotonic() - start)) if r in wait_for else 0.1
                codes.append(p.wait(timeout=left))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for f in logs:
        f.seek(0)
        texts.append(f.read())
        f.close()
    return codes, texts, time.monotonic() - start


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory) -> dict:
    """One process, 2 host devices: 500 steps (checkpoint at 250), then resumed from that checkpoint."""
    tmp = tmp_path_factory.mktemp("two_devices")
    return _one_process(tmp, "two", str(STEPS), str(tmp / "ckpt"))


def _assert_every_mechanism_ran(run: dict) -> None:
    phases = Counter(phase for _, phase, _ in run["log"])
    assert len(run["log"]) == STEPS
    assert phases["predict"] >= 30 and phases["correct"] >= 10 and phases["full"] >= 100, phases
    events = run["events"]
    assert events["predict_phases"] >= 5 and events["checks"] >= 5, events
    assert events["rollbacks"] >= 1, events  # a check failed and the prediction was undone


def _assert_replicated(params: dict, copies: int) -> None:
    assert all(params["replicated"]), params["sharding"]
    assert all("PartitionSpec()" in s or "spec=P()" in s for s in params["sharding"]), params["sharding"]
    for digests in params["digests"]:  # every device holds the same bits
        assert len(digests) == copies and len(set(digests)) == 1, digests


@pytest.mark.slow
def test_two_host_devices_match_one_device_and_resume_bit_exact(two_devices, tmp_path):
    one = _one_process(tmp_path, "one", str(STEPS), str(tmp_path / "ckpt"), "--devices", "1", "--no-resume")
    two = two_devices
    assert (one["devices"], two["devices"]) == (1, 2)
    _assert_every_mechanism_ran(two)
    # The same decisions at every step: the loss over a batch split in two differs from one device's in its
    # last bits (the mean is summed in another order; measured: up to 2.4e-7 on losses near 0.1-2), which
    # does not change any decision here.
    assert two["log"] == one["log"]
    assert two["events"] == one["events"]
    np.testing.assert_allclose(np.array(two["losses"], dtype=float), np.array(one["losses"], dtype=float),
                               rtol=1e-5, atol=1e-6)
    for a, b in zip(two["params"]["values"], one["params"]["values"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    _assert_replicated(two["params"], 2)
    # Resumed from the checkpoint taken at step 250: the same log and bit-identical weights, still replicated.
    assert two["resumed_log"] == two["log"]
    assert two["resumed_params"]["digests"] == two["params"]["digests"]
    assert two["resumed_params"]["sharding"] == two["params"]["sharding"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[list[dict], Path]:
    """2 processes of 1 device: 500 steps (checkpoint at 250), then both resumed from that checkpoint."""
    tmp = tmp_path_factory.mktemp("two_processes")
    ckpt = tmp / "ckpt"
    codes, logs, _ = _processes(tmp, "_jax_dist_child.py", lambda r, port: [
        str(tmp / f"rank{r}.json"), str(STEPS), str(ckpt), "--process", str(r), "--processes", "2",
        "--port", str(port)], timeout=300)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)], ckpt


@pytest.mark.slow
def test_two_processes_decide_together_end_bit_identical_and_resume_bit_exact(two_devices, two_processes):
    runs, _ = two_processes
    for r, run in enumerate(runs):
        assert (run["world_size"], run["collective"]) == (2, f"JaxCollective(rank={r}, world_size=2)")
        assert run["collective_calls"] > 50  # every read went through the collective
        _assert_replicated(run["params"], 1)
    _assert_every_mechanism_ran(runs[0])
    assert runs[0]["log"] == runs[1]["log"]
    assert runs[0]["losses"] == runs[1]["losses"]
    assert runs[0]["params"]["digests"] == runs[1]["params"]["digests"]
    # Resumed (both processes) from the checkpoint rank 0 wrote at step 250: bit-identical to the uninterrupted run.
    for run in runs:
        assert run["resumed_log"] == run["log"]
        assert run["resumed_params"]["digests"] == run["params"]["digests"]
        _assert_replicated(run["resumed_params"], 1)  # loaded back replicated on the mesh over both processes
    # Two processes of one device each compute what one process of two devices does, bit for bit.
    assert runs[0]["log"] == two_devices["log"]
    assert [d[0] for d in two_devices["params"]["digests"]] == [d[0] for d in runs[0]["params"]["digests"]]


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_resumes_in_one_process_of_two_devices(two_processes, tmp_path):
    runs, ckpt = two_processes
    resumed = _one_process(tmp_path, "from-two-processes", str(STEPS), str(ckpt), "--load", str(ckpt))
    assert (resumed["world_size"], resumed["devices"], resumed["loaded_at"]) == (1, 2, STEPS // 2)
    assert resumed["log"] == runs[0]["log"]
    assert [d[0] for d in resumed["params"]["digests"]] == [d[0] for d in runs[0]["params"]["digests"]]
    _assert_replicated(resumed["params"], 2)


@pytest.mark.slow
def test_a_process_that_dies_is_a_backend_error_naming_it_on_the_survivor(tmp_path):
    codes, logs, seconds = _processes(tmp_path, "_jax_dist_child.py", lambda r, port: [
        str(tmp_path / f"rank{r}.json"), "400", str(tmp_path / "ckpt"), "--process", str(r), "--processes", "2",
        "--port", str(port), "--die-at", "120"], timeout=120)
    dead, survivor = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (1, 0))
    assert codes[1] == 7, logs[1][-2000:]
    error = survivor.get("error")
    assert error is not None, logs[0][-3000:]
    assert error["type"] == "BackendError"
    assert "rank 0 of 2" in error["message"] and "rank 1" in error["message"], error
    assert "restart every rank from the last checkpoint" in error["recovery"]
    assert 120 <= error["step"] <= 125
    assert error["at"] - dead["died_at"] < 30  # the transport sees the closed connection at once
    # Then JAX's coordination service ends the survivor (heartbeat timeout 10 s in the child): no hang.
    assert codes[0] is not None, f"the survivor still ran after {seconds:.0f} s"


@pytest.mark.slow
def test_a_process_that_hangs_makes_jax_end_the_survivor_within_the_heartbeat_timeout(tmp_path):
    # A process that stops answering (SIGSTOP: alive, silent) while the survivor waits inside the step's own
    # all-reduce: no Python code runs on the survivor until that returns, so no BackendError can be raised.
    # What bounds it is JAX's coordination service: after heartbeat_timeout_seconds (10 s in the child)
    # without heartbeats it aborts the survivor (SIGABRT), instead of a silent hang.
    codes, logs, _ = _processes(tmp_path, "_jax_dist_child.py", lambda r, port: [
        str(tmp_path / f"rank{r}.json"), "400", str(tmp_path / "ckpt"), "--process", str(r), "--processes", "2",
        "--port", str(port), "--die-at", "120", "--hang", "--timeout", "300"], timeout=120, wait_for=(0,))
    ended = time.time()
    stopped = json.loads((tmp_path / "rank1.json").read_text())["died_at"]
    assert codes[0] is not None, "the survivor still waited at the deadline"
    assert codes[0] != 0 and not (tmp_path / "rank0.json").exists()  # ended by JAX, not by finishing
    assert "detected fatal errors" in logs[0] or "heartbeat" in logs[0], logs[0][-3000:]
    assert ended - stopped < 100


@pytest.mark.slow
def test_jax_collective_contract_on_two_processes(tmp_path):
    codes, logs, _ = _processes(tmp_path, "_jax_coll_child.py",
                                lambda r, port: [str(tmp_path / f"c{r}.json"), str(r), str(port)], timeout=120)
    # Rank 1 leaves abruptly at the end; JAX's coordination service then aborts rank 0 at its exit (SIGABRT).
    assert codes[1] == 0 and codes[0] is not None, logs[0][-3000:] + logs[1][-3000:]
    found = [json.loads((tmp_path / f"c{r}.json").read_text()) for r in range(2)]
    for r, f in enumerate(found):
        assert f["discovered"] == f"JaxCollective(rank={r}, world_size=2)"  # core discover() builds it
        assert (f["rank"], f["world_size"], f["rows_shape"]) == (r, 2, [2, 8])
        assert f["bits_exact"] and f["bytes_ok"]
        assert f["agreed"] == [0.5, (0.1 + 0.2) / 2]  # the mean in rank order, identical on both ranks
        assert f["desync"].startswith("BackendError: desync check: rank ") and f"rank {1 - r} is at" in f["desync"]
        assert f["replicated_read"] == f["replicated_numpy"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        assert f["split_read"].startswith("BackendError: ") and "split over the devices" in f["split_read"]
        assert all(e.startswith("BackendError: timeout=") for e in f["bad_timeout"]), f["bad_timeout"]
    # Rank 1 came 4 s late: rank 0 gave up after its 1 s timeout, naming rank 1, and refuses from then on.
    assert found[0]["late"].startswith("BackendError: late gather: rank 0 waited 1 s for rank(s) 1")
    assert 0.9 <= found[0]["late_seconds"] < 3.0
    assert "cannot take part in collectives any more" in found[0]["after_timeout"]
    assert found[1]["after_timeout"].startswith("BackendError: next gather: rank 1 waited 1 s for rank(s) 0")
    assert found[0]["dead_peer"].startswith("BackendError: after the peer died: rank 0 of 2 failed in a "
                                            "process_allgather; rank 1 probably died"), found[0]["dead_peer"]
    assert found[0]["dead_peer_seconds"] < 5
    assert 0 < found[0]["gather_seconds"] < 1


def _example(*args: str, devices: int | None) -> str:
    env = _env(devices)
    run = subprocess.run([sys.executable, str(HERE.parent / "examples" / "jax_multidevice.py"), *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def example_runs() -> dict[str, list[str]]:
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["devices", "processes"])
def test_the_multidevice_example_runs_on_two_devices_and_on_two_processes(mode, example_runs):
    args, devices = ((), 2) if mode == "devices" else (("--processes", "2"), None)
    out = _example("--steps", "300", "--timeout", "240", *args, devices=devices)
    lines = [line for line in out.strip().splitlines() if not line.startswith("[Gloo]")]  # gloo's own notice
    assert "parameters replicated: True; identical on all 2 devices: True" in lines, out
    phases = ast.literal_eval(out.split("steps per phase: ", 1)[1].splitlines()[0])
    assert phases["predict"] > 0 and sum(phases.values()) == 300, phases
    assert lines[0] == ("devices: 2 over 1 process(es); collective: SingleProcess()" if mode == "devices" else
                        "devices: 2 over 2 process(es); collective: JaxCollective(rank=0, world_size=2)")
    example_runs[mode] = lines[1:]
    if len(example_runs) == 2:  # the same run either way, down to the validation loss
        assert example_runs["devices"] == example_runs["processes"]


def test_jax_collective_in_one_process_is_rank_0_of_1_and_checks_its_timeout():
    from hybrid_core import BackendError
    from hybrid_core._collective import Collective
    from hybrid_core.adapters.jax import JaxCollective

    coll = JaxCollective(timeout=30)
    assert isinstance(coll, Collective) and (coll.rank, coll.world_size) == (0, 1)
    row = np.array([1 / 3, -0.0, 5e-324, np.inf])
    got = coll.all_gather(row, "one")
    assert got.shape == (1, 4) and np.array_equal(got.view(np.uint64), row.reshape(1, 4).view(np.uint64))
    assert coll.gather_bytes(b"abc", "bytes") == [b"abc"] and coll.gather_bytes(b"", "empty") == [b""]
    assert coll.calls == 5  # one for the row; two for each bytes: their lengths, then the padded bytes
    for bad in (0, -1, float("nan"), float("inf"), True, "5"):
        with pytest.raises(BackendError, match="timeout="):
            JaxCollective(timeout=bad)
