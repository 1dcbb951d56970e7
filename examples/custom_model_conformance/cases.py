"""Two models a third party might bring, run through the conformance suite with one command:

    cd examples/custom_model_conformance
    PYTHONPATH=. python -m pytest --pyargs hybrid_core.conformance --hybrid-case cases:make_cases

Only the public API is used: the `Model`/`Optimizer` protocols, the PyTorch adapter and
`ConformanceCase`.
"""

from __future__ import annotations

import numpy as np

from hybrid_core.conformance import ConformanceCase


class NumpyLinear:
    """Softmax regression written from scratch in NumPy: a `hybrid_core.Model` by shape alone."""

    def __init__(self, features: int, classes: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.normal(0.0, 0.1, size=(features, classes))
        self.b = np.zeros(classes)

    def parameters(self):
        return [self.w, self.b]

    def _probs(self, x):
        z = x @ self.w + self.b
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def loss(self, batch):
        x, y = batch
        p = self._probs(x)
        return np.asarray(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))

    def loss_and_grad(self, batch):
        x, y = batch
        p = self._probs(x)
        loss = np.asarray(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))
        p[np.arange(len(y)), y] -= 1.0
        p /= len(y)
        return loss, [x.T @ p, p.sum(axis=0)]

    def apply_update(self, update, scale):
        self.w = self.w + scale * update[0]
        self.b = self.b + scale * update[1]


class HeavyBallSGD:
    """SGD with momentum written from scratch: a `hybrid_core.Optimizer` by shape alone."""

    def __init__(self, model, lr=0.1, momentum=0.9):
        self.model, self.lr, self.momentum = model, lr, momentum
        self.velocity = [np.zeros_like(p) for p in model.parameters()]

    def step(self, grads):
        self.velocity = [self.momentum * v - self.lr * g for v, g in zip(self.velocity, grads)]
        update = [v.copy() for v in self.velocity]
        self.model.apply_update(update, 1.0)
        return update

    def extrapolate(self):
        return [self.momentum * v for v in self.velocity]

    def state_dict(self):
        return {"lr": self.lr, "momentum": self.momentum, "velocity": [v.copy() for v in self.velocity]}

    def load_state_dict(self, state):
        self.lr, self.momentum = state["lr"], state["momentum"]
        self.velocity = [np.array(v, copy=True) for v in state["velocity"]]


def _blobs(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 10))
    while True:
        y = rng.integers(0, 3, size=32)
        yield (centers[y] + 0.8 * rng.normal(size=(32, 10))).astype(dtype), y


def numpy_case() -> ConformanceCase:
    return ConformanceCase("numpy-linear", lambda seed: NumpyLinear(10, 3, seed), HeavyBallSGD, _blobs)


def torch_case() -> ConformanceCase:
    import torch
    from torch import nn

    from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

    def make_model(seed):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
        # eval_for_loss=False: loss() runs in the same (train) mode as loss_and_grad(), so the gradient
        # contract compares like with like (TorchModel's default runs loss() in eval mode, which the
        # trainer's forward checks want); `reseed` below makes dropout repeat its masks between evaluations.
        return TorchModel(net, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), eval_for_loss=False)

    def make_batches(seed):
        for x, y in _blobs(seed, np.float32):
            yield torch.from_numpy(x), torch.from_numpy(y)

    return ConformanceCase(
        "torch-batchnorm-dropout", make_model,
        lambda model: TorchOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2)),
        make_batches,
        reseed=lambda: torch.manual_seed(1234),  # dropout draws the same masks at every evaluation
    )


def make_cases() -> list[ConformanceCase]:
    """The cases this package contributes (the torch one only where torch is installed)."""
    cases = [numpy_case()]
    try:
        import torch  # noqa: F401
    except ImportError:
        return cases
    return [*cases, torch_case()]


def broken_case() -> ConformanceCase:
    """The NumPy model with its gradient's sign flipped: the suite must name the gradient contract."""

    class WrongSign(NumpyLinear):
        def loss_and_grad(self, batch):
            loss, grads = super().loss_and_grad(batch)
            return loss, [-g for g in grads]

    return ConformanceCase("numpy-linear-wrong-sign", lambda seed: WrongSign(10, 3, seed), HeavyBallSGD, _blobs)
