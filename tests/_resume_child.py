"""Child process for the checkpoint tests: train, save, resume in a fresh interpreter."""

import json
import random
import sys

import numpy as np

from hybrid_core import HybridConfig, HybridTrainer
from hybrid_core._backend import as_namespace, from_numpy, to_numpy
from hybrid_core.apps.data import split_digits
from hybrid_core.dynamics import RSSMDynamics
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

# The learning-rate recommendation is off: these runs must go through every phase.
CONFIG = HybridConfig(lr_recommend=False,
                      warmup_steps=40, min_full_steps=20, max_predict_steps=30, horizon_arms=(0, 10, 30),
                      check_interval=5, correct_steps=5, confidence_threshold=0.3)


def setup(backend, seed):
    if backend in ("torch-module", "torch-dropout"):  # an nn.Module through the adapters: the fused real step
        return _torch_module(seed, dropout=backend == "torch-dropout")
    if backend == "jax-dropout":
        return _jax_module(seed)
    if backend == "torch":
        import torch

        xp = as_namespace(torch)
    else:
        xp = as_namespace(np)
    split = split_digits(seed=0)
    x = from_numpy(xp, split.x_train, dtype=xp.float64)
    y = from_numpy(xp, split.y_train)
    if backend == "numpy-dropout":  # the process-global generators, seeded differently in the resuming process
        np.random.seed(seed)
        random.seed(seed)
    model = (_DropoutMLP if backend == "numpy-dropout" else MLP)([64, 24, 10], xp=xp, dtype=xp.float64, seed=seed)

    def batch(i):
        rng = np.random.default_rng(1000 + i)
        idx = from_numpy(xp, rng.choice(split.y_train.shape[0], size=32, replace=False))
        return xp.take(x, idx, axis=0), xp.take(y, idx, axis=0)

    return model, Adam(model, lr=3e-3), batch


class _DropoutMLP(MLP):
    """Input dropout drawn from NumPy's global generator and Python's ``random`` (the process-global ones)."""

    def loss_and_grad(self, batch):
        x, y = batch
        keep = np.random.random_sample(x.shape) >= 0.2
        scale = 1.0 + 0.01 * random.random()  # Python's generator too
        return super().loss_and_grad((x * keep * (scale / 0.8), y))


def _torch_module(seed, dropout=False):
    import torch

    from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

    split = split_digits(seed=0)
    x = torch.from_numpy(split.x_train).double()
    y = torch.from_numpy(split.y_train)
    torch.manual_seed(seed)
    middle = [torch.nn.Dropout(0.2)] if dropout else []
    net = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.Tanh(), *middle, torch.nn.Linear(24, 10)).double()
    model = TorchModel(net, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))

    def batch(i):
        rng = np.random.default_rng(1000 + i)
        idx = torch.from_numpy(rng.choice(split.y_train.shape[0], size=32, replace=False))
        return x[idx], y[idx]

    return model, TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=3e-3)), batch


def _jax_module(seed):
    """A JaxModel with dropout whose key comes with the batch, derived from the step index."""
    import jax
    import jax.numpy as jnp
    import optax

    from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer

    jax.config.update("jax_enable_x64", True)
    split = split_digits(seed=0)
    x, y = jnp.asarray(split.x_train, dtype=jnp.float64), jnp.asarray(split.y_train)
    rng = np.random.default_rng(seed)
    params = {"w1": jnp.asarray(rng.normal(0, 0.125, (64, 24))), "b1": jnp.zeros(24, jnp.float64),
              "w2": jnp.asarray(rng.normal(0, 0.2, (24, 10))), "b2": jnp.zeros(10, jnp.float64)}
    model = JaxModel(_jax_loss, params)
    base = jax.random.key(7)

    def batch(i):
        idx = jnp.asarray(np.random.default_rng(1000 + i).choice(split.y_train.shape[0], size=32, replace=False))
        return x[idx], y[idx], jax.random.fold_in(base, i)

    return model, OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=3e-3)), batch


def _jax_loss(p, batch):
    import jax
    import jax.numpy as jnp

    x, y, key = batch
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    h = h * jax.random.bernoulli(key, 0.8, h.shape) / 0.8
    logits = h @ p["w2"] + p["b2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def _dynamics(backend):
    """The NumPy run also trains the RSSM, whose generator is the trainer's own (saved in its part)."""
    return RSSMDynamics(seed=CONFIG.seed) if backend == "numpy-dropout" else None


def report(trainer, model):
    records = [[r.step, r.phase, r.loss, r.predicted_loss, r.backward] for r in trainer.metrics.records]
    params = [to_numpy(p).tolist() for p in model.parameters()]
    return {"records": records, "params": params, "summary": trainer.metrics.summary()["steps_per_phase"]}


def main():
    mode, backend, path, first, second = sys.argv[1:6]
    if mode == "straight":
        model, opt, batch = setup(backend, seed=0)
        trainer = HybridTrainer(model, opt, CONFIG, _dynamics(backend))
        trainer.fit(batch, int(first) + int(second), progress=False)
    elif mode == "first":
        model, opt, batch = setup(backend, seed=0)
        trainer = HybridTrainer(model, opt, CONFIG, _dynamics(backend))
        trainer.fit(batch, int(first), progress=False)
        trainer.save(path)
    else:  # "second": a NEW process, a differently initialised model, then load
        model, opt, batch = setup(backend, seed=123)
        trainer = HybridTrainer.load(path, model, opt)
        trainer.fit(batch, int(second), progress=False)
    json.dump(report(trainer, model), sys.stdout)


if __name__ == "__main__":
    main()
