"""A tiny least-squares model and plain SGD as test doubles for trainer unit tests."""

from __future__ import annotations

import numpy as np

import hybrid_core._backend as backend


class LeastSquares:
    """loss = 0.5·mean((x·w + b − y)²) on batches (x, y); implements `Model`."""

    def __init__(self, xp, dim=3, seed=0):
        self.xp = xp
        rng = np.random.default_rng(seed)
        self.params = [backend.from_numpy(xp, rng.normal(size=(dim,))), backend.from_numpy(xp, np.zeros(1))]

    def parameters(self):
        return list(self.params)

    def _resid(self, batch):
        x, y = batch
        w, b = self.params
        return x @ w + b - y

    def loss(self, batch):
        r = self._resid(batch)
        return 0.5 * self.xp.mean(r * r)

    def loss_and_grad(self, batch):
        x, _ = batch
        r = self._resid(batch)
        n = x.shape[0]
        return 0.5 * self.xp.mean(r * r), [x.T @ r / n, self.xp.reshape(self.xp.sum(r) / n, (1,))]

    def apply_update(self, update, scale):
        self.params = [p + scale * u for p, u in zip(self.params, update)]

    def set_parameters(self, values):
        self.params = list(values)


class PlainSGD:
    """θ ← θ − lr·g; extrapolates the last update; implements `Optimizer`."""

    def __init__(self, model, lr=0.1):
        self.model = model
        self._lr = lr
        self.last = None
        self.steps = 0

    @property
    def lr(self):
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = value

    def step(self, grads):
        update = [-self._lr * g for g in grads]
        self.model.apply_update(update, 1.0)
        self.last = update
        self.steps += 1
        return update

    def extrapolate(self):
        if self.last is None:
            return [p * 0 for p in self.model.parameters()]
        return list(self.last)

    def state_dict(self):
        return {"lr": self._lr, "steps": self.steps}

    def load_state_dict(self, state):
        self._lr, self.steps = state["lr"], state["steps"]


def regression_batches(xp, n=32, dim=3, seed=0, noise=0.01):
    """An endless stream of batches of a noisy linear target."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim,))
    while True:
        x = rng.normal(size=(n, dim))
        y = x @ w + 0.5 + noise * rng.normal(size=n)
        yield backend.from_numpy(xp, x), backend.from_numpy(xp, y)
