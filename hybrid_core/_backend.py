"""Array-namespace plumbing shared by the core, the reference models and the adapters."""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from ._errors import BackendError

__all__ = [
    "as_namespace",
    "from_numpy",
    "library_name",
    "namespace_of",
    "same_namespace",
    "to_numpy",
]


def library_name(xp: ModuleType) -> str:
    """A short human name for an array namespace ('numpy', 'torch', 'jax', ...)."""
    name = getattr(xp, "__name__", str(xp)).removeprefix("array_api_compat.")
    return "jax" if name.startswith("jax") else name.split(".")[0]


def as_namespace(xp: ModuleType | None) -> ModuleType:
    """The array-API-compatible namespace for a module the user passed (``numpy``, ``torch``, ...).

    ``None`` means NumPy. The result is what `array_api_compat.array_namespace` gives for
    an array of that module: the compat wrapper for NumPy and PyTorch, the module itself
    for array-api-strict and ``jax.numpy``, which already follow the standard.
    """
    if xp is None:
        import numpy

        xp = numpy
    try:
        probe = xp.asarray(0.0)
    except Exception as exc:
        raise BackendError(
            f"{xp!r} is not an array namespace: xp.asarray(0.0) failed ({exc})",
            "Pass an array module such as numpy, array_api_strict, torch or jax.numpy.",
        ) from exc
    return array_api_compat.array_namespace(probe)


def namespace_of(*arrays: Any, what: str = "arrays") -> ModuleType:
    """The one namespace of ``arrays``; `BackendError` naming the libraries if they are mixed."""
    flat = [a for a in _flatten(arrays) if a is not None and not isinstance(a, (int, float, bool))]
    if not flat:
        raise BackendError(f"no arrays found in {what}", "Pass at least one array.")
    try:
        return array_api_compat.array_namespace(*flat)
    except TypeError as exc:
        names = sorted({_array_library(a) for a in flat})
        raise BackendError(
            f"{what} mix array libraries: {', '.join(names)} ({exc})",
            "Convert every array to the model's library (and device) before training.",
        ) from exc


def same_namespace(expected: ModuleType, arrays: Iterable[Any], what: str) -> None:
    """Raise `BackendError` naming both libraries if ``arrays`` are not of ``expected``."""
    for a in _flatten(arrays):
        try:
            got = array_api_compat.array_namespace(a)
        except TypeError as exc:
            raise BackendError(
                f"{what} holds a {type(a).__module__}.{type(a).__name__}, which is not an array",
                "Pass arrays of the model's library.",
            ) from exc
        if got is not expected:
            raise BackendError(
                f"{what} is a {library_name(got)} array but the model uses {library_name(expected)}",
                f"Convert {what} to {library_name(expected)} (same device as the model) before the step.",
            )


def from_numpy(xp: ModuleType, value: Any, *, dtype: Any = None, device: Any = None) -> Any:
    """Convert a NumPy array (or scalar) to namespace ``xp``; the way randomness enters the core.

    The result may share memory with ``value`` (NumPy, CPU PyTorch): pass a copy if the
    source will be modified later.
    """
    arr = np.asarray(value)
    if device is None:
        return xp.asarray(arr, dtype=dtype) if dtype is not None else xp.asarray(arr)
    return xp.asarray(arr, dtype=dtype, device=device) if dtype is not None else xp.asarray(arr, device=device)


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy view or copy of any array (a host sync for device arrays); do not modify it."""
    xp = array_api_compat.array_namespace(x)
    if array_api_compat.is_torch_namespace(xp):
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_namespace(xp):
        return x.get()
    try:
        return np.asarray(x)
    except Exception:
        return np.asarray(x.tolist()) if hasattr(x, "tolist") else np.from_dlpack(x)


def _array_library(a: Any) -> str:
    try:
        return library_name(array_api_compat.array_namespace(a))
    except TypeError:
        return type(a).__module__.split(".")[0]


def _flatten(items: Iterable[Any]) -> Iterable[Any]:
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        elif isinstance(item, dict):
            yield from _flatten(item.values())
        else:
            yield item

