"""Cheap checks that a list of arrays lines up with a model's parameters (metadata only, no host sync)."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import array_api_compat

from .._backend import from_numpy, library_name
from .._errors import BackendError, BatchError, ConfigError

__all__ = ["check_batch_array", "check_like_parameters", "library_problem", "parameters_from_host"]

_LAYOUT_HINT = "Pass one array per parameter, in model.parameters() order, with their shapes and dtype."


def library_problem(xp: ModuleType, value: Any) -> str | None:
    """Why ``value`` is not an array of namespace ``xp`` (``None`` if it is)."""
    try:
        got = array_api_compat.array_namespace(value)
    except TypeError:
        return f"is a {type(value).__module__}.{type(value).__name__}, not an array"
    if got is not xp:
        return f"is a {library_name(got)} array but the model's parameters are {library_name(xp)} arrays"
    return None


def parameters_from_host(xp: ModuleType, host: Sequence[Any], dtype: Any, device: Any) -> list[Any]:
    """NumPy initial values as ``xp`` parameters of ``dtype`` on ``device``; `ConfigError` if they cannot be."""
    lib = library_name(xp)
    try:
        params = [from_numpy(xp, a, dtype=dtype, device=device) for a in host]
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"dtype={dtype!r}, device={device!r}: {lib} cannot make parameters with them ({exc})",
            f"Pass a floating dtype and a device of {lib} (or leave both at None).",
        ) from exc
    got = params[0].dtype
    if not xp.isdtype(got, "real floating") or got != dtype:
        raise ConfigError(
            f"dtype={dtype!r}: {lib} made {got} parameters; a real floating dtype is needed",
            "Pass e.g. xp.float32 or xp.float64 (JAX needs jax_enable_x64 for float64).",
        )
    return params


def check_batch_array(xp: ModuleType, array: Any, what: str, parameter: Any) -> None:
    """`BackendError` unless the batch's ``array`` is of namespace ``xp`` on ``parameter``'s device."""
    problem = library_problem(xp, array)
    if problem:
        raise BackendError(f"batch {what} {problem}", f"Convert the batch to {library_name(xp)} arrays first.")
    here, there = array_api_compat.device(array), array_api_compat.device(parameter)
    if here != there:
        raise BackendError(f"batch {what} is on device {here}; the model's parameters are on {there}",
                           f"Move the batch to {there}.")


def check_like_parameters(
    xp: ModuleType, params: Sequence[Any], arrays: Sequence[Any], what: str
) -> list[Any]:
    """``arrays`` as a list after checking it matches ``params`` one to one.

    `BackendError` for another library or device, `BatchError` for a wrong count, shape or dtype;
    each names the index and both sides.
    """
    arrays = list(arrays)
    if len(arrays) != len(params):
        raise BatchError(f"{what} holds {len(arrays)} arrays but the model has {len(params)} parameters",
                         _LAYOUT_HINT)
    for i, (a, p) in enumerate(zip(arrays, params, strict=True)):
        problem = library_problem(xp, a)
        if problem:
            raise BackendError(f"{what}[{i}] {problem}",
                               f"Convert {what} to {library_name(xp)} arrays on the parameters' device.")
        if array_api_compat.device(a) != array_api_compat.device(p):
            raise BackendError(
                f"{what}[{i}] is on device {array_api_compat.device(a)}; parameter {i} is on "
                f"{array_api_compat.device(p)}",
                f"Move {what} to the parameters' device.",
            )
        if tuple(a.shape) != tuple(p.shape):
            raise BatchError(f"{what}[{i}] has shape {tuple(a.shape)}; parameter {i} has {tuple(p.shape)}",
                             _LAYOUT_HINT)
        if a.dtype != p.dtype:
            raise BatchError(
                f"{what}[{i}] has dtype {a.dtype}; parameter {i} has dtype {p.dtype}",
                f"Cast {what} to {p.dtype}; mixing dtypes would silently change the parameters' dtype.",
            )
    return arrays
