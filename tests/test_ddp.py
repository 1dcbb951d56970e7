"""torch ``DistributedDataParallel`` with the trainer: real processes on 127.0.0.1 (gloo), every decision agreed.

The multi-process tests launch ranks as child processes (`_ddp_launch.launch`: a free port, a hard timeout
that kills every child); the ranks write what they saw into files this test compares.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from _ddp_launch import HERE, free_port, launch  # noqa: E402

from hybrid_core import BackendError, BatchError, ConfigError, HybridConfig, HybridTrainer, ModelError  # noqa: E402
from hybrid_core.adapters.torch import TorchCollective, TorchModel, TorchOptimizer  # noqa: E402

CHILD = os.path.join(HERE, "_ddp_child.py")
ROOT = os.path.dirname(HERE)


def _result(out, rank):
    return json.loads((out / f"rank{rank}.json").read_text())


@pytest.fixture
def one_rank_group():
    """A process group of this process alone (gloo, 127.0.0.1), torn down afterwards."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=20))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, x[:, :1] * 2 - 1


# -- fast ---------------------------------------------------------------------------------------------------------


def test_torch_collective_needs_an_initialized_group_and_a_positive_timeout(one_rank_group):
    with pytest.raises(BackendError, match="timeout"):
        TorchCollective(timeout=0)
    coll = TorchCollective(timeout=timedelta(seconds=3))
    assert (coll.rank, coll.world_size, coll.timeout) == (0, 1, 3.0)
    assert coll.all_gather([1.5, 2.0], "x").tolist() == [[1.5, 2.0]]
    assert coll.gather_bytes(b"abc" * 500, "y") == [b"abc" * 500]


def test_payloads_of_any_length_come_back_whole_around_the_first_block(one_rank_group):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    coll = TorchCollective(timeout=10)

    @settings(max_examples=40, deadline=None)
    @given(st.one_of(st.binary(max_size=40), st.binary(min_size=1000, max_size=1100), st.binary(max_size=5000)),
           st.lists(st.floats(allow_nan=False), max_size=300))
    def check(data, values):
        before = coll.calls
        assert coll.gather_bytes(data, "bytes") == [data]
        assert coll.calls - before == (1 if len(data) <= 1024 else 2)  # a second all-gather only past the block
        assert coll.all_gather(values, "row").tolist() == [values]

    check()


def test_torch_collective_without_a_process_group_is_a_backend_error():
    assert not dist.is_initialized()
    with pytest.raises(BackendError, match="not initialized"):
        TorchCollective()


def test_two_processes_gather_agree_and_refuse_uneven_rows_without_aborting(tmp_path):
    codes = launch([os.path.join(HERE, "_dist_child.py"), str(tmp_path)], timeout=90)
    assert codes == [0, 0]
    res = [json.loads((tmp_path / f"coll{r}.json").read_text()) for r in (0, 1)]
    for r in res:
        assert r["found"] == "TorchCollective" and r["world"] == 2  # discover() found the group
        assert r["rows"] == [[0.1, 0.0, 1e-300], [1.1, -1.0, 2e-300]]  # every rank's row, in rank order, exact
        assert r["calls_small"] == 1  # a read is one collective
        assert r["bytes_ok"] == [True, True]  # payloads of 10 and 3000 bytes
        assert r["agreed"] == [1.5, 0.5] and r["flags"] == [True, False]
        assert "different lengths" in r["uneven"] and "rank 1: 200" in r["uneven"]
        assert r["after"] == [[0.0], [1.0]]


def test_ddp_model_runs_forward_only_passes_inside_the_wrapper_and_accumulates_under_no_sync(one_rank_group):
    ddp = torch.nn.parallel.DistributedDataParallel(_mlp())
    seen = []

    def loss_fn(module, batch):
        seen.append(type(module).__name__)
        return torch.nn.functional.mse_loss(module(batch[0]), batch[1])

    syncs = []
    real_no_sync = ddp.no_sync

    def counting_no_sync():
        syncs.append(1)
        return real_no_sync()

    ddp.no_sync = counting_no_sync
    model = TorchModel(ddp, loss_fn, accumulate=4)
    batch = _batch()
    model.loss(batch)
    assert seen == ["Sequential"] * 4 and syncs == []  # forward-only: DDP's reducer never armed
    seen.clear()
    loss, grads = model.loss_and_grad(batch)
    assert seen == ["DistributedDataParallel"] * 4 and len(syncs) == 3  # the last micro-batch all-reduces
    plain = TorchModel(_mlp(), lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    ref_loss, ref_grads = plain.loss_and_grad(batch)
    assert torch.allclose(loss, ref_loss)
    assert all(torch.allclose(g, r) for g, r in zip(grads, ref_grads))


def test_ddp_refuses_layer_freezing(one_rank_group):
    ddp = torch.nn.parallel.DistributedDataParallel(_mlp())
    model = TorchModel(ddp, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    opt = TorchOptimizer(model, torch.optim.SGD(ddp.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="layer freezing") as info:
        HybridTrainer(model, opt, HybridConfig(layer_freeze="autofreeze"))
    assert "layer_freeze='off'" in info.value.recovery
    with pytest.raises(ConfigError):
        model.set_trainable([False, True])


@pytest.mark.parametrize(("message", "error"), [
    ("[gloo/transport/tcp/pair.cc:537] Read error: Connection closed by peer", BackendError),
    ("mat1 and mat2 shapes cannot be multiplied (16x4 and 5x8)", BatchError),
])
def test_a_failed_all_reduce_is_a_backend_error_and_a_bad_batch_stays_a_batch_error(one_rank_group, message, error):
    ddp = torch.nn.parallel.DistributedDataParallel(_mlp())

    def loss_fn(module, batch):
        out = torch.nn.functional.mse_loss(module(batch[0]), batch[1])
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            raise RuntimeError(message)  # what the backward pass's all-reduce raises when a peer is gone
        return out

    model = TorchModel(ddp, loss_fn)
    trainer = HybridTrainer(model, TorchOptimizer(model, torch.optim.SGD(ddp.parameters(), lr=0.1)))
    with pytest.raises(error) as info:
        trainer.step(_batch())
    if error is BackendError:
        assert "DDP gradient all-reduce" in info.value.message
    assert trainer.steps_done == 0


# -- slow: 2 processes, the whole run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The 600-step run of 2 DDP ranks (checkpoint after step 300), and the same run resumed at 300 in 2 new
    processes."""
    full, resumed = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("resumed")
    assert launch([CHILD, "train", str(full), "600", "300", "30"], timeout=240) == [0, 0]
    shutil.copy(full / "ckpt.bin", resumed / "ckpt.bin")
    assert launch([CHILD, "resume", str(resumed), "600", "0", "30"], timeout=240) == [0, 0]
    return full, resumed


@pytest.mark.slow
def test_two_ddp_ranks_on_different_shards_take_every_decision_together_and_end_bit_identical(ddp_runs):
    full, _ = ddp_runs
    r0, r1 = _result(full, 0), _result(full, 1)
    assert "error" not in r0 and "error" not in r1
    assert r0["steps_done"] == r1["steps_done"] == 600 and r0["world_size"] == 2
    assert r0["phases"] == r1["phases"] and len(r0["phases"]) == 600
    assert r0["losses"] == r1["losses"]  # the agreed (mean over ranks) losses
    steps, events = r0["steps_per_phase"], r0["events"]
    assert steps["predict"] > 0 and steps["correct"] > 0 and steps["full"] > 0
    assert events["checks"] > 0 and events["rollbacks"] > 0 and events["line_searches"] > 0
    assert (full / "rank0.params").read_bytes() == (full / "rank1.params").read_bytes()


@pytest.mark.slow
def test_the_ddp_run_resumed_from_its_midway_checkpoint_matches_it_bit_for_bit(ddp_runs):
    full, resumed = ddp_runs
    for rank in (0, 1):
        a, b = _result(full, rank), _result(resumed, rank)
        assert b["start"] == 300 and b["steps_done"] == 600
        assert a["phases"] == b["phases"] and a["losses"] == b["losses"] and a["events"] == b["events"]
        assert (full / f"rank{rank}.params").read_bytes() == (resumed / f"rank{rank}.params").read_bytes()


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_in_one_process_with_rank_0s_random_state(ddp_runs, tmp_path):
    full, _ = ddp_runs
    shutil.copy(full / "ckpt.bin", tmp_path / "ckpt.bin")
    proc = subprocess.run([sys.executable, "-W", "always::UserWarning", CHILD, "single", str(tmp_path), "400", "0"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "written by a run of 2 processes and is resumed by 1" in proc.stderr
    one = _result(tmp_path, 0)
    assert one["world_size"] == 1 and one["start"] == 300 and one["steps_done"] == 400
    assert one["phases"][:300] == _result(full, 0)["phases"][:300]  # the history of the 2-rank run


@pytest.mark.slow
@pytest.mark.parametrize(("at", "collective"), [(-100, "read "), (137, "DDP gradient all-reduce")])
def test_a_killed_rank_is_a_backend_error_naming_the_collective_and_the_rank_at_once(tmp_path, at, collective):
    codes = launch([CHILD, "kill", str(tmp_path), "600", str(at), "5"], timeout=90, wait_for=[0])
    assert codes[0] == 3 and codes[1] == -signal.SIGKILL
    r0 = _result(tmp_path, 0)
    assert r0["error"] == "BackendError", r0.get("message")
    assert r0["message"].startswith(collective) and "rank 1 did not answer" in r0["message"]
    assert "resume from the last checkpoint" in r0["recovery"]
    assert r0["elapsed"] < 5  # a dead peer is seen at once, well inside the 5 s timeout


@pytest.mark.slow
def test_a_stopped_rank_is_a_backend_error_after_the_timeout(tmp_path):
    codes = launch([CHILD, "stop", str(tmp_path), "600", "-100", "4"], timeout=90, wait_for=[0])
    assert codes[0] == 3
    r0 = _result(tmp_path, 0)
    assert r0["error"] == "BackendError", r0.get("message")
    assert r0["message"].startswith("read ") and "rank 1 did not answer within the 4 s timeout" in r0["message"]
    assert 3.5 < r0["elapsed"] < 4 + 10


@pytest.mark.slow
def test_the_ddp_example_runs_under_torchrun(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "examples", "ddp_torch.py"),
           "--steps", "200", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output
    assert "ranks agree: phases identical, parameters bit-identical" in output
    assert (tmp_path / "ddp_torch.ckpt").exists()


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    return env


def test_an_fsdp2_module_is_refused_with_what_does_not_work(one_rank_group):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    net = _mlp()
    fsdp.fully_shard(net)
    with pytest.raises(ModelError, match="FSDP2") as info:
        TorchModel(net, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    assert "_foreach_copy_" in info.value.message and "DistributedDataParallel" in info.value.recovery


@pytest.mark.slow
def test_the_collective_benchmark_runs_and_reports_its_fractions(tmp_path):
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, "-m", "hybrid_core.apps.bench.ddp", "--seeds", "1", "--steps", "6",
                           "--chunk", "3", "--latency-calls", "5", "--timeout", "150", "--out", str(out)],
                          capture_output=True, text=True, timeout=180, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["world_size"] == 2 and "--steps 6" in doc["command"]
    seed = doc["per_seed"][0]
    for arm in ("ddp", "hybrid", "hybrid-real"):
        assert len(seed["chunk_seconds_per_step"][arm]) == 2 and seed["seconds_per_step"][arm] > 0
    for arm in ("hybrid", "hybrid-real"):
        assert seed[arm]["collectives"] >= 1  # every read is agreed: at least the final flush
        assert 0 < seed[arm]["collective_fraction"] < 1
    assert "decision collectives" in proc.stdout
