"""The reference MLP: exact gradients, the same numbers on every namespace, clear errors for bad input."""

import array_api_compat
import numpy as np
import pytest
from _namespaces import NAMESPACES, namespace, namespace_fixture
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hybrid_core import BackendError, BatchError, ConfigError, Model
from hybrid_core._backend import from_numpy, to_numpy
from hybrid_core.models import MLP

xp = namespace_fixture()

SIZES = (5, 6, 4, 3)


def _batch(xp, loss, n=7, sizes=SIZES, seed=1, dtype=None):
    rng = np.random.default_rng(seed)
    dtype = xp.float64 if dtype is None else dtype
    x = from_numpy(xp, rng.normal(size=(n, sizes[0])), dtype=dtype)
    if loss == "cross_entropy":
        return x, from_numpy(xp, rng.integers(0, sizes[-1], size=n))
    return x, from_numpy(xp, rng.normal(size=(n, sizes[-1])), dtype=dtype)


def _numeric_gradient(model, batch, eps=1e-6):
    """Central differences of model.loss, one parameter entry at a time, bumped through apply_update."""
    params = model.parameters()
    numeric = []
    for i, p in enumerate(params):
        grad = np.zeros(p.shape)
        for idx in np.ndindex(p.shape):
            bump = [np.zeros_like(q) for q in params]
            bump[i][idx] = 1.0
            model.apply_update(bump, eps)
            up = float(model.loss(batch))
            model.apply_update(bump, -2 * eps)
            down = float(model.loss(batch))
            model.apply_update(bump, eps)
            grad[idx] = (up - down) / (2 * eps)
        numeric.append(grad)
    return numeric


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_gradients_match_central_differences(loss, activation):
    model = MLP(SIZES, loss=loss, activation=activation, dtype=np.float64, l2=0.3, seed=3)
    batch = _batch(np, loss)
    _, grads = model.loss_and_grad(batch)
    numeric = _numeric_gradient(model, batch)
    flat_a = np.concatenate([g.ravel() for g in grads])
    flat_n = np.concatenate([g.ravel() for g in numeric])
    rel = np.linalg.norm(flat_a - flat_n) / max(np.linalg.norm(flat_a), np.linalg.norm(flat_n))
    assert rel < 1e-6, rel
    for a, n in zip(grads, numeric, strict=True):
        np.testing.assert_allclose(a, n, rtol=1e-5, atol=1e-8)


def test_l2_term_is_half_l2_times_squared_weights():
    plain = MLP(SIZES, loss="mse", dtype=np.float64, seed=4)
    decayed = MLP(SIZES, loss="mse", dtype=np.float64, seed=4, l2=0.5)
    batch = _batch(np, "mse")
    weights = decayed.parameters()[0::2]
    expected = float(plain.loss(batch)) + 0.25 * sum(float(np.sum(w * w)) for w in weights)
    assert float(decayed.loss(batch)) == pytest.approx(expected, rel=1e-12)
    out = plain.outputs(batch[0])
    assert float(plain.loss(batch)) == pytest.approx(0.5 * np.sum((out - batch[1]) ** 2) / 7, rel=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_every_namespace_agrees_with_numpy(xp, loss, activation):
    ref = MLP(SIZES, loss=loss, activation=activation, dtype=np.float64, seed=2, l2=0.1)
    model = MLP(SIZES, xp=xp, loss=loss, activation=activation, dtype=xp.float64, seed=2, l2=0.1)
    assert isinstance(model, Model)
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        np.testing.assert_array_equal(to_numpy(p), r)
    batch, ref_batch = _batch(xp, loss), _batch(np, loss)
    ref_loss, ref_grads = ref.loss_and_grad(ref_batch)
    value, grads = model.loss_and_grad(batch)
    assert value.shape == () and array_api_compat.array_namespace(value) is xp
    np.testing.assert_allclose(to_numpy(value), ref_loss, rtol=1e-10, atol=0)
    np.testing.assert_allclose(to_numpy(model.loss(batch)), ref_loss, rtol=1e-10, atol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        assert array_api_compat.array_namespace(g) is xp and g.dtype == xp.float64
        np.testing.assert_allclose(to_numpy(g), r, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_numpy(model.outputs(batch[0])), ref.outputs(ref_batch[0]), rtol=1e-10)
    if loss == "cross_entropy":
        assert float(to_numpy(model.accuracy(batch))) == pytest.approx(float(ref.accuracy(ref_batch)))


def test_default_dtype_is_float32(xp):
    model = MLP([3, 4, 2], xp=xp)
    assert all(p.dtype == xp.float32 for p in model.parameters())
    value, grads = model.loss_and_grad(_batch(xp, "cross_entropy", sizes=(3, 4, 2), dtype=xp.float32))
    assert value.dtype == xp.float32 and all(g.dtype == xp.float32 for g in grads)


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    scale=st.floats(-100, 100, allow_nan=False),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("name", NAMESPACES)
def test_apply_update_and_its_negation_restore_the_parameters(name, sizes, scale, seed):
    with namespace(name) as xp:
        model = MLP(sizes, xp=xp, loss="mse", dtype=xp.float64, seed=seed)
        before = [to_numpy(p) for p in model.parameters()]
        rng = np.random.default_rng(seed)
        raw = [rng.normal(size=b.shape) for b in before]
        update = [from_numpy(xp, u, dtype=xp.float64) for u in raw]
        model.apply_update(update, scale)
        for p, b, u in zip(model.parameters(), before, raw, strict=True):
            np.testing.assert_allclose(to_numpy(p), b + scale * u, rtol=1e-12, atol=1e-12)
        model.apply_update(update, -scale)
        for p, b in zip(model.parameters(), before, strict=True):
            np.testing.assert_allclose(to_numpy(p), b, rtol=0, atol=1e-12 * (1 + abs(scale)) * 10)


_finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(np.float64, (3, 4), elements=_finite),
    target=hnp.arrays(np.float64, (3, 3), elements=_finite),
    labels=hnp.arrays(np.int64, (3,), elements=st.integers(0, 2)),
    loss=st.sampled_from(["cross_entropy", "mse"]),
    activation=st.sampled_from(["tanh", "relu"]),
)
def test_loss_and_gradients_are_finite_for_any_finite_input(x, target, labels, loss, activation):
    model = MLP([4, 5, 3], loss=loss, activation=activation, dtype=np.float64, l2=0.01)
    value, grads = model.loss_and_grad((x, labels if loss == "cross_entropy" else target))
    assert np.isfinite(value) and value >= 0
    assert all(np.all(np.isfinite(g)) for g in grads)


def _bad_batches():
    x, labels = np.zeros((7, 4)), np.zeros(7, dtype=np.int64)
    return [
        ("not a pair", "cross_entropy", x, BatchError, "pair"),
        ("wrong width", "cross_entropy", (np.zeros((7, 5)), labels), BatchError, r"\(7, 5\).*\(n, 4\)"),
        ("x is 1-d", "cross_entropy", (np.zeros(4), labels), BatchError, r"\(4,\).*\(n, 4\)"),
        ("empty", "cross_entropy", (np.zeros((0, 4)), np.zeros(0, dtype=np.int64)), BatchError, "empty"),
        ("x dtype", "cross_entropy", (np.zeros((7, 4), np.float32), labels), BatchError, "float32.*float64"),
        ("fewer labels", "cross_entropy", (x, labels[:3]), BatchError, r"\(3,\).*expected \(7,\)"),
        ("one-hot labels", "cross_entropy", (x, np.zeros((7, 3))), BatchError, r"\(7, 3\).*\(7,\)"),
        ("float labels", "cross_entropy", (x, np.zeros(7)), BatchError, "integer"),
        ("target width", "mse", (x, np.zeros((7, 2))), BatchError, r"\(7, 2\).*expected \(7, 3\)"),
        ("fewer targets", "mse", (x, np.zeros((6, 3))), BatchError, r"\(6, 3\).*expected \(7, 3\)"),
        ("target dtype", "mse", (x, np.zeros((7, 3), np.float32)), BatchError, "float32"),
        ("list input", "mse", (x.tolist(), np.zeros((7, 3))), BackendError, "not an array"),
    ]


@pytest.mark.parametrize("case", _bad_batches(), ids=lambda c: c[0])
def test_bad_batch_raises_a_clear_error(case):
    _, loss, batch, error, pattern = case
    model = MLP([4, 5, 3], loss=loss, dtype=np.float64)
    for call in (model.loss, model.loss_and_grad):
        with pytest.raises(error, match=pattern) as info:
            call(batch)
        assert info.value.recovery != error.default_recovery


@pytest.mark.parametrize("name", [p for p in NAMESPACES if p.values[0] != "numpy"])
def test_batch_from_another_library_raises_backend_error(name):
    model = MLP([4, 5, 3], dtype=np.float64)
    x, y = np.zeros((2, 4)), np.array([0, 1])
    with namespace(name) as other:
        foreign_y = from_numpy(other, y)
        foreign_x = from_numpy(other, x, dtype=other.float64)
        foreign_update = [from_numpy(other, to_numpy(p), dtype=other.float64) for p in model.parameters()]
    with pytest.raises(BackendError, match=rf"y is a {name}.* numpy") as info:
        model.loss((x, foreign_y))
    assert "Convert the batch to numpy" in str(info.value)
    with pytest.raises(BackendError, match=rf"x is a {name}"):
        model.outputs(foreign_x)
    with pytest.raises(BackendError, match=rf"update\[0\] is a {name}"):
        model.apply_update(foreign_update, 1.0)


def test_bad_update_raises_and_leaves_the_parameters_alone():
    model = MLP([4, 5, 3], dtype=np.float64)
    before = model.parameters()
    with pytest.raises(BatchError, match="holds 2 arrays but the model has 4"):
        model.apply_update(before[:2], 1.0)
    with pytest.raises(BatchError, match=r"update\[1\] has shape \(3,\); parameter 1 has \(5,\)"):
        model.apply_update([before[0], np.zeros(3), before[2], before[3]], 1.0)
    with pytest.raises(BatchError, match=r"update\[0\] has dtype float32"):
        model.apply_update([p.astype(np.float32) for p in before], 1.0)
    assert all(a is b for a, b in zip(before, model.parameters(), strict=True))


def test_outputs_and_accuracy_checks():
    model = MLP([4, 5, 3], loss="mse", dtype=np.float64)
    with pytest.raises(BatchError, match=r"\(2, 3\).*\(n, 4\)"):
        model.outputs(np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="accuracy"):
        model.accuracy((np.zeros((2, 4)), np.zeros((2, 3))))
    classifier = MLP([2, 3], dtype=np.float64, activation="relu")
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]])
    labels = np.argmax(classifier.outputs(x), axis=1)
    assert float(classifier.accuracy((x, labels))) == 1.0
    assert float(classifier.accuracy((x, (labels + 1) % 3))) == 0.0


def test_constructor_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        MLP([4], loss="hinge", activation="gelu", seed=-1, l2=-1.0)
    assert len(info.value.problems) == 5
    with pytest.raises(ConfigError, match="2 classes"):
        MLP([4, 1])
    with pytest.raises(ConfigError, match="real floating"):
        MLP([4, 2], dtype=np.int32)
    with pytest.raises(BackendError, match="not an array namespace"):
        MLP([4, 2], xp=object())
