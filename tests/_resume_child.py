"""Child process for the checkpoint tests: train, save, resume in a fresh interpreter."""

import json
import sys

import numpy as np

from hybrid_core import HybridConfig, HybridTrainer
from hybrid_core._backend import as_namespace, from_numpy, to_numpy
from hybrid_core.apps.data import split_digits
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

# The learning-rate recommendation is off: these runs must go through every phase.
CONFIG = HybridConfig(lr_recommend=False,
                      warmup_steps=40, min_full_steps=20, max_predict_steps=30, horizon_arms=(0, 10, 30),
                      check_interval=5, correct_steps=5, confidence_threshold=0.3)


def setup(backend, seed):
    if backend == "torch-module":  # an nn.Module through the adapters: the fused real step
        return _torch_module(seed)
    if backend == "torch":
        import torch

        xp = as_namespace(torch)
    else:
        xp = as_namespace(np)
    split = split_digits(seed=0)
    x = from_numpy(xp, split.x_train, dtype=xp.float64)
    y = from_numpy(xp, split.y_train)
    model = MLP([64, 24, 10], xp=xp, dtype=xp.float64, seed=seed)

    def batch(i):
        rng = np.random.default_rng(1000 + i)
        idx = from_numpy(xp, rng.choice(split.y_train.shape[0], size=32, replace=False))
        return xp.take(x, idx, axis=0), xp.take(y, idx, axis=0)

    return model, Adam(model, lr=3e-3), batch


def _torch_module(seed):
    import torch

    from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

    split = split_digits(seed=0)
    x = torch.from_numpy(split.x_train).double()
    y = torch.from_numpy(split.y_train)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.Tanh(), torch.nn.Linear(24, 10)).double()
    model = TorchModel(net, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))

    def batch(i):
        rng = np.random.default_rng(1000 + i)
        idx = torch.from_numpy(rng.choice(split.y_train.shape[0], size=32, replace=False))
        return x[idx], y[idx]

    return model, TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=3e-3)), batch


def report(trainer, model):
    records = [[r.step, r.phase, r.loss, r.predicted_loss, r.backward] for r in trainer.metrics.records]
    params = [to_numpy(p).tolist() for p in model.parameters()]
    return {"records": records, "params": params, "summary": trainer.metrics.summary()["steps_per_phase"]}


def main():
    mode, backend, path, first, second = sys.argv[1:6]
    if mode == "straight":
        model, opt, batch = setup(backend, seed=0)
        trainer = HybridTrainer(model, opt, CONFIG)
        trainer.fit(batch, int(first) + int(second), progress=False)
    elif mode == "first":
        model, opt, batch = setup(backend, seed=0)
        trainer = HybridTrainer(model, opt, CONFIG)
        trainer.fit(batch, int(first), progress=False)
        trainer.save(path)
    else:  # "second": a NEW process, a differently initialised model, then load
        model, opt, batch = setup(backend, seed=123)
        trainer = HybridTrainer.load(path, model, opt)
        trainer.fit(batch, int(second), progress=False)
    json.dump(report(trainer, model), sys.stdout)


if __name__ == "__main__":
    main()
