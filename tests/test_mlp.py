"""The reference MLP: hand-written gradients, every namespace, bad batches."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import BackendError, BatchError, ConfigError, Model
from hybrid_core._backend import from_numpy, to_numpy
from hybrid_core.models import MLP


def _batch(xp, loss, n=7, sizes=(5, 6, 4, 3), seed=1):
    rng = np.random.default_rng(seed)
    x = from_numpy(xp, rng.normal(size=(n, sizes[0])), dtype=xp.float64)
    if loss == "cross_entropy":
        y = from_numpy(xp, rng.integers(0, sizes[-1], size=n))
    else:
        y = from_numpy(xp, rng.normal(size=(n, sizes[-1])), dtype=xp.float64)
    return x, y


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_gradients_match_finite_differences(loss, activation):
    model = MLP([5, 6, 4, 3], loss=loss, activation=activation, dtype=np.float64, l2=0.3, seed=3)
    batch = _batch(np, loss)
    _, grads = model.loss_and_grad(batch)
    eps = 1e-6
    for i, p in enumerate(model.parameters()):
        numeric = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            bump = [np.zeros_like(q) for q in model.parameters()]
            bump[i][idx] = 1.0
            model.apply_update(bump, eps)
            up = float(model.loss(batch))
            model.apply_update(bump, -2 * eps)
            down = float(model.loss(batch))
            model.apply_update(bump, eps)
            numeric[idx] = (up - down) / (2 * eps)
        err = np.max(np.abs(numeric - grads[i])) / max(np.max(np.abs(numeric)), 1e-12)
        assert err < 1e-6, (i, err)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_every_namespace_agrees_with_numpy(xp, loss):
    ref = MLP([5, 6, 4, 3], loss=loss, dtype=np.float64, seed=2)
    model = MLP([5, 6, 4, 3], xp=xp, loss=loss, dtype=xp.float64, seed=2)
    assert isinstance(model, Model)
    ref_loss, ref_grads = ref.loss_and_grad(_batch(np, loss))
    loss_value, grads = model.loss_and_grad(_batch(xp, loss))
    assert loss_value.shape == ()
    np.testing.assert_allclose(to_numpy(loss_value), ref_loss, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(to_numpy(g), r, rtol=1e-9, atol=1e-12)
    if loss == "cross_entropy":
        acc = float(to_numpy(model.accuracy(_batch(xp, loss))))
        assert acc == pytest.approx(float(ref.accuracy(_batch(np, loss))))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.floats(-10, 10))
def test_apply_update_round_trip(hidden, out, scale):
    model = MLP([3, hidden, out], dtype=np.float64, seed=hidden)
    before = [p.copy() for p in model.parameters()]
    rng = np.random.default_rng(0)
    update = [rng.normal(size=p.shape) for p in before]
    model.apply_update(update, scale)
    model.apply_update(update, -scale)
    for a, b in zip(before, model.parameters()):
        np.testing.assert_allclose(a, b, atol=1e-12 * (1 + abs(scale)))


@settings(max_examples=40, deadline=None)
@given(st.floats(-1e3, 1e3), st.sampled_from(["cross_entropy", "mse"]))
def test_loss_finite_for_finite_input(value, loss):
    model = MLP([4, 5, 3], loss=loss, dtype=np.float64)
    x = np.full((2, 4), value)
    y = np.array([0, 2]) if loss == "cross_entropy" else np.full((2, 3), value)
    assert np.isfinite(model.loss((x, y)))


def test_bad_batches_and_arguments():
    model = MLP([4, 5, 3], dtype=np.float64)
    x, y = np.zeros((2, 4)), np.array([0, 1])
    with pytest.raises(BatchError, match=r"\(n, 4\)"):
        model.loss((np.zeros((2, 5)), y))
    with pytest.raises(BatchError, match="labels"):
        model.loss((x, np.array([0, 1, 2])))
    with pytest.raises(BatchError, match="empty"):
        model.loss((np.zeros((0, 4)), np.array([], dtype=int)))
    with pytest.raises(BatchError, match="pair"):
        model.loss(x)
    with pytest.raises(BatchError, match="shape"):
        model.apply_update([np.zeros(1)] * 4, 1.0)
    with pytest.raises(ConfigError) as info:
        MLP([4], loss="hinge", activation="gelu", l2=-1)
    assert len(info.value.problems) == 4
    strict = pytest.importorskip("array_api_strict", reason="array-api-strict not installed")
    with pytest.raises(BackendError, match=r"array_api_strict.*numpy"):
        model.loss((strict.asarray(x), strict.asarray(y)))
