"""Reference optimizers: torch.optim's numerics, extrapolate(), state round trips, validation."""

import numpy as np
import pytest

from hybrid_core import BatchError, CheckpointError, ConfigError, Optimizer
from hybrid_core.models import MLP
from hybrid_core.optim import SGD, Adam, AdamW

CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
]
OURS = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}


def _grads(i, shapes):
    rng = np.random.default_rng(100 + i)
    return [rng.normal(size=s) for s in shapes]


@pytest.mark.parametrize("name,kwargs", CASES)
def test_matches_torch_optim(name, kwargs):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    model = MLP([3, 4, 2], dtype=np.float64, seed=1)
    opt = OURS[name](model, **kwargs)
    assert isinstance(opt, Optimizer)
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in model.parameters()]
    topt = getattr(torch.optim, name)(tparams, **kwargs)
    shapes = [p.shape for p in model.parameters()]
    for i in range(20):
        grads = _grads(i, shapes)
        before = [p.copy() for p in model.parameters()]
        update = opt.step(grads)
        for t, g in zip(tparams, grads):
            t.grad = torch.tensor(g)
        topt.step()
        for p, b, u, t in zip(model.parameters(), before, update, tparams):
            np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(u, p - b, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_extrapolate_equals_the_next_step_given_the_assumed_gradient(name, kwargs):
    model = MLP([3, 4, 2], dtype=np.float64, seed=1)
    opt = OURS[name](model, **kwargs)
    shapes = [p.shape for p in model.parameters()]
    assert all(np.all(u == 0) for u in opt.extrapolate())
    for i in range(5):
        opt.step(_grads(i, shapes))
    state = {k: (list(v) if isinstance(v, list) else v) for k, v in opt.state_dict().items()}
    params = [p.copy() for p in model.parameters()]
    predicted = opt.extrapolate()
    for a, b in zip(params, model.parameters()):  # no side effects
        np.testing.assert_array_equal(a, b)
    assert opt.step_count == 5 and opt.state_dict()["step"] == state["step"]
    if name == "SGD":
        assumed = opt.last_grad
    else:
        assumed = [m / (1 - opt.betas[0] ** 5) for m in opt.exp_avg]
        if name == "Adam" and opt.weight_decay:  # Adam adds wd·θ to the gradient it is given
            assumed = [a - opt.weight_decay * p for a, p in zip(assumed, model.parameters())]
    actual = opt.step(assumed)
    for p, a in zip(predicted, actual):
        np.testing.assert_allclose(p, a, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_state_dict_round_trip(name, kwargs):
    shapes = None
    runs = []
    for restore in (False, True):
        model = MLP([3, 4, 2], dtype=np.float64, seed=1)
        opt = OURS[name](model, **kwargs)
        shapes = [p.shape for p in model.parameters()]
        for i in range(3):
            opt.step(_grads(i, shapes))
        if restore:
            clone_model = MLP([3, 4, 2], dtype=np.float64, seed=1)
            clone_model.apply_update([p - q for p, q in zip(model.parameters(), clone_model.parameters())], 1)
            clone = OURS[name](clone_model, **kwargs)
            clone.load_state_dict(opt.state_dict())
            model, opt = clone_model, clone
        runs.append([u.copy() for u in opt.step(_grads(9, shapes))])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_bad_state_leaves_optimizer_unchanged():
    model = MLP([3, 4, 2], dtype=np.float64)
    opt = Adam(model)
    opt.step(_grads(0, [p.shape for p in model.parameters()]))
    good = opt.state_dict()
    bad = dict(good, exp_avg=[np.zeros(1)] * 4)
    with pytest.raises(CheckpointError, match="exp_avg"):
        opt.load_state_dict(bad)
    with pytest.raises(CheckpointError, match="SGD"):
        opt.load_state_dict(dict(good, kind="SGD"))
    with pytest.raises(CheckpointError, match="lacks"):
        opt.load_state_dict({"kind": "Adam"})
    assert opt.state_dict()["exp_avg"] is not None and opt.step_count == 1


def test_validation():
    model = MLP([3, 2], dtype=np.float64)
    with pytest.raises(ConfigError) as info:
        SGD(model, lr=-1, momentum=1.5, weight_decay=-0.1)
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError, match="nesterov"):
        SGD(model, lr=0.1, nesterov=True)
    with pytest.raises(ConfigError) as info:
        Adam(model, lr=float("nan"), betas=(1.0, -0.1), eps=0)
    assert len(info.value.problems) == 4
    opt = AdamW(model)
    with pytest.raises(ConfigError):
        opt.lr = 0.0
    opt.lr = 0.5
    assert opt.lr == 0.5
    with pytest.raises(BatchError, match="gradient 0"):
        opt.step([np.zeros((2, 2)), np.zeros(2)])
    with pytest.raises(BatchError, match="1 gradients"):
        opt.step([np.zeros((3, 2))])


def test_adam_trains_on_every_namespace(xp):
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(128, 4))
    y_np = (x_np[:, 0] + x_np[:, 1] > 0).astype(np.int64)
    from hybrid_core._backend import from_numpy, to_numpy

    batch = (from_numpy(xp, x_np, dtype=xp.float64), from_numpy(xp, y_np))
    model = MLP([4, 8, 2], xp=xp, dtype=xp.float64)
    opt = Adam(model, lr=0.05)
    first = float(to_numpy(model.loss(batch)))
    for _ in range(100):
        opt.step(model.loss_and_grad(batch)[1])
    assert float(to_numpy(model.loss(batch))) < 0.5 * first
