"""`save_router` / `load_router`: a `Router` in the checkpoint file format (msgpack, checksum, atomic)."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from hybrid_core import CheckpointError, HybridError
from hybrid_core._backend import as_namespace, from_numpy, to_numpy
from hybrid_core._codec import DEFAULT_MAX_BYTES, encode, read_file, write_atomic
from hybrid_core.models import FastGRNN

from ._router import Router, ZScore

__all__ = ["load_router", "save_router"]

_KIND = "hybrid_core.router"  # the saved files' format tag (the package's old path); kept so old files load
_VERSION = 1
_KEYS = {"kind", "version", "settings", "dtype", "params", "mean", "std"}


def save_router(router: Router, path: str | os.PathLike[str]) -> None:
    """Write the router's weights, hyper-parameters and normaliser to ``path`` atomically."""
    params = [np.array(to_numpy(p), copy=True) for p in router.model.parameters()]
    state = {
        "kind": _KIND,
        "version": _VERSION,
        "settings": router.model.settings,
        "dtype": params[0].dtype.name,
        "params": params,
        "mean": np.asarray(router.normalizer.mean, dtype=np.float64),
        "std": np.asarray(router.normalizer.std, dtype=np.float64),
    }
    write_atomic(path, encode(state, lambda _: None))


def load_router(path: str | os.PathLike[str], *, xp: ModuleType | None = None, device: Any = None,
                max_bytes: int = DEFAULT_MAX_BYTES) -> Router:
    """The router saved at ``path``, its model on namespace ``xp`` (default NumPy) and ``device``.

    The weights are restored bit for bit. A truncated, corrupted or foreign file, or one whose
    contents do not make a router, raises `CheckpointError`.
    """
    raw = read_file(path, max_bytes)
    where = os.fspath(path)
    if not isinstance(raw, dict) or raw.get("kind") != _KIND:
        raise CheckpointError(f"{where}: not a saved router", "Pass a file written by save_router.")
    if set(raw) != _KEYS or raw["version"] != _VERSION:
        raise CheckpointError(f"{where}: router file has keys {sorted(raw)} and version {raw.get('version')!r}; "
                              f"expected {sorted(_KEYS)} and version {_VERSION}")
    try:
        return _build(raw, as_namespace(xp), device)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc.message}", exc.recovery) from exc
    except (HybridError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{where}: the file's contents do not make a router ({type(exc).__name__}: "
                              f"{exc})") from exc


def _build(raw: dict[str, Any], xp: ModuleType, device: Any) -> Router:
    model = FastGRNN(**raw["settings"], xp=xp, dtype=getattr(xp, raw["dtype"]), device=device)
    saved = raw["params"]
    current = model.parameters()
    if not isinstance(saved, list) or len(saved) != len(current):
        raise CheckpointError(f"the file holds {len(saved)} parameters; the model has {len(current)}")
    for i, (s, p) in enumerate(zip(saved, current)):
        if not isinstance(s, np.ndarray) or s.shape != tuple(p.shape) or s.dtype.name != raw["dtype"]:
            raise CheckpointError(f"parameter {i} does not match the saved settings")
    mean, std = raw["mean"], raw["std"]
    if not (isinstance(mean, np.ndarray) and isinstance(std, np.ndarray)) or not np.all(std > 0):
        raise CheckpointError("the normaliser's mean/std are missing or not positive")
    target = array_api_compat.device(current[0])
    live = [from_numpy(xp, s.copy(), dtype=p.dtype, device=target) for s, p in zip(saved, current)]
    # θ − θ is exactly 0 and 0 + θ_saved is exactly θ_saved: the weights come back bit for bit.
    model.apply_update([p * 1 for p in current], -1.0)
    model.apply_update(live, 1.0)
    return Router(model, ZScore(mean.astype(np.float64), std.astype(np.float64)))
