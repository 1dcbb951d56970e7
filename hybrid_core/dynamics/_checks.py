"""Argument checks of `RSSMDynamics`: constructor values, the dtype, and the feature vectors it is given."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from .._backend import from_numpy, library_name, to_numpy
from .._errors import BatchError, ConfigError

__all__ = ["FEATURE_BOUND", "host_features", "is_int", "problems", "resolve_dtype"]

FEATURE_BOUND = 1e12
"""Raw feature slots are clipped to ±this so their squares stay finite (the encoder itself clips at 1e6)."""


def problems(sizes: dict[str, Any], positives: dict[str, Any], seed: Any, slot: Any) -> list[str]:
    """One line per bad constructor argument: ``sizes`` must be integers >= 1, ``positives`` finite > 0."""
    found = [f"{name}={value!r}: must be an integer >= 1" for name, value in sizes.items()
             if not is_int(value) or value < 1]
    found += [f"{name}={value!r}: must be a finite number > 0" for name, value in positives.items()
              if not (_is_real(value) and value > 0)]
    if not is_int(seed) or seed < 0:
        found.append(f"seed={seed!r}: must be an integer >= 0")
    dim = sizes["feature_dim"]
    if not is_int(slot) or slot < 0 or (is_int(dim) and slot >= dim):
        found.append(f"log_loss_slot={slot!r}: must be an integer in [0, feature_dim)")
    return found


def resolve_dtype(xp: ModuleType, dtype: Any, device: Any) -> Any:
    """``dtype`` (default: the namespace's float32), checked to be a real floating dtype ``xp`` can make."""
    lib = library_name(xp)
    wanted = xp.float32 if dtype is None else dtype
    try:
        got = from_numpy(xp, np.zeros(1), dtype=wanted, device=device).dtype
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"dtype={dtype!r}, device={device!r}: {lib} cannot make arrays with them ({exc})",
                          f"Pass a floating dtype and a device of {lib} (or leave both at None).") from exc
    if not xp.isdtype(got, "real floating") or got != wanted:
        raise ConfigError(f"dtype={dtype!r}: {lib} made {got} arrays; a real floating dtype is needed",
                          "Pass e.g. xp.float32 or xp.float64 (JAX needs jax_enable_x64 for float64).")
    return got


def host_features(features: Any, dim: int) -> np.ndarray:
    """``features`` as a finite float64 host vector of length ``dim`` (`BatchError` otherwise).

    NaN becomes 0 and ±inf or huge values ±`FEATURE_BOUND`: one broken slot must not poison
    the running statistics.
    """
    try:
        raw = to_numpy(features) if array_api_compat.is_array_api_obj(features) else features
        row = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BatchError(f"features of type {type(features).__name__} are not numbers ({exc})",
                         f"Pass a float vector of length {dim}.") from exc
    if row.shape != (dim,):
        raise BatchError(f"features have shape {row.shape}; expected ({dim},)",
                         f"Pass the {dim}-slot feature vector of the step.")
    if not np.isfinite(row).all():
        row = np.nan_to_num(row, nan=0.0, posinf=FEATURE_BOUND, neginf=-FEATURE_BOUND)
    return np.minimum(np.maximum(row, -FEATURE_BOUND), FEATURE_BOUND)


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python int (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
