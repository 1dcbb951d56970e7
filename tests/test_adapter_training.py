"""The PyTorch and JAX adapters train the digits MLP through every phase of HybridTrainer."""

import numpy as np
import pytest

from hybrid_core import HybridConfig, HybridTrainer, Phase
from hybrid_core.apps.data import split_digits

CONFIG = HybridConfig(lr_recommend=False,  # at the given rate these runs go through every phase
                      warmup_steps=50, min_full_steps=25, max_predict_steps=30, horizon_arms=(0, 10, 30),
                      check_interval=5, correct_steps=5, confidence_threshold=0.1)


def _batches(seed=0):
    split = split_digits(seed=0)
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.choice(len(split.y_train), size=64, replace=False)
        yield split.x_train[idx].astype(np.float32), split.y_train[idx]


def _check(trainer, first, last):
    counts = trainer.metrics.summary()["steps_per_phase"]
    assert all(counts[p.value] > 0 for p in Phase), counts
    assert trainer.metrics.summary()["backward_passes"] == 400 - counts["predict"]
    assert last < 0.5 * first


def test_torch_adapter_trains_digits_through_every_phase():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    model = TorchModel(net, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    trainer = HybridTrainer(model, TorchOptimizer(model, torch.optim.Adam(net.parameters(), lr=3e-3)), CONFIG)
    split = split_digits(seed=0)
    val = (torch.from_numpy(split.x_val.astype(np.float32)), torch.from_numpy(split.y_val))
    first = float(model.loss(val))
    batches = ((torch.from_numpy(x), torch.from_numpy(y)) for x, y in _batches())
    trainer.fit(batches, 400, progress=False)
    _check(trainer, first, float(model.loss(val)))


def test_jax_adapter_trains_digits_through_every_phase():
    jax = pytest.importorskip("jax", reason="jax is not installed")
    optax = pytest.importorskip("optax", reason="optax is not installed")
    import jax.numpy as jnp

    from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer

    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(0, 0.125, (64, 64)), dtype=jnp.float32), "b1": jnp.zeros(64),
              "w2": jnp.asarray(rng.normal(0, 0.125, (64, 10)), dtype=jnp.float32), "b2": jnp.zeros(10)}
    model = JaxModel(_jax_loss, params)
    opt = OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=3e-3))
    trainer = HybridTrainer(model, opt, CONFIG)
    split = split_digits(seed=0)
    val = (jnp.asarray(split.x_val, dtype=jnp.float32), jnp.asarray(split.y_val))
    first = float(model.loss(val))
    batches = ((jnp.asarray(x), jnp.asarray(y)) for x, y in _batches())
    trainer.fit(batches, 400, progress=False)
    assert jax is not None
    _check(trainer, first, float(model.loss(val)))


def _jax_loss(params, batch):
    import jax
    import jax.numpy as jnp

    x, y = batch
    logits = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
