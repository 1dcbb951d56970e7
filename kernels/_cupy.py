"""CuPy launches of the CUDA C kernels in ``kernels/cuda/*.cu`` (compiled by NVRTC through `cupy.RawModule`).

The list kernels read an int64 table of sizes, device pointers and (tensor, start)
block pairs, so one launch covers every array of a dtype without copying them into
a flat buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cupy
import numpy as np

from ._tables import block_table

__all__ = ["SOURCES", "fused_axpy", "fused_stats", "gru_ensemble_rollout"]

SOURCES = Path(__file__).parent / "cuda"
"""Folder of the CUDA sources, one file per op."""

_CHUNK = 4096  # elements per thread block; matches CHUNK in the .cu files
_THREADS = 256  # matches THREADS in fused_stats.cu
_WIDTH = 6
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


@functools.cache
def _module(op: str) -> cupy.RawModule:
    return cupy.RawModule(code=(SOURCES / f"{op}.cu").read_text(encoding="utf-8"), options=("-std=c++14",))


def _kernel(op: str, name: str, dtype: Any) -> cupy.RawKernel:
    return _module(op).get_function(f"{name}_{_SUFFIX[np.dtype(dtype)]}")


def fused_axpy(params: Sequence[Any], direction: Sequence[Any], scale: float) -> list[Any]:
    """θ_i + s·d_i for every array: one launch per parameter dtype."""
    params = [cupy.ascontiguousarray(p) for p in params]
    direction = [cupy.ascontiguousarray(d.astype(p.dtype, copy=False)) for p, d in zip(params, direction)]
    out = [cupy.empty_like(p) for p in params]
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.dtype, []).append(i)
    for dtype, idx in groups.items():
        meta, n_blocks = _table([params[i] for i in idx], [[a[i] for i in idx] for a in (params, direction, out)])
        if n_blocks:
            _kernel("fused_axpy", "fused_axpy", dtype)((n_blocks,), (_THREADS,), (meta, np.int64(len(idx)),
                                                                                  dtype.type(scale)))
    return out


def fused_stats(loss: Any, grads: Sequence[Any], updates: Sequence[Any] | None) -> Any:
    """`reference.fused_stats` in two launches: per-block partials, then one reducing block."""
    dtype = loss.dtype
    gs = [cupy.ascontiguousarray(g.astype(dtype, copy=False)) for g in grads]
    us = gs if updates is None else [cupy.ascontiguousarray(u.astype(dtype, copy=False)) for u in updates]
    meta, n_blocks = _table(gs, [gs, us])
    partials = cupy.zeros((max(n_blocks, 1), _WIDTH), dtype=cupy.float64)
    if n_blocks:
        _kernel("fused_stats", "stats_partials", dtype)(
            (n_blocks,), (_THREADS,), (meta, np.int64(len(gs)), np.int32(updates is not None), partials))
    out = cupy.empty((6,), dtype=dtype)
    _kernel("fused_stats", "stats_finish", dtype)(
        (1,), (_THREADS,), (partials, np.int64(n_blocks), cupy.ascontiguousarray(loss.reshape(1)), out))
    return out


def gru_ensemble_rollout(w_x: Any, w_h: Any, b_x: Any, b_h: Any, h0: Any, x: Any) -> Any:
    """`reference.gru_ensemble_rollout` in one launch, one thread block per ensemble member."""
    ensemble, steps, inputs = x.shape
    hidden = h0.shape[1]
    dtype = h0.dtype
    out = cupy.empty((ensemble, steps, hidden), dtype=dtype)
    if ensemble and steps:
        arrays = [cupy.ascontiguousarray(a.astype(dtype, copy=False)) for a in (w_x, w_h, b_x, b_h, h0, x)]
        threads = min(1024, -(-hidden // 32) * 32)
        _kernel("gru_ensemble_rollout", "gru_rollout", dtype)(
            (ensemble,), (threads,), (*arrays, out, np.int64(steps), np.int64(inputs), np.int64(hidden)),
            shared_mem=hidden * dtype.itemsize)
    return out


def _table(sized: Sequence[Any], columns: Sequence[Sequence[Any]]) -> tuple[Any, int]:
    table, n_blocks = block_table([a.size for a in sized], [a.data.ptr for column in columns for a in column], _CHUNK)
    return cupy.asarray(table), n_blocks
