"""PyTorch adapter: gradients, updates, closed-form extrapolation against torch's next step, host syncs."""

import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch adapter needs torch (pip install '.[torch]')")

from hybrid_core import BackendError, CheckpointError, ConfigError, Model, ModelError, Optimizer  # noqa: E402
from hybrid_core.adapters import torch as ta  # noqa: E402
from hybrid_core.conformance import ConformanceCase  # noqa: E402
from hybrid_core.conformance import test_contracts as contracts  # noqa: E402

F = torch.nn.functional


def _net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)


def _mse(module, batch):
    x, y = batch
    return F.mse_loss(module(x), y)


def _batch(seed, dtype=torch.float64, n=16):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def _model(seed=0, **kw):
    return ta.TorchModel(_net(seed), _mse, **kw)


def _snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def _close(a, b, rtol=1e-9, atol=1e-13):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def _train(model, opt, steps, start=0):
    grads = None
    for k in range(steps):
        _, grads = model.loss_and_grad(_batch(start + k))
        opt.step(grads)
    return grads


def test_importing_the_adapters_package_imports_no_framework():
    code = ("import sys, hybrid_core.adapters, hybrid_core.adapters.numpy; "
            "sys.exit(sorted(m for m in ('torch', 'jax', 'optax') if m in sys.modules) or 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


# -- TorchModel --------------------------------------------------------------------------------------------


def test_implements_the_protocols():
    model = _model()
    assert isinstance(model, Model)
    assert isinstance(ta.TorchOptimizer(model, torch.optim.SGD(model.module.parameters(), lr=0.1)), Optimizer)


def test_parameters_are_the_live_trainable_tensors_in_module_order():
    net = _net()
    net[0].bias.requires_grad_(False)
    model = ta.TorchModel(net, _mse)
    expected = [p for p in net.parameters() if p.requires_grad]
    assert len(model.parameters()) == 3
    assert all(a is b for a, b in zip(model.parameters(), expected, strict=True))


def test_loss_is_a_detached_0d_tensor():
    model = _model()
    loss = model.loss(_batch(0))
    assert isinstance(loss, torch.Tensor) and loss.shape == () and not loss.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_loss_and_grad_matches_a_central_finite_difference():
    model = _model()
    batch = _batch(0)
    loss, grads = model.loss_and_grad(batch)
    assert loss.shape == () and not loss.requires_grad
    assert all(g is p.grad for g, p in zip(grads, model.parameters(), strict=True))
    gen = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))
    eps = 1e-6
    model.apply_update(direction, eps)
    up = float(model.loss(batch))
    model.apply_update(direction, -2 * eps)
    down = float(model.loss(batch))
    numeric = (up - down) / (2 * eps)
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=1e-7)


class _WithUnusedLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = _net()
        self.unused = torch.nn.Linear(2, 2).double()

    def forward(self, x):
        return self.used(x)


def test_gradient_of_an_unreached_parameter_is_zero():
    net = _WithUnusedLayer()
    model = ta.TorchModel(net, _mse)
    _, grads = model.loss_and_grad(_batch(0))
    assert torch.count_nonzero(grads[-1]) == 0 and grads[-1] is net.unused.bias.grad
    assert torch.count_nonzero(grads[0]) > 0


def test_apply_update_then_its_negation_restores_the_parameters():
    model = _model()
    before = _snapshot(model.parameters())
    gen = torch.Generator().manual_seed(3)
    update = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
    model.apply_update(update, 0.37)
    moved = _snapshot(model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, moved, strict=True))
    _close(moved, [b + 0.37 * u for b, u in zip(before, update, strict=True)], rtol=0, atol=1e-15)
    model.apply_update(update, -0.37)
    _close(model.parameters(), before, rtol=0, atol=1e-15)


def test_loss_and_grad_runs_in_train_mode_and_restores_eval():
    seen = []
    net = _net()
    net[0].register_forward_hook(lambda mod, _inp, _out: seen.append(mod.training))
    net.eval()
    model = ta.TorchModel(net, _mse)
    model.loss_and_grad(_batch(0))
    model.loss(_batch(0))
    assert seen == [True, False]
    assert not any(m.training for m in net.modules())


def test_loss_is_deterministic_by_default_and_leaves_batch_norm_stats_alone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.5),
                              torch.nn.Linear(6, 3)).double()
    net[1].eval()  # a submodule mode the user chose must survive the switch
    stats = net[1].running_mean.clone()
    checked = ta.TorchModel(net, _mse)  # eval_for_loss=True is the default
    assert checked.eval_for_loss
    batch = _batch(0)
    first, second = checked.loss(batch), checked.loss(batch)
    assert torch.equal(first, second)
    assert torch.equal(net[1].running_mean, stats)
    assert net.training and net[2].training and not net[1].training
    net[1].train()
    noisy = ta.TorchModel(net, _mse, eval_for_loss=False)  # the module's own (train) mode
    assert not torch.equal(noisy.loss(batch), noisy.loss(batch))
    assert not torch.equal(net[1].running_mean, stats)


def test_batch_of_another_library_raises_backend_error_naming_both():
    model = _model()
    x, y = _batch(0)
    with pytest.raises(BackendError, match=r"numpy.*torch"):
        model.loss((x.numpy(), y))
    with pytest.raises(BackendError, match=r"numpy.*torch"):
        model.loss_and_grad({"x": x, "y": [y.numpy()]})


def test_batch_on_another_device_raises_backend_error():
    model = _model()
    x, y = _batch(0)
    with pytest.raises(BackendError, match="meta"):
        model.loss_and_grad((x.to("meta"), y))


def test_update_of_another_library_or_dtype_is_rejected():
    model = _model()
    with pytest.raises(BackendError, match="numpy"):
        model.apply_update([np.zeros(tuple(p.shape)) for p in model.parameters()], 1.0)
    with pytest.raises(Exception, match="dtype"):
        model.apply_update([torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()], 1.0)


def test_bad_modules_and_losses_are_reported():
    with pytest.raises(ModelError):
        ta.TorchModel(object(), _mse)
    frozen = _net().requires_grad_(False)
    with pytest.raises(ModelError, match="requires_grad"):
        ta.TorchModel(frozen, _mse)
    with pytest.raises(ModelError, match=r"torch\.Tensor"):
        ta.TorchModel(_net(), lambda m, b: 1.0).loss(_batch(0))
    with pytest.raises(Exception, match="shape"):
        ta.TorchModel(_net(), lambda m, b: m(b[0])).loss(_batch(0))


# -- TorchOptimizer: steps ---------------------------------------------------------------------------------

SGD, ADAM, ADAMW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
NEXT_CASES = [
    pytest.param(SGD, dict(lr=0.1), id="sgd"),
    pytest.param(SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01, dampening=0.1), id="sgd-momentum"),
    pytest.param(SGD, dict(lr=0.05, momentum=0.8, weight_decay=0.02, nesterov=True), id="sgd-nesterov"),
    pytest.param(ADAM, dict(lr=0.01, weight_decay=0.05), id="adam-l2"),
    pytest.param(ADAM, dict(lr=0.01, betas=(0.8, 0.99), amsgrad=True), id="adam-amsgrad"),
    pytest.param(ADAMW, dict(lr=0.01, weight_decay=0.1), id="adamw"),
    pytest.param(ADAMW, dict(lr=0.02, weight_decay=0.1, amsgrad=True, eps=1e-6), id="adamw-amsgrad"),
]


def _next_gradient(opt, model, last_grads):
    """The gradient extrapolate() assumes: the last one for SGD, m̂_t = m_t/(1 − β₁ᵗ) for Adam/AdamW."""
    torch_opt = opt.optimizer
    if isinstance(torch_opt, torch.optim.SGD):
        return [g.clone() for g in last_grads]
    out = []
    for p in model.parameters():
        group = next(g for g in torch_opt.param_groups if any(q is p for q in g["params"]))
        state = torch_opt.state[p]
        out.append(state["exp_avg"] / (1 - group["betas"][0] ** state["step"].item()))
    return out


def test_step_returns_the_parameter_change_as_fresh_tensors():
    model = _model()
    opt = ta.TorchOptimizer(model, torch.optim.Adam(model.module.parameters(), lr=0.01))
    results = []
    for k in range(3):
        before = _snapshot(model.parameters())
        update = opt.step(model.loss_and_grad(_batch(k))[1])
        _close(update, [a - b for a, b in zip(model.parameters(), before, strict=True)], rtol=0, atol=0)
        results.append(_snapshot(update))
        assert all(u.data_ptr() != p.data_ptr() for u, p in zip(update, model.parameters(), strict=True))
        assert not any(u.requires_grad for u in update)
    assert not torch.equal(results[0][0], results[1][0])


@pytest.mark.parametrize(("cls", "kwargs"), NEXT_CASES)
def test_extrapolate_equals_the_next_real_update(cls, kwargs):
    model = _model()
    opt = ta.TorchOptimizer(model, cls(model.module.parameters(), **kwargs))
    last = [g.clone() for g in _train(model, opt, 4)]
    params_before = _snapshot(model.parameters())
    state_before = opt.optimizer.state_dict()
    state_before = {i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for i, s in
                    state_before["state"].items()}
    predicted = opt.extrapolate()
    again = opt.extrapolate()
    _close(again, predicted, rtol=0, atol=0)
    _close(model.parameters(), params_before, rtol=0, atol=0)
    for i, s in opt.optimizer.state_dict()["state"].items():
        for key, value in state_before[i].items():
            assert torch.equal(s[key], value), f"extrapolate changed optimizer state {key}"
    actual = opt.step(_next_gradient(opt, model, last))
    assert max(float(u.abs().max()) for u in actual) > 1e-4
    _close(predicted, actual)


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.Adagrad])
def test_extrapolate_before_any_step_is_zero(cls):
    model = _model()
    opt = ta.TorchOptimizer(model, cls(model.module.parameters(), lr=0.1))
    guess = opt.extrapolate()
    assert all(torch.count_nonzero(g) == 0 and g.shape == p.shape for g, p in
               zip(guess, model.parameters(), strict=True))


def test_unknown_optimizer_extrapolates_a_copy_of_its_last_update():
    model = _model()
    opt = ta.TorchOptimizer(model, torch.optim.Adagrad(model.module.parameters(), lr=0.1))
    _train(model, opt, 2)
    last = _snapshot(opt.step(model.loss_and_grad(_batch(9))[1]))
    guess = opt.extrapolate()
    _close(guess, last, rtol=0, atol=0)
    guess[0].add_(1.0)
    _close(opt.extrapolate(), last, rtol=0, atol=0)
    assert math.isclose(opt.lr, 0.1)


def test_param_groups_in_any_order_with_different_lrs():
    model = _model()
    first, last = model.module[0], model.module[2]
    torch_opt = torch.optim.Adam([{"params": last.parameters(), "lr": 0.1},
                                  {"params": first.parameters(), "lr": 0.01, "weight_decay": 0.1}], lr=0.5)
    opt = ta.TorchOptimizer(model, torch_opt)
    before = _snapshot(model.parameters())
    _train(model, opt, 3)
    moved = [float((a.detach() - b).abs().max()) for a, b in zip(model.parameters(), before, strict=True)]
    assert min(moved[2:]) > 5 * max(moved[:2])
    predicted = opt.extrapolate()
    _close(predicted, opt.step(_next_gradient(opt, model, None)))
    assert opt.lr == 0.1
    opt.lr = 0.05
    assert [g["lr"] for g in torch_opt.param_groups] == pytest.approx([0.05, 0.005])


def test_lr_setter_rejects_bad_values():
    model = _model()
    opt = ta.TorchOptimizer(model, torch.optim.SGD(model.module.parameters(), lr=0.1))
    for bad in (0.0, -1.0, math.nan, math.inf, "0.1", True):
        with pytest.raises(ConfigError):
            opt.lr = bad
    assert opt.lr == 0.1


def test_the_adapter_alone_steps_its_scheduler_on_updates_only():
    # Moves applied through the model are not its own: the trainer calls schedule_step for predicted steps
    # (tests/test_schedules.py).
    model = _model()
    torch_opt = torch.optim.SGD(model.module.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=2, gamma=0.5)
    opt = ta.TorchOptimizer(model, torch_opt, scheduler=sched)
    for k in range(3):
        opt.step(model.loss_and_grad(_batch(k))[1])
        for _ in range(4):  # predicted steps: extrapolate, apply through the model, check the loss
            model.apply_update(opt.extrapolate(), 1.0)
            model.loss(_batch(k))
    assert sched.last_epoch == 3
    assert opt.lr == pytest.approx(0.05)


def test_clip_grad_norm_clips_like_torch():
    model, reference = _model(), _net()
    opt = ta.TorchOptimizer(model, torch.optim.SGD(model.module.parameters(), lr=0.1), clip_grad_norm=0.05)
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    batch = _batch(0)
    update = opt.step(model.loss_and_grad(batch)[1])
    plain.zero_grad()
    _mse(reference, batch).backward()
    assert float(torch.nn.utils.clip_grad_norm_(reference.parameters(), math.inf)) > 0.05
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    before = _snapshot(reference.parameters())
    plain.step()
    _close(update, [a - b for a, b in zip(reference.parameters(), before, strict=True)])


def test_optimizer_must_hold_exactly_the_model_parameters():
    model = _model()
    with pytest.raises(ConfigError, match="no parameter group"):
        ta.TorchOptimizer(model, torch.optim.SGD(model.module[0].parameters(), lr=0.1))
    stranger = torch.nn.Linear(2, 2).double()
    both = list(model.module.parameters()) + list(stranger.parameters())
    with pytest.raises(ConfigError, match=r"not in model\.parameters"):
        ta.TorchOptimizer(model, torch.optim.SGD(both, lr=0.1))
    with pytest.raises(ConfigError, match="clip_grad_norm"):
        ta.TorchOptimizer(model, torch.optim.SGD(model.module.parameters(), lr=0.1), clip_grad_norm=0)


# -- TorchOptimizer: state ---------------------------------------------------------------------------------


def _plain_types(value):
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain_types(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain_types(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.AdamW, torch.optim.Adagrad])
def test_state_dict_round_trip_resumes_identically(cls):
    kwargs = dict(lr=0.05, momentum=0.9) if cls is torch.optim.SGD else dict(lr=0.05)

    def build():
        model = _model(seed=1)
        torch_opt = cls(model.module.parameters(), **kwargs)
        sched = torch.optim.lr_scheduler.ExponentialLR(torch_opt, gamma=0.9)
        return model, ta.TorchOptimizer(model, torch_opt, scheduler=sched, clip_grad_norm=1.0)

    model_a, opt_a = build()
    _train(model_a, opt_a, 3)
    saved = opt_a.state_dict()
    assert _plain_types(saved)
    extra = opt_a.step(model_a.loss_and_grad(_batch(50))[1])  # the snapshot must not follow later steps
    model_a.apply_update(extra, -1.0)
    opt_a.load_state_dict(saved)
    model_b, opt_b = build()
    gap = [a - b for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True)]
    model_b.apply_update(gap, 1.0)
    opt_b.load_state_dict(saved)
    _close(opt_a.extrapolate(), opt_b.extrapolate(), rtol=1e-12, atol=1e-15)
    assert opt_b.lr == pytest.approx(opt_a.lr)
    batch = _batch(7)
    _close(opt_a.step(model_a.loss_and_grad(batch)[1]), opt_b.step(model_b.loss_and_grad(batch)[1]),
           rtol=1e-12, atol=1e-15)


def test_load_state_dict_rejects_foreign_states_without_changing_anything():
    model = _model()
    opt = ta.TorchOptimizer(model, torch.optim.Adam(model.module.parameters(), lr=0.01))
    _train(model, opt, 2)
    good = opt.state_dict()
    guess = opt.extrapolate()
    other = ta.TorchOptimizer(model, torch.optim.SGD(model.module.parameters(), lr=0.1)).state_dict()
    with_scheduler = dict(good, scheduler={"last_epoch": 1})
    short = dict(good, last_update=good["last_update"][:1])
    for bad in ({}, other, with_scheduler, short, dict(good, kind="SGD")):
        with pytest.raises(CheckpointError):
            opt.load_state_dict(bad)
    _close(opt.extrapolate(), guess, rtol=0, atol=0)


# -- host syncs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam])
def test_no_host_syncs_across_steps_extrapolations_and_losses(cls, monkeypatch):
    model = _model()
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=0.01) if cls is torch.optim.SGD else dict(lr=0.01)
    torch_opt = cls(model.module.parameters(), **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=3)
    opt = ta.TorchOptimizer(model, torch_opt, scheduler=sched, clip_grad_norm=1.0)
    batches = [_batch(k) for k in range(10)]
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append((name, self))
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    for batch in batches:
        _, grads = model.loss_and_grad(batch)
        opt.step(grads)
        model.apply_update(opt.extrapolate(), 0.5)
        model.loss(batch)
        _ = opt.lr
    monkeypatch.undo()
    # torch.optim.Adam reads its own CPU-resident step counter (by design, no device sync); nothing else may.
    step_counters = {id(s["step"]) for s in torch_opt.state.values() if "step" in s}
    assert [(name, tuple(t.shape)) for name, t in reads if id(t) not in step_counters] == []


# -- conformance suite ---------------------------------------------------------------------------------------


def _conformance_case():
    def make_model(seed):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        return ta.TorchModel(net, lambda m, b: F.cross_entropy(m(b[0]), b[1]))

    def make_batches(seed):
        rng = np.random.default_rng(seed)
        centers = rng.normal(size=(4, 12))
        while True:
            y = rng.integers(0, 4, size=32)
            x = centers[y] + 0.7 * rng.normal(size=(32, 12))
            yield torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)

    return ConformanceCase(
        name="torch-adapter-adam",
        make_model=make_model,
        make_optimizer=lambda model: ta.TorchOptimizer(model, ADAM(model.module.parameters(), lr=1e-2)),
        make_batches=make_batches,
    )


CONTRACTS = sorted(name for name in dir(contracts) if name.startswith("test_"))


@pytest.mark.parametrize("contract", CONTRACTS)
def test_conformance_contract_holds_for_the_torch_adapter(contract):
    getattr(contracts, contract)(_conformance_case())


def _large_allocations(run, threshold):
    """Count allocations of at least ``threshold`` bytes made while ``run()`` executes, by op name."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return Counter(e.name for e in prof.events() if e.cpu_memory_usage >= threshold)


def test_hybrid_adam_allocates_no_parameter_sized_buffer_per_step_beyond_torch_adam():
    """200 hybrid steps with torch Adam: per real step, the adapter and trainer add no allocation
    as large as the biggest parameter to what plain ``torch.optim.Adam`` training allocates."""
    from hybrid_core import HybridConfig, HybridTrainer

    torch.manual_seed(0)
    width = 512
    net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 4))
    big = width * width * 4
    model = ta.TorchModel(net, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    trainer = HybridTrainer(model, ta.TorchOptimizer(model, torch.optim.Adam(net.parameters(), lr=1e-3)),
                            HybridConfig(warmup_steps=20, min_full_steps=10, max_full_steps=30))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, width, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    for s in range(20):
        trainer.step(batches[s % 4])
    before = trainer.metrics.summary()["backward_passes"]

    def hybrid():
        for s in range(200):
            trainer.step(batches[s % 4])

    verifies = trainer.ledger.verifies
    hybrid_counts = _large_allocations(hybrid, big)
    verifies = trainer.ledger.verifies - verifies
    summary = trainer.metrics.summary()
    real = summary["backward_passes"] - before
    assert summary["steps_per_phase"]["predict"] > 0, "the run must include PREDICT steps"

    plain_net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 4))
    plain_opt = torch.optim.Adam(plain_net.parameters(), lr=1e-3)

    def plain():
        for s in range(real):
            plain_opt.zero_grad()
            F.cross_entropy(plain_net(batches[s % 4][0]), batches[s % 4][1]).backward()
            plain_opt.step()

    plain(), plain_opt.zero_grad()  # first steps allocate Adam's state; count steady state only
    plain_counts = _large_allocations(plain, big)
    extra = sum(hybrid_counts.values()) - sum(plain_counts.values())
    # What remains is a handful per PREDICT phase (the extrapolated direction) and, per verified
    # point (every 4·read_every real steps and once per cycle), one copy of the parameter, of
    # Adam's two moments and of the last Δθ (the profiler counts each clone twice: clone and its
    # empty_strided).
    # The read-out keeps a bounded pool of snapshot buffers (lawa_snapshots + the EMA + one staged),
    # filled once, and each paired comparison (every readout_check_every steps) copies the raw weights
    # and forms each read-out: at most 12 such allocations per comparison.
    phases = summary["events"].get("predict_phases", 0) + summary["events"].get("probes", 0)
    comparisons = summary["events"].get("readout_forwards", 0)
    pool = 2 * (trainer.config.lawa_snapshots + 2)
    assert verifies <= real // (4 * trainer.config.read_every) + phases + 1, verifies
    assert extra <= 8 * verifies + 4 * phases + pool + 6 * comparisons, (
        f"{extra} extra parameter-sized allocations over {real} real steps: "
                                                f"hybrid {dict(hybrid_counts)} vs plain {dict(plain_counts)}")
    assert extra - pool - 6 * comparisons < real // 2
