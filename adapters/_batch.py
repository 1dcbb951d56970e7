"""What the framework adapters share: walking a batch's arrays and naming their library."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import array_api_compat
import numpy as np

from hybrid_core._backend import library_name

__all__ = ["batch_leaves", "library_of"]


def batch_leaves(batch: Any) -> Iterator[Any]:
    """Every leaf of ``batch``, looking inside tuples, lists and mappings."""
    if isinstance(batch, Mapping):
        for value in batch.values():
            yield from batch_leaves(value)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from batch_leaves(value)
    else:
        yield batch


def library_of(value: Any) -> str | None:
    """The array library of ``value`` ('numpy', 'torch', 'jax', ...), or ``None`` if it is not an array.

    NumPy scalars (``np.float32(1.0)``) count as numbers, not arrays: every framework accepts them.
    """
    if isinstance(value, np.generic) or not array_api_compat.is_array_api_obj(value):
        return None
    return library_name(array_api_compat.array_namespace(value))
