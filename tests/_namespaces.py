"""The array namespaces the reference model and optimizers run on, each skipped with a reason when missing."""

import contextlib
import importlib

import pytest

from hybrid_core._backend import BACKEND_MODULES, namespace_for

_NAMES = [name for name in BACKEND_MODULES if name != "cupy"]  # the backends that run on a CPU


def _param(name):
    module = BACKEND_MODULES[name]
    try:
        importlib.import_module(module)  # importing is enough here; `namespace` builds the namespace
    except ImportError as exc:
        return pytest.param(name, id=name, marks=pytest.mark.skip(reason=f"{module} does not import ({exc})"))
    return pytest.param(name, id=name)


NAMESPACES = [_param(name) for name in _NAMES]
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
    module = namespace_for(name)
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
