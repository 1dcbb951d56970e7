"""The distillation teacher: an MLP on the flattened window, trained first with plain Adam."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from hybrid_core.models import MLP
from hybrid_core.optim import Adam

__all__ = ["Teacher", "train_teacher"]


class Teacher(NamedTuple):
    """A trained teacher and its logits log P(1)/P(0) on the training windows."""

    model: MLP
    train_logits: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The teacher's logit per (normalised) window, float64."""
        out = self.model.outputs(_flat(x))
        return out[:, 1] - out[:, 0]

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """The fraction of windows the teacher classifies as ``y``."""
        return float(np.mean((self.logits(x) > 0) == (np.asarray(y) > 0.5)))


def train_teacher(x: np.ndarray, y: np.ndarray, *, hidden: int, epochs: int, batch_size: int, lr: float,
                  l2: float, seed: int) -> Teacher:
    """An MLP [T·d, hidden, 2] with softmax cross-entropy fitted to normalised windows ``x``, labels ``y``.

    It sees the whole window at once, so it is a different (and on these tasks stronger) model
    than the recurrent student; a plain loop is enough, as the teacher is a tool and not the
    showcase. NumPy float64, deterministic for a given ``seed``.
    """
    flat = _flat(x)
    labels = np.asarray(y).astype(np.int64)
    model = MLP([flat.shape[1], hidden, 2], dtype=np.float64, seed=seed, l2=l2)
    opt = Adam(model, lr=lr)
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(labels))
        for start in range(0, len(labels), batch_size):
            idx = order[start:start + batch_size]
            opt.step(model.loss_and_grad((flat[idx], labels[idx]))[1])
    out = model.outputs(flat)
    return Teacher(model, out[:, 1] - out[:, 0])


def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)
