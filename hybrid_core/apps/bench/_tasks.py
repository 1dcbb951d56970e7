"""Benchmark tasks: real data that needs no download, one builder per (task, backend)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from hybrid_core import BackendError, ConfigError, HybridConfig, Model, Optimizer
from hybrid_core._backend import from_numpy, namespace_for, to_numpy

from ..data import sequential_digits, split_digits

__all__ = ["TASKS", "BenchTask", "TaskSetup", "get_task"]


class TaskSetup(NamedTuple):
    """A fresh model and optimizer, its batches (a function of the step) and a validation-loss function."""

    model: Model
    optimizer: Optimizer
    batch: Callable[[int], Any]
    validate: Callable[[], float]
    sync: Callable[[], None] | None = None
    """Called at the end of every timed step to wait for asynchronous work (JAX); None: nothing to wait for."""


@dataclass(frozen=True)
class BenchTask:
    """A benchmark task: which backends it runs on, its defaults, and how to build a run."""

    name: str
    description: str
    backends: tuple[str, ...]
    steps: int
    lr: float
    eval_every: int
    seeds: int
    config: HybridConfig
    build: Callable[[str, int, float], TaskSetup]

    def setup(self, backend: str, seed: int, lr: float) -> TaskSetup:
        """Build one run; `BackendError` if the backend is not one of this task's or not installed."""
        if backend not in self.backends:
            raise ConfigError(f"task {self.name!r} runs on {', '.join(self.backends)}, not {backend!r}")
        try:
            return self.build(backend, seed, lr)
        except ImportError as exc:
            raise BackendError(f"task {self.name!r} needs {backend}: {exc}",
                               f"pip install 'hybrid-predict-trainer[{backend}]'") from exc


@functools.lru_cache(maxsize=1)
def _digits() -> Any:
    return split_digits(seed=0)


def _digits_mlp(backend: str, seed: int, lr: float) -> TaskSetup:
    from hybrid_core.models import MLP
    from hybrid_core.optim import Adam

    if backend == "torch":
        import torch

        # One intra-op thread: on a small shared machine more threads make timings swing
        # by an order of magnitude whenever another process runs; every run gets the same.
        torch.set_num_threads(1)
    xp = namespace_for(backend)
    split = _digits()
    dtype = xp.float32
    x = from_numpy(xp, split.x_train, dtype=dtype)
    y = from_numpy(xp, split.y_train)
    val = (from_numpy(xp, split.x_val, dtype=dtype), from_numpy(xp, split.y_val))
    model = MLP([64, 64, 10], xp=xp, dtype=dtype, seed=seed)
    n = split.y_train.shape[0]

    def batch(step: int) -> Any:
        rng = np.random.default_rng(seed * 1_000_003 + step)
        idx = from_numpy(xp, rng.choice(n, size=64, replace=False))
        return xp.take(x, idx, axis=0), xp.take(y, idx, axis=0)

    return TaskSetup(model, Adam(model, lr=lr), batch, lambda: float(to_numpy(model.loss(val))))


def _jax_mlp(backend: str, seed: int, lr: float) -> TaskSetup:
    from ._jax_mlp import build_jax_mlp

    return TaskSetup(*build_jax_mlp(seed, lr, _digits()))


@functools.lru_cache(maxsize=1)
def _sequential_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): the sequential digits shuffled with seed 0, 20% validation."""
    x, y = sequential_digits()
    order = np.random.default_rng(0).permutation(len(y))
    n_val = round(len(y) * 0.2)
    return x[order[n_val:]], y[order[n_val:]], x[order[:n_val]], y[order[:n_val]]


def _fastgrnn_router(backend: str, seed: int, lr: float) -> TaskSetup:
    from hybrid_core.models import FastGRNN
    from hybrid_core.optim import Adam

    if backend == "torch":
        import torch

        torch.set_num_threads(1)  # as in digits-mlp: one thread, steadier timings on a shared machine
    xp = namespace_for(backend)
    x_train, y_train, x_val, y_val = _sequential_digits()
    dtype = xp.float32
    x = from_numpy(xp, x_train, dtype=dtype)
    y = from_numpy(xp, y_train, dtype=dtype)
    val = (from_numpy(xp, x_val, dtype=dtype), from_numpy(xp, y_val, dtype=dtype))
    # No L2 term and no distillation: the loss is the plain binary cross-entropy, train and validation.
    model = FastGRNN(8, 32, u_rank=8, xp=xp, dtype=dtype, seed=seed)
    n = y_train.shape[0]

    def batch(step: int) -> Any:
        rng = np.random.default_rng(seed * 1_000_003 + step)
        idx = from_numpy(xp, rng.choice(n, size=64, replace=False))
        return xp.take(x, idx, axis=0), xp.take(y, idx, axis=0)

    return TaskSetup(model, Adam(model, lr=lr), batch, lambda: float(to_numpy(model.loss(val))))


def _lm_stdlib(backend: str, seed: int, lr: float) -> TaskSetup:
    from ._lm import build_lm

    return TaskSetup(*build_lm(seed, lr))


TASKS: dict[str, BenchTask] = {
    "digits-mlp": BenchTask(
        name="digits-mlp",
        description="64-64-10 tanh MLP, Adam, batch 64, on the bundled 1,797 digits (20% validation)",
        backends=("numpy", "torch"),
        steps=1500,
        lr=1e-3,
        eval_every=50,
        seeds=3,
        config=HybridConfig(),
        build=_digits_mlp,
    ),
    "lm-stdlib": BenchTask(
        name="lm-stdlib",
        description="byte-level 2-layer transformer (d=64, context 64), Adam, batch 16, on standard-library source",
        backends=("torch",),
        steps=600,
        lr=2e-3,
        eval_every=50,
        seeds=2,
        config=HybridConfig(),
        build=_lm_stdlib,
    ),
    "jax-mlp": BenchTask(
        name="jax-mlp",
        description="the digits-mlp network (64-64-10 tanh, batch 64) as a JaxModel, optax Adam through "
                    "OptaxOptimizer, on the bundled digits (20% validation)",
        backends=("jax",),
        steps=1500,
        lr=1e-3,
        eval_every=50,
        seeds=3,
        config=HybridConfig(),
        build=_jax_mlp,
    ),
    "fastgrnn-router": BenchTask(
        name="fastgrnn-router",
        description="FastGRNN (H=32, rank(U)=8) reading the digits row by row (8 steps of 8 pixels), "
                    "digits 0-4 vs 5-9, Adam, batch 64, binary cross-entropy (20% validation)",
        backends=("numpy", "torch"),
        steps=600,  # about where the validation loss bottoms out at this lr; later it overfits
        lr=1e-2,
        eval_every=50,
        seeds=3,
        # The router pipeline's own trainer settings (RouterConfig.hybrid): phases scaled to a short run.
        config=HybridConfig(warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10,
                            horizon_arms=(0, 5, 15, 30)),
        build=_fastgrnn_router,
    ),
}
"""Every benchmark task by name."""


def get_task(name: str) -> BenchTask:
    """The task called ``name``; `ConfigError` listing the known ones otherwise."""
    if name not in TASKS:
        raise ConfigError(f"task={name!r}: must be one of {', '.join(sorted(TASKS))}")
    return TASKS[name]
