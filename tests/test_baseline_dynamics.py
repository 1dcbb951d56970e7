"""TrendDynamics: the baseline dynamics model."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import ConfigError, DynamicsModel, Outcome, TrendDynamics

FEATS = np.zeros(64)


def _feed(dyn, losses):
    for loss in losses:
        dyn.observe(FEATS, Outcome(loss))


def test_is_a_dynamics_model():
    assert isinstance(TrendDynamics(), DynamicsModel)


def test_learns_a_smooth_decay_and_trusts_it():
    dyn = TrendDynamics()
    _feed(dyn, [2.0 * math.exp(-0.01 * i) for i in range(400)])
    pred = dyn.predict(FEATS, 10)
    truth = 2.0 * math.exp(-0.01 * 409)
    assert pred.loss[-1] == pytest.approx(truth, rel=0.03)
    assert dyn.confidence() > 0.9
    assert all(lo <= m <= hi for lo, m, hi in zip(pred.lower, pred.loss, pred.upper))


def test_noisy_random_walk_is_not_trusted():
    rng = np.random.default_rng(0)
    walk = np.exp(np.cumsum(rng.normal(0, 0.1, 400)))
    dyn = TrendDynamics()
    _feed(dyn, walk)
    smooth = TrendDynamics()
    _feed(smooth, [2.0 * math.exp(-0.01 * i) for i in range(400)])
    assert dyn.confidence() < 0.5 < smooth.confidence()


def test_confidence_zero_before_enough_data_and_bad_args():
    dyn = TrendDynamics()
    _feed(dyn, [1.0, 0.9])
    assert dyn.confidence() == 0.0
    with pytest.raises(ConfigError):
        dyn.predict(FEATS, 0)
    with pytest.raises(ConfigError) as info:
        TrendDynamics(level_rate=0, tolerance=-1, lookahead=0)
    assert len(info.value.problems) == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e300), min_size=0, max_size=60), st.integers(1, 80))
def test_confidence_in_unit_interval_and_predictions_finite(losses, horizon):
    dyn = TrendDynamics(min_observations=1)
    _feed(dyn, losses)
    c = dyn.confidence()
    assert 0.0 <= c <= 1.0
    pred = dyn.predict(FEATS, horizon)
    for seq in (pred.loss, pred.lower, pred.upper, pred.step_scale):
        assert len(seq) == horizon and all(math.isfinite(v) and v >= 0 for v in seq)
    assert 0.0 <= pred.confidence <= 1.0


def test_state_round_trip():
    a = TrendDynamics()
    _feed(a, [1.0 / (1 + 0.1 * i) for i in range(50)])
    b = TrendDynamics()
    b.load_state_dict(a.state_dict())
    assert a.predict(FEATS, 5) == b.predict(FEATS, 5)
    _feed(a, [0.3])
    _feed(b, [0.3])
    assert a.confidence() == b.confidence()
