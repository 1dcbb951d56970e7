"""PREDICT and CORRECT: exact rollback, NaN recovery, weight correction, no regret."""

import math

import numpy as np
import pytest
from _toy import LeastSquares, PlainSGD, regression_batches
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import HybridConfig, HybridTrainer, Phase, Prediction
from hybrid_core._cycle import CycleRun, PredictionCycle, cycle_reward
from hybrid_core.models import MLP


class Always:
    """Dynamics double that is always confident, with a wide band, so PREDICT is always allowed."""

    def __init__(self, upper=1e9):
        self.upper = upper

    def observe(self, features, outcome):
        pass

    def predict(self, features, horizon):
        return Prediction((1.0,) * horizon, (0.0,) * horizon, (self.upper,) * horizon, (1.0,) * horizon, 1.0)

    def confidence(self):
        return 1.0

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _run(direction):
    return CycleRun(arm=5, direction=direction, prediction=Always().predict(None, 10), context=np.zeros(5),
                    entry_slope=-0.01, slope_stderr=0.001, probe=False)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    scales=st.lists(st.floats(-3.0, 3.0, allow_subnormal=False), min_size=1, max_size=25),
    back_to=st.integers(0, 25),
    dtype=st.sampled_from([np.float64, np.float32]),
    seed=st.integers(0, 100),
)
def test_rollback_to_any_point_restores_parameters(sizes, scales, back_to, dtype, seed):
    model = MLP(sizes, loss="mse", dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    direction = [rng.normal(size=p.shape).astype(dtype) for p in model.parameters()]
    cycle = PredictionCycle(HybridConfig())
    n = len(scales)
    prediction = Prediction((1.0,) * n, (0.0,) * n, (1e9,) * n, tuple(scales), 1.0)
    cycle.start(direction, prediction, np.zeros(5), (-0.01, 0.001), probe=False)
    history = [[p.copy() for p in model.parameters()]]
    for k in range(n):
        cycle.advance(model, k)
        history.append([p.copy() for p in model.parameters()])
    j = min(back_to, len(scales))
    cycle.roll_back(model, j)
    assert cycle.applied == list(scales[:j])
    rtol, atol = (1e-12, 1e-12) if dtype == np.float64 else (1e-6, 1e-6)
    magnitude = 1.0 + sum(abs(s) for s in scales)  # rounding grows with the path length
    for want, got in zip(history[j], model.parameters()):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * magnitude)


def test_predict_applies_real_weight_changes_and_correct_line_searches():
    model = LeastSquares(np)
    cfg = HybridConfig(warmup_steps=5, min_full_steps=5, max_predict_steps=10, horizon_arms=(0, 10),
                       check_interval=0, correct_steps=3, use_bandit=False)
    trainer = HybridTrainer(model, PlainSGD(model, 0.05), cfg, dynamics=Always())
    batches = regression_batches(np)
    while trainer.phase is not Phase.PREDICT:
        trainer.step(next(batches))
    entry = [p.copy() for p in model.parameters()]
    for _ in range(10):
        trainer.step(next(batches))
    assert trainer.phase is Phase.CORRECT
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(entry, model.parameters()))
    assert moved > 1e-3  # PREDICT really changed the weights
    cycle = trainer.cycle.run
    trainer.step(next(batches))  # first CORRECT step: line search, then a real step
    assert cycle.best_fraction in (0.0, 0.5, 1.0) and cycle.paired_gain is not None
    events = trainer.metrics.summary()["events"]
    assert events["line_searches"] == 1 and events["line_search_forwards"] == 3


def test_nan_during_predict_rolls_back_and_training_recovers():
    model = LeastSquares(np)
    calls = {"n": 0}
    real_loss = model.loss

    def flaky_loss(batch):  # the second forward-only check of the run returns NaN
        calls["n"] += 1
        value = real_loss(batch)
        return value * np.nan if calls["n"] == 2 else value

    model.loss = flaky_loss
    cfg = HybridConfig(warmup_steps=5, min_full_steps=5, max_predict_steps=12, horizon_arms=(0, 12),
                       check_interval=3, correct_steps=3, use_bandit=False)
    trainer = HybridTrainer(model, PlainSGD(model, 0.05), cfg, dynamics=Always())
    batches = regression_batches(np)
    results = [trainer.step(next(batches)) for _ in range(80)]
    trainer.flush()
    nan_step = next(r for r in results if r.loss is not None and math.isnan(r.loss))
    assert nan_step.phase is Phase.PREDICT
    assert results[nan_step.step + 1].phase is Phase.CORRECT
    events = trainer.metrics.summary()["events"]
    assert events["nonfinite_in_predict"] == 1 and events["rollbacks"] >= 1
    assert all(np.all(np.isfinite(p)) for p in model.parameters())
    records = trainer.metrics.records
    assert records[-1].loss < records[0].loss


def _noisy_run(use_bandit, steps=3000):
    model = LeastSquares(np, dim=8)
    cfg = HybridConfig(warmup_steps=50, min_full_steps=20, check_interval=0, use_bandit=use_bandit,
                       max_predict_steps=30, horizon_arms=(0, 5, 15, 30))
    trainer = HybridTrainer(model, PlainSGD(model, 0.05), cfg, dynamics=Always())
    trainer.fit(regression_batches(np, n=4, dim=8, noise=1.0, seed=3), steps, progress=False)
    return trainer, model


def _val_loss(model):
    x, y = next(regression_batches(np, n=5000, dim=8, noise=1.0, seed=3))
    return float(model.loss((x, y)))


def test_bandit_learns_to_stop_predicting_when_it_hurts():
    plain = LeastSquares(np, dim=8)
    opt = PlainSGD(plain, 0.05)
    batches = regression_batches(np, n=4, dim=8, noise=1.0, seed=3)
    for _ in range(3000):
        opt.step(plain.loss_and_grad(next(batches))[1])
    trainer, model = _noisy_run(use_bandit=True)
    always, _ = _noisy_run(use_bandit=False)
    decisions = trainer.metrics.decisions
    late = decisions[len(decisions) // 2:]
    assert sum(d.horizon == 0 for d in late) > 0.7 * len(late)
    last_third = trainer.metrics.records[-1000:]
    assert sum(r.phase == "predict" for r in last_third) < 100
    assert _val_loss(model) <= 1.02 * _val_loss(plain)
    summary = trainer.metrics.summary()["bandit"]
    assert all(v["mean_reward"] < 0 for k, v in summary.items() if k != "0")
    # Without the bandit the same predictions keep running and cost more.
    assert always.metrics.summary()["steps_per_phase"]["predict"] > 3 * trainer.metrics.summary()[
        "steps_per_phase"]["predict"]


def test_cycle_reward_signs():
    cycle = _run([np.zeros(1)])
    cycle.steps = 10
    cycle.forwards = 2
    cycle.paired_gain = 0.1  # worth 10 plain steps at slope −0.01
    cost = 2 * 0.35 + 10 * 0.05
    assert cycle_reward(cycle, 0.35, 0.05) == pytest.approx((10 - cost) / 10)
    cycle.paired_gain = -0.05
    assert cycle_reward(cycle, 0.35, 0.05) == pytest.approx((-5 - cost) / 10)
    cycle.paired_gain = -1.0
    assert cycle_reward(cycle, 0.35, 0.05) == -1.0
    cycle.paired_gain = None
    assert cycle_reward(cycle, 0.35, 0.05) == -1.0
