"""Host reads: in the steady state a FULL step does not force a device→host transfer every step."""

import numpy as np
import pytest
from _namespaces import available

from hybrid_core import HybridConfig, HybridTrainer
from hybrid_core.dynamics import TrendDynamics

# Never predicts (the bandit's only horizon is 0) and never idles, so every step after WARMUP is a
# FULL step with all the bookkeeping: the worst case for reads.
CONFIG = HybridConfig(warmup_steps=20, min_full_steps=50, horizon_arms=(0,), max_full_steps=10**6, idle_after=0)
STEADY = 400


def _count(trainer, batch):
    for i in range(CONFIG.warmup_steps + 4):
        trainer.step(batch(i))
    before = trainer.host_syncs
    for i in range(CONFIG.warmup_steps + 4, CONFIG.warmup_steps + 4 + STEADY):
        trainer.step(batch(i))
    reads = trainer.host_syncs - before
    trainer.flush()
    records = trainer.metrics.records
    assert len(records) == CONFIG.warmup_steps + 4 + STEADY  # every step's loss was read in the end
    assert all(np.isfinite(r.loss) for r in records)
    decisions = STEADY // CONFIG.min_full_steps + 1
    comparisons = trainer.metrics.summary()["events"].get("readout_comparisons", 0)
    assert comparisons <= STEADY // CONFIG.readout_check_every + 1
    assert reads <= STEADY / CONFIG.read_every + decisions + comparisons, reads
    assert reads >= STEADY / CONFIG.read_every - 1, reads  # and it does read: nothing is skipped
    return reads


def _digits(n=64):
    from hybrid_core.apps.data import split_digits

    split = split_digits(seed=0)
    return split.x_train.astype(np.float32), split.y_train, n


@pytest.mark.skipif(not available("torch"), reason="torch is not installed")
def test_torch_reads_at_most_once_per_read_every_steps():
    import torch

    from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

    x, y, n = _digits()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    model = TorchModel(module, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    opt = TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                         scheduler=None)
    trainer = HybridTrainer(model, opt, CONFIG, TrendDynamics())

    def batch(i):
        idx = torch.from_numpy(np.random.default_rng(i).choice(len(y), n, replace=False))
        return xt[idx], yt[idx]

    _count(trainer, batch)


@pytest.mark.skipif(not available("jax"), reason="jax is not installed")
@pytest.mark.parametrize("schedule", [False, True])
def test_jax_reads_at_most_once_per_read_every_steps_even_with_a_scheduled_lr(schedule):
    import jax
    import jax.numpy as jnp
    import optax

    from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer

    x, y, n = _digits()
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.normal(0, 0.1, (64, 32)), jnp.float32), jnp.zeros(32),
              jnp.asarray(rng.normal(0, 0.1, (32, 10)), jnp.float32), jnp.zeros(10)]
    model = JaxModel(_jax_loss, params)
    lr = optax.linear_schedule(1e-3, 1e-4, 1000) if schedule else 1e-3
    opt = OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=lr))
    trainer = HybridTrainer(model, opt, CONFIG, TrendDynamics())

    def batch(i):
        idx = jnp.asarray(np.random.default_rng(i).choice(len(y), n, replace=False))
        return xj[idx], yj[idx]

    _count(trainer, batch)
    if schedule:  # the learning rate read with the statistics is the schedule's, not a stale copy
        assert trainer.state.lr == pytest.approx(float(jax.device_get(lr(trainer.steps_done - 1))), rel=1e-5)


def _jax_loss(params, batch):
    import jax
    import jax.numpy as jnp

    w0, b0, w1, b1 = params
    logits = jnp.tanh(batch[0] @ w0 + b0) @ w1 + b1
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[1][:, None], axis=1))


def test_numpy_reads_in_batches_too():
    from hybrid_core.models import MLP
    from hybrid_core.optim import Adam

    x, y, n = _digits()
    model = MLP([64, 32, 10], seed=0)
    trainer = HybridTrainer(model, Adam(model, lr=1e-3), CONFIG, TrendDynamics())

    def batch(i):
        idx = np.random.default_rng(i).choice(len(y), n, replace=False)
        return x[idx], y[idx]

    _count(trainer, batch)


def test_idle_trainer_reads_the_loss_only_and_stops_feeding_the_dynamics_model():
    from hybrid_core.models import MLP
    from hybrid_core.optim import Adam

    x, y, n = _digits()
    model = MLP([64, 32, 10], seed=0)
    dynamics = _Unsure()
    config = CONFIG.replace(idle_after=1, idle_steps=200)
    trainer = HybridTrainer(model, Adam(model, lr=1e-3), config, dynamics)

    def batch(i):
        idx = np.random.default_rng(i).choice(len(y), n, replace=False)
        return x[idx], y[idx]

    i = 0
    while not trainer.idle:
        trainer.step(batch(i))
        i += 1
    assert i == config.warmup_steps + config.min_full_steps  # the first decision found no confidence
    seen = dynamics.state_dict()["seen"]
    for _ in range(100):
        trainer.step(batch(i))
        i += 1
    trainer.flush()
    assert dynamics.state_dict()["seen"] == seen  # not fed while idle
    assert trainer.state.real_steps == i  # but every loss was read and recorded
    while trainer.idle:
        trainer.step(batch(i))
        i += 1
    assert i == config.warmup_steps + config.min_full_steps + config.idle_steps
    trainer.step(batch(i))
    trainer.flush()
    assert dynamics.state_dict()["seen"] > seen  # the idle spell ended: fed again


class _Unsure(TrendDynamics):
    """Trend dynamics that never trusts itself."""

    def confidence(self):
        return 0.0


@pytest.mark.skipif(not available("jax"), reason="jax is not installed")
@pytest.mark.parametrize("stateful", [False, True])
def test_a_scheduled_lr_is_evaluated_on_the_host_and_only_a_stateful_one_read_and_counted(stateful):
    import jax.numpy as jnp
    import optax

    from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer

    x, y, n = _digits()
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.normal(0, 0.1, (64, 10)), jnp.float32), jnp.zeros(10)]
    model = JaxModel(_linear_loss, params)
    schedule = optax.linear_schedule(1e-3, 1e-4, 100)
    opt = OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(
        learning_rate=_Stateful(schedule) if stateful else schedule))
    assert opt.lr_on_device is stateful  # a stateful schedule's value exists on the device only
    trainer = HybridTrainer(model, opt, CONFIG.replace(read_every=1), TrendDynamics())  # every step read at once
    for i in range(10):
        idx = np.random.default_rng(i).choice(len(y), n, replace=False)
        trainer.step((jnp.asarray(x[idx]), jnp.asarray(y[idx])))
    # The statistics each step, and for the stateful schedule the learning rate too.
    assert trainer.host_syncs == (2 if stateful else 1) * 10
    assert trainer.state.lr == pytest.approx(float(schedule(9)), rel=1e-6)


class _Stateful:
    """An optax StatefulSchedule (init/update/__call__ over a state) around a plain schedule."""

    def __init__(self, fn):
        self.fn = fn

    def init(self):
        import jax.numpy as jnp

        return jnp.zeros([], jnp.int32)

    def update(self, state, **extra):
        return state + 1

    def __call__(self, state, **extra):
        return self.fn(state)


def _linear_loss(params, batch):
    import jax
    import jax.numpy as jnp

    logits = batch[0] @ params[0] + params[1]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[1][:, None], axis=1))
