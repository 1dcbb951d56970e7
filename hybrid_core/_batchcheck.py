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
    return isinstance(getattr(x, "shape", None), tuple) and hasattr(x, "dtype")


def _leading(batch: Any, out: list[tuple[str, tuple[int, ...]]], path: str, depth: int) -> None:
    """(path, shape) of every array with at least one axis in ``batch``, within the walk's bounds."""
    if _is_array(batch):
        if len(batch.shape):
            out.append((path, tuple(batch.shape)))
    elif depth < _MAX_DEPTH and isinstance(batch, Mapping) and len(batch) <= _MAX_ITEMS:
        for key, value in batch.items():
            _leading(value, out, f"{path}[{key!r}]", depth + 1)
    elif depth < _MAX_DEPTH and isinstance(batch, (tuple, list)) and len(batch) <= _MAX_ITEMS:
        for i, value in enumerate(batch):
            _leading(value, out, f"{path}[{i}]", depth + 1)


def zero_samples(batch: Any) -> str | None:
    """None, or a description of the arrays when ``batch`` holds arrays with an axis and every one of them
    has length 0 along its first axis (a batch of no samples)."""
    found: list[tuple[str, tuple[int, ...]]] = []
    _leading(batch, found, "batch", 0)
    if not found or any(shape[0] for _, shape in found):
        return None
    return ", ".join(f"{path} has shape {shape}" for path, shape in found[:4]) + (", …" if len(found) > 4 else "")


def describe(batch: Any, depth: int = 0) -> Any:
    """The structure of ``batch`` as nested tuples (hashable, comparable); see the module docstring."""
    if _is_array(batch):
        shape = tuple(batch.shape)
        return ("array", type(batch), batch.dtype, (_ANY, *shape[1:]) if shape else ())
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
    if a == _ANY or b == _ANY or a[0] != b[0] or a[1] is not b[1]:
        return _ANY
    kind = a[0]
    if kind == "array":
        if a[2] != b[2] or len(a[3]) != len(b[3]):
            return _ANY
        return ("array", a[1], a[2], tuple(x if x == y else _ANY for x, y in zip(a[3], b[3])))
    if kind == "map":
        if a[2] != b[2] or a[2] == _ANY:
            return ("map", a[1], _ANY, ())
        return ("map", a[1], a[2], tuple(merge(x, y) for x, y in zip(a[3], b[3])))
    if kind == "seq":
        if a[2] == _ANY or b[2] == _ANY or len(a[2]) != len(b[2]):
            return ("seq", a[1], _ANY)
        return ("seq", a[1], tuple(merge(x, y) for x, y in zip(a[2], b[2])))
    return _ANY


def _name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__


def difference(batch: Any, ref: Any, path: str = "batch") -> str | None:
    """None if ``batch`` conforms to the structure ``ref``, else where and how it first differs."""
    if ref == _ANY:
        return None
    kind, expected = ref[0], ref[1]
    if type(batch) is not expected:
        return f"{path} is a {_name(type(batch))} where accepted batches had a {_name(expected)}"
    if kind == "array":
        if batch.dtype != ref[2]:
            return f"{path} has dtype {batch.dtype} where accepted batches had {ref[2]}"
        shape, dims = tuple(batch.shape), ref[3]
        if len(shape) != len(dims) or any(d != _ANY and d != s for d, s in zip(dims, shape)):
            return f"{path} has shape {shape} where accepted batches had ({', '.join(map(str, dims))})"
        return None
    if kind == "map":
        if ref[2] == _ANY:
            return None
        keys = sorted(batch, key=repr)
        if tuple(map(repr, keys)) != ref[2]:
            return f"{path} has keys {', '.join(map(repr, keys))} where accepted batches had {', '.join(ref[2])}"
        return next((d for k, r in zip(keys, ref[3]) if (d := difference(batch[k], r, f"{path}[{k!r}]"))), None)
    if kind == "seq":
        if ref[2] == _ANY:
            return None
        if len(batch) != len(ref[2]):
            return f"{path} has {len(batch)} items where accepted batches had {len(ref[2])}"
        return next((d for i, (v, r) in enumerate(zip(batch, ref[2])) if (d := difference(v, r, f"{path}[{i}]"))),
                    None)
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
