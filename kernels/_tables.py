"""The int64 block table the pointer-table kernels (Triton, CUDA) read to cover a whole list in one launch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["block_table"]


def block_table(sizes: Sequence[int], pointers: Sequence[int], chunk: int) -> tuple[np.ndarray, int]:
    """The table ``[sizes..., pointers..., (tensor, start) per chunk-element block]`` and its block count.

    ``pointers`` holds one column of ``len(sizes)`` device addresses per array list
    (e.g. params, directions, outputs), concatenated. Empty tensors get no block.
    """
    counts = np.asarray(sizes, dtype=np.int64)
    blocks = -(-counts // chunk)
    n_blocks = int(blocks.sum())
    owner = np.repeat(np.arange(len(counts), dtype=np.int64), blocks)
    first = np.repeat(np.cumsum(blocks) - blocks, blocks)
    starts = (np.arange(n_blocks, dtype=np.int64) - first) * chunk
    pairs = np.stack([owner, starts], axis=1).reshape(-1)
    return np.concatenate([counts, np.asarray(pointers, dtype=np.int64), pairs]), n_blocks
