"""Readers for saved states: each checks one field's type and range before anything is changed.

A part parses a whole saved state with these (returning the values it will keep) and only then
assigns them, so a state refused anywhere leaves the part as it was. Every reader raises
`ValueError` naming the field; `restore_parts` turns that into a `CheckpointError` naming the part.
Sizes come from the part's own configuration, never from the file: a file can make a part refuse,
not allocate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import array_api_compat
import numpy as np

from ._backend import to_host_floats
from ._errors import HybridError
from .models._checks import check_like_parameters

__all__ = ["all_finite", "arrays_like", "fields", "first_nonfinite", "flag", "integer", "matrix", "optional", "real",
           "reals", "sequence", "text"]

T = TypeVar("T")


def fields(state: Any, required: Iterable[str], optional_keys: Iterable[str] = (), what: str = "state"
           ) -> Mapping[str, Any]:
    """``state`` once it is a dict holding every key of ``required`` and no key outside ``optional_keys``."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} is a {type(state).__name__}, not a dict")
    required = set(required)
    keys = set(state)
    missing = sorted(required - keys)
    unknown = sorted(str(k) for k in keys - required - set(optional_keys))
    if missing or unknown:
        said = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has unknown {', '.join(unknown)}"] if unknown else [])
        raise ValueError(f"{what} {' and '.join(said)}")
    return state


def integer(value: Any, name: str, lo: int = 0, hi: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} is a {type(value).__name__}, not an integer")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name}={value}: must be in [{lo}, {'∞' if hi is None else hi}]")
    return value


def real(value: Any, name: str, lo: float = -math.inf, hi: float = math.inf, *, finite: bool = True) -> float:
    """``value`` as a float if it is a number (not a bool) in [lo, hi]; finite unless ``finite`` is False
    (then NaN passes, and ±Inf within the bounds)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} is a {type(value).__name__}, not a number")
    try:
        number = float(value)
    except OverflowError as exc:
        raise ValueError(f"{name}={value}: too large for a float") from exc
    if math.isnan(number) and not finite:
        return number
    if not math.isfinite(number) and finite:
        raise ValueError(f"{name}={number!r}: must be finite")
    if not lo <= number <= hi:
        raise ValueError(f"{name}={number!r}: must be in [{lo}, {hi}]")
    return number


def flag(value: Any, name: str) -> bool:
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} is a {type(value).__name__}, not True or False")
    return value


def text(value: Any, name: str) -> str:
    """``value`` if it is a str."""
    if not isinstance(value, str):
        raise ValueError(f"{name} is a {type(value).__name__}, not a string")
    return value


def optional(read: Callable[..., T], value: Any, name: str, *args: Any, **kwargs: Any) -> T | None:
    """None for None, else ``read(value, name, ...)``."""
    return None if value is None else read(value, name, *args, **kwargs)


def sequence(value: Any, name: str, max_len: int | None = None, min_len: int = 0) -> list[Any]:
    """``value`` as a list if it is a list or tuple of ``min_len`` to ``max_len`` entries."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} is a {type(value).__name__}, not a list")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        raise ValueError(f"{name} holds {len(value)} entries; expected {min_len} to "
                         f"{'any number' if max_len is None else max_len}")
    return list(value)


def reals(value: Any, name: str, max_len: int | None = None, min_len: int = 0, **kwargs: Any) -> list[float]:
    """``value`` as a list of floats (see `real` for ``lo``, ``hi``, ``finite``)."""
    return [real(v, f"{name}[{i}]", **kwargs) for i, v in enumerate(sequence(value, name, max_len, min_len))]


def matrix(value: Any, name: str, shape: tuple[int, ...], *, finite: bool = True) -> np.ndarray:
    """A float64 array of exactly ``shape`` from nested lists of numbers (or an array); finite unless told."""
    if isinstance(value, np.ndarray):
        if value.shape != shape or not (np.issubdtype(value.dtype, np.floating)
                                        or np.issubdtype(value.dtype, np.integer)):
            raise ValueError(f"{name} is a {value.dtype} array of shape {value.shape}; expected {shape} numbers")
        out = value.astype(np.float64)
    else:
        out = np.array(_nested(value, name, shape), dtype=np.float64).reshape(shape)
    if finite and not np.all(np.isfinite(out)):
        raise ValueError(f"{name} holds NaN or Inf")
    return out


def _nested(value: Any, name: str, shape: tuple[int, ...]) -> list[float]:
    """The numbers of nested lists of exactly ``shape``, flat (checked level by level, no recursion)."""
    level = [value]
    for n in shape:
        nxt = []
        for item in level:
            nxt.extend(sequence(item, name, n, n))
        level = nxt
    return [real(v, name, finite=False) for v in level]


def all_finite(arrays: Sequence[Any]) -> bool:
    """Whether every entry of the arrays (any one library) is finite: one host read for the lot."""
    return first_nonfinite(arrays) is None


def first_nonfinite(arrays: Sequence[Any]) -> int | None:
    """The index of the first array (any one library) holding NaN or Inf, or None: one host read for the lot."""
    floating = [i for i, a in enumerate(arrays) if _floating(a)]
    if not floating:
        return None
    xp = array_api_compat.array_namespace(*(arrays[i] for i in floating))
    counts = to_host_floats([xp.reshape(xp.astype(xp.any(xp.logical_not(xp.isfinite(arrays[i]))), xp.int32), (1,))
                             for i in floating])
    return next((i for i, c in zip(floating, counts, strict=True) if c), None)


def _floating(array: Any) -> bool:
    xp = array_api_compat.array_namespace(array)
    return bool(xp.isdtype(array.dtype, ("real floating", "complex floating")))


def arrays_like(value: Any, name: str, params: Sequence[Any], *, finite: bool = True) -> list[Any]:
    """``value`` as a list of arrays lining up with ``params`` (library, device, shapes, dtypes), finite unless told."""
    arrays = sequence(value, name)
    if len(arrays) != len(params):
        raise ValueError(f"{name} does not match the model's parameters: it holds {len(arrays)} arrays, the model "
                         f"has {len(params)}")
    try:
        xp = array_api_compat.array_namespace(*params)
        arrays = check_like_parameters(xp, params, arrays, name)
    except HybridError as exc:
        raise ValueError(exc.message) from exc
    except TypeError as exc:
        raise ValueError(f"{name} holds something that is not an array ({exc})") from exc
    bad = first_nonfinite(arrays) if finite else None
    if bad is not None:
        raise ValueError(f"{name}[{bad}] holds NaN or Inf")
    return arrays
