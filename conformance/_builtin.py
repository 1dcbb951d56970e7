"""Built-in cases: the reference MLP with Adam on every array namespace."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from hybrid_core._backend import as_namespace, from_numpy
from hybrid_core.conformance._case import ConformanceCase
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

__all__ = ["builtin_cases"]

_BACKENDS = (("numpy", "numpy"), ("array_api_strict", "array_api_strict"), ("torch", "torch"),
             ("jax", "jax.numpy"), ("cupy", "cupy"))


def _skip_reason(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return f"{module} is not installed ({exc})"
    if module == "cupy":
        try:
            if mod.cuda.runtime.getDeviceCount() < 1:
                return "cupy: no CUDA device"
        except Exception as exc:  # any CUDA failure means it cannot run here
            return f"cupy cannot run kernels without a GPU ({type(exc).__name__}: {exc})"
    return None


def _case(name: str, module: str) -> ConformanceCase:
    reason = _skip_reason(module)

    def xp() -> Any:
        return as_namespace(importlib.import_module(module))

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


def builtin_cases() -> list[ConformanceCase]:
    """One reference-MLP case per backend (float32); missing or GPU-less backends are skipped with a reason."""
    return [_case(name, module) for name, module in _BACKENDS]
