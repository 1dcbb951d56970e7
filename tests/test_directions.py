"""Directions of predicted steps."""

import numpy as np
from _toy import LeastSquares, PlainSGD

from hybrid_core._directions import ExtrapolateDirection, LinefitDirection, make_direction


def test_linefit_recovers_a_linear_trajectory_slope():
    model = LeastSquares(np)
    opt = PlainSGD(model)
    fit = LinefitDirection(count=4, spacing=5)
    velocity = [np.array([0.1, -0.2, 0.3]), np.array([0.05])]
    for step in range(1, 41):
        model.apply_update(velocity, 1.0)
        fit.observe(step, model)
    assert len(fit._snapshots) == 4
    for d, v in zip(fit.direction(model, opt), velocity):
        np.testing.assert_allclose(d, v, rtol=1e-10)
    assert fit.memory_copies == 4


def test_linefit_falls_back_and_extrapolate_uses_the_optimizer():
    model = LeastSquares(np)
    opt = PlainSGD(model)
    opt.step([np.ones(3), np.ones(1)])
    fit = LinefitDirection(count=3, spacing=1)
    fit.observe(1, model)
    for a, b in zip(fit.direction(model, opt), opt.extrapolate()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(ExtrapolateDirection().direction(model, opt), opt.last):
        np.testing.assert_array_equal(a, b)
    assert isinstance(make_direction("linefit", 3, 2), LinefitDirection)
    assert isinstance(make_direction("extrapolate", 3, 2), ExtrapolateDirection)
