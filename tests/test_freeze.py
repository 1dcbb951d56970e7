"""Layer freezing: the torch adapter's groups and frozen steps, the AutoFreeze criterion, the guard, persistence."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import ConfigError, HybridConfig, HybridTrainer, ModelError
from hybrid_core._backend import to_host_floats
from hybrid_core._freeze import STALL_Z, LayerFreeze, autofreeze_decision, stall_z
from hybrid_core._persist import write_checkpoint
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

torch = pytest.importorskip("torch")
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from hybrid_core.adapters.torch import TorchModel, TorchOptimizer  # noqa: E402

# Never predicts and keeps the rate, so every step is a plain real step.
PLAIN = dict(horizon_arms=(0,), lr_recommend=False, warmup_steps=10)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 4))


def _mse(module, batch):
    x, y = batch
    return torch.mean((module(x) - y) ** 2)


def _batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(32, 8, generator=g)
    return x, torch.stack([x[:, 0] * x[:, 1], x[:, 2], torch.sin(x[:, 3]), x[:, 4] - x[:, 5]], dim=1)


def _torch_pair(seed=0, lr=1e-2, **kw):
    model = TorchModel(_net(seed), _mse, **kw)
    return model, TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=lr))


def _snapshot(model, optimizer, group):
    """Copies of a group's parameters and of their torch optimizer state."""
    params = [model.parameters()[i] for i in group]
    state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.optimizer.state[p].items()}
             for p in params]
    return [p.detach().clone() for p in params], state


def _same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)


def _matmuls(step):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.name in ("aten::mm", "aten::addmm") for e in prof.events())


# -- the torch adapter -----------------------------------------------------------------------------


def test_default_groups_are_the_top_level_children_and_root_parameters_join_the_first():
    model = TorchModel(_net(), _mse)
    assert model.parameter_groups() == [[0, 1], [2, 3], [4, 5]]  # the Tanh children hold nothing

    class WithPosition(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.position = torch.nn.Parameter(torch.zeros(3, 4))
            self.head = torch.nn.Linear(4, 10)

    module = WithPosition()
    wrapped = TorchModel(module, lambda m, b: m.head(m.embed(b) + m.position).mean())
    names = [n for n, _ in module.named_parameters()]
    assert [[names[i] for i in g] for g in wrapped.parameter_groups()] == [
        ["position", "embed.weight"], ["head.weight", "head.bias"]]


def test_named_groups_and_their_errors():
    model = TorchModel(_net(), _mse, groups=[["0.weight", "0.bias", "2.weight", "2.bias"], ["4.weight", "4.bias"]])
    assert model.parameter_groups() == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(ModelError, match=r"no group holds 4\.bias"):
        TorchModel(_net(), _mse, groups=[["0.weight", "0.bias", "2.weight", "2.bias"], ["4.weight"]])
    with pytest.raises(ModelError, match="not a trainable parameter"):
        TorchModel(_net(), _mse, groups=[["nope"]])
    with pytest.raises(ModelError, match="in two groups"):
        TorchModel(_net(), _mse, groups=[["0.weight", "0.bias", "2.weight", "2.bias", "4.weight"],
                                         ["4.weight", "4.bias"]])
    with pytest.raises(ModelError, match="bools"):
        model.set_trainable([True])


def test_a_frozen_group_gets_no_gradient_computed_and_stays_bit_identical_with_its_optimizer_state():
    model, opt = _torch_pair()
    for i in range(3):  # Adam state for every parameter first
        opt.fused_step(_batch(i), True)
    first = model.parameters()[0]
    fired = []
    first.register_hook(lambda g: fired.append(1))
    full = _matmuls(lambda: opt.fused_step(_batch(3), False))
    assert fired
    model.set_trainable([False, False, True])
    fired.clear()
    frozen_groups = [i for g in model.parameter_groups()[:2] for i in g]
    before = _snapshot(model, opt, frozen_groups)
    head_before = model.parameters()[4].detach().clone()
    truncated = _matmuls(lambda: opt.fused_step(_batch(4), False))
    # Forward: 3 addmm either way. Backward: 5 matmuls with every group trainable (weight and input
    # gradients of the last two layers, the weight gradient of the first), 1 with the front two frozen.
    assert (full, truncated) == (8, 4)
    for i in range(5, 9):  # fused steps, measured and not, then the unfused path
        opt.fused_step(_batch(i), i % 2 == 0)
    for i in range(9, 12):
        _, grads = model.loss_and_grad(_batch(i))
        assert all(float(grads[j].abs().sum()) == 0.0 for j in frozen_groups)
        opt.step(grads)
    assert not fired
    _same(before, _snapshot(model, opt, frozen_groups))
    assert not torch.equal(head_before, model.parameters()[4])  # the head did train
    assert all(model.parameters()[i].grad is None for i in frozen_groups)
    model.set_trainable([True, True, True])
    opt.fused_step(_batch(12), True)
    assert fired and not torch.equal(before[0][0], model.parameters()[0])


def test_frozen_groups_stay_still_through_the_trainer_and_the_prediction_is_held():
    model, opt = _torch_pair()
    trainer = HybridTrainer(model, opt, HybridConfig(layer_freeze="autofreeze", **PLAIN))
    for i in range(20):
        trainer.step(_batch(i))
    trainer.freeze._set(1)  # freeze the first group by hand
    before = _snapshot(model, opt, [0, 1])
    for i in range(20, 60):
        trainer.step(_batch(i))
    trainer.flush()
    _same(before, _snapshot(model, opt, [0, 1]))
    held = trainer.freeze.hold(opt.extrapolate())
    assert all(float(held[i].abs().sum()) == 0.0 for i in (0, 1)) and float(held[4].abs().sum()) > 0


# -- the criterion ---------------------------------------------------------------------------------

norms = st.floats(0.0, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), groups=st.integers(1, 8))
def test_the_criterion_freezes_front_to_back_only_and_never_the_last_group(data, groups):
    sequence = data.draw(st.lists(st.lists(norms, min_size=groups, max_size=groups), min_size=2, max_size=12))
    frozen = 0
    for previous, current in itertools.pairwise(sequence):
        new = autofreeze_decision(previous, current, frozen)
        assert frozen <= new <= max(frozen, groups - 1)  # a prefix that only grows; never the head
        live = range(frozen, groups)
        changes = {g: abs(current[g] - previous[g]) / previous[g] if previous[g] > 0 else
                   (0.0 if current[g] == previous[g] else math.inf) for g in live}
        median = float(np.median([changes[g] for g in live])) if frozen < groups - 1 else None
        for g in range(frozen, new):
            assert changes[g] < median
        if new < groups - 1:
            assert changes[new] >= median  # it stopped at the first group at or above the median
        frozen = new
    assert frozen <= max(groups - 1, 0)


def test_the_criterion_on_a_hand_made_case():
    # Changes 0.0, 0.1, 0.5, 0.9: median 0.3, so the first two freeze; the head never does.
    assert autofreeze_decision([1, 1, 1, 1], [1, 1.1, 1.5, 1.9], 0) == 2
    assert autofreeze_decision([1, 1, 1, 1], [1, 1.1, 1.5, 1.9], 3) == 3
    assert autofreeze_decision([1, 1, 1], [2, 1, 1], 0) == 0  # the first group still changes most
    assert autofreeze_decision([1, math.nan], [1, 1], 0) == 0


# -- the guard -------------------------------------------------------------------------------------


class _Groups:
    """Two parameter groups of one weight each; records what `set_trainable` was told."""

    def __init__(self):
        self.w = [np.zeros(3), np.zeros(2)]
        self.flags = [True, True]

    def parameters(self):
        return list(self.w)

    def parameter_groups(self):
        return [[0], [1]]

    def set_trainable(self, flags):
        self.flags = list(flags)


class _Still:
    skips_frozen = True


def _feed(part, steps, loss, norms_of, diverging_at=()):
    """Drive ``part`` as the real steps do: measured steps every 8, each read carrying the staged norms."""
    last = -1
    for s in range(steps):
        if (s + 1) % 8:
            continue
        part.stage(s, [np.full(3, norms_of(s, 0) / 3), np.full(2, norms_of(s, 1) / 2)], np)
        values = to_host_floats(part.pending())
        records = [(k, loss(k), None) for k in range(last + 1, s + 1)]
        part.after_read(s, records, values, any(last < k <= s for k in diverging_at))
        last = s


def _part():
    model = _Groups()
    return LayerFreeze(HybridConfig(layer_freeze="autofreeze"), model, _Still()), model


def _power_law(s, stall_from=None):
    at = s if stall_from is None else min(s, stall_from)
    return 3.0 * (at + 1.0) ** -0.5 * (1.0 + 0.02 * math.sin(1.7 * s))


def _settled_front(s, g):
    return 1.0 if g == 0 else 1.0 + s / 50.0  # the first group's norm stops changing, the head's does not


def test_a_loss_that_stalls_after_the_freeze_unfreezes_and_drops_the_strategy():
    part, model = _part()
    _feed(part, 220, lambda s: _power_law(s, stall_from=104), _settled_front)
    summary = part.summary()
    assert model.flags == [True, True] and part.frozen == 0
    assert summary["state"] == "dropped" and summary["frozen"] == []
    assert len(summary["drops"]) == 1 and summary["drops"][0]["step"] == 152
    assert "stalled" in summary["drops"][0]["reason"] and "groups 0–0 trained again" in summary["drops"][0]["reason"]


def test_a_loss_that_keeps_its_trend_confirms_the_freeze():
    part, model = _part()
    _feed(part, 220, _power_law, _settled_front)
    assert model.flags == [False, True]
    assert part.summary()["frozen"] == [{"group": 0, "step": 104}] and part.summary()["state"] == "all frozen"


def test_the_divergence_monitor_during_probation_unfreezes_and_drops():
    part, model = _part()
    _feed(part, 220, _power_law, _settled_front, diverging_at=(120,))
    assert model.flags == [True, True]
    assert part.summary()["drops"] == [{"step": 128, "reason": "the divergence monitor asked for real steps; "
                                                                 "groups 0–0 trained again"}]


def test_stall_z_is_in_standard_errors_of_the_fit():
    before = [(s, _power_law(s)) for s in range(50, 100)]
    assert abs(stall_z(before, [(s, _power_law(s)) for s in range(100, 150)])) < STALL_Z
    assert stall_z(before, [(s, _power_law(100)) for s in range(100, 150)]) > STALL_Z
    assert stall_z(before[:2], [(100, 1.0)]) is None


class _Shift(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(8))


class _Body(torch.nn.Module):
    """y = W x + b for a target A x with no offset: once W is frozen the offset b cannot help, so the loss stalls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(8, 8, bias=False)
        self.head = _Shift()
        torch.nn.init.normal_(self.body.weight, std=0.05)

    def forward(self, x):
        return self.body(x) + self.head.bias


def test_a_real_stall_in_the_trainer_unfreezes_and_drops(monkeypatch):
    monkeypatch.setattr("hybrid_core._freeze.autofreeze_decision", lambda p, c, n: max(n, 1))
    target = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))

    def batch(i):
        x = torch.randn(256, 8, generator=torch.Generator().manual_seed(i))
        return x, x @ target.T

    model = TorchModel(_Body(), _mse)
    opt = TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    trainer = HybridTrainer(model, opt, HybridConfig(layer_freeze="autofreeze", **PLAIN))
    for i in range(200):
        trainer.step(batch(i))
    summary = trainer.summary()
    assert summary["freeze"]["state"] == "dropped", summary["freeze"]
    assert "stalled" in summary["freeze"]["drops"][0]["reason"]
    assert summary["events"]["freezes"] == 1 and summary["events"]["unfreezes"] == 1
    assert all(p.requires_grad for p in model.parameters())


# -- persistence and availability ------------------------------------------------------------------


def test_save_and_load_mid_run_is_bit_exact_with_the_frozen_pattern_restored(tmp_path, monkeypatch):
    monkeypatch.setattr("hybrid_core._freeze.autofreeze_decision", lambda p, c, n: max(n, 1))
    config = HybridConfig(layer_freeze="autofreeze", **PLAIN)
    model, opt = _torch_pair()
    trainer = HybridTrainer(model, opt, config)
    for i in range(130):
        trainer.step(_batch(i))
    assert trainer.freeze.frozen == 1 and trainer.freeze.state == "probation"
    trainer.save(tmp_path / "mid.ckpt")
    saved = trainer.freeze.state_dict()
    for i in range(130, 220):
        trainer.step(_batch(i))
    trainer.flush()

    model2, opt2 = _torch_pair(seed=5)
    resumed = HybridTrainer.load(tmp_path / "mid.ckpt", model2, opt2)
    assert [p.requires_grad for p in model2.parameters()] == [False, False, True, True, True, True]
    assert resumed.freeze.state_dict() == saved and resumed.freeze.state == "probation"
    for i in range(130, 220):
        resumed.step(_batch(i))
    resumed.flush()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in model2.parameters()]
    assert resumed.summary()["freeze"] == trainer.summary()["freeze"]
    assert resumed.freeze.state_dict() == trainer.freeze.state_dict()


def test_a_checkpoint_without_the_freeze_part_still_loads(tmp_path):
    model, opt = _torch_pair()
    trainer = HybridTrainer(model, opt, HybridConfig(**PLAIN))
    for i in range(12):
        trainer.step(_batch(i))
    trainer.flush()
    parts = {k: v for k, v in trainer.parts().items() if k != "freeze"}
    write_checkpoint(tmp_path / "old.ckpt", trainer.config.to_dict(), parts,
                     {"dynamics_type": type(trainer.dynamics).__name__})
    model2, opt2 = _torch_pair(seed=1)
    loaded = HybridTrainer.load(tmp_path / "old.ckpt", model2, opt2)
    assert loaded.summary()["freeze"]["state"] == "off"
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_a_model_without_the_methods_reports_unavailable_and_trains():
    model = MLP([6, 5, 3], dtype=np.float64, seed=0)
    config = HybridConfig(layer_freeze="autofreeze", **PLAIN)
    trainer = HybridTrainer(model, Adam(model, lr=0.05), config)
    rng = np.random.default_rng(0)
    for _ in range(120):
        x = rng.normal(size=(16, 6))
        trainer.step((x, (x[:, 0] > 0).astype(np.int64)))
    summary = trainer.summary()
    assert summary["freeze"]["state"] == "unavailable: the model has no parameter_groups"
    assert summary["freeze"]["frozen"] == [] and "freezes" not in summary["events"]


def test_other_reasons_it_is_unavailable_and_off():
    model = TorchModel(_net(), _mse)

    class Bare:  # a torch optimizer wrapper that does not promise to skip frozen parameters
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            if name == "skips_frozen":
                raise AttributeError(name)
            return getattr(self._inner, name)

    inner = TorchOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    part = LayerFreeze(HybridConfig(layer_freeze="autofreeze"), model, Bare(inner))
    assert part.state.startswith("unavailable: the optimizer does not say")
    single = TorchModel(torch.nn.Linear(3, 2), lambda m, b: m(b).sum())
    part = LayerFreeze(HybridConfig(layer_freeze="autofreeze"), single, TorchOptimizer(
        single, torch.optim.SGD(single.parameters(), lr=0.1)))
    assert part.state == "unavailable: the model has a single parameter group (the last group is never frozen)"
    assert LayerFreeze(HybridConfig(), model, inner).summary()["state"] == "off"


def test_config_fields():
    assert HybridConfig().layer_freeze == "off" and HybridConfig().freeze_every == 50
    with pytest.raises(ConfigError, match="freeze_every=4: must be >= read_every"):
        HybridConfig(layer_freeze="autofreeze", freeze_every=4)
    HybridConfig(freeze_every=4)  # off: no constraint


def test_flushes_and_saves_between_reads_change_no_freeze_decision():
    def run(flushes):
        model, opt = _torch_pair(lr=3e-2)
        trainer = HybridTrainer(model, opt, HybridConfig(layer_freeze="autofreeze", **PLAIN))
        for i in range(300):
            trainer.step(_batch(i))
            if i in flushes:
                trainer.flush()
        trainer.flush()
        return model, trainer.freeze.state_dict(), trainer.summary()["events"]

    model, state, events = run(set())
    model_f, state_f, events_f = run({3, 49, 50, 98, 99, 100, 101, 149, 150, 151, 199, 250, 251, 253})
    assert state["froze_at"] and state["froze_at"][0] == 104  # the criterion did freeze
    assert state_f == state and events_f == events
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_f.parameters()))
