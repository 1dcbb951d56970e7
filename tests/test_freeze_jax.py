"""Layer freezing on JAX: `JaxModel`'s groups, a backward pass without the frozen groups (counted in the
jaxpr), `OptaxOptimizer` holding frozen leaves and their state, and the strategy through the trainer."""

import functools

import numpy as np
import pytest

from hybrid_core import HybridConfig, HybridTrainer, ModelError

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from hybrid_core.adapters._jax_model import value_and_flat_grad  # noqa: E402
from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer  # noqa: E402

PLAIN = dict(horizon_arms=(0,), lr_recommend=False, warmup_steps=10)


def _mse(params, batch):
    x, y = batch
    h = x
    for name in ("0_in", "1_mid"):
        h = jnp.tanh(h @ params[name]["w"] + params[name]["b"])
    out = h @ params["2_head"]["w"] + params["2_head"]["b"]
    return jnp.mean((out - y) ** 2)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    sizes = {"0_in": (8, 16), "1_mid": (16, 16), "2_head": (16, 4)}
    return {k: {"w": jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), dtype=jnp.float32),
                "b": jnp.zeros(s[1], jnp.float32)} for k, s in sizes.items()}


def _batch(i):
    rng = np.random.default_rng(1000 + i)
    x = rng.normal(size=(32, 8)).astype(np.float32)
    y = np.stack([x[:, 0] * x[:, 1], x[:, 2], np.sin(x[:, 3]), x[:, 4] - x[:, 5]], axis=1).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def _pair(seed=0, lr=1e-2):
    model = JaxModel(_mse, _params(seed))
    return model, OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=lr))


def _dot_count(jaxpr):
    """dot_general equations in a jaxpr, nested ones (pjit, custom_jvp, …) included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "dot_general"
        for sub in jax.core.subjaxprs(eqn.params) if hasattr(jax.core, "subjaxprs") else _subjaxprs(eqn):
            count += _dot_count(sub)
    return count


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns"):
                yield inner


def _held_state(opt, leaves):
    """The optax μ and ν leaves of the parameter leaves ``leaves``."""
    adam = next(s for s in jax.tree_util.tree_leaves(opt.opt_state, is_leaf=lambda n: isinstance(
        n, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState))
    mu, nu = jax.tree_util.tree_leaves(adam.mu), jax.tree_util.tree_leaves(adam.nu)
    return [np.asarray(mu[i]).copy() for i in leaves] + [np.asarray(nu[i]).copy() for i in leaves]


def test_default_groups_are_the_top_level_keys_and_named_groups_are_checked():
    model = JaxModel(_mse, _params())
    assert model.parameter_groups() == [[0, 1], [2, 3], [4, 5]]  # leaves: 0_in.b, 0_in.w, 1_mid.b, …
    named = JaxModel(_mse, _params(), groups=[["0_in", "1_mid"], ["2_head"]])
    assert named.parameter_groups() == [[0, 1, 2, 3], [4, 5]]
    listed = JaxModel(lambda p, b: sum(jnp.sum(w) for w in p), [jnp.ones(2), jnp.ones(3), jnp.ones(1)])
    assert listed.parameter_groups() == [[0], [1], [2]]
    with pytest.raises(ModelError, match="no group holds '2_head'"):
        JaxModel(_mse, _params(), groups=[["0_in", "1_mid"]])
    with pytest.raises(ModelError, match="not a top-level key"):
        JaxModel(_mse, _params(), groups=[["0_in", "1_mid", "2_head", "nope"]])
    with pytest.raises(ModelError, match="in two groups"):
        JaxModel(_mse, _params(), groups=[["0_in", "1_mid"], ["1_mid", "2_head"]])
    with pytest.raises(ModelError, match="group 1 is empty"):
        JaxModel(_mse, _params(), groups=[["0_in", "1_mid", "2_head"], []])
    with pytest.raises(ModelError, match="bools"):
        model.set_trainable([True])


def test_a_bad_leaf_is_named_by_its_path():
    params = _params()
    params["1_mid"]["w"] = jnp.ones((2, 2), jnp.int32)
    with pytest.raises(ModelError, match=r"\['1_mid'\]\['w'\]"):
        JaxModel(_mse, params)


def test_the_jaxpr_of_a_frozen_front_holds_no_backward_for_it():
    model = JaxModel(_mse, _params())
    leaves, treedef = model.parameters(), model.treedef

    def dots(trainable):
        fn = functools.partial(value_and_flat_grad, _mse, treedef, trainable)
        return _dot_count(jax.make_jaxpr(fn)(leaves, _batch(0)).jaxpr)

    # Forward: 3 matmuls either way. Backward: weight and input gradients of the last two layers and the
    # weight gradient of the first (5) with every group trainable; with the front two frozen only the
    # head's weight gradient (1): the same counts as torch's autograd in test_freeze.
    assert (dots(None), dots((False, False, False, False, True, True))) == (8, 4)
    assert dots((False, False, True, True, True, True)) == 6
    loss, grads = value_and_flat_grad(_mse, treedef, (False, False, True, True, True, True), leaves, _batch(0))
    full_loss, full = value_and_flat_grad(_mse, treedef, None, leaves, _batch(0))
    assert float(loss) == float(full_loss)
    assert all(float(jnp.abs(grads[i]).sum()) == 0.0 for i in (0, 1))
    assert all(np.allclose(grads[i], full[i], rtol=1e-6, atol=1e-7) for i in range(2, 6))


def test_frozen_leaves_and_their_optax_state_stay_bit_identical_and_the_head_trains():
    model, opt = _pair()
    for i in range(3):
        opt.fused_step(_batch(i), True)
    model.set_trainable([False, False, True])
    assert model.trainable == (False, False, False, False, True, True)
    frozen = [0, 1, 2, 3]
    before = [np.asarray(model.parameters()[i]).copy() for i in frozen]
    state_before = _held_state(opt, frozen)
    head = np.asarray(model.parameters()[5]).copy()
    for i in range(3, 9):  # fused steps, measured and not, then the unfused path
        opt.fused_step(_batch(i), i % 2 == 0)
    for i in range(9, 12):
        _, grads = model.loss_and_grad(_batch(i))
        assert all(float(jnp.abs(grads[j]).sum()) == 0.0 for j in frozen)
        update = opt.step(grads)
        assert all(float(jnp.abs(update[j]).sum()) == 0.0 for j in frozen)
    assert all(np.array_equal(a, np.asarray(model.parameters()[i])) for a, i in zip(before, frozen))
    assert all(np.array_equal(a, b) for a, b in zip(state_before, _held_state(opt, frozen)))
    assert not np.array_equal(head, np.asarray(model.parameters()[5]))
    model.set_trainable([True, True, True])
    assert model.trainable is None
    opt.fused_step(_batch(12), False)
    assert not np.array_equal(before[1], np.asarray(model.parameters()[1]))


def test_the_strategy_runs_on_jax_through_the_trainer_and_resumes_bit_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr("hybrid_core._freeze.autofreeze_decision", lambda p, c, n: max(n, 1))
    config = HybridConfig(layer_freeze="autofreeze", **PLAIN)
    model, opt = _pair()
    trainer = HybridTrainer(model, opt, config)
    i = 0
    while trainer.freeze.frozen == 0 and i < 250:
        trainer.step(_batch(i))
        i += 1
    mid = i + 5
    for k in range(i, mid):
        trainer.step(_batch(k))
    assert trainer.freeze.frozen == 1 and trainer.freeze.state == "probation"
    assert model.trainable == (False, False, True, True, True, True)
    trainer.save(tmp_path / "mid.ckpt")
    for i in range(mid, mid + 90):
        trainer.step(_batch(i))
    trainer.flush()
    model2, opt2 = _pair(seed=5)
    resumed = HybridTrainer.load(tmp_path / "mid.ckpt", model2, opt2)
    assert model2.trainable == (False, False, True, True, True, True)
    for i in range(mid, mid + 90):
        resumed.step(_batch(i))
    resumed.flush()
    assert all(np.array_equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert resumed.summary()["freeze"] == trainer.summary()["freeze"]


def test_the_criterion_freezes_a_real_jax_run_unpatched():
    model, opt = _pair(lr=3e-2)
    trainer = HybridTrainer(model, opt, HybridConfig(layer_freeze="autofreeze", **PLAIN))
    for i in range(300):
        trainer.step(_batch(i))
    trainer.flush()
    summary = trainer.summary()["freeze"]
    assert summary["state"] in ("watching", "probation", "all frozen", "dropped")
    assert summary["frozen"] or summary["drops"], summary  # the criterion acted on its own
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in model.parameters())
