"""JAX/optax adapter: gradients, rebinding updates, extrapolation against optax's own next update, state."""

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the JAX adapter needs jax (pip install '.[jax]')")
optax = pytest.importorskip("optax", reason="the JAX adapter needs optax (pip install '.[jax]')")

import jax.numpy as jnp  # noqa: E402

from hybrid_core import BackendError, CheckpointError, ConfigError, Model, ModelError, Optimizer  # noqa: E402
from hybrid_core.adapters import jax as ja  # noqa: E402
from hybrid_core.conformance import ConformanceCase  # noqa: E402
from hybrid_core.conformance import test_contracts as contracts  # noqa: E402


def _params(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {"dense": {"w": jnp.asarray(rng.normal(size=(4, 6)) * 0.5, dtype=dtype),
                      "b": jnp.zeros(6, dtype)},
            "out": (jnp.asarray(rng.normal(size=(6, 3)) * 0.5, dtype=dtype), jnp.zeros(3, dtype))}


def _mse(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["dense"]["w"] + params["dense"]["b"])
    w, b = params["out"]
    return jnp.mean((h @ w + b - y) ** 2)


def _batch(seed, dtype=jnp.float32, n=16):
    rng = np.random.default_rng(1000 + seed)
    x, y = rng.normal(size=(n, 4)), rng.normal(size=(n, 3))
    return jnp.asarray(x, dtype=dtype), jnp.asarray(y, dtype=dtype)


def _host(arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _close(a, b, rtol=1e-5, atol=1e-8):
    assert len(a) == len(b)
    for x, y in zip(_host(a), _host(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _train(model, opt, steps, start=0):
    grads = None
    for k in range(steps):
        _, grads = model.loss_and_grad(_batch(start + k))
        opt.step(grads)
    return grads


def _find(state, cls):
    """The first node of type ``cls`` in a nested optax state (walked independently of the adapter)."""
    if isinstance(state, cls):
        return state
    if isinstance(state, dict):
        state = list(state.values())
    for child in state if isinstance(state, (tuple, list)) else ():
        found = _find(child, cls)
        if found is not None:
            return found
    return None


def _injected(factory, **kwargs):
    return optax.inject_hyperparams(factory)(**kwargs)


# -- JaxModel ------------------------------------------------------------------------------------------------


def test_implements_the_protocols():
    model = ja.JaxModel(_mse, _params())
    assert isinstance(model, Model)
    assert isinstance(ja.OptaxOptimizer(model, ADAM), Optimizer)


def test_parameters_are_the_flat_leaves_in_tree_order():
    params = _params()
    model = ja.JaxModel(_mse, params)
    expected = jax.tree_util.tree_leaves(params)
    assert all(a is b for a, b in zip(model.parameters(), expected, strict=True))
    assert jax.tree_util.tree_structure(model.params) == jax.tree_util.tree_structure(params)


def test_loss_and_grad_matches_a_central_finite_difference():
    with jax.enable_x64(True):
        model = ja.JaxModel(_mse, _params(dtype=jnp.float64))
        batch = _batch(0, dtype=jnp.float64)
        loss, grads = model.loss_and_grad(batch)
        assert loss.shape == () and loss.dtype == jnp.float64
        rng = np.random.default_rng(5)
        direction = [jnp.asarray(rng.normal(size=p.shape)) for p in model.parameters()]
        analytic = sum(float(jnp.sum(g * d)) for g, d in zip(grads, direction, strict=True))
        eps = 1e-6
        model.apply_update(direction, eps)
        up = float(model.loss(batch))
        model.apply_update(direction, -2 * eps)
        down = float(model.loss(batch))
    assert abs(analytic) > 1e-3
    assert (up - down) / (2 * eps) == pytest.approx(analytic, rel=1e-7)


def test_apply_update_rebinds_and_its_negation_restores():
    model = ja.JaxModel(_mse, _params())
    before = model.parameters()
    rng = np.random.default_rng(3)
    update = [jnp.asarray(rng.normal(size=p.shape), dtype=p.dtype) for p in before]
    model.apply_update(update, 0.37)
    moved = model.parameters()
    assert all(not np.array_equal(a, b) for a, b in zip(_host(before), _host(moved), strict=True))
    _close(moved, [b + 0.37 * u for b, u in zip(before, update, strict=True)], rtol=1e-6)
    assert jax.tree_util.tree_leaves(model.params)[0] is moved[0]
    model.apply_update(update, -0.37)
    _close(model.parameters(), before, rtol=0, atol=1e-6)


def test_batch_of_another_library_raises_backend_error_naming_both():
    torch = pytest.importorskip("torch", reason="needs torch to build a foreign batch")
    model = ja.JaxModel(_mse, _params())
    x, y = _batch(0)
    model.loss((np.asarray(x), np.asarray(y)))  # NumPy batches are fed to jax as usual
    with pytest.raises(BackendError, match=r"torch.*jax"):
        model.loss_and_grad((torch.as_tensor(np.array(x)), y))


def test_batch_on_another_device_raises_backend_error():
    if jax.device_count() < 2:
        pytest.skip("needs two JAX devices to put a batch on the wrong one")
    model = ja.JaxModel(_mse, jax.device_put(_params(), jax.devices()[0]))
    x, y = _batch(0)
    with pytest.raises(BackendError, match="device_put"):
        model.loss((jax.device_put(x, jax.devices()[1]), y))


def test_bad_params_are_reported():
    with pytest.raises(ModelError):
        ja.JaxModel(_mse, {"w": jnp.arange(3)})
    with pytest.raises(ModelError):
        ja.JaxModel(_mse, {})


# -- OptaxOptimizer ------------------------------------------------------------------------------------------

# Transformations are stateless, so one object serves every test (and they share compiled code).
ADAM_B1 = 0.9
ADAM = _injected(optax.adam, learning_rate=1e-2)
ADAMW = _injected(optax.adamw, learning_rate=1e-2, weight_decay=0.1)
CLIP_ADAM = optax.chain(optax.clip_by_global_norm(0.5), _injected(optax.adam, learning_rate=1e-2))
SGD_MOMENTUM = optax.sgd(0.1, momentum=0.9)
NEXT_CASES = [
    pytest.param(ADAM, None, "mhat", id="adam"),
    pytest.param(ADAMW, None, "mhat", id="adamw"),
    pytest.param(CLIP_ADAM, None, "mhat", id="chain-clip-adam"),
    pytest.param(SGD_MOMENTUM, 0.1, "last", id="sgd-momentum"),
    pytest.param(_injected(optax.sgd, learning_rate=0.05, momentum=0.8, nesterov=True), None, "last",
                 id="sgd-nesterov"),
    # As users write them: b1 and the learning rate (constant or schedule) are found inside the transformation.
    pytest.param(optax.adam(1e-2), 1e-2, "mhat", id="plain-adam-b1-found"),
    pytest.param(optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(optax.linear_schedule(1e-2, 1e-3, 50))),
                 None, "mhat", id="chain-clip-adamw-schedule"),
    pytest.param(optax.sgd(optax.cosine_decay_schedule(0.1, 50), momentum=0.9), None, "last",
                 id="sgd-momentum-schedule"),
]


def _next_gradient(opt, assumption, last_grads):
    """m̂_t = μ_t/(1 − β₁ᵗ) from the Adam state (computed here in float64), or the last gradient."""
    if assumption == "last":
        return list(last_grads)
    adam = _find(opt.opt_state, optax.ScaleByAdamState)
    count = int(adam.count)
    mu = opt.model.treedef.flatten_up_to(adam.mu)
    return [jnp.asarray(np.asarray(m, dtype=np.float64) / (1 - ADAM_B1**count), dtype=m.dtype) for m in mu]


def test_step_returns_the_applied_update():
    model = ja.JaxModel(_mse, _params())
    opt = ja.OptaxOptimizer(model, ADAM)
    for k in range(3):
        before = model.parameters()
        update = opt.step(model.loss_and_grad(_batch(k))[1])
        _close(update, [a - b for a, b in zip(model.parameters(), before, strict=True)], rtol=1e-5, atol=1e-7)
        assert max(float(jnp.max(jnp.abs(u))) for u in update) > 1e-3


@pytest.mark.parametrize(("tx", "lr", "assumption"), NEXT_CASES)
def test_extrapolate_equals_the_next_real_update(tx, lr, assumption):
    model = ja.JaxModel(_mse, _params())
    opt = ja.OptaxOptimizer(model, tx, lr=lr)
    last = _train(model, opt, 4)
    params_before, state_before = model.parameters(), jax.tree_util.tree_leaves(opt.opt_state)
    predicted = opt.extrapolate()
    _close(opt.extrapolate(), predicted, rtol=0, atol=0)
    _close(model.parameters(), params_before, rtol=0, atol=0)
    _close(jax.tree_util.tree_leaves(opt.opt_state), state_before, rtol=0, atol=0)
    actual = opt.step(_next_gradient(opt, assumption, last))
    assert max(float(jnp.max(jnp.abs(u))) for u in actual) > 1e-4
    _close(predicted, actual, rtol=2e-5, atol=1e-8)


def test_unknown_transformation_extrapolates_its_last_update():
    model = ja.JaxModel(_mse, _params())
    opt = ja.OptaxOptimizer(model, ADAGRAD, lr=0.1)
    assert all(not np.any(g) for g in _host(opt.extrapolate()))
    _train(model, opt, 2)
    last = opt.step(model.loss_and_grad(_batch(9))[1])
    _close(opt.extrapolate(), last, rtol=0, atol=0)


@pytest.mark.parametrize(("tx", "lr", "assumption"), NEXT_CASES[:4])
def test_extrapolate_before_any_step_is_zero(tx, lr, assumption):
    model = ja.JaxModel(_mse, _params())
    guess = ja.OptaxOptimizer(model, tx, lr=lr).extrapolate()
    assert [g.shape for g in guess] == [p.shape for p in model.parameters()]
    assert all(not np.any(g) for g in _host(guess))


def test_lr_reads_and_writes_the_injected_learning_rate():
    model = ja.JaxModel(_mse, _params())
    opt = ja.OptaxOptimizer(model, optax.chain(optax.clip(10.0), _injected(optax.sgd, learning_rate=0.1)))
    assert opt.lr == pytest.approx(0.1)
    _, grads = model.loss_and_grad(_batch(0))
    opt.lr = 0.025
    assert opt.lr == pytest.approx(0.025)
    update = opt.step(grads)
    _close(update, [-0.025 * g for g in grads], rtol=1e-6)
    for bad in (0.0, -1.0, math.nan, "0.1"):
        with pytest.raises(ConfigError):
            opt.lr = bad


def test_a_constant_lr_is_read_from_the_device_once_and_a_schedule_never():
    from hybrid_core.adapters._optax_state import injected_holding, replace_node

    model = ja.JaxModel(_mse, _params())
    opt = ja.OptaxOptimizer(model, _injected(optax.adam, learning_rate=1e-3))
    assert opt.lr == pytest.approx(1e-3)
    _train(model, opt, 3)

    def poke(optimizer, value):  # change the device value behind the adapter's back
        node = injected_holding(optimizer._state, "learning_rate")
        hyper = {**node.hyperparams, "learning_rate": jnp.asarray(value, dtype=jnp.float32)}
        optimizer._state = replace_node(optimizer._state, node, lambda n: n._replace(hyperparams=hyper))

    poke(opt, 0.5)
    assert opt.lr == pytest.approx(1e-3)  # the host copy: no device read per step
    opt.lr = 5e-4
    assert opt.lr == 5e-4
    poke(opt, 0.25)
    opt.load_state_dict(opt.state_dict())
    assert opt.lr == pytest.approx(0.25)  # re-read once after a load
    schedule = optax.linear_schedule(1e-3, 0.0, 10)
    scheduled = ja.OptaxOptimizer(model, _injected(optax.adam, learning_rate=schedule))
    assert not scheduled.lr_on_device  # the schedule is found inside inject_hyperparams and evaluated on the host
    _train(model, scheduled, 4)
    poke(scheduled, 0.5)  # the device's value is not what `lr` reads
    # The value used by the last of the 4 updates.
    assert scheduled.lr == pytest.approx(1e-3 * (1 - 3 / 10), rel=1e-5)
    _train(model, scheduled, 1)
    assert scheduled.lr == pytest.approx(1e-3 * (1 - 4 / 10), rel=1e-5)


def test_lr_that_cannot_be_known_or_set_is_a_config_error():
    model = ja.JaxModel(_mse, _params())
    with pytest.raises(ConfigError, match="not visible") as raised:
        ja.OptaxOptimizer(model, optax.scale_by_adam())  # no learning rate in it at all
    assert "learning_rate=" in raised.value.recovery
    assert ja.OptaxOptimizer(model, optax.adam(1e-3)).lr == pytest.approx(1e-3)  # found inside it
    with pytest.raises(ConfigError, match=r"uses 0\.001"):
        ja.OptaxOptimizer(model, optax.adam(1e-3), lr=1e-2)  # not the one it holds
    with pytest.raises(ConfigError, match="injects"):
        ja.OptaxOptimizer(model, _injected(optax.adam, learning_rate=1e-3), lr=1e-3)
    fixed = ja.OptaxOptimizer(model, optax.adam(1e-3), lr=1e-3)
    assert fixed.lr == 1e-3
    with pytest.raises(ConfigError, match="inject_hyperparams"):
        fixed.lr = 1e-2
    schedule = optax.linear_schedule(1e-3, 0.0, 10)
    scheduled = ja.OptaxOptimizer(model, _injected(optax.adam, learning_rate=schedule))
    with pytest.raises(ConfigError, match="schedule"):
        scheduled.lr = 1e-2


def _plain_types(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_types(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain_types(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, jax.Array))


ADAGRAD = optax.adagrad(0.1)


@pytest.mark.parametrize(("tx", "lr"), [
    pytest.param(CLIP_ADAM, None, id="chain-clip-adam"),
    pytest.param(SGD_MOMENTUM, 0.1, id="sgd-momentum"),
    pytest.param(ADAGRAD, 0.1, id="adagrad"),
])
def test_state_dict_round_trip_resumes_identically(tx, lr):
    model_a = ja.JaxModel(_mse, _params(seed=1))
    opt_a = ja.OptaxOptimizer(model_a, tx, lr=lr)
    _train(model_a, opt_a, 3)
    saved = opt_a.state_dict()
    assert _plain_types(saved)
    # As a checkpoint file hands it back: host arrays, plain numbers.
    saved = jax.tree_util.tree_map(lambda v: np.asarray(v) if isinstance(v, jax.Array) else v, saved)
    model_b = ja.JaxModel(_mse, jax.tree_util.tree_map(jnp.array, model_a.params))
    opt_b = ja.OptaxOptimizer(model_b, tx, lr=lr)
    opt_b.load_state_dict(saved)
    _close(opt_b.extrapolate(), opt_a.extrapolate(), rtol=0, atol=0)
    batch = _batch(7)
    _close(opt_b.step(model_b.loss_and_grad(batch)[1]), opt_a.step(model_a.loss_and_grad(batch)[1]),
           rtol=0, atol=0)


def test_load_state_dict_rejects_foreign_states_without_changing_anything():
    model = ja.JaxModel(_mse, _params())
    opt = ja.OptaxOptimizer(model, ADAM)
    _train(model, opt, 2)
    good = opt.state_dict()
    guess = opt.extrapolate()
    other = ja.OptaxOptimizer(model, SGD_MOMENTUM, lr=0.1).state_dict()
    wrong_shape = dict(good, leaves=[jnp.zeros(7), *good["leaves"][1:]])
    short = dict(good, last_update=good["last_update"][:2])
    for bad in ({}, other, wrong_shape, dict(good, steps=-1), short):
        with pytest.raises(CheckpointError):
            opt.load_state_dict(bad)
    _close(opt.extrapolate(), guess, rtol=0, atol=0)


# -- conformance suite ---------------------------------------------------------------------------------------


def _cross_entropy(p, batch):
    x, y = batch
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def _conformance_case():
    def make_model(seed):
        rng = np.random.default_rng(seed)
        params = {"w1": jnp.asarray(rng.normal(size=(12, 16)) / 4, dtype=jnp.float32),
                  "b1": jnp.zeros(16, jnp.float32),
                  "w2": jnp.asarray(rng.normal(size=(16, 4)) / 4, dtype=jnp.float32),
                  "b2": jnp.zeros(4, jnp.float32)}
        return ja.JaxModel(_cross_entropy, params)

    def make_batches(seed):
        rng = np.random.default_rng(seed)
        centers = rng.normal(size=(4, 12))
        while True:
            y = rng.integers(0, 4, size=32)
            x = centers[y] + 0.7 * rng.normal(size=(32, 12))
            yield jnp.asarray(x, dtype=jnp.float32), jnp.asarray(y)

    return ConformanceCase(
        name="jax-adapter-adam",
        make_model=make_model,
        make_optimizer=lambda model: ja.OptaxOptimizer(model, ADAM),
        make_batches=make_batches,
    )


CONTRACTS = sorted(name for name in dir(contracts) if name.startswith("test_"))


@pytest.mark.parametrize("contract", CONTRACTS)
def test_conformance_contract_holds_for_the_jax_adapter(contract):
    getattr(contracts, contract)(_conformance_case())
