"""Learning-rate schedules count every training step (predicted and skipped ones included) and never overrun."""

import math

import numpy as np
import pytest

from hybrid_core import ConfigError, DivergenceError, HybridConfig, HybridTrainer

torch = pytest.importorskip("torch", reason="the torch schedules need torch (pip install '.[torch]')")

from hybrid_core.adapters.torch import TorchModel, TorchOptimizer  # noqa: E402

# Predictions happen from early on (a confidence threshold of 0), so a run has predicted steps to count.
CONFIG = HybridConfig(warmup_steps=6, min_full_steps=4, max_predict_steps=6, horizon_arms=(0, 3, 6), check_interval=2,
                      correct_steps=2, confidence_threshold=0.0, horizon_ladder=False, read_every=4)


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


def _mse(module, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(module(x), y)


def batch(i, nan_at=()):
    g = torch.Generator().manual_seed(500 + i)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.stack([x[:, 0] * x[:, 1], x[:, 2] - x[:, 3]], dim=1)
    return (torch.full_like(x, math.nan) if i in nan_at else x), y


def one_cycle(total, config=CONFIG, counts="steps", chained=False):
    model = TorchModel(_net(), _mse)
    torch_opt = torch.optim.AdamW(model.module.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(torch_opt, max_lr=0.05, total_steps=total)
    if chained:
        sched = torch.optim.lr_scheduler.ChainedScheduler(
            [sched, torch.optim.lr_scheduler.ExponentialLR(torch_opt, gamma=0.999)], optimizer=torch_opt)
    opt = TorchOptimizer(model, torch_opt, scheduler=sched, schedule_counts=counts)
    return HybridTrainer(model, opt, config), sched, model


def _cycle_of(sched):
    return sched._schedulers[0] if isinstance(sched, torch.optim.lr_scheduler.ChainedScheduler) else sched


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_one_cycle_sized_to_the_run_counts_every_step_and_finishes():
    trainer, sched, _ = one_cycle(80)
    summary = trainer.fit(batch, max_steps=80, progress=False)
    assert summary["steps_per_phase"]["predict"] > 0, summary["steps_per_phase"]
    assert sched.last_epoch == 80 == trainer.steps_done
    plain = torch.optim.AdamW(_net().parameters(), lr=1e-2)  # where a plain 80-step loop leaves the rate
    reference = torch.optim.lr_scheduler.OneCycleLR(plain, max_lr=0.05, total_steps=80)
    for _ in range(80):
        plain.step()
        reference.step()
    assert trainer.optimizer.lr == reference.get_last_lr()[0]


def test_updates_only_is_an_option():
    trainer, sched, _ = one_cycle(80, counts="updates")
    summary = trainer.fit(batch, max_steps=80, progress=False)
    assert summary["steps_per_phase"]["predict"] > 0
    assert sched.last_epoch == summary["backward_passes"] < 80
    with pytest.raises(ConfigError, match="schedule_counts='sometimes'"):
        one_cycle(80, counts="sometimes")


@pytest.mark.parametrize("chained", [False, True])
@pytest.mark.parametrize("kwargs", [{"max_steps": 81}, {"steps": 81}])
def test_a_run_longer_than_the_schedule_is_refused_before_any_step(kwargs, chained):
    trainer, sched, model = one_cycle(80, chained=chained)
    before = snapshot(model)
    where = "in a ChainedScheduler" if chained else "has room for 80"
    with pytest.raises(ConfigError, match=rf"needs 81 more training step\(s\).*OneCycleLR\(total_steps=80\) at step 0"
                                          rf".*{where}") as err:
        trainer.fit(batch, progress=False, **kwargs)
    assert "total_steps" in err.value.recovery
    assert trainer.steps_done == 0 and _cycle_of(sched).last_epoch == 0 and same(before, snapshot(model))


def test_the_room_left_is_what_counts_after_some_steps():
    trainer, sched, _ = one_cycle(80)
    trainer.fit(batch, max_steps=30, progress=False)
    with pytest.raises(ConfigError, match=r"max_steps=81 needs 51 more .* at step 30 has room for 50"):
        trainer.fit(batch, max_steps=81, progress=False)
    with pytest.raises(ConfigError, match=r"steps=51 needs 51"):
        trainer.fit(batch, steps=51, progress=False)
    with pytest.raises(ConfigError, match=r"epochs=7 needs 56"):  # 7 passes over 8 batches from step 30
        trainer.fit([batch(i) for i in range(8)], epochs=7, progress=False)
    assert trainer.steps_done == 30 == sched.last_epoch
    trainer.fit(batch, max_steps=80, progress=False)
    assert sched.last_epoch == 80


def test_a_step_past_the_end_by_hand_is_refused_and_changes_nothing():
    trainer, sched, model = one_cycle(20)
    trainer.fit(batch, max_steps=20, progress=False)
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"step 20: the learning-rate schedule OneCycleLR.*has taken all its steps"):
        trainer.step(batch(20))
    assert trainer.steps_done == 20 == sched.last_epoch and same(before, snapshot(model))


@pytest.mark.parametrize("read_every", [1, 4])
def test_skipped_steps_count_and_rollbacks_keep_the_count(read_every):
    config = CONFIG.replace(on_nonfinite="skip", read_every=read_every)
    trainer, sched, _ = one_cycle(60, config=config)
    summary = trainer.fit(lambda i: batch(i, nan_at=(9, 21, 22)), max_steps=60, progress=False)
    assert summary["events"]["skipped_nonfinite"] == 3
    if read_every > 1:
        assert summary["events"]["late_nonfinite_rollbacks"] >= 1  # found late: rolled back and replayed
    assert sched.last_epoch == 60 == trainer.steps_done


def test_a_divergence_error_leaves_the_schedule_at_the_trainers_step():
    trainer, sched, _ = one_cycle(60)
    with pytest.raises(DivergenceError):  # the first real step among them (a predicted one reads no batch)
        trainer.fit(lambda i: batch(i, nan_at=range(26, 40)), max_steps=60, progress=False)
    assert sched.last_epoch == trainer.steps_done and 26 <= trainer.steps_done < 40
    trainer.fit(batch, max_steps=60, progress=False)
    assert sched.last_epoch == 60 == trainer.steps_done


def test_the_adapter_steps_the_scheduler_on_updates_and_when_told():
    model = TorchModel(_net(), _mse)
    torch_opt = torch.optim.SGD(model.module.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=2, gamma=0.5)
    opt = TorchOptimizer(model, torch_opt, scheduler=sched)
    opt.step(model.loss_and_grad(batch(0))[1])
    opt.schedule_step()
    opt.schedule_step()
    assert sched.last_epoch == 3 and opt.lr == pytest.approx(0.05)
    assert opt.schedule_left() is None  # StepLR has no end
    updates_only = TorchOptimizer(model, torch_opt, scheduler=sched, schedule_counts="updates")
    updates_only.schedule_step()
    assert sched.last_epoch == 3


# -- optax ----------------------------------------------------------------------------------------------------------


def _jax_trainer(transformation, counts="steps"):
    jnp = pytest.importorskip("jax.numpy")
    ja = pytest.importorskip("hybrid_core.adapters.jax")
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 8)) * 0.5), "v": jnp.asarray(rng.normal(size=(8, 2)) * 0.5)}

    def loss(p, b):
        x, y = b
        return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] - y) ** 2)

    model = ja.JaxModel(loss, params)
    # The learning rate (a schedule, injected or given to optax.adam) is found inside the transformation.
    return HybridTrainer(model, ja.OptaxOptimizer(model, transformation, schedule_counts=counts), CONFIG)


def jax_batch(i):
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(700 + i)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(np.stack([x[:, 0] * x[:, 1], x[:, 2] - x[:, 3]], axis=1))


def _counts(state, name):
    found = []

    def walk(node):
        if type(node).__name__ == name:
            found.append(int(node.count))
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (tuple, list)):
            for v in node:
                walk(v)

    walk(state)
    return found


@pytest.mark.parametrize("counts", ["steps", "updates"])
def test_an_optax_schedule_counts_every_step_but_adam_counts_its_gradients(counts):
    optax = pytest.importorskip("optax")
    trainer = _jax_trainer(optax.adam(optax.linear_schedule(0.02, 0.001, 60)), counts)
    summary = trainer.fit(jax_batch, max_steps=60, progress=False)
    assert summary["steps_per_phase"]["predict"] > 0
    state = trainer.optimizer.opt_state
    expected = 60 if counts == "steps" else summary["backward_passes"]
    assert _counts(state, "ScaleByScheduleState") == [expected]
    assert _counts(state, "ScaleByAdamState") == [summary["backward_passes"]]


def test_an_injected_schedule_gives_each_real_step_the_rate_of_its_index():
    optax = pytest.importorskip("optax")
    schedule = optax.linear_schedule(0.02, 0.001, 60)
    trainer = _jax_trainer(optax.inject_hyperparams(optax.adam)(learning_rate=schedule))
    summary = trainer.fit(jax_batch, max_steps=60, progress=False)
    assert summary["steps_per_phase"]["predict"] > 0
    assert _counts(trainer.optimizer.opt_state, "WrappedScheduleState") == [60]
    rated = [r for r in trainer.metrics.records if r.lr is not None]
    first_predicted = min(r.step for r in trainer.metrics.records if r.phase == "predict")
    assert any(r.step > first_predicted for r in rated)  # real steps after predicted ones
    for r in rated:
        assert r.lr == pytest.approx(float(schedule(r.step)), rel=1e-6), r


def test_an_optax_schedule_has_no_end_to_guard():
    optax = pytest.importorskip("optax")
    trainer = _jax_trainer(optax.adam(optax.linear_schedule(0.02, 0.001, 10)))
    assert trainer.optimizer.schedule_left() is None
    trainer.fit(jax_batch, max_steps=25, progress=False)  # past the schedule's length: it holds its last value
    assert trainer.steps_done == 25
