"""Callbacks with state save it in the trainer's checkpoints and get it back on resume."""

import json

import numpy as np
import pytest

from hybrid_core import CheckpointError, CheckpointPolicy, ConfigError, HybridConfig, HybridTrainer
from hybrid_core._codec import encode, read_file, write_atomic
from hybrid_core._persist import _host
from hybrid_core.callbacks import EarlyStopping, ExponentialLR, JSONLLogger, ValidationLogger
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

CONFIG = HybridConfig(warmup_steps=6, min_full_steps=4, max_predict_steps=6, horizon_arms=(0, 3, 6), check_interval=2,
                      correct_steps=2, confidence_threshold=0.0, horizon_ladder=False, read_every=4,
                      lr_recommend=False)


def batch(i):
    rng = np.random.default_rng(1000 + i)
    x = rng.normal(size=(12, 5))
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)


VAL = batch(-1)


def make(seed=0):
    model = MLP([5, 8, 3], dtype=np.float64, seed=seed)
    return HybridTrainer(model, Adam(model, lr=0.02), CONFIG), model


def params(model):
    return [p.tobytes() for p in model.parameters()]


def callbacks(model, path=None):
    """EarlyStopping (on this task: best at step 65, stops at 80) and a ValidationLogger, on ``model``."""
    return [EarlyStopping(lambda: float(model.loss(VAL)), every=5, patience=3),
            ValidationLogger(lambda: {"loss": float(model.loss(VAL))}, every=5, path=path)]


def rows_of(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_a_resumed_run_stops_where_the_uninterrupted_one_stops_and_logs_each_row_once(tmp_path):
    straight, model = make()
    stopper, logger = callbacks(model)
    straight.fit(batch, max_steps=300, progress=False, callbacks=[stopper, logger])
    assert (stopper.best_step, stopper.stopped_step) == (65, 80)

    policy = CheckpointPolicy(tmp_path / "ckpts", every=10, run_id="stop")
    first, first_model = make()
    path = tmp_path / "val.jsonl"
    first.fit(batch, max_steps=77, progress=False, callbacks=callbacks(first_model, path), checkpoint=policy)
    assert [r["step"] for r in rows_of(path)][-2:] == [70, 75]  # 75: past the last checkpoint (70)
    second, second_model = make(seed=3)  # a new trainer and new callbacks, as in a new process
    stopper2, logger2 = callbacks(second_model, path)
    seen = []  # the file as the first step after the resume leaves it (a kill could come next)
    second.fit(batch, max_steps=71, progress=False, checkpoint=policy,
               callbacks=[stopper2, logger2, lambda t, r: seen.append(rows_of(path)[-1]["step"])])
    assert seen == [70]  # rewritten from the checkpoint's rows at once: 75 dropped
    assert (stopper2.best, stopper2.best_step, stopper2.bad_evaluations) == (stopper.best, 65, 1)
    summary = second.fit(batch, max_steps=300, progress=False, callbacks=[stopper2, logger2], checkpoint=policy)
    assert summary["steps"] == 80 and stopper2.stopped_step == 80 and stopper2.evaluations == stopper.evaluations
    assert params(second_model) == params(model)  # the best weights put back, from the saved copy
    assert without_seconds(rows_of(path)) == without_seconds(logger.records) == without_seconds(logger2.records)
    assert [r["step"] for r in rows_of(path)] == list(range(5, 81, 5))
    seconds = [r["seconds"] for r in rows_of(path)]
    assert seconds == sorted(seconds)  # resumed rows go on from the last saved row's time


def test_a_decay_at_a_checkpoint_step_is_in_that_checkpoint(tmp_path):
    straight, model = make()
    straight.fit(batch, max_steps=40, progress=False, callbacks=[ExponentialLR(0.5, every=10)])
    policy = CheckpointPolicy(tmp_path / "ckpts", every=10, run_id="decay")
    first, _ = make()
    first.fit(batch, max_steps=20, progress=False, callbacks=[ExponentialLR(0.5, every=10)], checkpoint=policy)
    second, second_model = make(seed=3)
    second.fit(batch, max_steps=40, progress=False, callbacks=[ExponentialLR(0.5, every=10)], checkpoint=policy)
    assert second.optimizer.lr == straight.optimizer.lr == 0.02 / 16
    assert params(second_model) == params(model)


def test_keys_class_and_rank_or_explicit():
    trainer, _model = make()
    a, b = EarlyStopping(lambda: 1.0, every=5, patience=2), EarlyStopping(lambda: 2.0, every=5, patience=2)
    named = ValidationLogger(lambda: 1.0, every=5)
    named.key = "val"
    trainer.callback_states.attach([a, ExponentialLR(0.9, every=5), b, named])
    assert trainer.callback_states.attached == {"EarlyStopping#0": a, "EarlyStopping#1": b, "val": named}
    twin = ValidationLogger(lambda: 1.0, every=5)
    twin.key = "val"
    with pytest.raises(ConfigError, match="two callbacks have the key 'val'"):
        trainer.callback_states.attach([named, twin])
    twin.key = 3
    with pytest.raises(ConfigError, match="key=3: a callback's key must be a non-empty string"):
        trainer.callback_states.attach([twin])
    assert trainer.callback_states.attached == {"EarlyStopping#0": a, "EarlyStopping#1": b, "val": named}


def test_a_state_waits_for_its_callback_after_a_load_and_is_saved_meanwhile(tmp_path):
    trainer, model = make()
    stopper, logger = callbacks(model)
    trainer.fit(batch, max_steps=70, progress=False, callbacks=[stopper, logger])
    trainer.save(tmp_path / "a.ckpt")  # a manual save holds the callbacks of the last fit
    model2 = MLP([5, 8, 3], dtype=np.float64, seed=1)
    loaded = HybridTrainer.load(tmp_path / "a.ckpt", model2, Adam(model2, lr=0.02))
    assert loaded.callback_states.waiting == ["EarlyStopping#0", "ValidationLogger#0"]
    loaded.save(tmp_path / "b.ckpt")  # waiting states are saved again
    model3 = MLP([5, 8, 3], dtype=np.float64, seed=2)
    again = HybridTrainer.load(tmp_path / "b.ckpt", model3, Adam(model3, lr=0.02))
    stopper3, logger3 = callbacks(model3)
    again.fit(batch, max_steps=70, progress=False, callbacks=[stopper3, logger3])  # no step: handed over
    assert again.callback_states.waiting == []
    assert (stopper3.best, stopper3.best_step, stopper3.bad_evaluations) == (stopper.best, 65, 1)
    assert logger3.records == logger.records


def test_attach_by_hand_for_manual_loops(tmp_path):
    trainer, model = make()
    stopper = EarlyStopping(lambda: float(model.loss(VAL)), every=1, patience=5)
    trainer.callback_states.attach([stopper])
    for i in range(3):
        stopper(trainer, trainer.step(batch(i)))
    trainer.save(tmp_path / "manual.ckpt")
    assert read_file(tmp_path / "manual.ckpt")["parts"]["callbacks"]["EarlyStopping#0"]["evaluations"] == 3


def _doctored(tmp_path, change):
    trainer, model = make()
    trainer.fit(batch, max_steps=70, progress=False, callbacks=callbacks(model))
    trainer.save(tmp_path / "ok.ckpt")
    doc = read_file(tmp_path / "ok.ckpt")
    change(doc["parts"]["callbacks"])
    write_atomic(tmp_path / "bad.ckpt", encode(doc, _host))
    return tmp_path / "bad.ckpt"


@pytest.mark.parametrize("change, message", [
    (lambda s: s["EarlyStopping#0"].update(best_params=[np.zeros((2, 2))]), "best_params does not match"),
    (lambda s: s["EarlyStopping#0"].update(evaluations=-1), "evaluations=-1"),
    (lambda s: s["EarlyStopping#0"].pop("best"), "lacks best"),
    (lambda s: s["ValidationLogger#0"]["rows"].append({"step": 5, "loss": 1.0}), r"rows\[14\].step=5 does not follow"),
    (lambda s: s["ValidationLogger#0"]["rows"][0].update(loss=[1.0]), r"rows\[0\] holds 'loss'"),
])
def test_a_refused_callback_state_changes_nothing(tmp_path, change, message, monkeypatch):
    bad = _doctored(tmp_path, change)
    trainer, model = make(seed=5)
    stopper, logger = callbacks(model)
    trainer.fit(batch, max_steps=30, progress=False, callbacks=[stopper, logger])
    before = (params(model), trainer.steps_done, stopper.state_dict()["best"], logger.records)
    loads = []
    for kind in {type(part) for part in trainer.parts().values()}:  # all checked first: no part is loaded
        monkeypatch.setattr(kind, "load_state_dict", lambda self, state: loads.append(self))
    with pytest.raises(CheckpointError, match=f"part 'callbacks'.*{message}"):
        trainer.restore(bad)
    assert loads == []
    assert (params(model), trainer.steps_done, stopper.state_dict()["best"], logger.records) == before


def test_a_refused_waiting_state_stops_fit_before_any_step(tmp_path):
    bad = _doctored(tmp_path, lambda s: s["EarlyStopping#0"].update(best_params=[np.zeros((2, 2))]))
    model = MLP([5, 8, 3], dtype=np.float64, seed=1)
    loaded = HybridTrainer.load(bad, model, Adam(model, lr=0.02))  # waiting: no EarlyStopping to check it yet
    stopper, logger = callbacks(model)
    before = params(model)
    with pytest.raises(CheckpointError, match=r"callback .EarlyStopping#0.*best_params does not match"):
        loaded.fit(batch, max_steps=90, progress=False, callbacks=[stopper, logger])
    assert loaded.steps_done == 70 and params(model) == before and stopper.best is None and logger.records == []
    assert loaded.callback_states.waiting == ["EarlyStopping#0", "ValidationLogger#0"]


def test_a_jsonl_logger_resumed_from_a_checkpoint_holds_every_step_once(tmp_path):
    policy = CheckpointPolicy(tmp_path / "ckpts", every=10, run_id="rows")
    log = tmp_path / "run.jsonl"
    first, _ = make()
    first.fit(batch, max_steps=37, progress=False, callbacks=[JSONLLogger(log)], checkpoint=policy)
    assert [r["step"] for r in rows_of(log)] == list(range(37))  # 30..36 lie past the last checkpoint
    second, _ = make(seed=3)
    second.fit(batch, max_steps=60, progress=False, callbacks=[JSONLLogger(log)], checkpoint=policy)
    straight, _ = make()
    straight.fit(batch, max_steps=60, progress=False)
    keep = ("step", "phase", "loss", "backward", "lr")
    assert [{k: r[k] for k in keep} for r in rows_of(log)] == [
        {k: getattr(r, k) for k in keep} for r in straight.metrics.records]


def test_a_trainer_taken_back_without_the_loggers_state_logs_each_step_once(tmp_path):
    trainer, model = make()
    trainer.fit(batch, max_steps=20, progress=False)
    trainer.save(tmp_path / "twenty.ckpt")  # no callbacks attached yet: no state for the logger
    logger = ValidationLogger(lambda: float(model.loss(VAL)), every=5, path=tmp_path / "val.jsonl")
    trainer.fit(batch, max_steps=40, progress=False, callbacks=[logger])
    trainer.restore(tmp_path / "twenty.ckpt")  # back to step 20; the logger keeps its rows of 25..40
    trainer.fit(batch, max_steps=40, progress=False, callbacks=[logger])
    assert [r["step"] for r in logger.records] == [25, 30, 35, 40]
    assert [r["step"] for r in rows_of(tmp_path / "val.jsonl")] == [25, 30, 35, 40]
