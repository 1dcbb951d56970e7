"""Built-in cases: the reference MLP with Adam on every array namespace."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from hybrid_core._backend import BACKEND_MODULES, from_numpy, namespace_for
from hybrid_core._errors import BackendError
from hybrid_core.conformance._case import ConformanceCase
from hybrid_core.conformance._jax_cases import jax_library_cases
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

__all__ = ["builtin_cases"]


def _skip_reason(backend: str) -> str | None:
    """Why the backend called ``backend`` cannot run here (it does not import or cannot make an array), or None."""
    try:
        namespace_for(backend)
    except BackendError as exc:  # e.g. not installed, or CuPy without a usable GPU
        return exc.message
    return None


def _import_reason(module: str) -> str | None:
    """Why ``module`` (a library that is not an array backend, e.g. optax) does not import, or None."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{module} is not installed ({exc})"
    return None


def _case(name: str) -> ConformanceCase:
    reason = _skip_reason(name)

    def xp() -> Any:
        return namespace_for(name)

    def make_model(seed: int) -> MLP:
        return MLP([12, 16, 4], xp=xp(), seed=seed, dtype=xp().float32)

    def make_batches(seed: int) -> Iterator[Any]:
        ns = xp()
        rng = np.random.default_rng(seed)
        centers = rng.normal(size=(4, 12))
        while True:
            y = rng.integers(0, 4, size=32)
            x = centers[y] + 0.7 * rng.normal(size=(32, 12))
            yield from_numpy(ns, x, dtype=ns.float32), from_numpy(ns, y)

    return ConformanceCase(
        name=f"reference-mlp-{name}",
        make_model=make_model,
        make_optimizer=lambda model: Adam(model, lr=1e-2),
        make_batches=make_batches,
        skip_reason=reason,
    )


def _blobs(seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, 12))
    while True:
        y = rng.integers(0, 4, size=32)
        yield (centers[y] + 0.7 * rng.normal(size=(32, 12))).astype(np.float32), y


def _torch_adapter_case() -> ConformanceCase:
    reason = _skip_reason("torch")

    def make_model(seed: int) -> Any:
        import torch

        from hybrid_core.adapters.torch import TorchModel

        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        return TorchModel(net, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))

    def make_optimizer(model: Any) -> Any:
        import torch

        from hybrid_core.adapters.torch import TorchOptimizer

        return TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2))

    def make_batches(seed: int) -> Iterator[Any]:
        import torch

        for x, y in _blobs(seed):
            yield torch.from_numpy(x), torch.from_numpy(y)

    return ConformanceCase("torch-adapter", make_model, make_optimizer, make_batches, skip_reason=reason)


def _jax_adapter_case() -> ConformanceCase:
    reason = _skip_reason("jax") or _import_reason("optax")

    def make_model(seed: int) -> Any:
        import jax.numpy as jnp

        from hybrid_core.adapters.jax import JaxModel

        rng = np.random.default_rng(seed)
        params = {"w1": jnp.asarray(rng.normal(0, 0.3, (12, 16)), dtype=jnp.float32),
                  "b1": jnp.zeros(16, dtype=jnp.float32),
                  "w2": jnp.asarray(rng.normal(0, 0.3, (16, 4)), dtype=jnp.float32),
                  "b2": jnp.zeros(4, dtype=jnp.float32)}
        return JaxModel(_jax_loss, params)

    def make_optimizer(model: Any) -> Any:
        import optax

        from hybrid_core.adapters.jax import OptaxOptimizer

        return OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=1e-2))

    def make_batches(seed: int) -> Iterator[Any]:
        import jax.numpy as jnp

        for x, y in _blobs(seed):
            yield jnp.asarray(x), jnp.asarray(y)

    return ConformanceCase("jax-adapter", make_model, make_optimizer, make_batches, skip_reason=reason)


def _jax_loss(params: Any, batch: Any) -> Any:
    import jax
    import jax.numpy as jnp

    x, y = batch
    logits = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def builtin_cases() -> list[ConformanceCase]:
    """The reference MLP on every backend (float32), plus the PyTorch and JAX/optax adapters, an Equinox and a
    Flax NNX module and an optax chain with a schedule.

    Missing or GPU-less backends are skipped with a reason.
    """
    return [*(_case(name) for name in BACKEND_MODULES), _torch_adapter_case(), _jax_adapter_case(),
            *jax_library_cases()]
