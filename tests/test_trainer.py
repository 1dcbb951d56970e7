"""HybridTrainer unit tests on a least-squares test double."""

import math

import numpy as np
import pytest
from _toy import LeastSquares, PlainSGD, regression_batches

from hybrid_core import (
    BackendError,
    BatchError,
    ConfigError,
    DivergenceError,
    HybridConfig,
    HybridTrainer,
    ModelError,
    Outcome,
    Phase,
    Prediction,
)

FAST = HybridConfig(warmup_steps=5, min_full_steps=5, max_full_steps=40, max_predict_steps=8,
                    probe_steps=2, check_interval=3, correct_steps=3)


class Oracle:
    """A dynamics double: fixed confidence, flat prediction with a chosen band and scale."""

    def __init__(self, confidence=1.0, upper=1e9, scale=1.0):
        self.conf, self.upper, self.scale = confidence, upper, scale
        self.observed = 0

    def observe(self, features, outcome):
        assert features.shape == (64,) and isinstance(outcome, Outcome)
        self.observed += 1

    def predict(self, features, horizon):
        return Prediction((0.1,) * horizon, (0.0,) * horizon, (self.upper,) * horizon,
                          (self.scale,) * horizon, self.conf)

    def confidence(self):
        return self.conf

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _trainer(config=FAST, dynamics=None, lr=0.05, xp=np):
    model = LeastSquares(xp)
    return HybridTrainer(model, PlainSGD(model, lr), config, dynamics or Oracle()), model


def test_cycles_through_all_phases_with_fewer_backward_passes():
    trainer, _ = _trainer()
    batches = regression_batches(np)
    results = [trainer.step(next(batches)) for _ in range(60)]
    phases = [r.phase for r in results]
    assert phases[:5] == [Phase.WARMUP] * 5
    assert set(phases) == set(Phase)
    trainer.flush()  # real steps are recorded when they are read
    s = trainer.metrics.summary()
    assert s["backward_passes"] == sum(r.backward for r in results) < 60
    assert all(r.backward == (r.phase is not Phase.PREDICT) for r in results)


def test_predict_applies_the_optimizer_direction_without_backward():
    trainer, model = _trainer(FAST.replace(check_interval=0))
    batches = regression_batches(np)
    while trainer.phase is not Phase.PREDICT:
        trainer.step(next(batches))
    before = [np.array(p) for p in model.parameters()]
    direction = trainer.optimizer.extrapolate()
    steps_before = trainer.optimizer.steps
    r = trainer.step(next(batches))
    assert r.phase is Phase.PREDICT and not r.backward and r.loss is None and r.predicted_loss == 0.1
    assert trainer.optimizer.steps == steps_before  # no real optimizer step
    for b, p, d in zip(before, model.parameters(), direction):
        np.testing.assert_allclose(p, b + d)


def test_failed_check_rolls_back_unchecked_steps_and_ends_phase():
    trainer, model = _trainer(FAST.replace(check_interval=2), dynamics=Oracle(upper=-1.0))
    batches = regression_batches(np)
    while trainer.phase is not Phase.PREDICT:
        trainer.step(next(batches))
    start = [np.array(p) for p in model.parameters()]
    trainer.step(next(batches))
    trainer.step(next(batches))
    r = trainer.step(next(batches))  # k=2: the check fails (upper band is negative)
    assert r.loss is not None and trainer.phase is Phase.CORRECT
    for a, b in zip(start, model.parameters()):
        np.testing.assert_allclose(a, b, atol=1e-12)
    ev = trainer.metrics.summary()["events"]
    assert ev["checks_failed"] == 1 and ev["rollbacks"] == 1


class BandAt(Oracle):
    """An oracle whose band is impossible (negative) only at forecast index ``bad``."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def predict(self, features, horizon):
        upper = tuple(-1.0 if j == self.bad else 1e9 for j in range(horizon))
        loss = tuple(float(j) for j in range(horizon))
        return Prediction(loss, (0.0,) * horizon, upper, (1.0,) * horizon, 1.0)


@pytest.mark.parametrize(("bad", "fails"), [(1, True), (2, False)])
def test_check_compares_with_the_forecast_for_the_steps_applied(bad, fails):
    """The check at phase step k runs after k predicted updates: it must use forecast entry k − 1."""
    trainer, _ = _trainer(FAST.replace(check_interval=2), dynamics=BandAt(bad))
    batches = regression_batches(np)
    while trainer.phase is not Phase.PREDICT:
        trainer.step(next(batches))
    trainer.step(next(batches))
    trainer.step(next(batches))
    r = trainer.step(next(batches))  # k = 2: two updates applied, compared with entry 1
    assert r.loss is not None and r.predicted_loss == 1.0
    assert (trainer.phase is Phase.CORRECT) == fails
    assert trainer.metrics.summary()["events"].get("checks_failed", 0) == int(fails)


def test_low_confidence_never_predicts_except_bounded_probes():
    trainer, _ = _trainer(dynamics=Oracle(confidence=0.0))
    batches = regression_batches(np)
    results = [trainer.step(next(batches)) for _ in range(200)]
    predicted = sum(r.phase is Phase.PREDICT for r in results)
    probes = trainer.metrics.summary()["events"]["probes"]
    assert 0 < predicted <= probes * FAST.probe_steps
    assert predicted / len(results) <= FAST.probe_steps / FAST.max_full_steps + 0.05


def test_loss_decreases_with_default_dynamics():
    trainer, _ = _trainer(HybridConfig(warmup_steps=20, min_full_steps=10, max_predict_steps=10,
                                       check_interval=2, correct_steps=3), dynamics=None)
    summary = trainer.fit(regression_batches(np), 150, progress=False)
    losses = [r.loss for r in trainer.metrics.records if r.loss is not None]
    assert summary["steps"] == 150 and losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("read_every", [1, 4])
def test_nan_loss_raises_and_leaves_the_trainer_as_before_the_bad_step(read_every):
    """Read at once or found by a later read: the trainer ends as it was before the bad batch."""
    trainer, model = _trainer(FAST.replace(read_every=read_every))
    batches = regression_batches(np)
    trainer.step(next(batches))
    trainer.flush()
    before = [np.array(p) for p in model.parameters()]
    x, y = next(batches)
    with pytest.raises(DivergenceError, match="non-finite") as info:
        trainer.step((x, y * np.nan))
        for _ in range(read_every - 1):  # good batches until the read that finds the NaN
            trainer.step(next(batches))
    assert "back at the state before step 1" in str(info.value)
    for a, b in zip(before, model.parameters()):
        np.testing.assert_array_equal(a, b)
    assert trainer.state.step == 1 and trainer.steps_done == 1 and trainer.metrics.summary()["steps"] == 1
    assert trainer.phase_state.steps_in_phase == 1
    trainer.step(next(batches))  # and it carries on
    trainer.flush()
    assert all(np.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("read_every", [1, 4])
def test_nan_batch_skipped_when_configured(read_every):
    trainer, model = _trainer(FAST.replace(on_nonfinite="skip", read_every=read_every))
    batches = regression_batches(np)
    x, y = next(batches)
    r = trainer.step((x, y * np.nan))
    for _ in range(read_every - 1):
        trainer.step(next(batches))
    assert r.skipped == (read_every == 1)
    assert not any(np.isnan(p).any() for p in model.parameters())
    summary = trainer.metrics.summary()
    assert summary["events"]["skipped_nonfinite"] == 1 and summary["steps"] == read_every
    assert [rec.skipped for rec in trainer.metrics.records] == [True] + [False] * (read_every - 1)


def test_bad_inputs_raise_hybrid_errors():
    with pytest.raises(ConfigError):
        _trainer(config={"warmup_steps": 3})
    with pytest.raises(ModelError, match="loss_and_grad"):
        HybridTrainer(object(), PlainSGD(LeastSquares(np)))
    model = LeastSquares(np)
    model.params = []
    with pytest.raises(ModelError, match="empty"):
        HybridTrainer(model, PlainSGD(model))
    model.params = [np.zeros((0, 3))]
    with pytest.raises(ModelError, match="no elements"):
        HybridTrainer(model, PlainSGD(model))
    trainer, _ = _trainer()
    x, y = next(regression_batches(np))
    with pytest.raises(BatchError, match="ValueError") as info:
        trainer.step((x, y[:, None] * np.ones((1, 2))))  # the model's own broadcast error
    assert isinstance(info.value.__cause__, ValueError)
    trainer.model.loss_and_grad = lambda batch: (np.ones(3), [np.zeros(3), np.zeros(1)])
    with pytest.raises(BatchError, match="scalar"):
        trainer.step((x, y))
    assert trainer.state.step == 0
    with pytest.raises(ConfigError):
        trainer.fit(lambda i: (x, y), steps=None)


def test_mixed_libraries_name_both():
    strict = pytest.importorskip("array_api_strict", reason="array-api-strict not installed")
    trainer, _ = _trainer()
    x, y = next(regression_batches(np))
    model = trainer.model

    def bad_loss_and_grad(batch):
        loss, grads = LeastSquares.loss_and_grad(model, batch)
        return strict.asarray(float(loss)), grads

    model.loss_and_grad = bad_loss_and_grad
    with pytest.raises(BackendError) as info:
        trainer.step((x, y))
    assert "array_api_strict" in str(info.value) and "numpy" in str(info.value)


def test_read_every_1_reads_once_per_real_step_and_per_check():
    trainer, _ = _trainer(FAST.replace(check_interval=3, read_every=1))
    batches = regression_batches(np)
    results = [trainer.step(next(batches)) for _ in range(80)]
    real = sum(r.backward for r in results)
    events = trainer.metrics.summary()["events"]
    checks, searches = events.get("checks", 0), events.get("line_searches", 0)
    assert checks > 0 and searches > 0 and trainer.host_syncs == real + checks + searches


def test_fit_accepts_a_function_and_callbacks_stop_it():
    trainer, _ = _trainer()
    x, y = next(regression_batches(np))
    seen = []
    summary = trainer.fit(lambda i: (x, y), steps=50, progress=False,
                          callbacks=[lambda t, r: seen.append(r.step) or r.step >= 9])
    assert summary["steps"] == 10 and seen == list(range(10))


def test_progress_is_shown(capsys):
    trainer, _ = _trainer()
    trainer.fit(regression_batches(np), 20, progress=True)
    err = capsys.readouterr().err
    assert "train: 100% 20/20 [" in err and "loss=" in err and "\r" not in err  # captured: plain lines


def test_predicted_loss_reported_in_correct_phase():
    trainer, _ = _trainer()
    batches = regression_batches(np)
    for _ in range(40):
        trainer.step(next(batches))
    trainer.flush()
    correct = [r for r in trainer.metrics.records if r.phase == Phase.CORRECT.value]
    assert correct and all(r.predicted_loss > 0 and math.isfinite(r.loss) for r in correct)
    assert correct[0].predicted_loss == 0.1  # before any residual, the corrector leaves predictions alone
    assert trainer.residuals.total == len(correct) and trainer.corrector.updates == len(correct)
    assert trainer.state.pred_err_last > 0


def test_python_float_loss_is_a_backend_error():
    trainer, model = _trainer()
    x, y = next(regression_batches(np))
    model.loss_and_grad = lambda batch: (0.5, [np.zeros(3), np.zeros(1)])
    with pytest.raises(BackendError, match="not an array"):
        trainer.step((x, y))


class _Recorder(Oracle):
    def __init__(self, observes):
        super().__init__()
        if observes is not None:
            self.observes_features = observes
        self.seen, self.predicted_from = [], []

    def observe(self, features, outcome):
        self.seen.append(np.array(features))

    def predict(self, features, horizon):
        self.predicted_from.append(np.array(features))
        return super().predict(features, horizon)


@pytest.mark.parametrize("observes", [None, True, False])
def test_features_are_encoded_for_observe_unless_the_model_declares_it_ignores_them(observes):
    dynamics = _Recorder(observes)
    trainer, _ = _trainer(dynamics=dynamics)
    batches = regression_batches(np)
    for _ in range(40):
        trainer.step(next(batches))
    assert dynamics.seen and dynamics.predicted_from
    assert all(f.shape == (64,) for f in dynamics.seen)
    zeros = [not f.any() for f in dynamics.seen]
    assert all(zeros) if observes is False else not any(zeros)
    assert all(f.any() for f in dynamics.predicted_from)  # predict always gets the real features
