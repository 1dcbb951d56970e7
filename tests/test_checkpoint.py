"""Checkpoints: bit-exact resume across processes, crash safety, hostile files."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from _namespaces import available

from hybrid_core import CheckpointError, CheckpointPolicy, HybridConfig, HybridTrainer
from hybrid_core._codec import FORMAT_VERSION, MAGIC, encode, read_file, write_atomic
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

HERE = Path(__file__).parent
CHILD = str(HERE / "_resume_child.py")


def _child(*args):
    run = subprocess.run([sys.executable, CHILD, *args], capture_output=True, text=True, cwd=HERE)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("backend", ["numpy", *(pytest.param(b, marks=pytest.mark.skipif(
    not available("torch"), reason="torch is not installed")) for b in ("torch", "torch-module"))])
def test_resume_in_a_new_process_is_bit_exact(backend, tmp_path):
    path = str(tmp_path / "run.ckpt")
    straight = _child("straight", backend, path, "100", "100")
    first = _child("first", backend, path, "100", "100")
    second = _child("second", backend, path, "100", "100")
    assert straight["records"][:100] == first["records"]
    assert second["records"] == straight["records"]  # the loaded metrics carry the first 100 records
    assert second["params"] == straight["params"]
    phases = {r[1] for r in straight["records"]}
    assert {"warmup", "full", "predict", "correct"} <= phases, phases


def _trainer(seed=0):
    model = MLP([6, 5, 3], dtype=np.float64, seed=seed)
    cfg = HybridConfig(warmup_steps=5, min_full_steps=5, correct_steps=3, confidence_threshold=0.0)
    trainer = HybridTrainer(model, Adam(model, lr=0.01), cfg)
    rng = np.random.default_rng(0)
    for _ in range(30):
        trainer.step((rng.normal(size=(8, 6)), rng.integers(0, 3, size=8)))
    return trainer, model


def _snapshot(trainer, model):
    return ([p.copy() for p in model.parameters()], trainer.state.step, trainer.metrics.summary()["steps"],
            trainer.optimizer.state_dict()["step"])


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a[0], b[0])) and a[1:] == b[1:]


def _header(version=FORMAT_VERSION, length=None, payload=b"", magic=MAGIC, digest=None):
    import hashlib

    digest = hashlib.sha256(payload).digest() if digest is None else digest
    return struct.pack(">8sHQ32s", magic, version, len(payload) if length is None else length, digest) + payload


def _hostile_files(tmp_path, good: bytes):
    evil_pickle = b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR."
    crafted = {
        "truncated": good[: len(good) // 2],
        "flipped": good[:100] + bytes([good[100] ^ 0x01]) + good[101:],
        "wrong_magic": b"NOTHYBRD" + good[8:],
        "newer_version": _header(version=FORMAT_VERSION + 1, payload=good[50:]),
        "huge_length": _header(length=50 * 2**30, payload=b"\x00" * 16),
        "msgpack_bomb": _header(payload=b"\xdb\xff\xff\xff\xf0" + b"x" * 16),  # str32 claiming ~4 GiB
        "pickle_payload": _header(payload=evil_pickle),
        "ext_bomb": _header(payload=msgpack.packb(msgpack.ExtType(1, msgpack.packb(
            ["float64", [2**40, 2**40], b"", "numpy"])))),
        "empty": b"",
    }
    return crafted


def test_hostile_files_raise_and_leave_the_live_trainer_alone(tmp_path):
    trainer, model = _trainer()
    good_path = tmp_path / "good.ckpt"
    trainer.save(good_path)
    good = good_path.read_bytes()
    before = _snapshot(trainer, model)
    for name, data in _hostile_files(tmp_path, good).items():
        bad = tmp_path / f"{name}.ckpt"
        bad.write_bytes(data)
        with pytest.raises(CheckpointError):
            HybridTrainer.load(bad, model, trainer.optimizer)
        assert _same(before, _snapshot(trainer, model)), name
    assert not (tmp_path / "pwned").exists()
    # and the good file still loads
    restored = HybridTrainer.load(good_path, model, trainer.optimizer)
    assert restored.state.step == trainer.state.step


def test_size_limit_and_foreign_model(tmp_path):
    trainer, model = _trainer()
    path = tmp_path / "t.ckpt"
    trainer.save(path)
    with pytest.raises(CheckpointError, match="exceeds the limit"):
        HybridTrainer.load(path, model, trainer.optimizer, max_bytes=100)
    other = MLP([6, 7, 3], dtype=np.float64)
    with pytest.raises(CheckpointError, match="parameter 0"):
        HybridTrainer.load(path, other, Adam(other, lr=0.01))  # the run's rate: only the model differs


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "live.ckpt"
    script = f"""
import sys, numpy as np
from hybrid_core._codec import encode, write_atomic
big = {{"weights": np.random.default_rng(0).normal(size=(3_000_000,)), "step": 0}}
write_atomic({str(path)!r}, encode(big, lambda v: None))
print("ready", flush=True)
i = 0
while True:
    i += 1
    big["step"] = i
    write_atomic({str(path)!r}, encode(big, lambda v: None))
"""
    for delay in (0.05, 0.2, 0.45):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        state = read_file(path)
        assert state["weights"].shape == (3_000_000,)


def test_write_atomic_round_trip_and_no_pickle(tmp_path):
    path = tmp_path / "x.ckpt"
    obj = {"a": np.arange(5, dtype=np.int32), "big": 2**100, "nested": [1.5, None, "s", {"k": True}]}
    write_atomic(path, encode(obj, lambda v: None))
    back = read_file(path)
    assert back["big"] == 2**100 and back["nested"] == [1.5, None, "s", {"k": True}]
    assert back["a"].dtype == np.int32 and back["a"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(CheckpointError):
        encode({"f": object()}, lambda v: None)
    with pytest.raises(CheckpointError):
        encode({"f": np.array(["text"])}, lambda v: None)


def test_auto_checkpoints_keep_the_newest_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    data = [(rng.normal(size=(8, 6)), rng.integers(0, 3, size=8)) for _ in range(100)]
    policy = CheckpointPolicy(tmp_path / "ckpts", every=10, keep=2, run_id="digits")
    trainer, _ = _trainer()
    assert trainer.steps_done == 30
    trainer.fit(lambda i: data[i % 100], 25, progress=False, checkpoint=policy)  # steps 30..54
    assert trainer.run_id == "digits"
    files = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert files == ["step-000000040-digits.ckpt", "step-000000050-digits.ckpt"]
    newest = tmp_path / "ckpts" / files[-1]
    newest.write_bytes(newest.read_bytes()[:-10])  # damage the newest: resume falls back to the older one
    fresh_model = MLP([6, 5, 3], dtype=np.float64, seed=5)
    fresh = HybridTrainer(fresh_model, Adam(fresh_model, lr=0.01), trainer.config)
    fresh.fit(lambda i: data[i % 100], 0, progress=False, checkpoint=policy)  # a new process: the run named
    assert fresh.state.step == 40 and fresh.run_id == "digits"


def test_a_refused_component_state_puts_the_earlier_ones_back(tmp_path):
    trainer, model = _trainer()
    path = tmp_path / "t.ckpt"
    trainer.save(path)
    for _ in range(3):  # move on so the saved optimizer state differs from the live one
        trainer.step((np.ones((8, 6)), np.zeros(8, dtype=np.int64)))
    live_opt = trainer.optimizer.state_dict()

    class Refusing:
        def observe(self, features, outcome): ...
        def predict(self, features, horizon): ...
        def confidence(self):
            return 0.0
        def state_dict(self):
            return {}
        def load_state_dict(self, state):
            raise CheckpointError("refused")

    Refusing.__name__ = "TrendDynamics"  # the default's name passes the type check, then it refuses its state
    with pytest.raises(CheckpointError, match="refused"):
        HybridTrainer.load(path, model, trainer.optimizer, dynamics=Refusing())
    assert trainer.optimizer.state_dict()["step"] == live_opt["step"]
    for a, b in zip(trainer.optimizer.state_dict()["exp_avg"], live_opt["exp_avg"]):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_from_before_the_parts_redesign_is_refused_naming_its_format(tmp_path):
    trainer, model = _trainer()
    old = {"library_version": "0.1.0", "config": trainer.config.to_dict(), "params": list(model.parameters()),
           "model_state": None, "optimizer": trainer.optimizer.state_dict(), "state": trainer.state.state_dict()}
    path = tmp_path / "old.ckpt"
    write_atomic(path, encode(old, lambda v: None))
    before = _snapshot(trainer, model)
    with pytest.raises(CheckpointError, match=r"trainer-state format 1 .*reads format 2") as info:
        HybridTrainer.load(path, model, trainer.optimizer)
    assert "0.1.0" in info.value.message and info.value.recovery
    assert _same(before, _snapshot(trainer, model))


def test_load_without_dynamics_takes_the_saved_library_model(tmp_path):
    from hybrid_core.dynamics import RSSMDynamics, TrendDynamics

    x = np.random.default_rng(0).normal(size=(16, 6))
    batch = (x, (x[:, 0] > 0).astype(np.int64))
    for cls in (RSSMDynamics, TrendDynamics):
        model = MLP([6, 5, 3], dtype=np.float64, seed=0)
        trainer = HybridTrainer(model, Adam(model, lr=0.01), HybridConfig(), cls(seed=0) if cls is RSSMDynamics
                                else cls())
        for _ in range(12):
            trainer.step(batch)
        trainer.save(tmp_path / "d.ckpt")
        model2 = MLP([6, 5, 3], dtype=np.float64, seed=1)
        loaded = HybridTrainer.load(tmp_path / "d.ckpt", model2, Adam(model2, lr=0.01))
        assert type(loaded.dynamics) is cls
        assert loaded.dynamics.state_dict().keys() == trainer.dynamics.state_dict().keys()
