"""PyTorch Lightning: `HybridLightningModule` under `Trainer.fit` — phases, logging, checkpoints, refusals."""

import csv
import dataclasses
import math
import os
import signal
import socket
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="the Lightning integration needs torch (pip install '.[lightning]')")
pl = pytest.importorskip("lightning.pytorch", reason="the Lightning integration needs lightning "
                         "(pip install '.[lightning]')")

from _lightning_net import CONFIG, STEPS, Net, comparable, loader  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from hybrid_core import CheckpointError, ConfigError, Phase  # noqa: E402
from hybrid_core.adapters.lightning import CHECKPOINT_KEY, PHASE_CODES  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _trainer(**kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    # max_epochs: a guard, should the step count stop advancing (25 batches per epoch)
    return pl.Trainer(max_steps=kw.pop("max_steps", STEPS), max_epochs=20, accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def _weights(module):
    return [p.detach().clone() for p in module.parameters()]


def _logged(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fit_visits_every_phase_logs_them_and_resumes_bit_exactly_from_lightnings_checkpoint(tmp_path):
    net = Net()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=100, save_top_k=-1)
    trainer = _trainer(logger=CSVLogger(tmp_path), callbacks=[ckpt], enable_checkpointing=True, log_every_n_steps=1)
    trainer.fit(net, loader())
    summary = net.hybrid.summary()
    phases = summary["steps_per_phase"]
    assert trainer.global_step == STEPS == sum(phases.values())
    assert all(phases[p.value] > 0 for p in Phase), phases
    assert summary["backward_passes"] == STEPS - phases["predict"]

    rows = _logged(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    logged = [float(r["hybrid/phase"]) for r in rows if r["hybrid/phase"]]
    assert sorted(set(logged)) == sorted(PHASE_CODES.values())
    assert logged.count(PHASE_CODES[Phase.PREDICT]) == phases["predict"]
    skipped = [float(r["hybrid/backward_skipped"]) for r in rows if r["hybrid/backward_skipped"]]
    assert skipped[-1] == phases["predict"] and skipped == sorted(skipped)
    losses = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    assert len(losses) > STEPS // 10 and all(math.isfinite(v) for v in losses)

    saved = torch.load(tmp_path / "ckpt" / "epoch=3-step=100.ckpt", weights_only=False)
    assert isinstance(saved[CHECKPOINT_KEY], bytes)
    at_100 = [float(r["hybrid/phase"]) for r in rows if r["hybrid/phase"] and int(r["step"]) == 100]
    assert at_100 == [PHASE_CODES[Phase.PREDICT]]  # the checkpoint is taken in the middle of a prediction cycle

    resumed = Net()
    again = _trainer()
    again.fit(resumed, loader(), ckpt_path=tmp_path / "ckpt" / "epoch=3-step=100.ckpt")
    assert again.global_step == STEPS
    assert all(torch.equal(a, b) for a, b in zip(_weights(net), _weights(resumed), strict=True))
    assert comparable(resumed.hybrid.summary()) == comparable(summary)
    assert resumed.hybrid.optimizer.lr == net.hybrid.optimizer.lr


def test_a_checkpoint_whose_hybrid_state_is_corrupted_is_refused(tmp_path):
    net = Net(steps=60)
    trainer = _trainer(max_steps=60, callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=50)],
                       enable_checkpointing=True)
    trainer.fit(net, loader())
    path = tmp_path / "epoch=1-step=50.ckpt"
    saved = torch.load(path, weights_only=False)
    blob = bytearray(saved[CHECKPOINT_KEY])
    blob[len(blob) // 2] ^= 0xFF
    saved[CHECKPOINT_KEY] = bytes(blob)
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match=r"checksum|corrupt"):
        _trainer(max_steps=60).fit(Net(steps=60), loader(), ckpt_path=path)


class _TwoOptimizers(Net):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


class _EpochScheduler(Net):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 5)}  # interval="epoch"


@pytest.mark.parametrize(("module", "options", "message"), [
    (_TwoOptimizers, {}, "2 optimizers"),
    (_EpochScheduler, {}, "interval='epoch'"),
])
def test_what_the_trainer_cannot_drive_is_refused_before_the_first_step(module, options, message):
    net = module()
    before = _weights(net)
    with pytest.raises(ConfigError, match=message):
        _trainer(max_steps=5, **options).fit(net, loader())
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(net), strict=True))


def test_bf16_mixed_precision_trains_under_lightnings_autocast():
    net = Net(steps=40)
    before = _weights(net)
    _trainer(max_steps=40, precision="bf16-mixed").fit(net, loader())
    assert net.hybrid.steps_done == 40
    after = _weights(net)
    assert all(p.dtype == torch.float32 for p in after)  # mixed: the weights stay float32
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    losses = [r.loss for r in net.hybrid.metrics.records if r.loss is not None]
    assert losses and all(math.isfinite(v) for v in losses)


def test_hybrid_config_must_be_a_config():
    with pytest.raises(ConfigError, match="HybridConfig"):
        Net(hybrid_config={"warmup_steps": 3})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_keeps_the_ranks_identical_and_resumes_bit_exactly(tmp_path):
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "GLOO_SOCKET_IFNAME": "lo"}
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_lightning_ddp_child.py"), str(tmp_path)], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # Lightning's second rank is in the same session
        proc.communicate()
        pytest.fail("the DDP run did not finish within 150 s")
    assert proc.returncode == 0, output.decode()[-3000:]
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert [first["world"], second["world"], first["world_seen"], second["world_seen"]] == [2, 2, 2, 2]
    phases = first["summary"]["steps_per_phase"]
    assert sum(phases.values()) == STEPS and all(phases[p.value] > 0 for p in Phase)
    assert first["summary"] == second["summary"]
    assert all(torch.equal(a, b) for a, b in zip(first["weights"], second["weights"], strict=True))
    for rank in (first, second):
        assert rank["steps"] == STEPS and rank["resumed_summary"] == rank["summary"]
        assert all(torch.equal(a, b) for a, b in zip(rank["weights"], rank["resumed_weights"], strict=True))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.integers(1, 60), read_every=st.integers(1, 9))
def test_every_hybrid_step_is_one_lightning_step_and_max_steps_is_the_total(steps, read_every):
    config = dataclasses.replace(CONFIG, read_every=read_every)
    net = Net(steps=steps, hybrid_config=config)
    trainer = _trainer(max_steps=steps)
    trainer.fit(net, loader())
    assert trainer.global_step == net.hybrid.steps_done == steps
    assert sum(net.hybrid.summary()["steps_per_phase"].values()) == steps  # every step read by the end
