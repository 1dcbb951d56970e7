"""Kernel capability declarations and run-time selection (the xformers dispatch model).

Every implementation is a `Kernel` subclass whose class attributes say what it can
run on; `select` walks the op's implementations in registration order (GPU kernels,
then CPU fast paths, then the reference) and returns the first that fits. The
``HYBRID_KERNELS`` environment variable forces one; a forced choice that cannot run
raises `BackendError` listing why every candidate was rejected.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Callable, Collection
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from hybrid_core._backend import library_name
from hybrid_core._errors import BackendError, ConfigError

__all__ = [
    "CHOICES",
    "ENV_VAR",
    "OPS",
    "REGISTRY",
    "Kernel",
    "device_kind",
    "dtype_name",
    "register",
    "select",
]

OPS = ("fused_axpy", "fused_stats", "gru_ensemble_rollout")
"""The operations that have kernels."""

CHOICES = ("auto", "reference", "triton", "pallas", "cupy", "foreach", "jit")
"""The values ``HYBRID_KERNELS`` accepts: ``auto`` or an implementation name."""

ENV_VAR = "HYBRID_KERNELS"
"""Environment variable that forces an implementation for every op."""


class Kernel:
    """Abstract: one implementation of one op and where it can run; subclasses only set class attributes.

    An empty ``backends``/``devices``/``dtypes`` means "any". ``devices`` are the device
    kinds `select` picks it for on its own; ``interpret_devices`` are kinds where it runs
    only in an interpreter (slow: for testing), so only when forced, and only when the
    ``interpret_env`` variable has its value. ``requires`` lists (module, minimum version);
    it is checked from package metadata, so nothing is imported until the first call.
    """

    op: ClassVar[str]
    name: ClassVar[str]
    entry: ClassVar[str]
    """``"module:function"`` inside this package, imported at the first call."""
    backends: ClassVar[Collection[str]] = ()
    devices: ClassVar[Collection[str]] = ()
    dtypes: ClassVar[Collection[str]] = ()
    interpret_devices: ClassVar[Collection[str]] = ()
    interpret_dtypes: ClassVar[Collection[str]] = ()
    interpret_env: ClassVar[tuple[str, str] | None] = None
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()

    @classmethod
    def rejection(cls, backend: str, device: str, dtype: str | None, *, forced: bool = False) -> str | None:
        """Why this implementation cannot run here (``None`` if it can); ``forced`` allows interpreters."""
        if cls.backends and backend not in cls.backends:
            return f"backend {backend} is not one of {_names(cls.backends)}"
        reasons = []
        dtypes = cls.dtypes
        if device in cls.interpret_devices and device not in cls.devices:
            dtypes = cls.interpret_dtypes or cls.dtypes
            if not forced:
                reasons.append(f"runs on {device} only in an interpreter (slow); force it with {ENV_VAR}={cls.name}")
            else:
                reasons.extend(cls._interpreter_problems(device))
        elif cls.devices and device not in cls.devices:
            reasons.append(f"device {device} is not one of {_names({*cls.devices, *cls.interpret_devices})}")
        if dtype is not None and dtypes and dtype not in dtypes:
            reasons.append(f"dtype {dtype} is not one of {_names(dtypes)} on {device}")
        reasons.extend(problem for module, minimum in cls.requires if (problem := _requirement(module, minimum)))
        return "; ".join(reasons) or None

    @classmethod
    def _interpreter_problems(cls, device: str) -> list[str]:
        if cls.interpret_env is None:
            return []
        key, value = cls.interpret_env
        if os.environ.get(key) != value:
            return [f"device {device} needs {key}={value} (the interpreter), set before the first call"]
        return []

    @classmethod
    def load(cls) -> Callable[..., Any]:
        """The implementing function (imports its backend module on first use)."""
        return _load(cls.entry)


REGISTRY: dict[str, list[type[Kernel]]] = {op: [] for op in OPS}
"""Per op, its implementations in selection order (GPU kernels, CPU fast paths, reference)."""


def register(cls: type[Kernel]) -> type[Kernel]:
    """Class decorator adding a final `Kernel` subclass to `REGISTRY` (after checking its declarations)."""
    problems = []
    if cls.op not in OPS:
        problems.append(f"{cls.__name__}.op = {cls.op!r} is not one of {OPS}")
    if cls.name not in CHOICES[1:]:
        problems.append(f"{cls.__name__}.name = {cls.name!r} is not one of {CHOICES[1:]}")
    if any(k.name == cls.name for k in REGISTRY.get(cls.op, [])):
        problems.append(f"{cls.op} already has an implementation called {cls.name!r}")
    if problems:
        raise ConfigError(problems, "Fix the kernel declaration.")
    REGISTRY[cls.op].append(cls)
    return cls


_SELECTED: dict[tuple[Any, ...], type[Kernel]] = {}


def select(op: str, xp: ModuleType | str, device: Any, dtype: Any = None, *,
           choice: str | None = None) -> type[Kernel]:
    """The implementation of ``op`` to use for arrays of namespace ``xp`` on ``device`` with ``dtype``.

    ``choice`` overrides ``HYBRID_KERNELS`` (both default to ``auto``: the first
    implementation that fits). ``xp`` may also be a library name such as ``"torch"``.
    """
    if op not in REGISTRY:
        raise ConfigError(f"unknown kernel op {op!r}; the ops are {', '.join(OPS)}")
    backend = xp if isinstance(xp, str) else library_name(xp)
    kind = device_kind(backend, device)
    dt = dtype_name(dtype)
    # This runs on every trainer step: remember what was chosen for the same question under
    # the same environment (the only run-time inputs besides installed packages).
    key = (op, choice, backend, kind, dt, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"))
    cached = _SELECTED.get(key)
    if cached is not None:
        return cached
    choice, source = _choice(choice)
    forced = choice != "auto"
    rejections = []
    for impl in REGISTRY[op]:
        reason = impl.rejection(backend, kind, dt, forced=forced and impl.name == choice)
        if reason is None and (not forced or impl.name == choice):
            if len(_SELECTED) < 256:
                _SELECTED[key] = impl
            return impl
        rejections.append(f"{impl.name}: {reason or f'can run, but {source} forces {choice}'}")
    where = f"{backend} arrays on {kind}" + (f" ({dt})" if dt else "")
    missing = "" if any(k.name == choice for k in REGISTRY[op]) else f" ({op} has no {choice!r} implementation)"
    raise BackendError(
        f"no {choice!r} implementation of {op} can run for {where}{missing}; every candidate:\n"
        + "\n".join(f"    - {line}" for line in rejections),
        f"Unset {ENV_VAR} (or set it to auto), or meet the requirement listed for {choice}.",
    )


def device_kind(backend: str, device: Any) -> str:
    """The kind of ``device`` ('cpu', 'cuda', 'gpu', 'tpu', ...) as its library names it.

    For JAX, ``device`` may also be a ``jax.sharding.Sharding`` (what ``array_api_compat.device``
    gives for an array laid out over several devices, e.g. a ``NamedSharding`` over a ``Mesh``): its
    kind is the one platform of all its devices. A sharding over devices of several platforms, or a
    device whose kind cannot be told, raises `BackendError`.
    """
    if isinstance(device, str):
        return device.split(":")[0].lower()
    if device is None or backend in ("numpy", "array_api_strict"):
        return "cuda" if backend == "cupy" else "cpu"
    if backend == "torch":
        kind = getattr(device, "type", None)
        if not isinstance(kind, str):
            raise BackendError(f"cannot tell the kind of the torch device {device!r}",
                               "Put the tensors on a torch.device (cpu, cuda, ...).")
        return kind
    if backend == "jax":
        return _jax_platform(device)
    if backend == "cupy":
        return "cuda"
    return str(device).split(":")[0].lower()


def _jax_platform(device: Any) -> str:
    """The platform of a JAX device, or the one platform of every device of a sharding."""
    platform = getattr(device, "platform", None)
    if isinstance(platform, str):
        return platform
    try:
        platforms = {getattr(d, "platform", None) for d in device.device_set}  # a jax.sharding.Sharding
    except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
        raise BackendError(f"cannot tell where jax arrays placed by {device!r} live ({type(exc).__name__}: {exc})",
                           _SHARDING_HINT) from exc
    if len(platforms) == 1 and isinstance(only := next(iter(platforms)), str):
        return only
    found = ", ".join(sorted(str(p) for p in platforms)) or "no devices"
    raise BackendError(f"jax arrays placed by {device!r} span {found}: the kernels need one platform",
                       _SHARDING_HINT)


_SHARDING_HINT = ("Place the arrays on one device or with a jax.sharding.Sharding over devices of one platform "
                  "(e.g. NamedSharding(Mesh(jax.devices(), ...), spec)).")


def dtype_name(dtype: Any) -> str | None:
    """A library-neutral dtype name ('float32', 'bfloat16', ...), ``None`` for ``None``."""
    if dtype is None:
        return None
    try:
        return np.dtype(dtype).name
    except TypeError:
        # torch.float32 and array_api_strict.float32 are not NumPy dtypes; they print as module.name.
        return str(dtype).rsplit(".", 1)[-1]


def _choice(choice: str | None) -> tuple[str, str]:
    """The choice and where it came from (for messages)."""
    if choice is None:
        choice = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        source = f"{ENV_VAR}={choice}"
    else:
        source = f"choice={choice!r}"
    if choice not in CHOICES:
        raise ConfigError(
            f"{source} is not a kernel choice; allowed: {', '.join(CHOICES)}",
            f"Set {ENV_VAR} to one of {', '.join(CHOICES)} (or unset it for auto).",
        )
    return choice, source


@functools.cache
def _requirement(module: str, minimum: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (needs >= {minimum})"
    version = _installed_version(module)
    if version is not None and _version_tuple(version) < _version_tuple(minimum):
        return f"{module} {version} is older than {minimum}"
    return None


@functools.cache
def _installed_version(module: str) -> str | None:
    # A module's distribution may be named differently (cupy comes as cupy-cuda12x, ...).
    for dist in [module, *importlib.metadata.packages_distributions().get(module, [])]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


@functools.cache
def _load(entry: str) -> Callable[..., Any]:
    module, function = entry.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)


def _names(values: Collection[str]) -> str:
    return "(" + ", ".join(sorted(values)) + ")"
