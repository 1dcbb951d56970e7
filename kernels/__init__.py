"""Hot whole-parameter operations, each dispatched at run time to the best kernel for its arrays.

`select` picks, per op, the first implementation in `REGISTRY` that can run on the
arrays' library, device and dtype: GPU kernels (Triton for torch, Pallas for JAX,
CUDA C through CuPy), then CPU fast paths (``torch._foreach_*``, one ``jax.jit``),
then the array-API `reference`. ``HYBRID_KERNELS`` forces one (see `CHOICES`).
Importing this package imports no array library beyond NumPy; a backend's module is
imported at its first call. `FlatTensors`, `flatten` and `flatten_module_` (flat parameter
buffers for torch, see ``_flat``) import torch when first accessed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import array_api_compat

from hybrid_core._backend import widened
from hybrid_core._errors import BackendError, ModelError

from . import _catalog  # noqa: F401  (registers every implementation)
from ._registry import CHOICES, ENV_VAR, OPS, REGISTRY, Kernel, select
from .reference import STATS_FIELDS

if TYPE_CHECKING:
    from ._flat import FlatTensors as FlatTensors
    from ._flat import flatten as flatten
    from ._flat import flatten_module_ as flatten_module_

__all__ = [
    "CHOICES",
    "ENV_VAR",
    "OPS",
    "REGISTRY",
    "STATS_FIELDS",
    "Kernel",
    "fused_axpy",
    "fused_axpy_",
    "fused_stats",
    "gru_ensemble_rollout",
    "select",
]


_LAZY = {"FlatTensors", "flatten", "flatten_module_"}
"""Torch-only names, loaded on first attribute access and left out of ``__all__`` so that
``from hybrid_core.kernels import *`` works without torch."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # imports torch, so only on first use
        from . import _flat

        return getattr(_flat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fused_axpy(params: Sequence[Any], direction: Sequence[Any], scale: float) -> list[Any]:
    """θ_i + s·d_i for every tensor: a new list, each in its parameter's dtype (see `reference.fused_axpy`).

    Two torch `FlatTensors` of one layout take one add over their buffers (unless
    ``HYBRID_KERNELS`` forces an implementation); the result is then `FlatTensors` too.
    """
    flat = _flat_pair(params, direction)
    if flat is not None and _auto():
        return flat.add(params, direction, scale)
    _same_shapes(params, direction, "direction")
    if not params:
        return []
    first = params[0]
    impl = select("fused_axpy", array_api_compat.array_namespace(first), array_api_compat.device(first), first.dtype)
    return _run(impl, "fused_axpy", [*params, *direction], params, direction, scale)


def fused_axpy_(params: Sequence[Any], direction: Sequence[Any], scale: float) -> Sequence[Any]:
    """θ_i += s·d_i for every tensor, in place (d_i cast to θ_i's dtype); returns ``params``.

    torch: two `FlatTensors` of one layout → one ``add_`` over their buffers (the memory
    bandwidth limit); any other lists of tensors → one ``torch._foreach_add_``, under
    ``torch.no_grad()`` (it is a parameter update). Other mutable array libraries (NumPy,
    CuPy, array-api-strict) → `reference.fused_axpy_`, one in-place update per array;
    immutable ones (JAX) raise `BackendError`: use `fused_axpy` there. This op is not in
    `REGISTRY` (``HYBRID_KERNELS`` does not apply): an in-place add has nothing to fuse
    beyond these paths.
    """
    flat = _flat_pair(params, direction)
    if flat is not None:
        return flat.add_(params, direction, scale)
    if len(params) != len(direction):
        _same_shapes(params, direction, "direction")  # raises the count error
    if not params:
        return params
    if array_api_compat.is_torch_array(params[0]):
        from . import _torch

        return _torch.foreach_axpy_(params, direction, scale)
    _same_shapes(params, direction, "direction")
    from . import reference

    return reference.fused_axpy_(params, direction, scale)


def fused_stats(loss: Any, grads: Sequence[Any], updates: Sequence[Any] | None) -> Any:
    """[loss, Σg², Σu², Σg·u, max|g|, non-finite count] as one device array in the loss's dtype.

    A bfloat16 or float16 loss is widened to float32 first (on the device), so the sums of a
    low-precision model neither overflow (float16 tops out at 65504) nor round to a few digits.
    """
    loss = widened(loss)
    if updates is not None:
        _same_shapes(grads, updates, "updates")
    impl = select("fused_stats", array_api_compat.array_namespace(loss), array_api_compat.device(loss), loss.dtype)
    return _run(impl, "fused_stats", [loss, *grads, *(updates or ())], loss, grads, updates)


def gru_ensemble_rollout(w_x: Any, w_h: Any, b_x: Any, b_h: Any, h0: Any, x: Any) -> Any:
    """All hidden states (E, T, H) of E GRUs run over x (E, T, D) from h0 (see `reference.gru_ensemble_rollout`)."""
    _gru_shapes(w_x, w_h, b_x, b_h, h0, x)
    impl = select("gru_ensemble_rollout", array_api_compat.array_namespace(x), array_api_compat.device(x), x.dtype)
    return _run(impl, "gru_ensemble_rollout", [w_x, w_h, b_x, b_h, h0, x], w_x, w_h, b_x, b_h, h0, x)


def _run(impl: type[Kernel], op: str, arrays: Sequence[Any], *args: Any) -> Any:
    """``impl``'s function on ``args``; JAX's error for arrays committed to different devices → `BackendError`.

    The placement is looked at only after a failure, so a call that works costs nothing extra.
    """
    try:
        return impl.load()(*args)
    except ValueError as exc:
        placements = _committed_placements(arrays)
        if len(placements) < 2:
            raise
        found = "; ".join(sorted(placements))
        raise BackendError(f"{op} got JAX arrays committed to different devices: {found}",
                           "Lay them out alike: jax.device_put(x, params[0].sharding) for the odd ones (a "
                           "batch sharded over the parameters' devices is fine; a subset of them is not).") from exc


def _committed_placements(arrays: Sequence[Any]) -> set[str]:
    """The distinct device sets of the committed JAX arrays among ``arrays`` (described as text)."""
    found = set()
    for a in arrays:
        devices = getattr(a, "devices", None)
        if getattr(a, "committed", False) and callable(devices):
            found.add("{" + ", ".join(sorted(str(d) for d in devices())) + "}")
    return found


def _flat_pair(params: Sequence[Any], direction: Sequence[Any]) -> Any:
    """The `_flat` module when both lists are intact FlatTensors of one layout, else None (O(1))."""
    flat = sys.modules.get(f"{__name__}._flat")  # no FlatTensors can exist before it is imported
    return flat if flat is not None and flat.same_layout(params, direction) else None


def _auto() -> bool:
    return os.environ.get(ENV_VAR, "auto").strip().lower() in ("", "auto")


def _same_shapes(first: Sequence[Any], second: Sequence[Any], what: str) -> None:
    if len(first) != len(second):
        raise ModelError(f"{what} has {len(second)} arrays for {len(first)} tensors",
                         f"Give {what} exactly one array per tensor, in the same order.")
    bad = [f"#{i}: {tuple(b.shape)} != {tuple(a.shape)}" for i, (a, b) in enumerate(zip(first, second))
           if tuple(a.shape) != tuple(b.shape)]
    if bad:
        raise ModelError(f"{what} shapes differ from their tensors': {', '.join(bad)}",
                         f"Give {what} arrays shaped like the tensors they pair with.")


def _gru_shapes(w_x: Any, w_h: Any, b_x: Any, b_h: Any, h0: Any, x: Any) -> None:
    if x.ndim != 3 or h0.ndim != 2:
        raise ModelError(f"gru_ensemble_rollout needs x (E, T, D) and h0 (E, H), got {tuple(x.shape)} "
                         f"and {tuple(h0.shape)}", "Add the leading ensemble axis (size 1 for a single GRU).")
    (e, _, d), h = x.shape, h0.shape[1]
    expected = {"w_x": (e, d, 3 * h), "w_h": (e, h, 3 * h), "b_x": (e, 3 * h), "b_h": (e, 3 * h), "h0": (e, h)}
    got = {"w_x": w_x, "w_h": w_h, "b_x": b_x, "b_h": b_h, "h0": h0}
    bad = [f"{k} {tuple(got[k].shape)} != {v}" for k, v in expected.items() if tuple(got[k].shape) != v]
    if bad:
        raise ModelError(f"gru_ensemble_rollout shapes for E={e}, D={d}, H={h}: {', '.join(bad)}",
                         "Lay the weights out as (E, D, 3H), (E, H, 3H), biases (E, 3H), gates in r, z, n order.")
