"""LinUCB: Sherman–Morrison updates equal the closed form; it learns to stop predicting."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import ConfigError
from hybrid_core._bandit import LinUCBBandit

contexts = st.lists(st.floats(-3, 3), min_size=3, max_size=3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 5, 10]), contexts, st.floats(-1, 1)), max_size=40),
       st.floats(0.1, 10.0), st.floats(0.0, 2.0), contexts)
def test_updates_match_closed_form(history, ridge, alpha, query):
    bandit = LinUCBBandit([0, 5, 10], 3, alpha=alpha, ridge=ridge)
    for arm, x, r in history:
        bandit.update(arm, np.array(x), r)
    q = np.array(query)
    expected = []
    for arm in (0, 5, 10):
        rows = [(np.array(x), r) for a, x, r in history if a == arm]
        a_mat = ridge * np.eye(3) + sum((np.outer(x, x) for x, _ in rows), np.zeros((3, 3)))
        b = sum((r * x for x, r in rows), np.zeros(3))
        theta = np.linalg.solve(a_mat, b)
        np.testing.assert_allclose(bandit.theta(arm), theta, rtol=1e-7, atol=1e-9)
        expected.append(theta @ q + alpha * np.sqrt(q @ np.linalg.solve(a_mat, q)))
    np.testing.assert_allclose(bandit.scores(q), expected, rtol=1e-7, atol=1e-9)


def test_prefers_the_arm_that_pays_and_zero_when_none_does():
    rng = np.random.default_rng(0)
    good = LinUCBBandit([0, 5, 10], 2, alpha=0.3)
    bad = LinUCBBandit([0, 5, 10], 2, alpha=0.3)
    x = np.array([1.0, 0.5])
    for _ in range(200):
        for bandit, means in ((good, {0: 0.0, 5: 0.1, 10: 0.4}), (bad, {0: 0.0, 5: -0.2, 10: -0.5})):
            arm = bandit.choose(x)
            bandit.update(arm, x, means[arm] + 0.3 * rng.normal())
    assert good.choose(x) == 10 and bad.choose(x) == 0
    assert bad.pulls[0] > 150


def test_validation_and_round_trip():
    with pytest.raises(ConfigError) as info:
        LinUCBBandit([5, 5], 0, alpha=-1, ridge=0)
    assert len(info.value.problems) == 5
    b = LinUCBBandit([0, 3], 2)
    with pytest.raises(ConfigError):
        b.update(4, np.ones(2), 1.0)
    with pytest.raises(ConfigError):
        b.update(3, np.array([1.0, np.nan]), 1.0)
    b.update(3, np.array([1.0, 2.0]), 0.5)
    c = LinUCBBandit([0, 3], 2)
    c.load_state_dict(b.state_dict())
    np.testing.assert_array_equal(c.scores(np.ones(2)), b.scores(np.ones(2)))


def test_ladder_unlocks_a_horizon_only_after_the_shorter_one_paid():
    bandit = LinUCBBandit([0, 5, 15, 30], 2, alpha=0.5, ladder=True)
    x = np.array([1.0, 0.5])
    assert bandit.allowed() == [0, 5]
    bandit.update(5, x, -0.3)
    assert bandit.allowed() == [0, 5]  # 5 lost: 15 and 30 stay locked
    for _ in range(50):
        assert bandit.choose(x) in (0, 5)
        bandit.update(bandit.choose(x), x, -0.3 if bandit.choose(x) == 5 else 0.0)
    bandit.update(5, x, 2.0)  # now 5 pays on average
    assert bandit.reward_sums[1] > 0 and bandit.allowed() == [0, 5, 15]
    bandit.update(15, x, 0.4)
    assert bandit.allowed() == [0, 5, 15, 30]
    restored = LinUCBBandit([0, 5, 15, 30], 2)
    restored.load_state_dict(bandit.state_dict())
    assert restored.ladder and restored.allowed() == bandit.allowed()
    assert LinUCBBandit([0, 5, 15, 30], 2).allowed() == [0, 5, 15, 30]  # off by default for the class


def test_ladder_falls_back_to_no_prediction_when_every_horizon_loses():
    rng = np.random.default_rng(1)
    bandit = LinUCBBandit([0, 5, 15, 30, 50, 75], 2, alpha=0.5, ladder=True)
    x = np.array([1.0, 0.5])
    chosen = []
    for _ in range(30):
        arm = bandit.choose(x)
        chosen.append(arm)
        bandit.update(arm, x, 0.0 if arm == 0 else -0.02 * arm + 0.05 * rng.normal())
    assert max(chosen) == 5  # longer horizons never explored
    assert chosen[-10:].count(0) >= 8
