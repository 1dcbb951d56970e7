"""PyTorch implementations: ``torch._foreach_*`` fast paths and the Triton entry points.

Importing this module registers the ops ``torch.ops.hybrid_core.fused_axpy``,
``fused_stats`` and ``gru_ensemble_rollout`` with `torch.library.custom_op`: their
CPU (and any non-CUDA) kernel is the fast path here, their CUDA kernel is Triton,
and a fake kernel gives output shapes, so ``torch.compile`` traces them on any
machine, with or without a GPU or Triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hybrid_core._errors import BackendError, ModelError

from . import reference

__all__ = ["foreach_axpy", "foreach_axpy_", "foreach_stats", "triton_axpy", "triton_gru", "triton_stats"]

Tensor = torch.Tensor


def foreach_axpy(params: Sequence[Tensor], direction: Sequence[Tensor], scale: float) -> list[Tensor]:
    """θ_i + s·d_i for every tensor in one ``torch._foreach_add`` call."""
    if not params:
        return []
    direction = [d if d.dtype == p.dtype else d.to(p.dtype) for p, d in zip(params, direction)]
    return list(torch._foreach_add(list(params), direction, alpha=scale))


def foreach_axpy_(params: Sequence[Tensor], direction: Sequence[Tensor], scale: float) -> Sequence[Tensor]:
    """θ_i += s·d_i in one ``torch._foreach_add_`` call (no autograd); returns ``params``.

    ``_foreach_add_`` would broadcast a mismatched d_i, so shapes are checked first, in
    the same Python pass that finds d_i needing a cast to θ_i's dtype.
    """
    if not params:
        return params
    cast = False
    for i, (p, d) in enumerate(zip(params, direction)):
        if not isinstance(d, Tensor) or not isinstance(p, Tensor):
            raise BackendError(f"fused_axpy_ on torch tensors got a {type(p if isinstance(d, Tensor) else d).__name__} "
                               f"at #{i}", "Give every parameter and direction as torch tensors.")
        if p.shape != d.shape:
            raise ModelError(f"direction shapes differ from their tensors': #{i}: {tuple(d.shape)} != {tuple(p.shape)}",
                             "Give direction arrays shaped like the tensors they pair with.")
        cast = cast or d.dtype != p.dtype
    if params[0].device != direction[0].device:  # torch reports other pairs (CPU with CUDA) itself
        raise BackendError(f"fused_axpy_ got parameters on {params[0].device} and directions on "
                           f"{direction[0].device}")
    if cast:
        direction = [d if d.dtype == p.dtype else d.to(p.dtype) for p, d in zip(params, direction)]
    try:
        with torch.no_grad():
            torch._foreach_add_(list(params), list(direction), alpha=scale)
    except RuntimeError as exc:  # e.g. tensors on different devices
        raise BackendError(f"fused_axpy_ could not add the directions: {exc}") from exc
    return params


def foreach_stats(loss: Tensor, grads: Sequence[Tensor], updates: Sequence[Tensor] | None) -> Tensor:
    """`reference.fused_stats` with Σg², Σu² and max|g| from ``torch._foreach_norm``.

    There is no foreach dot product, so Σg·u is one ``torch.dot`` per tensor. The
    non-finite count costs a per-tensor pass on the CPU only when Σg² is not finite (any
    inf/NaN entry makes it so), i.e. on the steps the trainer is about to reject; on a GPU
    it always runs, so that no value is read back here.
    """
    dtype = loss.dtype
    keep = [i for i, g in enumerate(grads) if g.numel()]
    gs = [_as(grads[i], dtype) for i in keep]
    zero = loss.new_zeros((), dtype=dtype)
    if not gs:
        return torch.stack([loss.reshape(()), zero, zero, zero, zero, zero])
    grad_sq = torch.stack(torch._foreach_norm(gs)).square().sum()
    if gs[0].device.type == "cpu":
        # foreach's inf-norm takes a slow path on CPU (~0.4 ms for 30 small tensors); one
        # aminmax per tensor is ~5x cheaper. NaN propagates through both, as it must.
        lows_highs = [torch.aminmax(g) for g in gs]
        grad_max = torch.maximum(torch.stack([lo for lo, _ in lows_highs]).neg().max(),
                                 torch.stack([hi for _, hi in lows_highs]).max())
    else:
        grad_max = torch.stack(torch._foreach_norm(gs, float("inf"))).max()
    update_sq = dot = zero
    if updates is not None:
        us = [_as(updates[i], dtype) for i in keep]
        update_sq = torch.stack(torch._foreach_norm(us)).square().sum()
        dot = torch.stack([torch.dot(g.reshape(-1), u.reshape(-1)) for g, u in zip(gs, us)]).sum()
    nonfinite = zero
    # On the CPU reading Σg² costs no device sync, so the per-tensor count runs only when an
    # entry is non-finite; on a GPU it always runs, queued, so the caller's read stays the only sync.
    if gs[0].device.type != "cpu" or not bool(torch.isfinite(grad_sq)):
        nonfinite = sum((torch.count_nonzero(~torch.isfinite(g)) for g in gs), start=zero).to(dtype)
    return torch.stack([loss.reshape(()), grad_sq, update_sq, dot, grad_max, nonfinite])


def triton_axpy(params: Sequence[Tensor], direction: Sequence[Tensor], scale: float) -> list[Tensor]:
    """`fused_axpy` through Triton: the custom op on CUDA, the interpreter launch on CPU."""
    if not params:
        return []
    if params[0].is_cuda:
        return list(torch.ops.hybrid_core.fused_axpy(list(params), list(direction), float(scale)))
    from . import _triton_kernels

    return _triton_kernels.axpy(params, direction, float(scale))


def triton_stats(loss: Tensor, grads: Sequence[Tensor], updates: Sequence[Tensor] | None) -> Tensor:
    """`fused_stats` through Triton: the custom op on CUDA, the interpreter launch on CPU."""
    if loss.is_cuda:
        return torch.ops.hybrid_core.fused_stats(loss, list(grads), list(updates or []))
    from . import _triton_kernels

    return _triton_kernels.stats(loss, grads, updates)


def triton_gru(w_x: Tensor, w_h: Tensor, b_x: Tensor, b_h: Tensor, h0: Tensor, x: Tensor) -> Tensor:
    """`gru_ensemble_rollout` through Triton: the custom op on CUDA, the interpreter launch on CPU."""
    if x.is_cuda:
        return torch.ops.hybrid_core.gru_ensemble_rollout(w_x, w_h, b_x, b_h, h0, x)
    from . import _triton_kernels

    return _triton_kernels.gru(w_x, w_h, b_x, b_h, h0, x)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# -- custom ops: CPU = the fast path above, CUDA = Triton, fake = shapes for torch.compile -------------------


@torch.library.custom_op("hybrid_core::fused_axpy", mutates_args=())
def _axpy_op(params: list[Tensor], direction: list[Tensor], scale: float) -> list[Tensor]:
    return foreach_axpy(params, direction, scale)


@_axpy_op.register_kernel("cuda")
def _axpy_cuda(params: list[Tensor], direction: list[Tensor], scale: float) -> list[Tensor]:
    from . import _triton_kernels

    return _triton_kernels.axpy(params, direction, scale)


@_axpy_op.register_fake
def _axpy_fake(params: list[Tensor], direction: list[Tensor], scale: float) -> list[Tensor]:
    return [torch.empty_like(p) for p in params]


# custom_op schemas cannot hold Optional[list[Tensor]]: an empty ``updates`` list stands for None.
@torch.library.custom_op("hybrid_core::fused_stats", mutates_args=())
def _stats_op(loss: Tensor, grads: list[Tensor], updates: list[Tensor]) -> Tensor:
    return foreach_stats(loss, grads, updates if updates else None)


@_stats_op.register_kernel("cuda")
def _stats_cuda(loss: Tensor, grads: list[Tensor], updates: list[Tensor]) -> Tensor:
    from . import _triton_kernels

    return _triton_kernels.stats(loss, grads, updates if updates else None)


@_stats_op.register_fake
def _stats_fake(loss: Tensor, grads: list[Tensor], updates: list[Tensor]) -> Tensor:
    return loss.new_empty((len(reference.STATS_FIELDS),))


@torch.library.custom_op("hybrid_core::gru_ensemble_rollout", mutates_args=())
def _gru_op(w_x: Tensor, w_h: Tensor, b_x: Tensor, b_h: Tensor, h0: Tensor, x: Tensor) -> Tensor:
    return reference.gru_ensemble_rollout(w_x, w_h, b_x, b_h, h0, x)


@_gru_op.register_kernel("cuda")
def _gru_cuda(w_x: Tensor, w_h: Tensor, b_x: Tensor, b_h: Tensor, h0: Tensor, x: Tensor) -> Tensor:
    from . import _triton_kernels

    return _triton_kernels.gru(w_x, w_h, b_x, b_h, h0, x)


@_gru_op.register_fake
def _gru_fake(w_x: Tensor, w_h: Tensor, b_x: Tensor, b_h: Tensor, h0: Tensor, x: Tensor) -> Tensor:
    return h0.new_empty((x.shape[0], x.shape[1], h0.shape[1]))
