"""RSSMDynamics: hand-written gradients, properties, learning, state, backends; and evaluate_dynamics."""

import math

import numpy as np
import pytest
from _namespaces import NAMESPACES, available, namespace
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hybrid_core import BatchError, CheckpointError, ConfigError, DynamicsModel, Outcome, Prediction
from hybrid_core._backend import as_namespace
from hybrid_core.dynamics import RSSMDynamics, _heads, _network, _rollout, evaluate_dynamics

DIM = 64
SMALL = {"hidden": 8, "latent": 2, "ensemble": 3, "window": 4, "samples": 4}
FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)
LOSS = st.floats(min_value=1e-300, max_value=1e300)


def features_for(losses, dim=DIM):
    """Rows like the encoder's, row t taken before step t: loss, log-loss, EMAs, last change, lr, step."""
    rows = np.zeros((len(losses), dim))
    fast = slow = float(losses[0])
    last_change = change_ema = 0.0
    for t in range(len(losses)):
        prev = float(losses[max(t - 1, 0)])
        if t >= 2:
            last_change = math.log(prev) - math.log(float(losses[t - 2]))
            change_ema += 0.1 * (last_change - change_ema)
        if t >= 1:
            fast += 0.1 * (prev - fast)
            slow += 0.01 * (prev - slow)
        rows[t, :6] = prev, math.log(prev), fast, slow, math.log(fast), math.log(slow)
        rows[t, 17:19] = last_change, change_ema
        rows[t, 44] = 1e-3
        rows[t, 52] = math.log1p(t)
    return rows


def power_law(steps, noise, seed):
    """A noisy decaying loss 2·(1 + t/50)^-½ · exp(N(0, noise²)) and its noiseless trend."""
    t = np.arange(steps)
    trend = 2.0 * (1.0 + t / 50.0) ** -0.5
    return trend * np.exp(np.random.default_rng(seed).normal(0.0, noise, steps)), trend


def random_walk(steps, seed):
    """A loss whose log is a random walk with N(0, 0.1²) steps."""
    return np.exp(np.cumsum(np.random.default_rng(seed).normal(0.0, 0.1, steps)))


def feed(dyn, feats, losses, start=0, stop=None):
    for t in range(start, len(losses) if stop is None else stop):
        dyn.observe(feats[t], Outcome(float(losses[t])))


# --- gradients ---------------------------------------------------------------------------------------------

def _problem(seed=0, ensemble=2, inputs=6, hidden=4, latent=3, steps=5, windows=3):
    """Random float64 weights and random windows, big enough to leave the linear regime of every unit."""
    rng = np.random.default_rng(seed)
    weights = [w * 3.0 + rng.normal(0.0, 0.3, w.shape)
               for w in _network.initial_weights(rng, ensemble, inputs, hidden, latent)]
    batch = _network.WindowBatch(
        h0=rng.normal(0.0, 0.5, (ensemble, windows, hidden)),
        x=rng.normal(0.0, 1.0, (steps, windows, inputs)),
        target=rng.normal(0.0, 1.0, (steps, windows)),
        scale_target=rng.uniform(0.0, 2.0, (steps, windows)),
        scale_mask=(rng.random((steps, windows)) < 0.6).astype(np.float64),
        weight=rng.poisson(1.0, (ensemble, steps, windows)).astype(np.float64) + 0.5,
        eps=rng.normal(0.0, 1.0, (ensemble, steps, windows, latent)),
    )
    return weights, batch


def _relative_error(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300)


@pytest.mark.parametrize(("seed", "windows"), [(0, 3), (1, 1)])
def test_gradients_match_central_finite_differences(seed, windows):
    xp = as_namespace(np)
    weights, batch = _problem(seed, windows=windows)
    _, grads = _network.loss_and_grads(xp, weights, batch)
    step = 1e-6
    for name, w, g in zip(_network.WEIGHT_NAMES, weights, grads, strict=True):
        numeric = np.zeros_like(w)
        for i in np.ndindex(w.shape):
            plus, minus = [v.copy() for v in weights], [v.copy() for v in weights]
            plus[_network.WEIGHT_NAMES.index(name)][i] += step
            minus[_network.WEIGHT_NAMES.index(name)][i] -= step
            difference = float(_network.loss(xp, plus, batch)) - float(_network.loss(xp, minus, batch))
            numeric[i] = difference / (2 * step)
        assert _relative_error(g, numeric) < 1e-6, name


@pytest.mark.skipif(not available("torch"), reason="torch is not installed")
def test_gradients_match_torch_autograd():
    import torch

    weights, batch = _problem(seed=2, ensemble=3, inputs=7, hidden=5, latent=2, steps=6, windows=4)
    _, grads = _network.loss_and_grads(as_namespace(np), weights, batch)
    tensors = [torch.tensor(w, requires_grad=True) for w in weights]
    torch_batch = _network.WindowBatch(*(torch.tensor(v) for v in batch))
    _network.loss(as_namespace(torch), tensors, torch_batch).backward()
    for name, t, g in zip(_network.WEIGHT_NAMES, tensors, grads, strict=True):
        assert _relative_error(g, t.grad.numpy()) < 1e-6, name


def test_folded_heads_sample_what_the_training_heads_compute():
    xp = as_namespace(np)
    weights, batch = _problem(seed=3)
    eps = batch.eps[:, :, 0, :]
    h = np.random.default_rng(3).normal(0.0, 1.0, (*eps.shape[:2], weights[2].shape[1]))
    out = _heads.forward(xp, h, eps, *weights[4:]).out
    raw = _heads.sample(xp, _heads.fold(xp, *weights[4:]), h, eps)
    np.testing.assert_allclose(raw[..., 0], out.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_heads.log_std(xp, raw), out.log_std, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_heads.step_scale(xp, raw), out.scale, rtol=1e-12, atol=1e-12)
    w_mean, b_mean = _heads.mean_head(xp, *weights[4:])
    at_mean = _heads.forward(xp, h, np.zeros_like(eps), *weights[4:]).out.mean
    np.testing.assert_allclose((h @ w_mean + b_mean)[..., 0], at_mean, rtol=1e-12, atol=1e-12)


# --- contract, arguments ------------------------------------------------------------------------------------

def test_is_a_dynamics_model_and_rejects_bad_arguments():
    assert isinstance(RSSMDynamics(**SMALL), DynamicsModel)
    with pytest.raises(ConfigError) as info:
        RSSMDynamics(0, hidden=0, latent=1.5, lr=-1.0, clip=math.inf, seed=-1, log_loss_slot=3, tolerance=0,
                     train_every=0)
    assert len(info.value.problems) == 9 and "recovery" in str(info.value)
    with pytest.raises(ConfigError, match="log_loss_slot"):
        RSSMDynamics(8, log_loss_slot=8)
    with pytest.raises(ConfigError, match="dtype"):
        RSSMDynamics(dtype=np.int64)
    dyn = RSSMDynamics(**SMALL)
    with pytest.raises(ConfigError, match="horizon"):
        dyn.predict(np.zeros(DIM), 0)
    with pytest.raises(BatchError, match="shape"):
        dyn.observe(np.zeros(DIM + 1), Outcome(1.0))


def test_non_finite_or_non_positive_losses_are_skipped():
    dyn = RSSMDynamics(**SMALL)
    before = dyn.state_dict()
    for loss in (math.nan, math.inf, 0.0, -1.0):
        dyn.observe(np.ones(DIM), Outcome(loss))
    after = dyn.state_dict()
    assert after["seen"] == 0 and after["rng"] == before["rng"]


def test_confidence_does_no_array_work_and_is_cached_until_the_next_observe(monkeypatch):
    losses, _ = power_law(80, 0.02, seed=0)
    feats = features_for(losses)
    dyn = RSSMDynamics(**SMALL, train_every=8, windows=2)
    feed(dyn, feats, losses, stop=64)
    calls = []
    real = _rollout.mean_rollout
    monkeypatch.setattr(_rollout, "mean_rollout", lambda *a: calls.append(1) or real(*a))
    first = dyn.confidence()
    assert 0.0 < first <= 1.0
    assert dyn.confidence() == first and dyn.predict(feats[64], 5).confidence == first and not calls
    # One 10-step forecast every 10th observe serves both confidence factors.
    for t in range(64, 80):
        feed(dyn, feats, losses, start=t, stop=t + 1)
        dyn.confidence()
        assert len(calls) == (t + 1) // 10 - 6
    assert dyn.state_dict()["adam_step"] == 10


def test_windows_batched_into_one_step_average_their_losses_and_gradients():
    xp = as_namespace(np)
    weights, batch = _problem(seed=4, windows=3)
    total, grads = _network.loss_and_grads(xp, weights, batch)
    singles = []
    for b in range(3):
        one = _network.WindowBatch(batch.h0[:, b:b + 1], batch.x[:, b:b + 1], batch.target[:, b:b + 1],
                                   batch.scale_target[:, b:b + 1], batch.scale_mask[:, b:b + 1],
                                   batch.weight[:, :, b:b + 1], batch.eps[:, :, b:b + 1])
        singles.append(_network.loss_and_grads(xp, weights, one))
    assert float(total) == pytest.approx(np.mean([float(t) for t, _ in singles]), rel=1e-12)
    for i, g in enumerate(grads):
        np.testing.assert_allclose(g, np.mean([s[1][i] for s in singles], axis=0), rtol=1e-10, atol=1e-13)


def test_predict_changes_no_state():
    losses, _ = power_law(40, 0.02, seed=1)
    feats = features_for(losses)
    a, b = RSSMDynamics(**SMALL), RSSMDynamics(**SMALL)
    feed(a, feats, losses, stop=30)
    feed(b, feats, losses, stop=30)
    assert a.predict(feats[30], 7) == a.predict(feats[30], 7)
    feed(a, feats, losses, start=30)
    feed(b, feats, losses, start=30)
    assert a.predict(feats[39], 7) == b.predict(feats[39], 7)


def test_longer_predictions_extend_shorter_ones():
    losses, _ = power_law(30, 0.02, seed=2)
    feats = features_for(losses)
    dyn = RSSMDynamics(**SMALL)
    feed(dyn, feats, losses, stop=29)
    short, long = dyn.predict(feats[29], 4), dyn.predict(feats[29], 9)
    assert short.loss == long.loss[:4] and short.step_scale == long.step_scale[:4]


def test_carries_holts_state_and_falls_back_to_it_where_members_disagree():
    from hybrid_core import TrendDynamics

    losses, _ = power_law(60, 0.03, seed=8)
    feats = features_for(losses)
    dyn, holt = RSSMDynamics(**SMALL), TrendDynamics()
    feed(dyn, feats, losses)
    feed(holt, feats, losses)
    level, trend = dyn.state_dict()["holt"]
    assert level == pytest.approx(holt.state_dict()["level"], abs=1e-12)
    assert trend == pytest.approx(holt.state_dict()["trend"], abs=1e-12)
    forecast = level + trend * np.arange(1, 6)

    def centre(members):
        holt, correction, kept = dyn._shrinkage(members)
        np.testing.assert_allclose(holt, forecast, atol=1e-12)
        assert np.all(kept >= 0.0) and np.all(kept <= np.abs(members.mean(axis=0) - holt) / 2 + 1e-12)
        return holt + correction

    # Corrections of opposite signs cancel: the centre is Holt's forecast.
    split = forecast + np.array([[0.1], [-0.1], [0.1], [-0.1]])
    np.testing.assert_allclose(centre(split), forecast, atol=1e-12)
    # Members that agree keep their correction; a wider spread shrinks it further toward Holt.
    agreed = forecast + np.full((4, 5), 0.2)
    np.testing.assert_allclose(centre(agreed), agreed[0], atol=1e-12)
    near, far = (centre(forecast + 0.2 + np.array([[d], [-d], [d], [-d]])) - forecast for d in (0.05, 0.2))
    assert np.all(0.0 < far) and np.all(far < near) and np.all(near < 0.2)


def test_the_correction_is_trusted_only_as_far_as_scored_forecasts_support_it():
    from hybrid_core.dynamics._accuracy import AccuracyTracker

    def scored(gap_of):
        tracker = AccuracyTracker(lookahead=4, span=2, step_rate=0.05, forecast_rate=0.2)
        assert tracker.trust == 0.0  # nothing scored yet: Holt's forecast alone
        rng = np.random.default_rng(0)
        for n in range(0, 400, 4):
            correction = float(rng.normal(0.0, 0.1))
            tracker.start(n, [0.0] * 4, [correction] * 4)
            for k in range(1, 5):
                tracker.observed(n + k, gap_of(correction, rng))
        return tracker.trust

    assert scored(lambda c, rng: c) == pytest.approx(1.0)  # the correction is exactly what Holt missed
    assert scored(lambda c, rng: 0.5 * c) == pytest.approx(0.5)  # half of it
    assert scored(lambda c, rng: -c) == 0.0  # it points the wrong way
    assert scored(lambda c, rng: rng.normal(0.0, 0.1)) < 0.3  # unrelated to what happens


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float64, (DIM,), elements=st.floats(-1e6, 1e6)), st.floats(-50, 50), st.floats(-5, 5))
def test_a_steps_inputs_are_those_the_training_windows_give_a_real_row(raw, level, trend):
    losses, _ = power_law(12, 0.03, seed=1)
    dyn = RSSMDynamics(**SMALL)
    feed(dyn, features_for(losses), losses)
    bound, scale = dyn._features.bound, dyn._targets.scale
    gap = np.array([level + trend]) - np.clip(raw[None, 1], -700.0, 700.0)
    extra = _rollout.holt_inputs(np.zeros(1), np.array([trend]), gap, scale, bound)
    expected = np.concatenate([dyn._features.normalize(raw[None, :]), extra], axis=1)
    np.testing.assert_array_equal(dyn._row_inputs(raw, level, trend), expected.astype(np.float32))


def test_trains_once_per_tick_on_windows_that_start_from_the_carried_states(monkeypatch):
    losses, _ = power_law(40, 0.02, seed=9)
    feats = features_for(losses)
    every, rarely = RSSMDynamics(**SMALL, train_every=1, windows=1), RSSMDynamics(**SMALL, train_every=8, windows=4)
    seen = []
    real = _network.loss_and_grads
    monkeypatch.setattr(_network, "loss_and_grads", lambda xp, w, batch: seen.append(batch) or real(xp, w, batch))
    feed(every, feats, losses, stop=26)
    assert every.state_dict()["adam_step"] == 26 and all(b.x.shape[1] == 1 for b in seen)
    seen.clear()
    feed(rarely, feats, losses, stop=24)
    assert rarely.state_dict()["adam_step"] == 3 and len(seen) == 3
    # The third tick, at the 24th row (the newest 4 + 8 - 1 = 11 kept): windows of 4 rows end at every 2nd
    # of the newest 8 rows, and each starts from the GRU state carried before its first row.
    last = seen[-1]
    assert last.x.shape == (4, 4, DIM + _rollout.EXTRA_INPUTS)
    carried = rarely.state_dict()["h_before"]
    for b, end in enumerate((4, 6, 8, 10)):
        np.testing.assert_array_equal(last.h0[:, b:b + 1], carried[end - 3])


# --- properties ---------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(0, 26), st.just(DIM)), elements=FINITE),
       st.lists(LOSS, min_size=26, max_size=26), st.integers(1, 30))
def test_outputs_are_finite_and_ordered_for_any_finite_input(feats, losses, horizon):
    dyn = RSSMDynamics(**SMALL)
    feed(dyn, feats, losses[:len(feats)])
    assert 0.0 <= dyn.confidence() <= 1.0
    query = feats[-1] if len(feats) else np.full(DIM, 1e300)
    pred = dyn.predict(query, horizon)
    assert isinstance(pred, Prediction) and 0.0 <= pred.confidence <= 1.0
    for seq in pred[:4]:
        assert len(seq) == horizon and all(math.isfinite(v) and v >= 0.0 for v in seq)
    assert all(lo <= m <= hi for lo, m, hi in zip(pred.lower, pred.loss, pred.upper, strict=True))
    assert all(0.0 < s <= 2.0 for s in pred.step_scale)


@settings(max_examples=20, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 26), st.just(DIM)), elements=FINITE),
       st.lists(st.floats(1e-6, 1e6), min_size=27, max_size=27), st.integers(1, 40))
def test_band_never_narrows_with_the_horizon_for_any_finite_input(feats, losses, horizon):
    # Arbitrary slots, but the log-loss slot holds the log of the previous loss, as the encoder's does,
    # so the band stays clear of the ±700 log bound whose clipping could narrow it.
    feats[:, 1] = np.log(losses[:len(feats)])
    dyn = RSSMDynamics(**SMALL)
    feed(dyn, feats, losses[1:len(feats) + 1])
    query = feats[-1].copy()
    query[1] = math.log(losses[len(feats)])
    pred = dyn.predict(query, horizon)
    log_loss, low, high = (np.log(np.array(seq)) for seq in pred[:3])
    assert np.all(np.diff(log_loss - low) >= -1e-9) and np.all(np.diff(high - log_loss) >= -1e-9)


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.005, 0.1), st.integers(30, 80))
def test_band_widens_with_the_horizon_on_average(seed, noise, steps):
    losses, _ = power_law(steps + 1, noise, seed)
    feats = features_for(losses)
    dyn = RSSMDynamics(seed=seed % 7, **{**SMALL, "samples": 8})
    feed(dyn, feats, losses, stop=steps)
    pred = dyn.predict(feats[steps], 30)
    # Relative width log(upper/lower): the absolute width of a falling loss shrinks with its level.
    width = np.log(np.array(pred.upper) / np.array(pred.lower))
    assert np.all(np.diff(width) >= -1e-12) and width[20:].mean() >= width[:10].mean()


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 40), st.integers(1, 10), st.booleans())
def test_state_dict_round_trip_is_exact(before, after, with_scale):
    losses, _ = power_law(before + after + 1, 0.03, seed=before)
    feats = features_for(losses)
    a = RSSMDynamics(**SMALL)
    for t in range(before):
        a.observe(feats[t], Outcome(float(losses[t]), 0.5 if with_scale else None))
    b = RSSMDynamics(seed=99, **SMALL)
    b.load_state_dict(a.state_dict())
    assert a.predict(feats[before], 6) == b.predict(feats[before], 6)
    feed(a, feats, losses, start=before, stop=before + after)
    feed(b, feats, losses, start=before, stop=before + after)
    assert a.predict(feats[before + after], 6) == b.predict(feats[before + after], 6)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(np.array_equal(x, y) for x, y in zip(sa["weights"], sb["weights"], strict=True))
    assert sa["rng"] == sb["rng"] and sa["seen"] == sb["seen"] and a.confidence() == b.confidence()
    assert repr(sa["accuracy"]) == repr(sb["accuracy"])  # repr: NaN == NaN


def test_load_state_dict_rejects_foreign_states():
    a = RSSMDynamics(**SMALL)
    with pytest.raises(CheckpointError, match="sizes"):
        RSSMDynamics(**{**SMALL, "hidden": 9}).load_state_dict(a.state_dict())
    with pytest.raises(CheckpointError, match="sizes"):
        RSSMDynamics(**{**SMALL, "windows": 2}).load_state_dict(a.state_dict())
    for old in ("RSSMDynamics/1", "RSSMDynamics/2", "something else"):
        with pytest.raises(CheckpointError, match="format"):
            a.load_state_dict({"format": old})


def _damaged(state):
    """Variants of a valid state with one part broken."""
    rows = state["rows"]
    yield {**state, "seen": state["seen"] - 10}  # rows no longer match the observations
    yield {**state, "h_before": state["h_before"][:-1]}
    yield {**state, "rows": {**rows, "features": rows["features"][:, :-1]}}
    yield {**state, "weights": state["weights"][:, :-1]}
    yield {**state, "h_run": np.zeros((1, 1, 1))}
    yield {**state, "unscored": [[0.0, 1.0]] * 40}
    yield {**state, "accuracy": {**state["accuracy"], "pending": [1.0, 2.0]}}
    yield {k: v for k, v in state.items() if k != "targets"}


def test_a_damaged_state_raises_and_changes_nothing():
    losses, _ = power_law(30, 0.03, seed=2)
    feats = features_for(losses)
    good, victim = RSSMDynamics(**SMALL), RSSMDynamics(**SMALL, seed=5)
    feed(good, feats, losses, stop=25)
    feed(victim, feats, losses, stop=13)
    before = victim.predict(feats[13], 4)
    for broken in _damaged(good.state_dict()):
        with pytest.raises(CheckpointError):
            victim.load_state_dict(broken)
        assert victim.predict(feats[13], 4) == before and victim.state_dict()["seen"] == 13


# Eager JAX compiles each new (operation, shape) once, ~200 of them here (~12 s): slow even for a short run.
OTHER_BACKENDS = [pytest.param(*p.values, id=p.id, marks=[*p.marks, *[pytest.mark.slow] * (p.id == "jax")])
                  for p in NAMESPACES if p.id != "numpy"]


@pytest.mark.parametrize("name", OTHER_BACKENDS)
def test_backends_agree_with_numpy_for_the_same_seed(name):
    steps, horizon = (3, 2) if name == "jax" else (30, 8)
    config = {**SMALL, "window": 1} if name == "jax" else SMALL
    losses, _ = power_law(steps + 1, 0.03, seed=3)
    feats = features_for(losses)
    results = []
    for backend in ("numpy", name):
        with namespace(backend) as xp:
            dyn = RSSMDynamics(xp=xp, dtype=xp.float64, **config)
            feed(dyn, feats, losses, stop=steps)
            pred = dyn.predict(feats[steps], horizon)
            results.append((np.array(pred[:4]), pred.confidence))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-9)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-9, abs=1e-12)


# --- learning -----------------------------------------------------------------------------------------------

def test_learns_a_noisy_power_law_and_trusts_it_more_than_a_random_walk():
    losses, trend = power_law(320, 0.03, seed=0)
    feats = features_for(losses)
    dyn = RSSMDynamics()
    feed(dyn, feats, losses, stop=300)
    pred = dyn.predict(feats[300], 10)
    assert abs(pred.loss[-1] / trend[309] - 1.0) < 0.10
    walk = random_walk(300, seed=0)
    wandering = RSSMDynamics()
    feed(wandering, features_for(walk), walk)
    assert dyn.confidence() > wandering.confidence() + 0.2


def test_step_scale_head_learns_observed_targets_only():
    losses, _ = power_law(400, 0.02, seed=4)
    feats = features_for(losses)
    taught, untaught = RSSMDynamics(**SMALL), RSSMDynamics(**SMALL)
    for t in range(400):
        taught.observe(feats[t], Outcome(float(losses[t]), 0.4))
        untaught.observe(feats[t], Outcome(float(losses[t])))
    assert max(taught.predict(feats[-1], 5).step_scale) < 0.6
    assert all(abs(s - 1.0) < 0.05 for s in untaught.predict(feats[-1], 5).step_scale)


# --- evaluate_dynamics --------------------------------------------------------------------------------------

class _Oracle:
    """Knows the whole trajectory: predicts the realised losses exactly."""

    def __init__(self, losses):
        self.losses, self.seen = losses, 0

    def observe(self, features, outcome):
        self.seen += 1

    def predict(self, features, horizon):
        future = tuple(float(v) for v in self.losses[self.seen:self.seen + horizon])
        return Prediction(future, future, future, (1.0,) * horizon, 1.0)

    def confidence(self):
        return 1.0

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


class _Constant(_Oracle):
    """Predicts the trajectory's mean loss at every step."""

    def predict(self, features, horizon):
        mean = float(np.mean(self.losses))
        return Prediction((mean,) * horizon, (0.0,) * horizon, (2 * mean,) * horizon, (1.0,) * horizon, 0.5)


def test_evaluate_scores_a_perfect_and_a_constant_predictor():
    losses, _ = power_law(400, 0.05, seed=5)
    feats = features_for(losses)
    perfect = evaluate_dynamics(lambda: _Oracle(losses), feats, losses, horizons=(1, 10, 50), warmup=100)
    for h in (1, 10, 50):
        assert perfect["r2"][h] == pytest.approx(1.0) and perfect["coverage"][h] == 1.0
        assert perfect["skill"][h] == pytest.approx(1.0) and perfect["count"][h] > 40
    assert perfect["observe_ms"] >= 0.0 and perfect["predict_ms"] >= 0.0 and perfect["predictions"] == 60
    constant = evaluate_dynamics(lambda: _Constant(losses), feats, losses, warmup=100)
    assert all(constant["r2"][h] < 0.05 for h in (1, 10, 50))


def test_evaluate_runs_the_rssm_and_rejects_bad_arguments():
    losses, _ = power_law(160, 0.03, seed=6)
    feats = features_for(losses)
    result = evaluate_dynamics(lambda: RSSMDynamics(**SMALL), feats, losses, horizons=(1, 10), warmup=120)
    assert set(result) == {"r2", "skill", "coverage", "count", "observe_ms", "predict_ms", "predictions"}
    assert result["count"][10] > 0 and 0.0 <= result["coverage"][10] <= 1.0 and result["observe_ms"] > 0.0
    with pytest.raises(ConfigError) as info:
        evaluate_dynamics(RSSMDynamics, feats[:-1], losses, horizons=(0,), warmup=500, every=0)
    assert len(info.value.problems) == 4


@pytest.mark.slow
def test_rssm_tracks_a_long_noisy_power_law():
    losses, _ = power_law(1500, 0.03, seed=7)
    feats = features_for(losses)
    result = evaluate_dynamics(RSSMDynamics, feats, losses, horizons=(1, 10, 50), warmup=300)
    assert result["r2"][1] > 0.95 and result["r2"][10] > 0.9 and result["r2"][50] > 0.7
    # One step ahead it must beat repeating the last loss: it has learnt to discount that loss's noise.
    assert result["skill"][1] > 0.2
    assert all(0.75 <= result["coverage"][h] <= 1.0 for h in (1, 10, 50))


# --- BLAS threads -------------------------------------------------------------------------------------------

def test_training_runs_numpy_blas_on_one_thread_and_restores_the_count(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    losses, _ = power_law(20, 0.03, seed=3)
    feats = features_for(losses)
    dyn = RSSMDynamics(**SMALL, train_every=4, windows=2)
    inside = []
    real = _network.loss_and_grads

    def numpy_blas_threads():  # NumPy's own BLAS (its wheel ships it in numpy.libs); other libraries may be loaded
        return [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas" and "numpy" in i["filepath"]]

    def spy(xp, weights, batch):
        inside.append(numpy_blas_threads())
        return real(xp, weights, batch)

    monkeypatch.setattr(_network, "loss_and_grads", spy)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        outside = numpy_blas_threads()
        if not outside or max(outside) < 2:
            pytest.skip("NumPy's BLAS here is not a library of its own that can run two threads")
        feed(dyn, feats, losses)
        after = numpy_blas_threads()
    assert len(inside) == 5 and all(counts == [1] * len(outside) for counts in inside)
    assert after == outside
