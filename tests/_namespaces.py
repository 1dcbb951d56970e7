"""The array namespaces the reference model and optimizers run on, each skipped with a reason when missing."""

import contextlib
import importlib

import pytest

from hybrid_core._backend import as_namespace

_MODULES = {"numpy": "numpy", "array_api_strict": "array_api_strict", "torch": "torch", "jax": "jax.numpy"}


def _param(name, module):
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return pytest.param(name, id=name, marks=pytest.mark.skip(reason=f"{module} does not import ({exc})"))
    return pytest.param(name, id=name)


NAMESPACES = [_param(name, module) for name, module in _MODULES.items()]
"""One pytest.param per namespace name; use with `namespace` or `namespace_fixture`."""


def only(*names):
    """The entries of NAMESPACES called ``names``."""
    return [p for p in NAMESPACES if p.values[0] in names]


def available(name):
    """Whether the namespace called ``name`` imports here."""
    return any(p.values[0] == name and not p.marks for p in NAMESPACES)


@contextlib.contextmanager
def namespace(name):
    """The array-API namespace called ``name``; on JAX float64 is enabled inside the block only."""
    module = as_namespace(importlib.import_module(_MODULES[name]))
    if name != "jax":
        yield module
        return
    import jax

    before = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield module
    finally:
        jax.config.update("jax_enable_x64", before)


def namespace_fixture():
    """A fixture over NAMESPACES yielding each namespace; bind it as ``xp = namespace_fixture()``."""

    @pytest.fixture(params=NAMESPACES)
    def xp(request):
        with namespace(request.param) as module:
            yield module

    return xp
