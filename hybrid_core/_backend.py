"""Array-namespace plumbing shared by the core, the reference models and the adapters."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from ._errors import BackendError

__all__ = [
    "BACKEND_MODULES",
    "as_namespace",
    "dtype_name",
    "from_numpy",
    "is_low_precision",
    "library_name",
    "namespace_for",
    "namespace_of",
    "same_namespace",
    "to_host_floats",
    "to_numpy",
    "widened",
]

BACKEND_MODULES: dict[str, str] = {
    "numpy": "numpy",
    "array_api_strict": "array_api_strict",
    "torch": "torch",
    "jax": "jax.numpy",
    "cupy": "cupy",
}
"""Backend name -> the module whose arrays it means. The package's one such map: use `namespace_for`.

The names are the short ones `library_name` gives, so ``library_name(namespace_for(n)) == n``.
"""

_EXTRAS = {"array_api_strict": "test", "torch": "torch", "jax": "jax", "cupy": "cupy"}
"""The pip extra of this package that installs each optional backend."""


def namespace_for(name: str) -> ModuleType:
    """The array-API namespace of the backend called ``name`` (a key of `BACKEND_MODULES`), imported now.

    The result is what `as_namespace` gives for that module. `BackendError`, with a recovery
    hint, if ``name`` is not a known backend or its library does not import (or cannot make
    an array) here.
    """
    module_name = BACKEND_MODULES.get(name) if isinstance(name, str) else None
    if module_name is None:
        raise BackendError(
            f"unknown backend {name!r}; known backends: {', '.join(BACKEND_MODULES)}",
            f"Pass one of {', '.join(repr(n) for n in BACKEND_MODULES)}.",
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or a broken install failing on import in its own way
        extra = _EXTRAS.get(name)
        raise BackendError(
            f"backend {name!r} is not available: {module_name} does not import ({type(exc).__name__}: {exc})",
            f"pip install 'hybrid-predict-trainer[{extra}]'" if extra else f"Install {module_name}.",
        ) from exc
    try:
        return as_namespace(module)
    except BackendError as exc:  # it imports but cannot make an array here (CuPy without a usable GPU)
        raise BackendError(
            f"backend {name!r} imports but cannot make an array here: {exc.message}",
            f"Run where {module_name} works (CuPy needs a CUDA GPU and driver) or pick another backend.",
        ) from exc


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


_LOW_PRECISION = frozenset({"bfloat16", "float16"})
"""Floating dtypes narrower than float32 (`widened` casts them to float32 on their device)."""


def dtype_name(x: Any) -> str:
    """The short name of an array's dtype (``'float32'``, ``'bfloat16'``, ...), whatever its library;
    ``''`` for a value without a dtype (a Python number)."""
    dtype = getattr(x, "dtype", None)
    return "" if dtype is None else str(dtype).rsplit(".", 1)[-1]


def is_low_precision(x: Any) -> bool:
    """Whether ``x`` is a bfloat16 or float16 array (of any library)."""
    return dtype_name(x) in _LOW_PRECISION


def widened(x: Any) -> Any:
    """``x`` as float32 if it is bfloat16 or float16, else ``x`` itself: a device op, nothing is read.

    The cast is exact (float32 holds every bfloat16 and float16 value).
    """
    if not is_low_precision(x):
        return x
    xp = array_api_compat.array_namespace(x)
    return xp.astype(x, xp.float32)


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy view or copy of any array (a host sync for device arrays); do not modify it.

    NumPy has no bfloat16: a bfloat16 array is cast to float32 on its device first (exactly), so
    the result is a float32 array. Every other dtype, float16 included, is kept.
    """
    xp = array_api_compat.array_namespace(x)
    if dtype_name(x) == "bfloat16":
        x = xp.astype(x, xp.float32)
    if array_api_compat.is_torch_namespace(xp):
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_namespace(xp):
        return x.get()
    if array_api_compat.is_jax_namespace(xp):
        x = _jax_local(x)
    try:
        return np.asarray(x)
    except Exception:
        return np.asarray(x.tolist()) if hasattr(x, "tolist") else np.from_dlpack(x)


def to_host_floats(arrays: Sequence[Any]) -> list[float]:
    """Every entry of ``arrays`` (0-d or 1-D, one library) as Python floats, in one transfer.

    One synchronisation for the lot: JAX starts every copy before waiting (``jax.device_get``);
    device tensors of torch and CuPy are concatenated on the device and copied once; host
    arrays (NumPy, CPU torch, array-api-strict) are read directly. A bfloat16 array is read as
    float32 (see `to_numpy`; JAX hands it over as ``ml_dtypes.bfloat16``), so it reads like any other.
    """
    if not arrays:
        return []
    first = arrays[0]
    if isinstance(first, np.ndarray):  # NumPy: already on the host
        return np.concatenate([np.ravel(a) for a in arrays]).tolist()
    xp = array_api_compat.array_namespace(first)
    if array_api_compat.is_jax_namespace(xp):
        import jax

        return [float(v) for a in jax.device_get([_jax_local(a) for a in arrays]) for v in np.ravel(a).tolist()]
    on_device = (array_api_compat.is_cupy_namespace(xp)
                 or (array_api_compat.is_torch_namespace(xp) and first.device.type != "cpu"))
    if on_device and len(arrays) > 1:
        arrays = [xp.concat([xp.reshape(a, (-1,)) for a in arrays])]
    return [float(v) for a in arrays for v in np.ravel(to_numpy(a)).tolist()]


def _jax_local(x: Any) -> Any:
    """A JAX array this process can read whole: ``x``, or for an array laid out over the devices of several
    processes (``jax.distributed``) and replicated, this process's own copy. `BackendError` for one split
    across processes (no process holds all of it)."""
    if getattr(x, "is_fully_addressable", True):
        return x
    if not x.is_fully_replicated:
        raise BackendError(
            f"a jax array of shape {tuple(x.shape)} is split over the devices of several processes ({x.sharding}): "
            "no process holds all of it, so it cannot be read here",
            "Replicate what the trainer reads (losses, parameters, optimizer state: NamedSharding(mesh, P())); "
            "split only the batches.")
    return x.addressable_data(0)


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

