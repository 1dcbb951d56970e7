"""ResidualStore and the recursive-least-squares ResidualCorrector."""

import math

import numpy as np

from hybrid_core._corrector import ResidualCorrector, ResidualStore


def test_rls_matches_least_squares_without_forgetting():
    rng = np.random.default_rng(0)
    w_true = np.array([0.3, -0.2, 0.1])
    xs = rng.normal(size=(200, 3))
    ys = xs @ w_true + 0.01 * rng.normal(size=200)
    rls = ResidualCorrector(3, forgetting=1.0, prior=1e6, max_log_correction=10.0)
    for x, y in zip(xs, ys):
        rls.update(x, y)
    np.testing.assert_allclose(rls.w, np.linalg.lstsq(xs, ys, rcond=None)[0], atol=1e-6)
    assert math.isclose(rls.correct(2.0, xs[0]), 2.0 * math.exp(xs[0] @ rls.w), rel_tol=1e-9)


def test_correction_is_clipped_and_ignores_non_finite():
    rls = ResidualCorrector(2, max_log_correction=0.5)
    for _ in range(50):
        rls.update(np.array([1.0, 0.0]), 5.0)
    rls.update(np.array([np.nan, 1.0]), 1.0)
    assert rls.log_correction(np.array([1.0, 0.0])) == 0.5
    assert np.all(np.isfinite(rls.w))
    clone = ResidualCorrector(2)
    clone.load_state_dict(rls.state_dict())
    assert clone.log_correction(np.array([1.0, 0.0])) == 0.5


def test_store_is_bounded_and_in_log_space():
    store = ResidualStore(capacity=3)
    for i in range(5):
        store.add(i, np.zeros(2), predicted=1.0, actual=math.e)
    assert len(store) == 3 and store.total == 5
    assert store.items[0].step == 2 and math.isclose(store.mean(), 1.0)
    copy = ResidualStore(3)
    copy.load_state_dict(store.state_dict())
    assert copy.items == store.items
