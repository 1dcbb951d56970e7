"""`save_router` / `load_router`: a `Router` in the checkpoint file format (msgpack, checksum, atomic);
`QuantizedRouter` and its compact int8 export (`save_quantized_router` / `load_quantized_router`)."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from hybrid_core import CheckpointError, HybridError
from hybrid_core._backend import as_namespace, from_numpy, to_numpy
from hybrid_core._codec import DEFAULT_MAX_BYTES, encode, read_file, write_atomic
from hybrid_core.models import FastGRNN, QuantizedFastGRNN, load_quantized, save_quantized
from hybrid_core.models._export import EXPORT_MAX_BYTES

from ._router import Router, ZScore

__all__ = ["QuantizedRouter", "load_quantized_router", "load_router", "save_quantized_router", "save_router"]

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


class QuantizedRouter:
    """A `QuantizedFastGRNN` with its normaliser: raw windows in, integer-inference routes out."""

    def __init__(self, model: QuantizedFastGRNN, normalizer: ZScore) -> None:
        width = model.settings["input_size"]
        if normalizer.mean.shape != (width,) or normalizer.std.shape != (width,):
            raise CheckpointError(f"the normaliser has {normalizer.mean.shape} statistics but the model reads "
                                  f"{width} features")
        self.model = model
        self.normalizer = normalizer

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The integer path's logit per raw window, as float64."""
        return self.model.logits(self.normalizer.apply(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The route per window: 1 where the integer logit is positive, else 0."""
        return self.model.predict(self.normalizer.apply(x))

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """The fraction of windows whose route matches ``y``."""
        return float(np.mean(self.predict(x) == np.asarray(y)))

    def extra(self) -> dict[str, np.ndarray]:
        """The normaliser as the export stores it."""
        return {"mean": np.asarray(self.normalizer.mean, dtype=np.float64),
                "std": np.asarray(self.normalizer.std, dtype=np.float64)}

    def to_router(self, *, xp: ModuleType | None = None, device: Any = None) -> Router:
        """A float `Router` with the dequantized weights (any backend)."""
        return Router(self.model.to_float(xp=xp, device=device), self.normalizer)

    def __repr__(self) -> str:
        return f"QuantizedRouter({self.model!r})"


def save_quantized_router(router: QuantizedRouter, path: str | os.PathLike[str]) -> int:
    """Write the int8 model and its normaliser to ``path`` (`hybrid_core.models.save_quantized`); returns the
    file's length in bytes."""
    return save_quantized(router.model, path, router.extra())


def load_quantized_router(path: str | os.PathLike[str], max_bytes: int = EXPORT_MAX_BYTES) -> QuantizedRouter:
    """The router exported at ``path``, bit for bit; `CheckpointError` for a damaged, foreign or inconsistent file."""
    model, extra = load_quantized(path, max_bytes)
    width = model.settings["input_size"]
    mean, std = extra.get("mean"), extra.get("std")
    if set(extra) != {"mean", "std"} or not all(
            isinstance(a, np.ndarray) and a.dtype == np.float64 and a.shape == (width,) for a in (mean, std)) or (
            not np.all(np.isfinite(mean)) or not np.all(std > 0)):
        raise CheckpointError(f"{os.fspath(path)}: the export's normaliser is missing or malformed",
                              "Pass a file written by save_quantized_router.")
    return QuantizedRouter(model, ZScore(mean, std))
