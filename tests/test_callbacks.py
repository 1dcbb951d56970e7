"""Fit callbacks (early stopping, LR decay, validation logs) and the ClipGradNorm optimizer wrapper."""

import json
import math

import numpy as np
import pytest
from _namespaces import namespace_fixture

from hybrid_core import CheckpointError, ConfigError, HybridConfig, HybridTrainer, Optimizer
from hybrid_core._backend import from_numpy, to_numpy
from hybrid_core.callbacks import EarlyStopping, ExponentialLR, ValidationLogger
from hybrid_core.models import MLP
from hybrid_core.optim import SGD, Adam, ClipGradNorm

xp = namespace_fixture()

SIZES = [4, 6, 3]


def _data(xp=np, dtype=None, n=32, seed=0):
    rng = np.random.default_rng(seed)
    dtype = xp.float32 if dtype is None else dtype
    return from_numpy(xp, rng.normal(size=(n, SIZES[0])), dtype=dtype), from_numpy(xp, rng.integers(0, 3, n))


def _trainer(lr=0.05, dtype=np.float32):
    model = MLP(SIZES, dtype=dtype, seed=0)
    # Real steps only: these tests are about the callbacks, not about prediction.
    return HybridTrainer(model, Adam(model, lr=lr), HybridConfig(warmup_steps=10**6, lr_recommend=False))


def _scripted(values):
    it = iter(values)
    return lambda: next(it)


class _Snapshots:
    """A callback keeping a copy of the parameters every ``every`` steps, keyed by step count."""

    def __init__(self, every):
        self.every, self.params = every, {}

    def __call__(self, trainer, result):
        if (result.step + 1) % self.every == 0:
            self.params[result.step + 1] = [np.array(p, copy=True) for p in trainer.model.parameters()]


def test_early_stopping_stops_after_patience_and_restores_the_best_weights_exactly():
    trainer = _trainer()
    batch = _data()
    snaps = _Snapshots(5)
    stopper = EarlyStopping(_scripted([3.0, 2.0, 2.5, 1.5, 1.6, 1.7, 1.8, 0.1]), every=5, patience=3)
    summary = trainer.fit(lambda _: batch, steps=100, progress=False, callbacks=[snaps, stopper])
    assert summary["steps"] == 35 and stopper.stopped_step == 35
    assert (stopper.best, stopper.best_step, stopper.evaluations) == (1.5, 20, 7)
    for p, best, last in zip(trainer.model.parameters(), snaps.params[20], snaps.params[35], strict=True):
        np.testing.assert_array_equal(p, best)
        assert not np.array_equal(p, last)


def test_without_restore_the_last_weights_stay_and_restore_can_be_called_later():
    trainer = _trainer()
    batch = _data()
    snaps = _Snapshots(4)
    stopper = EarlyStopping(_scripted([1.0, 2.0, 3.0]), every=4, patience=2, restore_best=False)
    assert stopper.restore() is False
    trainer.fit(lambda _: batch, steps=50, progress=False, callbacks=[snaps, stopper])
    assert stopper.stopped_step == 12
    for p, last in zip(trainer.model.parameters(), snaps.params[12], strict=True):
        np.testing.assert_array_equal(p, last)
    assert stopper.restore() is True
    for p, best in zip(trainer.model.parameters(), snaps.params[4], strict=True):
        np.testing.assert_array_equal(p, best)


@pytest.mark.parametrize("values,kwargs,stop", [
    ([1.0, 0.95, 0.92, 0.5], dict(min_delta=0.1, patience=2), 3),  # small gains are not improvements
    ([1.0, 0.5, 0.4, 0.3, 0.2], dict(min_delta=0.1, patience=2), None),
    ([1.0, 2.0, 1.5, 3.0], dict(mode="max", patience=2), None),
    ([1.0, 2.0, 1.5, 1.9], dict(mode="max", patience=2), 4),
    ([1.0, math.nan, math.nan], dict(patience=2), 3),  # NaN never improves
])
def test_improvement_rules(values, kwargs, stop):
    trainer = _trainer()
    batch = _data()
    stopper = EarlyStopping(_scripted(values), every=1, **kwargs)
    summary = trainer.fit(lambda _: batch, steps=len(values), progress=False, callbacks=[stopper])
    assert stopper.stopped_step == stop
    assert summary["steps"] == (stop or len(values))


def test_exponential_lr_decays_every_few_steps_down_to_min_lr():
    trainer = _trainer(lr=0.1)
    batch = _data()
    seen = []
    trainer.fit(lambda _: batch, steps=10, progress=False,
                callbacks=[ExponentialLR(0.5, every=3), lambda t, r: seen.append(t.optimizer.lr)])
    assert trainer.optimizer.lr == pytest.approx(0.1 * 0.5**3)
    assert seen[:3] == [0.1, 0.1, 0.05]
    trainer.fit(lambda _: batch, steps=30, progress=False, callbacks=[ExponentialLR(0.5, every=1, min_lr=1e-3)])
    assert trainer.optimizer.lr == pytest.approx(1e-3)


def test_validation_logger_records_and_writes_json_lines(tmp_path):
    trainer = _trainer()
    batch = _data()
    path = tmp_path / "val.jsonl"
    values = iter([{"loss": 1.0, "acc": 0.5}, {"loss": math.nan, "acc": 0.75}])
    logger = ValidationLogger(lambda: next(values), every=4, path=path)
    assert trainer.fit(lambda _: batch, steps=10, progress=False, callbacks=[logger])["steps"] == 10
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8] and [r["acc"] for r in rows] == [0.5, 0.75]
    assert rows[0]["loss"] == 1.0 and rows[1]["loss"] is None  # NaN is not JSON
    assert all(r["lr"] == 0.05 and r["seconds"] >= 0 for r in rows)
    assert [r["step"] for r in logger.records] == [4, 8] and math.isnan(logger.records[1]["loss"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.jsonl"]  # no temporary file left behind
    plain = ValidationLogger(lambda: 0.25, every=5)
    trainer.fit(lambda _: batch, steps=5, progress=False, callbacks=[plain])
    assert plain.records[0]["value"] == 0.25 and plain.records[0]["step"] == 15


@pytest.mark.parametrize("make", [
    lambda: EarlyStopping(lambda: 0.0, every=0, patience=-1, min_delta=-1.0, mode="best"),
    lambda: ExponentialLR(gamma=1.5, every=0, min_lr=-1),
    lambda: ValidationLogger(None, every=2.5),
])
def test_callbacks_reject_bad_settings(make):
    with pytest.raises(ConfigError) as info:
        make()
    assert len(info.value.problems) >= 2


# -- ClipGradNorm ------------------------------------------------------------------------------


def _grads(xp, model, scale, seed=0):
    rng = np.random.default_rng(seed)
    return [from_numpy(xp, scale * rng.normal(size=p.shape), dtype=xp.float64) for p in model.parameters()]


def test_clipping_scales_every_gradient_by_the_global_norm(xp):
    clipped_model = MLP(SIZES, xp=xp, dtype=xp.float64, seed=1)
    plain_model = MLP(SIZES, xp=xp, dtype=xp.float64, seed=1)
    clip = ClipGradNorm(Adam(clipped_model, lr=0.01), max_norm=0.5)
    plain = Adam(plain_model, lr=0.01)
    assert isinstance(clip, Optimizer)
    for step in range(3):
        grads = _grads(xp, clipped_model, 10.0, seed=step)
        host = [to_numpy(g) for g in grads]
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in host))
        update = clip.step(grads)
        assert float(to_numpy(clip.last_norm)) == pytest.approx(norm, rel=1e-12)
        scaled = [from_numpy(xp, g * (0.5 / (norm + 1e-6)), dtype=xp.float64) for g in host]
        expected = plain.step(scaled)
        for u, e in zip(update, expected, strict=True):
            np.testing.assert_allclose(to_numpy(u), to_numpy(e), rtol=1e-10, atol=1e-14)
    for a, b in zip(clip.extrapolate(), plain.extrapolate(), strict=True):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-10, atol=1e-14)


def test_small_gradients_pass_unchanged_bit_for_bit(xp):
    a, b = MLP(SIZES, xp=xp, dtype=xp.float64, seed=2), MLP(SIZES, xp=xp, dtype=xp.float64, seed=2)
    clip, plain = ClipGradNorm(SGD(a, lr=0.1, momentum=0.9), max_norm=100.0), SGD(b, lr=0.1, momentum=0.9)
    for step in range(3):
        for u, e in zip(clip.step(_grads(xp, a, 0.01, step)), plain.step(_grads(xp, b, 0.01, step)), strict=True):
            np.testing.assert_array_equal(to_numpy(u), to_numpy(e))


def test_clipping_reads_nothing_back_to_the_host(monkeypatch):
    torch = pytest.importorskip("torch", reason="torch is not installed: no device arrays to watch")
    from hybrid_core._backend import as_namespace

    tx = as_namespace(torch)
    model = MLP(SIZES, xp=tx, dtype=tx.float64, seed=3)
    clip = ClipGradNorm(Adam(model, lr=0.01), max_norm=0.1)
    grads = _grads(tx, model, 5.0)

    def sync(*_):
        raise AssertionError("host sync")

    for name in ("item", "__float__", "__bool__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    clip.step(grads)
    monkeypatch.undo()
    assert float(clip.last_norm) > 0.1


def test_lr_and_state_go_to_the_wrapped_optimizer():
    model = MLP(SIZES, dtype=np.float64, seed=4)
    inner = Adam(model, lr=0.01)
    clip = ClipGradNorm(inner, max_norm=1.0)
    clip.lr = 0.2
    assert inner.lr == 0.2 and clip.lr == 0.2 and clip.optimizer is inner
    clip.step(_grads(np, model, 3.0))
    state = clip.state_dict()
    assert state["max_norm"] == 1.0 and state["inner"]["step"] == 1
    other = ClipGradNorm(Adam(model, lr=0.5), max_norm=7.0)
    other.load_state_dict(state)
    assert other.max_norm == 1.0 and other.lr == 0.2 and other.optimizer.step_count == 1
    for bad in ({"kind": "Adam"}, {**state, "max_norm": -1.0}, {**state, "kind": "SGD"}):
        with pytest.raises(CheckpointError):
            other.load_state_dict(bad)


def test_wrapper_settings_are_validated():
    model = MLP(SIZES, dtype=np.float64)
    with pytest.raises(ConfigError) as info:
        ClipGradNorm(object(), max_norm=0.0, eps=-1.0)
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError, match="max_norm"):
        ClipGradNorm(Adam(model), max_norm=math.inf)


def test_trainer_checkpoint_round_trips_the_wrapper(tmp_path):
    batch = _data(dtype=np.float64)

    def make():
        model = MLP(SIZES, dtype=np.float64, seed=5)
        return model, ClipGradNorm(Adam(model, lr=0.05), max_norm=0.5)

    model, opt = make()
    trainer = HybridTrainer(model, opt, HybridConfig(warmup_steps=5, min_full_steps=5))
    trainer.fit(lambda _: batch, steps=20, progress=False)
    trainer.save(tmp_path / "t.ckpt")
    model2, opt2 = make()
    resumed = HybridTrainer.load(tmp_path / "t.ckpt", model2, opt2)
    trainer.fit(lambda _: batch, steps=10, progress=False)
    resumed.fit(lambda _: batch, steps=10, progress=False)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_validation_logger_and_early_stopping_evaluate_the_read_out_the_trainer_chose():
    model = MLP(SIZES, dtype=np.float64, seed=0)
    trainer = HybridTrainer(model, Adam(model, lr=0.05),
                            HybridConfig(warmup_steps=10**6, lr_recommend=False, readout_check_every=10))
    data = _data(dtype=np.float64, n=256)
    seen = []

    def batch(i):
        idx = np.random.default_rng(i).choice(256, 8, replace=False)
        return data[0][idx], data[1][idx]

    def evaluate():
        kind = trainer.readout.resolve(None)
        expected = trainer.export_parameters(kind) if kind != "raw" else None
        seen.append((kind, [p.copy() for p in model.parameters()], expected))
        return float(model.loss(data))

    logger = ValidationLogger(evaluate, every=20)
    raw_logger = ValidationLogger(lambda: float(model.loss(data)), every=20, readout=False)
    stopper = EarlyStopping(evaluate, every=20, patience=100)
    trainer.fit(batch, steps=100, callbacks=[logger, raw_logger, stopper])
    chosen = trainer.readout.chosen
    assert chosen != "raw"  # noisy 8-example steps at a high rate: the average sits lower
    assert logger.records[-1]["weights"] == chosen and raw_logger.records[-1]["weights"] == "raw"
    assert logger.records[-1]["value"] != raw_logger.records[-1]["value"]
    kind, evaluated, expected = seen[-1]
    assert kind == chosen
    for got, want in zip(evaluated, expected):
        np.testing.assert_array_equal(got, want)  # evaluated on the read-out...
    assert not any(np.array_equal(p, q) for p, q in zip(model.parameters(), evaluated))  # ...then the raw came back
    with pytest.raises(ConfigError, match="readout"):
        ValidationLogger(evaluate, every=5, readout="yes")
