"""Hugging Face Accelerate: the hybrid trainer in a prepared loop — backward, bf16, accumulation, save_state."""

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="the Accelerate integration needs torch (pip install '.[accelerate]')")
accelerate = pytest.importorskip("accelerate", reason="the Accelerate integration needs accelerate "
                                 "(pip install '.[accelerate]')")

from _accelerate_run import CONFIG, SAVE_AT, STEPS, build, mse, run  # noqa: E402

from hybrid_core import CheckpointError, ConfigError, Phase  # noqa: E402
from hybrid_core.adapters.accelerate import HybridState, prepare  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def fresh_state():
    """Accelerate keeps its state in process-wide singletons; each test starts from none."""
    accelerate.state.AcceleratorState._reset_state(True)
    yield
    accelerate.state.AcceleratorState._reset_state(True)


def test_a_run_visits_every_phase_and_resumes_bit_exactly_through_save_state(tmp_path, fresh_state):
    out = run(tmp_path, mixed_precision="bf16", gradient_accumulation_steps=2)
    assert out["world"] == 1
    assert sum(out["phases"].values()) == STEPS and all(out["phases"][p.value] > 0 for p in Phase)
    assert out["resumed_at"] == SAVE_AT
    assert out["resumed_phases"] == out["phases"]
    assert all(torch.equal(a, b) for a, b in zip(out["weights"], out["resumed_weights"], strict=True))
    assert (tmp_path / "state" / "custom_checkpoint_0.pkl").is_file()


def test_bf16_autocast_and_accumulation_match_the_plain_accelerate_loop(fresh_state):
    """One real step with gradient_accumulation_steps=2 moves the weights as accelerate's own loop does over the
    two halves of the batch with ``accelerator.accumulate`` (SGD, so a wrong loss scale shows)."""
    def setup():
        accelerate.state.AcceleratorState._reset_state(True)
        acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        net, opt = acc.prepare(net, opt)
        return acc, net, opt

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)
    acc, net, opt = setup()
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = prepare(acc, net, opt, mse, config=CONFIG, checkpointing=False)
    trainer.step((x, y))
    assert seen == [torch.bfloat16, torch.bfloat16]  # two micro-batches, each under Accelerate's autocast
    mine = [p.detach().clone() for p in net.parameters()]

    acc, net, opt = setup()
    for half in (slice(0, 16), slice(16, 32)):
        with acc.accumulate(net):
            acc.backward(mse(net, (x[half], y[half])))
            opt.step()
            opt.zero_grad()
    plain = [p.detach().clone() for p in net.parameters()]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(mine, plain, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(mine, build_initial(), strict=True))


def build_initial():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return [p.detach() for p in net.parameters()]


def test_fp16_is_refused_and_a_corrupted_state_leaves_the_trainer_as_it_was(tmp_path, fresh_state):
    acc = accelerate.Accelerator(cpu=True)
    net, trainer, loader = build(acc, steps=40)
    for _, batch in zip(range(30), loader):
        trainer.step(batch)
    state = HybridState(trainer).state_dict()
    blob = bytearray(state["hybrid_trainer"])
    blob[len(blob) // 2] ^= 0xFF
    before = [p.detach().clone() for p in net.parameters()]
    steps = trainer.steps_done
    with pytest.raises(CheckpointError):
        HybridState(trainer).load_state_dict({"hybrid_trainer": bytes(blob)})
    with pytest.raises(CheckpointError, match="not bytes"):
        HybridState(trainer).load_state_dict({"hybrid_trainer": "text"})
    assert trainer.steps_done == steps
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))

    accelerate.state.AcceleratorState._reset_state(True)
    fp16 = accelerate.Accelerator(cpu=True)
    fp16.state._mixed_precision = "fp16"  # what Accelerator(mixed_precision="fp16") sets on a GPU
    with pytest.raises(ConfigError, match="fp16"):
        prepare(fp16, net, torch.optim.SGD(net.parameters(), lr=0.1), mse)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_with_two_processes_keeps_the_ranks_identical_and_resumes_bit_exactly(tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate command is not on the PATH")
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    # --multi_gpu picks Accelerate's torchrun launcher (its --cpu launcher starts several processes only through
    # mpirun); the script's Accelerator(cpu=True) then runs on CPU over gloo.
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(_free_port()),
           os.path.join(HERE, "_accelerate_run.py"), str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail("accelerate launch did not finish within 150 s")
    assert proc.returncode == 0, output.decode()[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    first, second = ranks
    assert first["phases"] == second["phases"] and all(first["phases"][p.value] > 0 for p in Phase)
    for out in ranks:
        assert out["resumed_at"] == SAVE_AT and out["resumed_phases"] == out["phases"]
        assert all(torch.equal(a, b) for a, b in zip(out["weights"], out["resumed_weights"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first["weights"], second["weights"], strict=True))


def test_the_gpt2_example_fine_tunes_a_model_built_from_a_config(tmp_path):
    pytest.importorskip("transformers", reason="the example needs transformers (pip install '.[accelerate]')")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "..", "examples", "accelerate_gpt2.py"), "--steps", "24",
                           "--pretrain", "8", "--out", str(tmp_path / "state")], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"held-out English loss: ([\d.]+) after pre-training .*, ([\d.]+) after fine-tuning", proc.stdout)
    assert match, proc.stdout
    before, after = map(float, match.groups())
    assert after < before < 5.6  # ln 256 = 5.55 at chance
    assert "gradient accumulation: 2" in proc.stdout and "mixed precision: bf16" in proc.stdout
    assert (tmp_path / "state" / "custom_checkpoint_0.pkl").is_file()
