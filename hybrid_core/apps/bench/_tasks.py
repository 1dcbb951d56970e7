"""Benchmark tasks: real data that needs no download, one builder per (task, backend).

Every task builds two kinds of run from the same seed:

- `TaskSetup` (``BenchTask.setup``): a `Model` and `Optimizer` for `HybridTrainer`;
- `NativeRun` (``BenchTask.native_setup``): the training loop a user of that framework writes,
  with no code of this library in it where the framework has a loop of its own (torch, JAX);
  the baseline and the tuned baseline run it; on the torch tasks ``BenchTask.schedulefree_setup``
  builds the same loop with ``schedulefree.AdamWScheduleFree`` (the Schedule-Free peer).

Both start from the same initial weights and see the same batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from hybrid_core import BackendError, ConfigError, HybridConfig, Model, Optimizer
from hybrid_core._backend import from_numpy, namespace_for, to_numpy

from ..data import sequential_digits, split_digits
from ._native import NativeRun
from ._native import reference_native as _reference_native
from ._native import torch_native as _torch_native  # under this name for the other tasks' modules too

__all__ = ["TASKS", "BenchTask", "NativeRun", "TaskSetup", "get_task"]


class TaskSetup(NamedTuple):
    """A fresh model and optimizer for the hybrid run, its batches (a function of the step) and a validation loss."""

    model: Model
    optimizer: Optimizer
    batch: Callable[[int], Any]
    validate: Callable[[], float]
    sync: Callable[[], None] | None = None
    """Called at the end of every timed step to wait for asynchronous work (JAX); None: nothing to wait for."""
    loop: str = ""
    """What the hybrid run's trainer drives, in words (stored in the JSON)."""


Builder = Callable[[str, int, float], Any]


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
    """(backend, seed, lr) → the hybrid run's model and optimizer."""
    native: Callable[[str, int, float], NativeRun]
    """(backend, seed, lr) → the native loop of the baseline and tuned runs, same initial weights."""
    schedulefree: Callable[[str, int, float], NativeRun] | None = None
    """(backend, seed, lr) → the native loop with ``schedulefree.AdamWScheduleFree`` at ``lr``, same initial
    weights; on `schedulefree_backends` only."""
    schedulefree_backends: tuple[str, ...] = ()

    def has_schedulefree(self, backend: str) -> bool:
        """Whether this task has a Schedule-Free peer on ``backend`` (the package may still be missing)."""
        return self.schedulefree is not None and backend in self.schedulefree_backends

    def setup(self, backend: str, seed: int, lr: float) -> TaskSetup:
        """Build one hybrid run; `BackendError` if the backend is not one of this task's or not installed."""
        return self._call(self.build, backend, seed, lr)

    def native_setup(self, backend: str, seed: int, lr: float) -> NativeRun:
        """Build one native (baseline) run; errors as `setup`."""
        return self._call(self.native, backend, seed, lr)

    def schedulefree_setup(self, backend: str, seed: int, lr: float) -> NativeRun:
        """Build one Schedule-Free run; `ConfigError` where `has_schedulefree` is False, errors as `setup`."""
        if self.schedulefree is None or not self.has_schedulefree(backend):
            raise ConfigError(f"task {self.name!r} has no Schedule-Free peer on {backend!r}")
        return self._call(self.schedulefree, backend, seed, lr)

    def _call(self, builder: Builder, backend: str, seed: int, lr: float) -> Any:
        if backend not in self.backends:
            raise ConfigError(f"task {self.name!r} runs on {', '.join(self.backends)}, not {backend!r}")
        try:
            return builder(backend, seed, lr)
        except ImportError as exc:
            raise BackendError(f"task {self.name!r} needs {backend}: {exc}",
                               f"pip install 'hybrid-predict-trainer[{backend}]'") from exc


def _one_torch_thread() -> None:
    import torch

    # One intra-op thread: on a small shared machine more threads make timings swing by an
    # order of magnitude whenever another process runs; every run gets the same.
    torch.set_num_threads(1)


# -- digits-mlp ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> Any:
    return split_digits(seed=0)


def _digits_batches(xp: Any, seed: int, x_dtype: Any, y_dtype: Any = None) -> tuple[Callable[[int], Any], Any]:
    """(batch(step), validation batch) of the digits split in namespace ``xp``."""
    split = _digits()
    x = from_numpy(xp, split.x_train, dtype=x_dtype)
    y = from_numpy(xp, split.y_train, dtype=y_dtype)
    val = (from_numpy(xp, split.x_val, dtype=x_dtype), from_numpy(xp, split.y_val, dtype=y_dtype))
    n = split.y_train.shape[0]

    def batch(step: int) -> Any:
        rng = np.random.default_rng(seed * 1_000_003 + step)
        idx = from_numpy(xp, rng.choice(n, size=64, replace=False))
        return xp.take(x, idx, axis=0), xp.take(y, idx, axis=0)

    return batch, val


def torch_digits_module(seed: int) -> Any:
    """``nn.Sequential(Linear(64, 64), Tanh(), Linear(64, 10))`` with the initial weights of
    ``MLP([64, 64, 10], seed=seed)``: the MLP computes x @ W + b with W of shape (in, out), and
    ``nn.Linear`` stores W transposed, (out, in)."""
    import torch
    from torch import nn

    from hybrid_core.models import MLP

    w0, b0, w1, b1 = (np.asarray(p) for p in MLP([64, 64, 10], seed=seed).parameters())
    module = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    with torch.no_grad():
        for layer, w, b in ((module[0], w0, b0), (module[2], w1, b1)):
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            layer.bias.copy_(torch.from_numpy(b))
    return module


def _cross_entropy(module: Any, batch: Any) -> Any:
    import torch

    x, y = batch
    return torch.nn.functional.cross_entropy(module(x), y)


def _digits_torch_data(seed: int) -> tuple[Callable[[int], Any], Any]:
    import torch

    _one_torch_thread()
    return _digits_batches(namespace_for("torch"), seed, torch.float32, torch.int64)


def _digits_mlp(backend: str, seed: int, lr: float) -> TaskSetup:
    if backend == "torch":
        import torch

        from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

        batch, val = _digits_torch_data(seed)
        model = TorchModel(torch_digits_module(seed), _cross_entropy)
        optimizer = TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=lr))
        return TaskSetup(model, optimizer, batch, lambda: float(model.loss(val)), None,
                         "HybridTrainer over TorchModel(the same nn.Sequential) + TorchOptimizer(torch.optim.Adam); "
                         "real steps through its FusedStep")
    from hybrid_core.models import MLP
    from hybrid_core.optim import Adam

    xp = namespace_for(backend)
    batch, val = _digits_batches(xp, seed, xp.float32)
    model = MLP([64, 64, 10], xp=xp, dtype=xp.float32, seed=seed)
    return TaskSetup(model, Adam(model, lr=lr), batch, lambda: float(to_numpy(model.loss(val))), None,
                     f"HybridTrainer over hybrid_core.models.MLP + hybrid_core.optim.Adam on {backend} arrays")


_DIGITS_MODULE = "nn.Sequential(Linear(64, 64), Tanh(), Linear(64, 10))"


def _digits_mlp_native(backend: str, seed: int, lr: float) -> NativeRun:
    if backend == "torch":
        batch, val = _digits_torch_data(seed)
        return _torch_native(torch_digits_module(seed), _cross_entropy, lr, batch, val, _DIGITS_MODULE)
    from hybrid_core.models import MLP
    from hybrid_core.optim import Adam

    xp = namespace_for(backend)
    batch, val = _digits_batches(xp, seed, xp.float32)
    model = MLP([64, 64, 10], xp=xp, dtype=xp.float32, seed=seed)
    return _reference_native(model, Adam(model, lr=lr), batch, lambda: float(to_numpy(model.loss(val))),
                             f"{backend}: model.loss_and_grad(batch); optimizer.step(grads) with "
                             "hybrid_core.models.MLP and hybrid_core.optim.Adam called directly")


def _digits_mlp_schedulefree(backend: str, seed: int, lr: float) -> NativeRun:
    batch, val = _digits_torch_data(seed)
    return _torch_native(torch_digits_module(seed), _cross_entropy, lr, batch, val, _DIGITS_MODULE, True)


# -- jax-mlp ---------------------------------------------------------------------------------------


def _jax_mlp(backend: str, seed: int, lr: float) -> TaskSetup:
    from ._jax_mlp import build_jax_mlp

    return TaskSetup(*build_jax_mlp(seed, lr, _digits()),
                     loop="HybridTrainer over JaxModel + OptaxOptimizer(optax.inject_hyperparams(optax.adam)); "
                          "real steps through its FusedStep (one jitted computation)")


def _jax_mlp_native(backend: str, seed: int, lr: float) -> NativeRun:
    from ._jax_mlp import build_jax_native

    return NativeRun(*build_jax_native(seed, lr, _digits()))


# -- fastgrnn-router -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _sequential_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): the sequential digits shuffled with seed 0, 20% validation."""
    x, y = sequential_digits()
    order = np.random.default_rng(0).permutation(len(y))
    n_val = round(len(y) * 0.2)
    return x[order[n_val:]], y[order[n_val:]], x[order[:n_val]], y[order[:n_val]]


def _fastgrnn_parts(backend: str, seed: int, lr: float) -> tuple[Any, Any, Callable[[int], Any], Callable[[], float]]:
    from hybrid_core.models import FastGRNN
    from hybrid_core.optim import Adam

    if backend == "torch":
        _one_torch_thread()
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

    return model, Adam(model, lr=lr), batch, lambda: float(to_numpy(model.loss(val)))


def _fastgrnn_router(backend: str, seed: int, lr: float) -> TaskSetup:
    model, optimizer, batch, validate = _fastgrnn_parts(backend, seed, lr)
    return TaskSetup(model, optimizer, batch, validate, None,
                     f"HybridTrainer over hybrid_core.models.FastGRNN + hybrid_core.optim.Adam on {backend} arrays")


def _fastgrnn_router_native(backend: str, seed: int, lr: float) -> NativeRun:
    model, optimizer, batch, validate = _fastgrnn_parts(backend, seed, lr)
    return _reference_native(model, optimizer, batch, validate,
                             f"{backend}: model.loss_and_grad(batch); optimizer.step(grads) with "
                             "hybrid_core.models.FastGRNN and hybrid_core.optim.Adam called directly (the FastGRNN "
                             "is a reference array-API model with no nn.Module twin)")


# -- lm-stdlib -------------------------------------------------------------------------------------


def _lm_stdlib(backend: str, seed: int, lr: float) -> TaskSetup:
    from ._lm import build_lm

    return TaskSetup(*build_lm(seed, lr), None,
                     "HybridTrainer over TorchModel(the same TinyTransformer) + TorchOptimizer(torch.optim.Adam); "
                     "real steps through its FusedStep")


def lm_native(module_and_data: Callable[[int], tuple[Any, Any, Any]], what: str,
              schedulefree: bool = False) -> Callable[[str, int, float], NativeRun]:
    """The native (or, with ``schedulefree``, the Schedule-Free) loop builder of a byte-level LM task whose
    ``module_and_data(seed)`` gives (module, batch(step), validation batch)."""

    def build(backend: str, seed: int, lr: float) -> NativeRun:
        from ._lm import loss_fn

        module, batch, val = module_and_data(seed)
        return _torch_native(module, loss_fn, lr, batch, val, what, schedulefree)

    return build


def _stdlib_module_and_data(seed: int) -> tuple[Any, Any, Any]:
    from ._lm import module_and_data

    return module_and_data(seed)


_lm_stdlib_native = lm_native(_stdlib_module_and_data, "TinyTransformer nn.Module")
_lm_stdlib_schedulefree = lm_native(_stdlib_module_and_data, "TinyTransformer nn.Module", schedulefree=True)


TASKS: dict[str, BenchTask] = {
    "digits-mlp": BenchTask(
        name="digits-mlp",
        description="64-64-10 tanh MLP, Adam, batch 64, on the bundled 1,797 digits (20% validation); on torch an "
                    "nn.Sequential with the MLP's initial weights and torch.optim.Adam",
        backends=("numpy", "torch"),
        steps=1500,
        lr=1e-3,
        eval_every=10,
        seeds=3,
        config=HybridConfig(),
        build=_digits_mlp,
        native=_digits_mlp_native,
        schedulefree=_digits_mlp_schedulefree,
        schedulefree_backends=("torch",),
    ),
    "lm-stdlib": BenchTask(
        name="lm-stdlib",
        description="byte-level 2-layer transformer (d=64, context 64), torch.optim.Adam, batch 16, on "
                    "standard-library source",
        backends=("torch",),
        steps=600,
        lr=2e-3,
        eval_every=10,
        seeds=2,
        config=HybridConfig(),
        build=_lm_stdlib,
        native=_lm_stdlib_native,
        schedulefree=_lm_stdlib_schedulefree,
        schedulefree_backends=("torch",),
    ),
    "jax-mlp": BenchTask(
        name="jax-mlp",
        description="the digits-mlp network (64-64-10 tanh, batch 64) as a JAX loss over a parameter list, optax "
                    "Adam, on the bundled digits (20% validation)",
        backends=("jax",),
        steps=1500,
        lr=1e-3,
        eval_every=10,
        seeds=3,
        config=HybridConfig(),
        build=_jax_mlp,
        native=_jax_mlp_native,
    ),
    "fastgrnn-router": BenchTask(
        name="fastgrnn-router",
        description="FastGRNN (H=32, rank(U)=8) reading the digits row by row (8 steps of 8 pixels), "
                    "digits 0-4 vs 5-9, Adam, batch 64, binary cross-entropy (20% validation)",
        backends=("numpy", "torch"),
        steps=600,  # about where the validation loss bottoms out at this lr; later it overfits
        lr=1e-2,
        eval_every=10,
        seeds=3,
        # The router pipeline's own trainer settings (RouterConfig.hybrid): phases scaled to a short run.
        config=HybridConfig(warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10,
                            horizon_arms=(0, 5, 15, 30), lr_recommend=False),
        build=_fastgrnn_router,
        native=_fastgrnn_router_native,
    ),
}
"""Every benchmark task by name."""


from ._finetune import finetune_task  # noqa: E402  (it builds a BenchTask, defined above)

TASKS["lm-finetune"] = finetune_task()


def get_task(name: str) -> BenchTask:
    """The task called ``name``; `ConfigError` listing the known ones otherwise."""
    if name not in TASKS:
        raise ConfigError(f"task={name!r}: must be one of {', '.join(sorted(TASKS))}")
    return TASKS[name]
