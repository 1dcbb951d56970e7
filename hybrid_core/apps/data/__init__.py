"""Small data sets that ship with the package, so nothing is downloaded at run time."""

from __future__ import annotations

import gzip
from importlib import resources
from typing import NamedTuple

import numpy as np

__all__ = ["Split", "load_digits", "sequential_digits", "split_digits"]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 handwritten digits: pixels (1797, 64) float64 in [0, 16] and labels (1797,) int64.

    The same data as `sklearn.datasets.load_digits`, read from the copy inside this
    package (see ``LICENSE-digits.txt`` beside it).
    """
    with resources.files(__name__).joinpath("digits.csv.gz").open("rb") as raw, gzip.open(raw, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].astype(np.float64), table[:, -1].astype(np.int64)


class Split(NamedTuple):
    """A train/validation split of features and labels (NumPy)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def split_digits(val_fraction: float = 0.2, seed: int = 0) -> Split:
    """Shuffled digits split with pixels scaled to [0, 1]; deterministic for a given seed."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    x, y = load_digits()
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order] / 16.0, y[order]
    n_val = round(len(y) * val_fraction)
    return Split(x[n_val:], y[n_val:], x[:n_val], y[:n_val])


def sequential_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits as sequences for a binary task: x (1797, 8, 8) float64 in [0, 1], y (1797,) int64.

    Each image is read top to bottom, one row of 8 pixels per time step (8 steps of 8
    features); y is 1 for the digits 5-9 and 0 for 0-4. Not shuffled.
    """
    x, digit = load_digits()
    return (x / 16.0).reshape(-1, 8, 8), (digit >= 5).astype(np.int64)
