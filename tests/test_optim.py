"""Reference optimizers: torch.optim's numbers, extrapolate(), exact state round trips, validation."""

import array_api_compat
import numpy as np
import pytest
from _namespaces import available, namespace, namespace_fixture, only
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import BackendError, BatchError, CheckpointError, ConfigError, ModelError, Optimizer
from hybrid_core._backend import from_numpy, to_numpy
from hybrid_core.models import MLP
from hybrid_core.optim import SGD, Adam, AdamW

xp = namespace_fixture()

OURS = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}
CASES = [
    pytest.param("SGD", dict(lr=0.1), id="sgd"),
    pytest.param("SGD", dict(lr=0.1, weight_decay=0.05), id="sgd-wd"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.9), id="sgd-momentum"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01), id="sgd-momentum-wd"),
    pytest.param("SGD", dict(lr=0.05, momentum=0.8, weight_decay=0.02, nesterov=True), id="sgd-nesterov-wd"),
    pytest.param("Adam", dict(lr=0.01), id="adam"),
    pytest.param("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), id="adam-wd"),
    pytest.param("AdamW", dict(lr=0.01), id="adamw"),
    pytest.param("AdamW", dict(lr=0.01, betas=(0.85, 0.995), weight_decay=0.1), id="adamw-wd"),
]
SIZES = [3, 4, 2]


def _grads(xp, step, model):
    rng = np.random.default_rng(100 + step)
    return [from_numpy(xp, rng.normal(size=p.shape), dtype=p.dtype) for p in model.parameters()]


def _same_state(a, b):
    """Two state dicts hold equal scalars and the very same arrays."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, list):
            assert len(value) == len(b[key]) and all(x is y for x, y in zip(value, b[key], strict=True)), key
        else:
            assert value == b[key], key


def _assert_close(ours, theirs, **tol):
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), **tol)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_matches_torch_optim_for_20_steps(xp, name, kwargs):
    torch = pytest.importorskip("torch", reason="torch is not installed: nothing to compare against")
    model = MLP(SIZES, xp=xp, dtype=xp.float64, seed=1)
    opt = OURS[name](model, **kwargs)
    assert isinstance(opt, Optimizer)
    ref = [torch.tensor(to_numpy(p), requires_grad=True) for p in model.parameters()]
    ref_opt = getattr(torch.optim, name)(ref, **kwargs)
    for i in range(20):
        if i == 10:  # a learning-rate change mid-run must take effect the same way
            opt.lr = kwargs["lr"] / 2
            for group in ref_opt.param_groups:
                group["lr"] = kwargs["lr"] / 2
        grads = _grads(xp, i, model)
        before = [to_numpy(p) for p in model.parameters()]
        update = opt.step(grads)
        for t, g in zip(ref, grads, strict=True):
            t.grad = torch.tensor(to_numpy(g))
        ref_opt.step()
        after = [to_numpy(p) for p in model.parameters()]
        _assert_close(after, [t.detach().numpy() for t in ref], rtol=1e-10, atol=1e-12)
        _assert_close(update, [a - b for a, b in zip(after, before, strict=True)], rtol=1e-8, atol=1e-15)
        _assert_close(opt.last_update, update, rtol=0, atol=0)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_extrapolate_is_the_next_step_for_the_assumed_gradient(xp, name, kwargs):
    model = MLP(SIZES, xp=xp, dtype=xp.float64, seed=1)
    opt = OURS[name](model, **kwargs)
    zeros = opt.extrapolate()
    for z, p in zip(zeros, model.parameters(), strict=True):
        assert z.shape == p.shape and z.dtype == p.dtype and array_api_compat.array_namespace(z) is xp
        assert not np.any(to_numpy(z))
    for i in range(5):
        grads = _grads(xp, i, model)
        opt.step(grads)
    state, params = opt.state_dict(), model.parameters()
    predicted = opt.extrapolate()
    _same_state(opt.state_dict(), state)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    if name == "SGD":
        assumed = grads
    else:
        assumed = [m / (1 - state["beta1"] ** state["step"]) for m in state["exp_avg"]]
    actual = opt.step(assumed)
    assert any(np.any(to_numpy(p)) for p in predicted)
    _assert_close(predicted, actual, rtol=1e-13, atol=1e-16)


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["SGD", "Adam", "AdamW"]),
    lr=st.floats(1e-4, 1.0),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.0, 0.999),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    nesterov=st.booleans(),
    steps=st.integers(1, 6),
)
def test_extrapolate_holds_for_random_hyper_parameters(kind, lr, beta1, beta2, weight_decay, nesterov, steps):
    model = MLP(SIZES, dtype=np.float64, seed=steps)
    if kind == "SGD":
        opt = SGD(model, lr=lr, momentum=beta1, weight_decay=weight_decay, nesterov=nesterov and beta1 > 0)
    else:
        opt = OURS[kind](model, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    for i in range(steps):
        grads = _grads(np, i, model)
        opt.step(grads)
    predicted = opt.extrapolate()
    state = opt.state_dict()
    assumed = grads if kind == "SGD" else [m / (1 - beta1**steps) for m in state["exp_avg"]]
    for p, a in zip(predicted, opt.step(assumed), strict=True):
        np.testing.assert_array_equal(p, a)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_state_dict_round_trip_is_exact(xp, name, kwargs):
    def trained():
        model = MLP(SIZES, xp=xp, dtype=xp.float64, seed=1)
        opt = OURS[name](model, **kwargs)
        for i in range(3):
            opt.step(_grads(xp, i, model))
        return model, opt

    model, opt = trained()
    state = opt.state_dict()
    assert type(state["lr"]) is float and type(state["step"]) is int and state["step"] == 3
    assert all(type(v) in (float, bool) for k, v in state.items() if k not in ("kind", "lr", "step")
               and not isinstance(v, list) and v is not None)
    twin_model, _ = trained()  # same grads, same arithmetic: bit-identical parameters
    twin = OURS[name](twin_model, lr=0.5)
    twin.load_state_dict(state)
    _same_state(twin.state_dict(), state)
    assert repr(twin) == repr(opt)
    _assert_close(twin.extrapolate(), opt.extrapolate(), rtol=0, atol=0)
    grads = _grads(xp, 9, model)
    _assert_close(twin.step(grads), opt.step(grads), rtol=0, atol=0)
    again = opt.state_dict()
    opt.load_state_dict(again)
    _same_state(opt.state_dict(), again)


def test_state_of_a_fresh_optimizer_round_trips():
    model = MLP(SIZES, dtype=np.float64)
    for opt in (SGD(model, lr=0.1, momentum=0.5), Adam(model), AdamW(model)):
        state = opt.state_dict()
        opt.load_state_dict(state)
        _same_state(opt.state_dict(), state)
        assert opt.step_count == 0 and opt.last_update is None


def _foreign(buf):
    with namespace("array_api_strict") as strict:
        return [from_numpy(strict, to_numpy(b), dtype=strict.float64) for b in buf]


BAD_STATES = [
    ("not a dict", lambda s, b, h: list(s.items()), "not a dict"),
    ("missing key", lambda s, b, h: {k: v for k, v in s.items() if k != b}, "lacks"),
    ("extra key", lambda s, b, h: s | {"amsgrad": False}, "unexpected"),
    ("other kind", lambda s, b, h: s | {"kind": "Other"}, "'Other'"),
    ("negative step", lambda s, b, h: s | {"step": -1}, "step=-1"),
    ("bool step", lambda s, b, h: s | {"step": True}, "step=True"),
    ("bad hyper-parameter", lambda s, b, h: s | {h: 1.5}, "invalid hyper-parameters"),
    ("bad lr", lambda s, b, h: s | {"lr": float("nan")}, "lr=nan"),
    ("short buffer", lambda s, b, h: s | {b: s[b][:-1]}, "holds 3 arrays"),
    ("buffer shape", lambda s, b, h: s | {b: [np.zeros((2, 2)), *s[b][1:]]}, r"\[0\] has shape \(2, 2\)"),
    ("buffer dtype", lambda s, b, h: s | {b: [a.astype(np.float32) for a in s[b]]}, "dtype float32"),
    ("buffer not a list", lambda s, b, h: s | {b: np.zeros(3)}, "expected a list"),
    ("buffer of lists", lambda s, b, h: s | {b: [a.tolist() for a in s[b]]}, "not an array"),
    ("buffer missing", lambda s, b, h: s | {b: None}, "missing at step 2"),
    ("buffer at step 0", lambda s, b, h: s | {"step": 0}, "set at step 0"),
]


@pytest.mark.parametrize("case", BAD_STATES, ids=lambda c: c[0])
@pytest.mark.parametrize("make,buffer,hyper", [
    (lambda m: SGD(m, lr=0.1, momentum=0.9), "momentum_buffer", "momentum"),
    (lambda m: Adam(m, weight_decay=0.1), "exp_avg", "beta1"),
    (lambda m: AdamW(m), "exp_avg_sq", "beta2"),
], ids=["sgd", "adam", "adamw"])
def test_bad_state_raises_and_changes_nothing(case, make, buffer, hyper):
    _, corrupt, pattern = case
    model = MLP(SIZES, dtype=np.float64)
    opt = make(model)
    for i in range(2):
        opt.step(_grads(np, i, model))
    good = opt.state_dict()
    with pytest.raises(CheckpointError, match=pattern) as info:
        opt.load_state_dict(corrupt(dict(good), buffer, hyper))
    assert "recovery:" in str(info.value)
    _same_state(opt.state_dict(), good)
    assert opt.last_update is not None


@pytest.mark.skipif(not available("array_api_strict"), reason="array-api-strict is not installed")
def test_state_buffers_from_another_library_are_rejected():
    model = MLP(SIZES, dtype=np.float64)
    opt = Adam(model)
    opt.step(_grads(np, 0, model))
    good = opt.state_dict()
    with pytest.raises(CheckpointError, match="array_api_strict array"):
        opt.load_state_dict(good | {"exp_avg": _foreign(good["exp_avg"])})
    _same_state(opt.state_dict(), good)


def test_constructors_list_every_problem():
    model = MLP(SIZES, dtype=np.float64)
    with pytest.raises(ConfigError) as info:
        SGD(model, lr=0, momentum=1.0, weight_decay=-1, nesterov="yes")
    assert len(info.value.problems) == 4
    with pytest.raises(ConfigError, match="nesterov=True: needs momentum > 0") as info:
        SGD(model, lr=0.1, nesterov=True)
    assert len(info.value.problems) == 1
    with pytest.raises(ConfigError) as info:
        Adam(model, lr=-1.0, betas=(1.0, -0.1), eps=0.0, weight_decay=float("inf"))
    assert len(info.value.problems) == 5
    with pytest.raises(ConfigError, match="must be a pair"):
        AdamW(model, betas=(0.9,))
    with pytest.raises(ConfigError, match="lr=True"):
        AdamW(model, lr=True)
    with pytest.raises(ModelError, match="does not implement"):
        SGD(object(), lr=0.1)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "0.1"])
def test_lr_setter_validates(bad):
    opt = Adam(MLP(SIZES, dtype=np.float64), lr=0.01)
    with pytest.raises(ConfigError, match="lr="):
        opt.lr = bad
    assert opt.lr == 0.01
    opt.lr = 0.5
    assert opt.lr == 0.5 and opt.state_dict()["lr"] == 0.5


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_bad_gradients_raise_and_change_nothing(cls):
    model = MLP(SIZES, dtype=np.float64)
    opt = cls(model, lr=0.1)
    params = model.parameters()
    good = _grads(np, 0, model)
    with pytest.raises(BatchError, match="holds 1 arrays but the model has 4"):
        opt.step(good[:1])
    with pytest.raises(BatchError, match=r"gradients\[1\] has shape \(3,\); parameter 1 has \(4,\)"):
        opt.step([good[0], np.zeros(3), *good[2:]])
    with pytest.raises(BatchError, match=r"gradients\[0\] has dtype float32"):
        opt.step([g.astype(np.float32) for g in good])
    with pytest.raises(BackendError, match=r"gradients\[2\] is a builtins.list"):
        opt.step([*good[:2], good[2].tolist(), good[3]])
    if available("array_api_strict"):
        with pytest.raises(BackendError, match=r"gradients\[0\] is a array_api_strict array"):
            opt.step(_foreign(good))
    assert opt.step_count == 0 and opt.last_update is None
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_float32_stays_float32_on_every_namespace(xp, cls):
    rng = np.random.default_rng(0)
    batch = (from_numpy(xp, rng.normal(size=(8, 3)), dtype=xp.float32), from_numpy(xp, rng.integers(0, 2, 8)))
    model = MLP(SIZES, xp=xp)
    opt = cls(model, lr=0.1) if cls is SGD else cls(model)
    for _ in range(3):
        update = opt.step(model.loss_and_grad(batch)[1])
    for arrays in (model.parameters(), update, opt.extrapolate()):
        assert all(a.dtype == xp.float32 and array_api_compat.array_namespace(a) is xp for a in arrays)


@pytest.mark.parametrize("name", only("numpy", "array_api_strict"))
def test_adam_halves_the_loss_of_an_mlp_in_200_steps(name):
    rng = np.random.default_rng(0)
    centers = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    labels = rng.integers(0, 3, size=96)
    points = centers[labels] + 0.6 * rng.normal(size=(96, 2))
    with namespace(name) as xp:
        batch = (from_numpy(xp, points, dtype=xp.float32), from_numpy(xp, labels))
        model = MLP([2, 16, 3], xp=xp, seed=0)
        opt = Adam(model, lr=0.01)
        first = float(to_numpy(model.loss(batch)))
        for _ in range(200):
            opt.step(model.loss_and_grad(batch)[1])
        last = float(to_numpy(model.loss(batch)))
        accuracy = float(to_numpy(model.accuracy(batch)))
    assert last < 0.5 * first, (first, last)
    assert accuracy > 0.9
