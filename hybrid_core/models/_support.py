"""`Support`: which entries of some parameters may be non-zero, re-applied after every parameter change.

Sparse training by iterative hard thresholding (IHT) keeps, for each constrained tensor, its
``k = max(1, round(density · size))`` entries of largest magnitude and zeroes the rest. Here the
support is a set of 0/1 masks owned by the model: every change of the parameters (an optimizer
step, a predicted step, a correction, a rollback, `set_parameters`) is multiplied by them, so no
path of the trainer can revive a pruned weight. Projection by a fixed mask is linear per entry,
so the trainer's "undo by minus the scale" rollbacks stay exact. Only `select` moves the support:
`hybrid_core.optim.HardThresholding` calls it after each real step (the IHT of the paper), and
fine-tuning on a fixed support simply never calls it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, final

import array_api_compat
import numpy as np

from .._backend import from_numpy, to_numpy
from .._errors import CheckpointError, ConfigError

__all__ = ["Support", "kept_count", "top_k_mask"]


def kept_count(size: int, density: float) -> int:
    """How many of ``size`` entries a tensor keeps at ``density``: round(density·size), at least 1."""
    return max(1, min(size, round(density * size)))


def top_k_mask(xp: ModuleType, w: Any, k: int) -> Any:
    """A 0/1 array like ``w`` (its dtype) with ones at the ``k`` entries of largest |w|; ties go to the lower
    flat index, so exactly ``k`` ones whatever the values (NaN counts as the smallest magnitude)."""
    flat = xp.reshape(xp.abs(w), (-1,))
    flat = xp.where(xp.isnan(flat), xp.full_like(flat, -1.0), flat)
    order = xp.argsort(-flat, stable=True)
    rank = xp.argsort(order, stable=True)
    return xp.reshape(xp.astype(rank < k, w.dtype), w.shape)


@final
class Support:
    """Masks for the parameters at ``indices``, each group of indices sharing one density.

    ``groups`` maps a name (``"w"``, ``"u"``) to (parameter indices, density in (0, 1]).
    """

    def __init__(self, xp: ModuleType, groups: Mapping[str, tuple[Sequence[int], float]]) -> None:
        problems = [f"{name}_density={d!r}: must be a number in (0, 1]" for name, (_, d) in groups.items()
                    if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d)
                    or not 0 < d <= 1]
        if problems:
            raise ConfigError(problems, "Pass densities such as 0.5 (keep half of the weights) or 1 (keep all).")
        self._xp = xp
        self.groups = {name: (tuple(idx), float(d)) for name, (idx, d) in groups.items()}
        self.masks: dict[int, Any] = {}
        """Parameter index → its 0/1 mask (empty until `select`)."""

    @property
    def densities(self) -> dict[str, float]:
        """The requested density of each group."""
        return {name: d for name, (_, d) in self.groups.items()}

    def select(self, params: Sequence[Any]) -> None:
        """Re-select every mask: the top-k magnitudes of the current values (the hard threshold)."""
        xp = self._xp
        masks = {}
        for indices, density in self.groups.values():
            for i in indices:
                size = math.prod(params[i].shape)
                masks[i] = top_k_mask(xp, params[i], kept_count(size, density))
        self.masks = masks

    def project(self, params: Sequence[Any]) -> list[Any]:
        """``params`` with every masked one multiplied by its mask (the others as they are)."""
        return [p * self.masks[i] if i in self.masks else p for i, p in enumerate(params)]

    def state_dict(self) -> dict[str, Any]:
        """Densities and masks (the live 0/1 arrays: masks are rebound, never written in place)."""
        return {"densities": self.densities, "masks": {str(i): m for i, m in self.masks.items()}}

    def check_state_dict(self, state: Any, params: Sequence[Any]) -> dict[int, np.ndarray]:
        """The masks `load_state_dict` would set, as NumPy 0/1 floats; `CheckpointError` naming the field
        otherwise (wrong keys, densities or shapes, values other than 0 and 1, another count of ones)."""
        if not isinstance(state, Mapping) or set(state) != {"densities", "masks"}:
            raise CheckpointError("support state must hold exactly 'densities' and 'masks'")
        if state["densities"] != self.densities:
            raise CheckpointError(f"support state has densities {state['densities']!r}; expected {self.densities!r}")
        masks = state["masks"]
        expected = {str(i) for indices, _ in self.groups.values() for i in indices}
        if not isinstance(masks, Mapping) or (masks and set(masks) != expected):
            raise CheckpointError(f"support masks must be keyed {sorted(expected)} (or be empty)")
        out = {}
        for key, mask in masks.items():
            i = int(key)
            try:
                host = np.asarray(to_numpy(mask), dtype=np.float64)
            except Exception as exc:
                raise CheckpointError(f"support mask {key} is not an array ({type(exc).__name__})") from exc
            if host.shape != tuple(params[i].shape) or not np.all((host == 0) | (host == 1)):
                raise CheckpointError(f"support mask {key} is not a 0/1 array of shape {tuple(params[i].shape)}")
            density = next(d for indices, d in self.groups.values() if i in indices)
            if int(host.sum()) != kept_count(host.size, density):
                raise CheckpointError(f"support mask {key} keeps {int(host.sum())} entries; density {density} "
                                      f"keeps {kept_count(host.size, density)}")
            out[i] = host
        return out

    def load_state_dict(self, state: Any, params: Sequence[Any]) -> None:
        """Restore `state_dict` output (checked first: a refused state changes nothing)."""
        masks = self.check_state_dict(state, params)
        self.masks = {i: from_numpy(self._xp, m, dtype=params[i].dtype, device=array_api_compat.device(params[i]))
                      for i, m in masks.items()}
