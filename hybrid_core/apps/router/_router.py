"""`Router`: a trained FastGRNN with the z-score normaliser of its training data."""

from __future__ import annotations

from typing import Any, NamedTuple, final

import array_api_compat
import numpy as np

from hybrid_core import BatchError, ConfigError
from hybrid_core._backend import from_numpy, to_numpy
from hybrid_core.models import FastGRNN

__all__ = ["Router", "ZScore"]

_MIN_STD = 1e-8  # a feature that never varies is only centred: dividing by ~0 would blow it up


class ZScore(NamedTuple):
    """Per-feature z-score normalisation, (x − mean)/std, with the statistics kept for deployment."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> ZScore:
        """Mean and std of every feature (last axis) over all sequences and time steps of ``x``."""
        flat = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
        std = flat.std(axis=0)
        return cls(flat.mean(axis=0), np.where(std < _MIN_STD, 1.0, std))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x`` normalised, float64."""
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.std


@final
class Router:
    """Turns raw request windows (NumPy, shape (n, T, features)) into route decisions."""

    def __init__(self, model: FastGRNN, normalizer: ZScore) -> None:
        width = model.settings["input_size"]
        if normalizer.mean.shape != (width,) or normalizer.std.shape != (width,):
            raise ConfigError(f"the normaliser has {normalizer.mean.shape} / {normalizer.std.shape} statistics "
                             f"but the model reads {width} features", "Fit the normaliser on the model's inputs.")
        self.model = model
        self.normalizer = normalizer

    def inputs(self, x: np.ndarray) -> Any:
        """Raw ``x`` normalised and converted to the model's namespace, dtype and device."""
        x = np.asarray(x)
        width = self.model.settings["input_size"]
        if x.ndim != 3 or x.shape[2] != width:
            raise BatchError(f"request windows have shape {x.shape}; expected (n, T, {width})",
                             f"Pass windows of {width} raw features per request.")
        device = array_api_compat.device(self.model.parameters()[0])
        return from_numpy(self.model.xp, self.normalizer.apply(x), dtype=self.model.dtype, device=device)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The model's logit per window, as float64 NumPy."""
        return np.asarray(to_numpy(self.model.logits(self.inputs(x))), dtype=np.float64)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """P(route to the large model) per window."""
        return 0.5 * (1.0 + np.tanh(0.5 * self.logits(x)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The route per window: 1 (large model) where the logit is positive, else 0."""
        return (self.logits(x) > 0).astype(np.int64)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """The fraction of windows whose route matches ``y``."""
        return float(np.mean(self.predict(x) == np.asarray(y)))

    def __repr__(self) -> str:
        return f"Router({self.model!r})"
