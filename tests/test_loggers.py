"""Step loggers (CSV, JSON Lines, TensorBoard) and the learning rate and gradient norm of StepResult and records."""

import csv
import json
import math
import sys

import numpy as np
import pytest

from hybrid_core import ConfigError, HybridConfig, HybridTrainer
from hybrid_core._loggers import FIELDS, PHASE_CODES
from hybrid_core.apps.data import split_digits
from hybrid_core.callbacks import CSVLogger, JSONLLogger, TensorBoardLogger, ValidationLogger
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

SPLIT = split_digits(seed=0)
# Short phases so a few hundred steps hold every phase (the README's settings).
CONFIG = dict(warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10)


def _trainer(**overrides):
    model = MLP([64, 16, 10], dtype=np.float64, seed=0)
    return HybridTrainer(model, Adam(model, lr=3e-3), HybridConfig(**{**CONFIG, **overrides}))


def _batch(step):
    idx = np.random.default_rng(step).choice(len(SPLIT.y_train), size=32, replace=False)
    return SPLIT.x_train[idx], SPLIT.y_train[idx]


def _jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_jsonl_and_csv_loggers_write_every_record_once_as_the_collector_keeps_it(tmp_path):
    trainer = _trainer()
    jl, cl = JSONLLogger(tmp_path / "run.jsonl"), CSVLogger(tmp_path / "run.csv")
    trainer.fit(_batch, 300, progress=False, callbacks=[jl, cl])
    trainer.metrics.to_jsonl(tmp_path / "all.jsonl")
    rows = _jsonl(tmp_path / "run.jsonl")
    assert rows == _jsonl(tmp_path / "all.jsonl")  # the records of the last read included (on_fit_end)
    assert [r["step"] for r in rows] == list(range(300))
    assert {r["phase"] for r in rows} == {"warmup", "full", "predict", "correct"}
    assert all(r["wall_seconds"] is not None and r["wall_seconds"] > 0 for r in rows)
    with open(tmp_path / "run.csv", newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == FIELDS and len(table) == 301
    for row, rec in zip(table[1:], rows):
        cells = dict(zip(FIELDS, row))
        assert int(cells["step"]) == rec["step"] and cells["phase"] == rec["phase"]
        assert (cells["loss"] == "") == (rec["loss"] is None)
        if rec["loss"] is not None:
            assert float(cells["loss"]) == rec["loss"]  # repr round-trips exactly
        assert (cells["grad_norm"] == "") == (rec["grad_norm"] is None)


def test_records_and_step_results_carry_the_learning_rate_and_the_measured_gradient_norm():
    trainer = _trainer(lr_recommend=False, warmup_steps=10**6, read_every=4)
    twin = MLP([64, 16, 10], dtype=np.float64, seed=0)
    measured = 0
    for step in range(40):
        before = [np.array(p, copy=True) for p in trainer.model.parameters()]
        result = trainer.step(_batch(step))
        if result.grad_norm is None:
            assert step % 4 != 3 and result.loss is None and result.lr is None
            continue
        measured += 1
        twin.set_parameters(before)
        _, grads = twin.loss_and_grad(_batch(step))
        assert result.grad_norm == pytest.approx(math.sqrt(sum(float(np.sum(g * g)) for g in grads)), rel=1e-9)
        assert result.lr == 3e-3 and result.loss is not None
    assert measured == 10  # every read_every-th step, nothing else
    trainer.flush()
    records = trainer.metrics.records
    assert all(r.lr == 3e-3 for r in records)
    assert [r.step for r in records if r.grad_norm is not None] == list(range(3, 40, 4))


def test_a_resumed_run_keeps_earlier_rows_and_rewrites_those_past_the_checkpoint(tmp_path):
    first = _trainer(metrics_max_records=64)  # the checkpoint holds the records of steps 56-119 only
    logs = [JSONLLogger(tmp_path / "run.jsonl"), CSVLogger(tmp_path / "run.csv")]
    first.fit(_batch, 120, progress=False, callbacks=logs)
    first.save(tmp_path / "at120.ckpt")
    # Then "killed" at 150, after its rows were written; other batches, so those rows differ from the rerun's.
    first.fit(lambda step: _batch(step + 10**6), 30, progress=False, callbacks=logs)
    with open(tmp_path / "run.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 150, "pha')  # a row torn by the kill
    assert (tmp_path / "run.jsonl").read_text().count("\n") == 150
    resumed = _trainer(metrics_max_records=64)
    resumed.restore(tmp_path / "at120.ckpt")
    resumed.fit(_batch, 80, progress=False,
                callbacks=[JSONLLogger(tmp_path / "run.jsonl"), CSVLogger(tmp_path / "run.csv")])
    rows = _jsonl(tmp_path / "run.jsonl")
    assert [r["step"] for r in rows] == list(range(200))
    assert len(resumed.metrics.records) == 64  # the rows of steps before 136 came from the file
    with open(tmp_path / "run.csv", newline="", encoding="utf-8") as f:
        assert [int(r[0]) for r in list(csv.reader(f))[1:]] == list(range(200))
    uninterrupted = _trainer()
    uninterrupted.fit(_batch, 200, progress=False, callbacks=[JSONLLogger(tmp_path / "straight.jsonl")])
    straight = _jsonl(tmp_path / "straight.jsonl")
    assert [(r["step"], r["phase"], r["loss"]) for r in rows] == [(r["step"], r["phase"], r["loss"]) for r in straight]


@pytest.mark.parametrize("kind", [JSONLLogger, CSVLogger])
def test_rows_a_kill_left_unwritten_before_the_checkpoint_come_from_the_restored_records(kind, tmp_path):
    path = tmp_path / "run.log"
    first = _trainer()
    first.fit(_batch, 120, progress=False, callbacks=[kind(path)])
    first.save(tmp_path / "at120.ckpt")
    lines = path.read_text().splitlines(keepends=True)
    head = 1 if kind is CSVLogger else 0
    # Killed right after the save: rows from step 112 on not written yet, the row of 111 torn.
    path.write_text("".join(lines[:head + 111]) + lines[head + 111][:20])
    resumed = _trainer()
    resumed.restore(tmp_path / "at120.ckpt")
    resumed.fit(_batch, 30, progress=False, callbacks=[kind(path)])
    rows = path.read_text().splitlines(keepends=True)
    assert len(rows) == head + 150 and rows[:head + 120] == lines
    steps = [json.loads(r)["step"] for r in rows] if kind is JSONLLogger else [int(r.split(",")[0]) for r in rows[1:]]
    assert steps == list(range(150))


def test_a_logger_follows_a_trainer_that_went_back(tmp_path):
    log = JSONLLogger(tmp_path / "run.jsonl")
    _trainer().fit(_batch, 50, progress=False, callbacks=[log])
    _trainer().fit(_batch, 30, progress=False, callbacks=[log])  # a new run from step 0 with the same logger
    assert [r["step"] for r in _jsonl(tmp_path / "run.jsonl")] == list(range(30))


def test_a_logger_at_step_zero_starts_a_fresh_file(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"step": 7, "phase": "full"}\n' * 3)
    _trainer().fit(_batch, 10, progress=False, callbacks=[JSONLLogger(path)])
    assert [r["step"] for r in _jsonl(path)] == list(range(10))


def test_bad_logger_paths_are_refused_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        JSONLLogger(tmp_path / "missing" / "run.jsonl")
    with pytest.raises(ConfigError, match="is a directory"):
        CSVLogger(tmp_path)
    other = tmp_path / "other.csv"
    other.write_text("epoch,accuracy\n1,0.5\n")
    with pytest.raises(ConfigError, match="other columns"):
        CSVLogger(other)
    assert other.read_text() == "epoch,accuracy\n1,0.5\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        TensorBoardLogger(tmp_path / "file")


def test_tensorboard_logger_needs_tensorboardx_and_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ConfigError, match=r"hybrid-predict-trainer\[tensorboard\]"):
        TensorBoardLogger(tmp_path / "tb")


def _scalars(logdir):
    pytest.importorskip("tensorboardX")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_file_is_written_and_read_back_with_tensorboard(tmp_path):
    pytest.importorskip("tensorboardX")
    trainer = _trainer()
    val = ValidationLogger(lambda: float(trainer.model.loss((SPLIT.x_val, SPLIT.y_val))), every=50)
    jl = JSONLLogger(tmp_path / "run.jsonl")
    trainer.fit(_batch, 200, progress=False, callbacks=[val, jl, TensorBoardLogger(tmp_path / "tb", validation=val)])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    scalars = _scalars(tmp_path / "tb")
    rows = _jsonl(tmp_path / "run.jsonl")
    losses = [(r["step"] + 1, r["loss"]) for r in rows if r["loss"] is not None]
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in losses]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [v for _, v in losses], rtol=1e-6)
    assert [(s, int(v)) for s, v in scalars["train/phase"]] == [(r["step"] + 1, PHASE_CODES[r["phase"]]) for r in rows]
    assert [s for s, _ in scalars["train/grad_norm"]] == [r["step"] + 1 for r in rows if r["grad_norm"] is not None]
    assert [s for s, _ in scalars["validation/value"]] == [50, 100, 150, 200]
    np.testing.assert_allclose([v for _, v in scalars["validation/value"]], [r["value"] for r in val.records],
                               rtol=1e-6)


def test_tensorboard_resume_purges_the_points_past_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboardX")
    first = _trainer()
    first.fit(_batch, 60, progress=False, callbacks=[TensorBoardLogger(tmp_path / "tb")])
    first.save(tmp_path / "at60.ckpt")
    first.fit(_batch, 30, progress=False, callbacks=[TensorBoardLogger(tmp_path / "tb")])  # killed at 90
    resumed = _trainer()
    resumed.restore(tmp_path / "at60.ckpt")
    resumed.fit(_batch, 40, progress=False, callbacks=[TensorBoardLogger(tmp_path / "tb")])
    steps = [s for s, _ in _scalars(tmp_path / "tb")["train/phase"]]
    assert steps == list(range(1, 101))
