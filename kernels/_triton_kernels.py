"""Triton kernels on torch tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``).

One launch covers every tensor of a list: the host packs a small int64 table
(sizes, data pointers, then a (tensor, start) pair per BLOCK-element block) that the
kernel reads to find its block, so nothing is copied into a flat buffer. A list
whose tensors have different dtypes gets one launch per dtype. All arithmetic is
in float32; results are stored in the tensors' own dtype.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from ._tables import block_table

__all__ = ["INTERPRETED", "axpy", "gru", "stats"]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels below were built for Triton's CPU interpreter (decided at import)."""

BLOCK = 1024
_PARTIAL_WIDTH = 8  # Σg², Σu², Σg·u, max|g| (NaN ignored), non-finite count, NaN count, 2 spare (alignment)
_FLOAT32_MAX = 3.4028234663852886e38
_ELEMENT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

Tensor = torch.Tensor


@triton.jit
def _axpy_kernel(meta, n_tensors, scale, ELEM: tl.constexpr, BLOCK: tl.constexpr):
    # meta: sizes, param ptrs, direction ptrs, output ptrs (n_tensors each), then (tensor, start) per block.
    pid = tl.program_id(0)
    t = tl.load(meta + 4 * n_tensors + 2 * pid)
    start = tl.load(meta + 4 * n_tensors + 2 * pid + 1)
    numel = tl.load(meta + t)
    p = tl.load(meta + n_tensors + t).to(tl.pointer_type(ELEM), bitcast=True)
    d = tl.load(meta + 2 * n_tensors + t).to(tl.pointer_type(ELEM), bitcast=True)
    o = tl.load(meta + 3 * n_tensors + t).to(tl.pointer_type(ELEM), bitcast=True)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(d + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o + offs, (x + scale * y).to(ELEM), mask=mask)


@triton.jit
def _stats_partials_kernel(meta, n_tensors, partials, ELEM: tl.constexpr, HAS_UPDATES: tl.constexpr,
                           BLOCK: tl.constexpr, WIDTH: tl.constexpr, FMAX: tl.constexpr):
    # meta: sizes, grad ptrs, update ptrs (n_tensors each), then (tensor, start) per block.
    pid = tl.program_id(0)
    t = tl.load(meta + 3 * n_tensors + 2 * pid)
    start = tl.load(meta + 3 * n_tensors + 2 * pid + 1)
    numel = tl.load(meta + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    g_ptr = tl.load(meta + n_tensors + t).to(tl.pointer_type(ELEM), bitcast=True)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(g)
    is_nan = g != g
    row = partials + pid * WIDTH
    tl.store(row + 0, tl.sum(g * g, axis=0))
    tl.store(row + 3, tl.max(tl.where(is_nan, 0.0, a), axis=0))
    # NaN fails every comparison, so `a <= FMAX` is false exactly for ±inf and NaN.
    tl.store(row + 4, tl.sum(tl.where(a <= FMAX, 0.0, 1.0), axis=0))
    tl.store(row + 5, tl.sum(tl.where(is_nan, 1.0, 0.0), axis=0))
    if HAS_UPDATES:
        u_ptr = tl.load(meta + 2 * n_tensors + t).to(tl.pointer_type(ELEM), bitcast=True)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(row + 1, tl.sum(u * u, axis=0))
        tl.store(row + 2, tl.sum(g * u, axis=0))
    else:
        tl.store(row + 1, 0.0)
        tl.store(row + 2, 0.0)


@triton.jit
def _stats_finish_kernel(partials, n_rows, loss, out, WIDTH: tl.constexpr, RBLOCK: tl.constexpr):
    grad_sq = tl.zeros([RBLOCK], tl.float32)
    update_sq = tl.zeros([RBLOCK], tl.float32)
    dot = tl.zeros([RBLOCK], tl.float32)
    grad_max = tl.zeros([RBLOCK], tl.float32)
    nonfinite = tl.zeros([RBLOCK], tl.float32)
    nans = tl.zeros([RBLOCK], tl.float32)
    for r0 in range(0, n_rows, RBLOCK):
        rows = r0 + tl.arange(0, RBLOCK)
        mask = rows < n_rows
        base = partials + rows * WIDTH
        grad_sq += tl.load(base + 0, mask=mask, other=0.0)
        update_sq += tl.load(base + 1, mask=mask, other=0.0)
        dot += tl.load(base + 2, mask=mask, other=0.0)
        grad_max = tl.maximum(grad_max, tl.load(base + 3, mask=mask, other=0.0))
        nonfinite += tl.load(base + 4, mask=mask, other=0.0)
        nans += tl.load(base + 5, mask=mask, other=0.0)
    out_type = out.dtype.element_ty
    largest = tl.max(grad_max, axis=0)
    tl.store(out + 0, tl.load(loss).to(out_type))
    tl.store(out + 1, tl.sum(grad_sq, axis=0).to(out_type))
    tl.store(out + 2, tl.sum(update_sq, axis=0).to(out_type))
    tl.store(out + 3, tl.sum(dot, axis=0).to(out_type))
    tl.store(out + 4, tl.where(tl.sum(nans, axis=0) > 0, float("nan"), largest).to(out_type))
    tl.store(out + 5, tl.sum(nonfinite, axis=0).to(out_type))


@triton.jit
def _sigmoid(v):
    e = tl.exp(-tl.abs(v))  # in (0, 1]: cannot overflow
    return tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _tanh(v):
    e = tl.exp(-2.0 * tl.abs(v))
    m = (1.0 - e) / (1.0 + e)
    return tl.where(v >= 0, m, -m)


@triton.jit
def _gru_kernel(w_x, w_h, b_x, b_h, h0, x, out, T, D, H, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program per ensemble member walks all T steps. Step t reads h_{t-1} (h0, or the
    # row of `out` written at t-1) in tiles, so any H fits; the barrier makes step t's
    # stores visible to every thread of the program before step t+1 reads them.
    e = tl.program_id(0).to(tl.int64)
    G = 3 * H
    w_x_e = w_x + e * D * G
    w_h_e = w_h + e * H * G
    b_x_e = b_x + e * G
    b_h_e = b_h + e * G
    x_e = x + e * T * D
    out_e = out + e * T * H
    out_type = out.dtype.element_ty
    for t in range(T):
        prev = h0 + e * H
        if t > 0:
            prev = out_e + (t - 1) * H
        for j0 in range(0, H, BLOCK_H):
            j = j0 + tl.arange(0, BLOCK_H)
            jm = j < H
            acc_r = tl.load(b_x_e + j, mask=jm, other=0.0).to(tl.float32)
            acc_r += tl.load(b_h_e + j, mask=jm, other=0.0).to(tl.float32)
            acc_z = tl.load(b_x_e + H + j, mask=jm, other=0.0).to(tl.float32)
            acc_z += tl.load(b_h_e + H + j, mask=jm, other=0.0).to(tl.float32)
            acc_xn = tl.load(b_x_e + 2 * H + j, mask=jm, other=0.0).to(tl.float32)
            acc_hn = tl.load(b_h_e + 2 * H + j, mask=jm, other=0.0).to(tl.float32)
            for k0 in range(0, D, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                km = k < D
                xk = tl.load(x_e + t * D + k, mask=km, other=0.0).to(tl.float32)[:, None]
                w = w_x_e + k[:, None] * G + j[None, :]
                wm = km[:, None] & jm[None, :]
                acc_r += tl.sum(xk * tl.load(w, mask=wm, other=0.0).to(tl.float32), axis=0)
                acc_z += tl.sum(xk * tl.load(w + H, mask=wm, other=0.0).to(tl.float32), axis=0)
                acc_xn += tl.sum(xk * tl.load(w + 2 * H, mask=wm, other=0.0).to(tl.float32), axis=0)
            for k0 in range(0, H, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                km = k < H
                hk = tl.load(prev + k, mask=km, other=0.0).to(tl.float32)[:, None]
                w = w_h_e + k[:, None] * G + j[None, :]
                wm = km[:, None] & jm[None, :]
                acc_r += tl.sum(hk * tl.load(w, mask=wm, other=0.0).to(tl.float32), axis=0)
                acc_z += tl.sum(hk * tl.load(w + H, mask=wm, other=0.0).to(tl.float32), axis=0)
                acc_hn += tl.sum(hk * tl.load(w + 2 * H, mask=wm, other=0.0).to(tl.float32), axis=0)
            r = _sigmoid(acc_r)
            z = _sigmoid(acc_z)
            n = _tanh(acc_xn + r * acc_hn)
            h_old = tl.load(prev + j, mask=jm, other=0.0).to(tl.float32)
            tl.store(out_e + t * H + j, ((1.0 - z) * n + z * h_old).to(out_type), mask=jm)
        tl.debug_barrier()


def axpy(params: Sequence[Tensor], direction: Sequence[Tensor], scale: float) -> list[Tensor]:
    """θ_i + s·d_i for every tensor: one launch per parameter dtype."""
    params = [p.contiguous() for p in params]
    direction = [(d if d.dtype == p.dtype else d.to(p.dtype)).contiguous() for p, d in zip(params, direction)]
    out = [torch.empty_like(p) for p in params]
    for dtype, idx in _by_dtype(params).items():
        meta, n_blocks = _table([params[i] for i in idx],
                                [[params[i] for i in idx], [direction[i] for i in idx], [out[i] for i in idx]])
        if n_blocks:
            with _quiet():
                _axpy_kernel[(n_blocks,)](meta, len(idx), scale, ELEM=_ELEMENT[dtype], BLOCK=BLOCK)
    return out


def stats(loss: Tensor, grads: Sequence[Tensor], updates: Sequence[Tensor] | None) -> Tensor:
    """`reference.fused_stats` in two launches: per-block partials, then one program that reduces them."""
    dtype = loss.dtype
    gs = [(g if g.dtype == dtype else g.to(dtype)).contiguous() for g in grads]
    columns = [gs]
    if updates is not None:
        columns.append([(u if u.dtype == dtype else u.to(dtype)).contiguous() for u in updates])
    else:
        columns.append(gs)  # never read: HAS_UPDATES is False
    meta, n_blocks = _table(gs, columns)
    partials = torch.empty((max(n_blocks, 1), _PARTIAL_WIDTH), dtype=torch.float32, device=loss.device)
    out = torch.empty((6,), dtype=dtype, device=loss.device)
    with _quiet():
        if n_blocks:
            _stats_partials_kernel[(n_blocks,)](meta, len(gs), partials, ELEM=_ELEMENT[dtype],
                                                HAS_UPDATES=updates is not None, BLOCK=BLOCK,
                                                WIDTH=_PARTIAL_WIDTH, FMAX=_FLOAT32_MAX)
        _stats_finish_kernel[(1,)](partials, n_blocks, loss.contiguous(), out, WIDTH=_PARTIAL_WIDTH, RBLOCK=256)
    return out


def gru(w_x: Tensor, w_h: Tensor, b_x: Tensor, b_h: Tensor, h0: Tensor, x: Tensor) -> Tensor:
    """`reference.gru_ensemble_rollout` in one launch, one program per ensemble member."""
    ensemble, steps, inputs = x.shape
    hidden = h0.shape[1]
    out = torch.empty((ensemble, steps, hidden), dtype=h0.dtype, device=h0.device)
    if ensemble and steps:
        _gru_kernel[(ensemble,)](w_x.contiguous(), w_h.contiguous(), b_x.contiguous(), b_h.contiguous(),
                                 h0.contiguous(), x.contiguous(), out, steps, inputs, hidden,
                                 BLOCK_H=min(64, triton.next_power_of_2(hidden)),
                                 BLOCK_K=min(64, triton.next_power_of_2(max(inputs, hidden))))
    return out


def _quiet() -> contextlib.AbstractContextManager[object]:
    # The interpreter computes with NumPy, which warns about the inf/NaN that are data here.
    return np.errstate(all="ignore") if INTERPRETED else contextlib.nullcontext()


def _by_dtype(tensors: Sequence[Tensor]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


def _table(sized: Sequence[Tensor], columns: Sequence[Sequence[Tensor]]) -> tuple[Tensor, int]:
    table, n_blocks = block_table([t.numel() for t in sized], [t.data_ptr() for column in columns for t in column],
                                  BLOCK)
    device = sized[0].device if sized else torch.device("cpu")
    return torch.from_numpy(table).to(device), n_blocks
