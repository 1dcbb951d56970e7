"""`BatchCheck`: what the trainer checks of a batch before a step uses it, cheaply enough for every step.

Every step refuses a batch with zero samples (`zero_samples`) before anything runs. A real step's
batch is then checked by the model itself (its errors become `BatchError`, a loss of another
library a `BackendError`). A predicted step without a forward check runs no model code, so it
compares the batch's structure with the batches the model accepted: containers (tuple, list,
mapping keys), leaf types, and for arrays their type (library), dtype, number of axes and the
sizes of every axis but the first. A batch that matches costs a walk over its containers, no
forward pass and no host read; one that differs gets one forward pass (no read), so the model
judges it exactly as a real step would: refused → the model's error, accepted → its structure
is merged into the reference (what differed becomes a wildcard) and costs nothing the next time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._errors import BackendError, BatchError, ModelError

__all__ = ["BatchCheck", "zero_samples"]

_ANY = "*"
"""A wildcard in a structure: anything goes there."""
_MAX_ITEMS = 64
"""Containers with more items are not described item by item (a list of texts, of per-sample arrays)."""
_MAX_DEPTH = 8


def _is_array(x: Any) -> bool:
    return isinstance(getattr(x, "shape", None), tuple)


def _samples(batch: Any, depth: int) -> bool | None:
    """True as soon as an array with a non-empty first axis is found; False if arrays with an axis were found
    and all are empty along it; None if there are none (within the walk's bounds)."""
    shape = getattr(batch, "shape", None)
    if isinstance(shape, tuple):
        return bool(shape[0]) if shape else None
    if depth >= _MAX_DEPTH:
        return None
    if isinstance(batch, (tuple, list)):
        items: Any = batch
    elif isinstance(batch, Mapping):
        items = batch.values()
    else:
        return None
    if len(items) > _MAX_ITEMS:
        return None
    found = None
    for item in items:
        has = _samples(item, depth + 1)
        if has:
            return True
        found = found if has is None else False
    return found


def _shapes(batch: Any, out: list[str], path: str, depth: int) -> None:
    """``path has shape …`` for every array with an axis in ``batch`` (for the message)."""
    if _is_array(batch):
        if batch.shape:
            out.append(f"{path} has shape {tuple(batch.shape)}")
    elif depth < _MAX_DEPTH and isinstance(batch, (tuple, list, Mapping)) and len(batch) <= _MAX_ITEMS:
        pairs = batch.items() if isinstance(batch, Mapping) else enumerate(batch)
        for key, value in pairs:
            _shapes(value, out, f"{path}[{key!r}]", depth + 1)


def zero_samples(batch: Any) -> str | None:
    """None, or a description of the arrays when ``batch`` holds arrays with an axis and every one of them
    has length 0 along its first axis (a batch of no samples)."""
    if _samples(batch, 0) is not False:
        return None
    found: list[str] = []
    _shapes(batch, found, "batch", 0)
    return ", ".join(found[:4]) + (", …" if len(found) > 4 else "")


def describe(batch: Any, depth: int = 0) -> Any:
    """The structure of ``batch`` as nested tuples (hashable, comparable); see the module docstring."""
    if _is_array(batch):
        shape = tuple(batch.shape)
        return ("array", type(batch), getattr(batch, "dtype", None), (_ANY, *shape[1:]) if shape else ())
    if depth >= _MAX_DEPTH:
        return _ANY
    if isinstance(batch, Mapping):
        if len(batch) > _MAX_ITEMS:
            return ("map", type(batch), _ANY, ())
        keys = sorted(batch, key=repr)
        return ("map", type(batch), tuple(map(repr, keys)), tuple(describe(batch[k], depth + 1) for k in keys))
    if isinstance(batch, (tuple, list)):
        if len(batch) > _MAX_ITEMS:
            return ("seq", type(batch), _ANY)
        return ("seq", type(batch), tuple(describe(v, depth + 1) for v in batch))
    return ("leaf", type(batch))


def merge(a: Any, b: Any) -> Any:
    """A structure both ``a`` and ``b`` conform to, with wildcards where they differ."""
    if a == b:
        return a
    if a is _ANY or b is _ANY or a[0] != b[0] or a[1] is not b[1]:
        return _ANY
    kind = a[0]
    if kind == "array":
        if a[2] != b[2] or len(a[3]) != len(b[3]):
            return _ANY
        return ("array", a[1], a[2], tuple(x if x == y else _ANY for x, y in zip(a[3], b[3])))
    if kind == "map":
        if a[2] is _ANY or a[2] != b[2]:
            return ("map", a[1], _ANY, ())
        return ("map", a[1], a[2], tuple(merge(x, y) for x, y in zip(a[3], b[3])))
    if kind == "seq":
        if a[2] is _ANY or b[2] is _ANY or len(a[2]) != len(b[2]):
            return ("seq", a[1], _ANY)
        return ("seq", a[1], tuple(merge(x, y) for x, y in zip(a[2], b[2])))
    return _ANY


def _name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__


def difference(batch: Any, ref: Any) -> str | None:
    """None if ``batch`` conforms to the structure ``ref``, else where and how it first differs."""
    found = _difference(batch, ref)
    if found is None:
        return None
    keys, what = found
    return "batch" + "".join(f"[{k!r}]" for k in reversed(keys)) + " " + what


def _difference(batch: Any, ref: Any) -> tuple[list[Any], str] | None:
    """(the keys leading to the first difference, innermost first; what differs) or None."""
    if ref is _ANY:
        return None
    kind, expected = ref[0], ref[1]
    if type(batch) is not expected:
        return [], f"is a {_name(type(batch))} where accepted batches had a {_name(expected)}"
    if kind == "array":
        dtype = getattr(batch, "dtype", None)
        if dtype != ref[2]:
            return [], f"has dtype {dtype} where accepted batches had {ref[2]}"
        shape, dims = batch.shape, ref[3]
        if len(shape) != len(dims) or any(d is not _ANY and d != n for d, n in zip(dims, shape)):
            return [], f"has shape {tuple(shape)} where accepted batches had ({', '.join(map(str, dims))})"
        return None
    if kind == "map":
        if ref[2] is _ANY:
            return None
        keys = sorted(batch, key=repr)
        if tuple(map(repr, keys)) != ref[2]:
            return [], f"has keys {', '.join(map(repr, keys))} where accepted batches had {', '.join(ref[2])}"
        pairs: Any = ((k, batch[k]) for k in keys)
        children = ref[3]
    elif kind == "seq":
        children = ref[2]
        if children is _ANY:
            return None
        if len(batch) != len(children):
            return [], f"has {len(batch)} items where accepted batches had {len(children)}"
        pairs = enumerate(batch)
    else:
        return None
    for (key, value), child in zip(pairs, children):
        found = _difference(value, child)
        if found is not None:
            found[0].append(key)
            return found
    return None


class BatchCheck:
    """Refuses empty batches, and checks the batches of predicted steps that run no forward pass."""

    def __init__(self) -> None:
        self.reference: Any = None
        """The structure of the batches the model accepted (None until the first; not saved in checkpoints)."""

    def before_step(self, batch: Any, step: int, phase: str) -> None:
        """`BatchError` (nothing changed) when ``batch`` has zero samples."""
        empty = zero_samples(batch)
        if empty is not None:
            raise BatchError(
                f"step {step} ({phase}): the batch has zero samples ({empty})",
                "The data pipeline yielded an empty batch (a filter that removed every sample, a last partial "
                "batch of size 0, an exhausted shard): drop empty batches before the trainer. The trainer was "
                "not changed.",
            )

    def accepted(self, batch: Any, widen: bool = False) -> None:
        """The model ran on ``batch`` without error: it is the reference if there is none yet; with ``widen``
        (a predicted step's forward check) the reference is widened to take it."""
        if self.reference is None:
            self.reference = describe(batch)
        elif widen and difference(batch, self.reference) is not None:
            self.reference = merge(self.reference, describe(batch))

    def unchecked(self, batch: Any, step: int, forward: Callable[[Any], Any]) -> bool:
        """Check the batch of a predicted step that runs no forward pass; True if it took one after all.

        A batch whose structure differs from the reference gets one forward pass (no host read): the
        model's refusal is raised (`BatchError`, `BackendError`), with what differed; an accepted batch
        widens the reference. With no reference yet (a trainer resumed inside PREDICT) the batch becomes it.
        """
        if self.reference is None:
            self.reference = describe(batch)
            return False
        differs = difference(batch, self.reference)
        if differs is None:
            return False
        try:
            forward(batch)
        except (BatchError, BackendError, ModelError) as exc:
            raise type(exc)(
                f"step {step} (predict, a step that runs no forward pass of its own): {differs}, and the model "
                f"refuses the batch: {exc.message}", exc.recovery) from exc
        self.reference = merge(self.reference, describe(batch))
        return True
