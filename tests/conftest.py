"""Shared fixtures: the array namespaces the core must run on."""

import importlib

import pytest

from hybrid_core._backend import as_namespace

_CANDIDATES = [("numpy", "numpy"), ("array_api_strict", "array_api_strict"), ("torch", "torch"),
               ("jax", "jax.numpy")]


def _namespace_params():
    params = []
    for name, module in _CANDIDATES:
        try:
            importlib.import_module(module)
        except ImportError:
            params.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{module} is not installed"), id=name))
        else:
            params.append(pytest.param(name, id=name))
    return params


NAMESPACES = _namespace_params()


def load_namespace(name):
    """The array-API namespace for a backend name (float64 enabled on JAX for exact checks)."""
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    return as_namespace(importlib.import_module(dict(_CANDIDATES)[name]))


@pytest.fixture(params=NAMESPACES)
def xp(request):
    """Every importable array namespace, each as its array-API-compatible module."""
    return load_namespace(request.param)
