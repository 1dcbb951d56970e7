"""Flat parameter buffers for torch: many tensors that are views into one contiguous 1-D buffer.

An elementwise update of every parameter (θᵢ += s·dᵢ) is memory-bound: at best one
pass over the bytes. With thousands of small tensors, per-tensor dispatch dominates
instead (a Python loop of ``add_`` over 10,000 tensors of 1k elements is several times
slower than one ``add_`` over the same 10M numbers). Laying the tensors out in one
buffer turns the update into that one ``add_``: `FlatTensors` is a list of per-tensor
views that also carries ``.base``, the buffer they view in order, and ``.layout``, the
shapes and offsets. Two `FlatTensors` built for the same shapes share one ``layout``
object, so `fused_axpy_` can check "same layout" in O(1) and add the bases.

Importing this module imports torch.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from hybrid_core._errors import BackendError, ModelError

__all__ = ["FlatLayout", "FlatTensors", "add", "add_", "flatten", "flatten_module_", "same_layout"]

Tensor = torch.Tensor


class FlatLayout:
    """The shapes and element offsets of the views in a flat buffer; interned, so equal layouts are one object."""

    __slots__ = ("__weakref__", "numel", "numels", "offsets", "shapes")

    shapes: tuple[tuple[int, ...], ...]
    numels: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int

    def __repr__(self) -> str:
        return f"FlatLayout({len(self.shapes)} tensors, {self.numel} elements)"


_LAYOUTS: weakref.WeakValueDictionary[tuple[tuple[int, ...], ...], FlatLayout] = weakref.WeakValueDictionary()


def _layout(shapes: tuple[tuple[int, ...], ...]) -> FlatLayout:
    found = _LAYOUTS.get(shapes)
    if found is not None:
        return found
    layout = FlatLayout()
    layout.shapes = shapes
    layout.numels = tuple(math.prod(shape) for shape in shapes)
    layout.offsets = tuple(itertools.accumulate(layout.numels, initial=0))[:-1]
    layout.numel = sum(layout.numels)
    _LAYOUTS[shapes] = layout
    return layout


def _frozen(name: str) -> Any:
    def refuse(self: FlatTensors, *args: Any, **kwargs: Any) -> Any:
        raise ModelError(f"FlatTensors.{name}: the list of views is fixed (it must match its flat buffer)",
                         "Build a new list with flatten(...), or convert with list(...) to edit a plain copy.")

    refuse.__name__ = name
    return refuse


class FlatTensors(list):
    """A list of tensors that are views, in order, into ``base``: one contiguous 1-D buffer of one dtype and device.

    Build one with `flatten` or `flatten_module_`. The list itself cannot be edited
    (that would break the layout); the tensors' values can, in place, like any tensor's.
    Rebinding a tensor's ``.data`` (``module.half()``, ``.to(other_device)``) moves it out
    of the buffer: `intact` then returns False and the kernels stop using the flat path.
    """

    __slots__ = ("base", "layout")

    base: Tensor
    layout: FlatLayout

    def __init__(self, tensors: Iterable[Tensor], base: Tensor, layout: FlatLayout) -> None:
        super().__init__(tensors)
        self.base = base
        self.layout = layout

    def intact(self, full: bool = False) -> bool:
        """Whether the tensors still view ``base`` at their offsets.

        The default checks the first and last tensor (O(1): enough to notice a whole
        module moved or cast); ``full=True`` checks every tensor.
        """
        if len(self) != len(self.layout.shapes):
            return False
        if not self:
            return True
        start, size = self.base.data_ptr(), self.base.element_size()
        offsets = self.layout.offsets
        which = range(len(self)) if full else {0, len(self) - 1}
        for i in which:
            t = self[i]
            if t.dtype != self.base.dtype or t.device != self.base.device:
                return False
            if t.numel() and t.data_ptr() != start + offsets[i] * size:
                return False
        return True

    def __reduce__(self) -> Any:  # pickle/deepcopy: a plain list of the tensors' values
        return (list, (list(self),))

    def __repr__(self) -> str:
        base = self.base
        return f"FlatTensors({len(self)} views of a {base.dtype} buffer of {base.numel()} on {base.device})"

    __setitem__ = _frozen("__setitem__")
    __delitem__ = _frozen("__delitem__")
    __iadd__ = _frozen("__iadd__")
    __imul__ = _frozen("__imul__")
    append = _frozen("append")
    extend = _frozen("extend")
    insert = _frozen("insert")
    pop = _frozen("pop")
    remove = _frozen("remove")
    clear = _frozen("clear")
    sort = _frozen("sort")
    reverse = _frozen("reverse")


def same_layout(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are intact `FlatTensors` of one layout on one device (dtypes may differ)."""
    return (type(a) is FlatTensors and type(b) is FlatTensors and a.layout is b.layout
            and a.base.device == b.base.device and a.intact() and b.intact())


def add_(params: FlatTensors, direction: FlatTensors, scale: float) -> FlatTensors:
    """θ += s·d as one ``add_`` on the buffers (`same_layout` must hold); returns ``params``."""
    d = direction.base
    with torch.no_grad():
        params.base.add_(d if d.dtype == params.base.dtype else d.to(params.base.dtype), alpha=scale)
    return params


def add(params: FlatTensors, direction: FlatTensors, scale: float) -> FlatTensors:
    """θ + s·d as one ``add`` on the buffers (`same_layout` must hold): new `FlatTensors` in θ's dtype."""
    p, d = params.base, direction.base
    with torch.no_grad():
        base = torch.add(p, d if d.dtype == p.dtype else d.to(p.dtype), alpha=scale)
    return FlatTensors(views(base, params.layout), base, params.layout)


def views(base: Tensor, layout: FlatLayout) -> list[Tensor]:
    """The per-tensor views of ``base`` for ``layout`` (one C++ split; a ``view`` only for shapes that are not 1-D)."""
    if not layout.shapes:
        return []
    return [v if len(s) == 1 else v.view(s) for v, s in zip(base.split_with_sizes(layout.numels), layout.shapes)]


def flatten(tensors: Sequence[Tensor], dtype: torch.dtype | None = None,
            device: torch.device | str | None = None) -> FlatTensors:
    """Copy ``tensors`` into one new contiguous buffer; views with their shapes, in order.

    All tensors must share one dtype and one device (one buffer has one of each) unless
    ``dtype``/``device`` is given, which casts/moves everything there. The views do not
    require grad; for an ``nn.Module``'s parameters use `flatten_module_`.
    """
    tensors = list(tensors)
    bad = [i for i, t in enumerate(tensors) if not isinstance(t, torch.Tensor)]
    if bad:
        raise BackendError(f"flatten takes torch tensors; #{bad[0]} is a {type(tensors[bad[0]]).__name__}",
                           "Flat buffers exist for torch only; use the list-based kernels for other libraries.")
    dtype = dtype if dtype is not None else _one("dtype", {t.dtype for t in tensors}, torch.float32)
    device = torch.device(device) if device is not None else _one("device", {t.device for t in tensors},
                                                                   torch.device("cpu"))
    layout = _layout(tuple(tuple(t.shape) for t in tensors))
    base = torch.empty(layout.numel, dtype=dtype, device=device)
    out = views(base, layout)
    with torch.no_grad():
        for view, t in zip(out, tensors):
            view.copy_(t)
    return FlatTensors(out, base, layout)


def flatten_module_(module: torch.nn.Module) -> FlatTensors:
    """Move ``module``'s parameters into one flat buffer, in place; the parameters themselves, as `FlatTensors`.

    Each parameter keeps its identity (optimizers, hooks and ``state_dict`` keep
    working) and ``requires_grad``; only its ``.data`` becomes a view of the buffer.
    Call it before building the optimizer (optimizer state is per-parameter and unaffected,
    but it is cleaner), and not again after ``module.to(...)``/``.half()``, which move
    parameters out of the buffer (call it again afterwards instead).
    """
    params = list(module.parameters())
    flat = flatten([p.detach() for p in params])
    for p, view in zip(params, flat):
        p.data = view
    return FlatTensors(params, flat.base, flat.layout)


def _one(what: str, found: set[Any], default: Any) -> Any:
    if len(found) > 1:
        names = ", ".join(sorted(str(f) for f in found))
        raise BackendError(f"one flat buffer holds one {what}, got {names}",
                           f"Flatten each {what} group separately (e.g. group the tensors by {what}).")
    return next(iter(found)) if found else default
