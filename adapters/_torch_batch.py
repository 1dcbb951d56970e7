"""What `TorchModel` does to a batch before its forward pass: move it to the model's device, and cut it
into the micro-batches of gradient accumulation.

Both walk the same containers as the device check (`batch_leaves`): tuples (named ones included),
lists and mappings; any other object is a leaf, passed on unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from hybrid_core._errors import BackendError, BatchError

__all__ = ["map_tensors", "split_batch", "to_device"]


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor leaf; the very same object when ``fn`` changed nothing."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        items = {k: map_tensors(v, fn) for k, v in batch.items()}
        if all(items[k] is v for k, v in batch.items()):
            return batch
        try:
            return type(batch)(items)
        except TypeError:  # a mapping type that cannot be built from a dict
            return items
    if isinstance(batch, (tuple, list)):
        items_list = [map_tensors(v, fn) for v in batch]
        if all(a is b for a, b in zip(items_list, batch)):
            return batch
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
            return type(batch)(*items_list)
        return type(batch)(items_list)
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of ``batch`` on ``device`` (``Tensor.to``; a tensor already there is passed as is).

    `BackendError` for a tensor that cannot be moved: one on the ``meta`` device (it holds no data),
    or one torch refuses to copy.
    """

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            return t
        if t.device.type == "meta":
            raise BackendError(f"the batch holds a tensor on the meta device (no data) but the model is on {device}",
                               "Build the batch from real data (a tensor on the meta device has shape only).")
        try:
            return t.to(device, non_blocking=True)
        except (RuntimeError, NotImplementedError, AssertionError) as exc:
            raise BackendError(f"the batch holds a tensor on {t.device} that cannot be moved to {device}: {exc}",
                               f"Move the batch to {device} yourself, or build it there.") from exc

    return map_tensors(batch, move)


def split_batch(batch: Any, parts: int) -> list[tuple[float, Any]]:
    """``batch`` cut into at most ``parts`` micro-batches along the first dimension, each with its weight
    (its share of the examples), so that Σ weight·mean-loss(micro) = mean-loss(batch).

    Every tensor with at least one dimension is cut (``torch.tensor_split``: sizes differ by at most one);
    0-d tensors and other leaves go whole into every micro-batch. A batch with fewer examples than ``parts``
    gives one micro-batch per example. `BatchError` if the tensors disagree on the number of examples.
    """
    sizes = set()

    def size(t: torch.Tensor) -> torch.Tensor:
        if t.dim() > 0:
            sizes.add(int(t.shape[0]))
        return t

    map_tensors(batch, size)
    if len(sizes) > 1:
        raise BatchError(f"gradient accumulation cuts the batch along its first dimension, but its tensors hold "
                         f"{sorted(sizes)} examples", "Give every tensor of the batch the same first dimension "
                         "(the examples), or use accumulate=1.")
    if not sizes or parts == 1:
        return [(1.0, batch)]
    total = sizes.pop()
    count = min(parts, total)
    if count <= 1:
        return [(1.0, batch)]
    chunks: dict[int, tuple[torch.Tensor, ...]] = {}

    def piece(t: torch.Tensor, i: int) -> torch.Tensor:
        if t.dim() == 0:
            return t
        if id(t) not in chunks:
            chunks[id(t)] = torch.tensor_split(t, count)
        return chunks[id(t)][i]

    pieces: list[tuple[float, Any]] = []
    for i in range(count):
        micro = map_tensors(batch, lambda t, i=i: piece(t, i))
        n = total // count + (1 if i < total % count else 0)
        pieces.append((n / total, micro))
    return pieces
