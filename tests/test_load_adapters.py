"""Transactional load on torch and JAX: the adapters check their optimizer state the way the reference
optimizers do, and a refused checkpoint leaves the (in-place updated) torch parameters untouched."""

import copy

import numpy as np
import pytest

from hybrid_core import CheckpointError, HybridConfig, HybridTrainer
from hybrid_core._codec import ForeignArray, encode, read_file, write_atomic
from hybrid_core._persist import _host

CONFIG = HybridConfig(warmup_steps=6, min_full_steps=4, max_predict_steps=6, horizon_arms=(0, 3, 6), check_interval=2,
                      correct_steps=3, confidence_threshold=0.0, horizon_ladder=False, read_every=2,
                      layer_freeze="autofreeze", freeze_every=8)


def _bytes(value):
    return encode(value, _host)


def _fingerprint(trainer):
    return _bytes({name: part.state_dict() for name, part in trainer.parts().items()})


def _write(path, doc):
    """Write ``doc`` as read by `read_file`, its arrays of torch or JAX (`ForeignArray`) turned back into theirs."""
    write_atomic(path, encode(_live(doc), _host))


def _live(value):
    if isinstance(value, ForeignArray):
        if value.library == "torch":
            return torch.from_numpy(value.array.copy())
        import jax.numpy as jnp

        return jnp.asarray(value.array)
    if isinstance(value, dict):
        return {k: _live(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_live(v) for v in value]
    return value


def _with(doc, path, value):
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


# -- torch ---------------------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch", reason="the torch tests need torch")
from hybrid_core.adapters import torch as ta  # noqa: E402


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


def _batch(seed, i):
    g = torch.Generator().manual_seed(1000 * seed + i)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)


def _torch_trainer(seed, steps):
    model = ta.TorchModel(_net(seed), lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    opt = ta.TorchOptimizer(model, torch.optim.Adam(model.module.parameters(), lr=0.01))
    trainer = HybridTrainer(model, opt, CONFIG)
    for i in range(steps):
        trainer.step(_batch(seed, i))
    trainer.flush()
    return trainer


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torch-load")
    _torch_trainer(1, 40).save(folder / "source.ckpt")
    target = _torch_trainer(2, 25)
    target.save(folder / "home.ckpt")
    return folder, read_file(folder / "source.ckpt"), target


def _torch_refused(torch_files, doc, match):
    folder, _, target = torch_files
    target.restore(folder / "home.ckpt")
    before = _fingerprint(target)
    params = [p.detach().clone() for p in target.model.parameters()]
    _write(folder / "bad.ckpt", doc)
    with pytest.raises(CheckpointError, match=match):
        target.restore(folder / "bad.ckpt")
    for a, b in zip(target.model.parameters(), params, strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype
    assert _fingerprint(target) == before


@pytest.mark.parametrize("path, value", [
    (["bandit", "pulls"], "x"),
    (["metrics", "steps"], "x"),
    (["residuals", "total"], -1),
    (["corrector", "w"], [1.0]),
    (["phase", "phase"], "sideways"),
    (["cycle", "horizon_scale"], 2.0),
    (["real_steps", "last_update"], [1.0]),
    (["ledger", "host_syncs"], -1),
    (["freeze", "frozen"], "x"),
    (["lr", "multiplier"], -1.0),
])
def test_torch_a_malformed_later_part_leaves_parameters_and_optimizer_untouched(torch_files, path, value):
    doc = _with(copy.deepcopy(torch_files[1]), ["parts", *path], value)
    _torch_refused(torch_files, doc, f"part '{path[0]}'")


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_torch_non_finite_weights_are_refused(torch_files, fill):
    doc = copy.deepcopy(torch_files[1])
    doc["parts"]["model"]["params"][0].array[1, 2] = fill
    _torch_refused(torch_files, doc, r"part 'model': params\[0\] holds NaN or Inf")


def _put(entry, key, array):
    entry[key] = ForeignArray("torch", array)


@pytest.mark.parametrize("change, match", [
    (lambda s: _put(s[0], "exp_avg", s[0]["exp_avg"].array[:2]), r"'exp_avg' of parameter 0 has shape \(2, 4\)"),
    (lambda s: _put(s[1], "exp_avg", s[1]["exp_avg"].array.astype(np.float32)), r"'exp_avg' of parameter 1 has"),
    (lambda s: s[2]["exp_avg_sq"].array.__setitem__((0, 0), np.nan), r"'exp_avg_sq' of parameter 2 holds NaN"),
    (lambda s: s.clear(), r"parameter 0 has taken \d+ steps but its state is missing"),
    (lambda s: s[3].update(step=1.0), r"parameter 3 holds step 1, but the optimizer took \d+ steps"),
])
def test_torch_optimizer_state_is_checked_in_a_checkpoint(torch_files, change, match):
    doc = copy.deepcopy(torch_files[1])
    change(doc["parts"]["optimizer"]["optimizer"]["state"])
    _torch_refused(torch_files, doc, r"part 'optimizer': torch optimizer state: " + match)


def _adam(seed=0, steps=3, scheduler=False):
    model = ta.TorchModel(_net(seed), lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    adam = torch.optim.Adam(model.module.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(adam, step_size=2) if scheduler else None
    opt = ta.TorchOptimizer(model, adam, scheduler=sched)
    for i in range(steps):
        opt.step(model.loss_and_grad(_batch(seed, i))[1])
    return model, opt


def test_torch_optimizer_puts_its_state_back_if_torch_refuses_late(monkeypatch):
    _, opt = _adam(scheduler=True)
    _, other = _adam(seed=1, steps=5, scheduler=True)
    before = _bytes(opt.state_dict())
    real = type(opt.scheduler).load_state_dict
    calls = []

    def refuse_once(self, state):
        calls.append(state)
        if len(calls) == 1:
            raise RuntimeError("torch refused")
        real(self, state)

    monkeypatch.setattr(type(opt.scheduler), "load_state_dict", refuse_once)
    with pytest.raises(CheckpointError, match="torch refused"):
        opt.load_state_dict(other.state_dict())  # the torch optimizer's state was loaded before the scheduler's
    assert len(calls) == 2 and _bytes(opt.state_dict()) == before


def test_torch_scheduler_state_is_checked():
    _, opt = _adam(scheduler=True)
    good = opt.state_dict()
    before = _bytes(good)
    for key, value in (("last_epoch", "x"), ("unknown", 1), ("step_size", None)):
        bad = copy.deepcopy(good)
        if value is None:
            del bad["scheduler"][key]
        else:
            bad["scheduler"][key] = value
        with pytest.raises(CheckpointError, match="scheduler"):
            opt.load_state_dict(bad)
        assert _bytes(opt.state_dict()) == before


def test_torch_optimizer_refuses_bad_buffers_and_changes_nothing():
    _, opt = _adam()
    good = opt.state_dict()
    before = _bytes(good)
    guess = [t.clone() for t in opt.extrapolate()]
    bad = []
    wrong_shape = copy.deepcopy(good)
    wrong_shape["optimizer"]["state"][0]["exp_avg"] = torch.zeros(5, 4, dtype=torch.float64)
    wrong_dtype = copy.deepcopy(good)
    wrong_dtype["optimizer"]["state"][0]["exp_avg"] = wrong_dtype["optimizer"]["state"][0]["exp_avg"].float()
    nan_moment = copy.deepcopy(good)
    nan_moment["optimizer"]["state"][2]["exp_avg_sq"][0, 0] = float("nan")
    wiped = copy.deepcopy(good)
    wiped["optimizer"]["state"] = {}
    wiped_old_file = {k: v for k, v in copy.deepcopy(wiped).items() if k != "steps"}  # written before "steps"
    nan_update = copy.deepcopy(good)
    nan_update["last_update"][1][0] = float("inf")
    nan_lr = copy.deepcopy(good)
    nan_lr["optimizer"]["param_groups"][0]["lr"] = float("nan")
    bad = [wrong_shape, wrong_dtype, nan_moment, wiped, wiped_old_file, nan_update, nan_lr]
    _, fresh = _adam(steps=0)  # no state of its own to compare with: a new process loading a checkpoint
    untouched = _bytes(fresh.state_dict())
    for state in bad:
        with pytest.raises(CheckpointError):
            opt.load_state_dict(state)
        assert _bytes(opt.state_dict()) == before
        with pytest.raises(CheckpointError):
            fresh.load_state_dict(state)
        assert _bytes(fresh.state_dict()) == untouched
    for a, b in zip(opt.extrapolate(), guess, strict=True):
        assert torch.equal(a, b)
    opt.load_state_dict(good)  # the unchanged state still loads
    assert _bytes(opt.state_dict()) == before


@pytest.mark.parametrize("name, kwargs", [
    ("SGD", {}), ("SGD", {"momentum": 0.9, "nesterov": True}), ("Adam", {"amsgrad": True}), ("AdamW", {}),
    ("Adamax", {}), ("NAdam", {}), ("RAdam", {}), ("Adagrad", {}), ("Adadelta", {}),
    ("RMSprop", {"momentum": 0.5, "centered": True}), ("Rprop", {}), ("ASGD", {}), ("Adafactor", {}),
])
def test_torch_optimizer_states_of_every_builtin_still_load(name, kwargs):
    """The checks refuse nothing torch itself writes (two groups, one parameter frozen from the start)."""
    net = _net(3)
    frozen = net[2].bias
    frozen.requires_grad_(False)
    model = ta.TorchModel(net, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    groups = [{"params": list(net[0].parameters())}, {"params": [net[2].weight, frozen], "lr": 0.005}]
    opt = ta.TorchOptimizer(model, getattr(torch.optim, name)(groups, lr=0.01, **kwargs))
    for i in range(3):
        opt.step(model.loss_and_grad(_batch(3, i))[1])
    saved = opt.state_dict()
    twin = ta.TorchOptimizer(model, getattr(torch.optim, name)(groups, lr=0.01, **kwargs))
    twin.load_state_dict(saved)
    again = twin.state_dict()
    assert again.get("steps") == saved.get("steps")
    assert sorted(again["optimizer"]["state"]) == sorted(saved["optimizer"]["state"])
    for i, entry in saved["optimizer"]["state"].items():
        for key, value in entry.items():  # torch casts 0-d state such as NAdam's mu_product to the parameter's dtype
            assert torch.equal(again["optimizer"]["state"][i][key], value.to(again["optimizer"]["state"][i][key]))
    opt.load_state_dict(again)


# -- JAX -----------------------------------------------------------------------------------------------------------


def _jax_setup():
    pytest.importorskip("jax", reason="the JAX tests need jax")
    optax = pytest.importorskip("optax", reason="the JAX tests need optax")
    import jax.numpy as jnp

    from hybrid_core.adapters import jax as ja

    def mse(params, batch):
        x, y = batch
        return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) @ params["v"] - y) ** 2)

    def build(seed, steps):
        rng = np.random.default_rng(seed)
        params = {"w": jnp.asarray(rng.normal(size=(4, 6)) * 0.5, jnp.float32), "b": jnp.zeros(6, jnp.float32),
                  "v": jnp.asarray(rng.normal(size=(6, 3)) * 0.5, jnp.float32)}
        model = ja.JaxModel(mse, params)
        opt = ja.OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=0.01))
        trainer = HybridTrainer(model, opt, CONFIG)
        for i in range(steps):
            r = np.random.default_rng([seed, i])
            trainer.step((jnp.asarray(r.normal(size=(16, 4)), jnp.float32),
                          jnp.asarray(r.normal(size=(16, 3)), jnp.float32)))
        trainer.flush()
        return trainer

    return build


def test_optax_optimizer_refuses_non_finite_buffers_and_changes_nothing():
    build = _jax_setup()
    opt = build(1, 12).optimizer
    good = opt.state_dict()
    before = _bytes(good)
    for index, leaf in enumerate(good["leaves"]):
        if np.asarray(leaf).size > 1:
            bad = copy.deepcopy(good)
            values = np.array(leaf)
            values.flat[0] = np.nan
            bad["leaves"][index] = values
            with pytest.raises(CheckpointError, match=f"optax state array {index} .*holds NaN or Inf"):
                opt.load_state_dict(bad)
            assert _bytes(opt.state_dict()) == before
    bad = copy.deepcopy(good)
    bad["last_update"] = [np.full(np.shape(a), np.inf, np.float32) for a in opt.model.parameters()]
    with pytest.raises(CheckpointError, match="last_update holds NaN or Inf"):
        opt.load_state_dict(bad)
    opt.load_state_dict(good)
    assert _bytes(opt.state_dict()) == before


def test_jax_a_refused_checkpoint_changes_nothing(tmp_path):
    build = _jax_setup()
    build(1, 30).save(tmp_path / "source.ckpt")
    target = build(2, 20)
    target.save(tmp_path / "home.ckpt")
    for path, value in ((["model", "params", 2], None), (["bandit", "arms"], [0, 0]), (["cycle", "chosen"], [9, []])):
        doc = read_file(tmp_path / "source.ckpt")
        if value is None:
            leaf = np.array(doc["parts"]["model"]["params"][2].array)
            leaf[0, 0] = np.nan
            value = ForeignArray("jax", leaf)
        _write(tmp_path / "bad.ckpt", _with(doc, ["parts", *path], value))
        target.restore(tmp_path / "home.ckpt")
        before, params = _fingerprint(target), [np.asarray(p).tobytes() for p in target.model.parameters()]
        with pytest.raises(CheckpointError, match=f"part '{path[0]}'"):
            target.restore(tmp_path / "bad.ckpt")
        assert [np.asarray(p).tobytes() for p in target.model.parameters()] == params
        assert _fingerprint(target) == before
