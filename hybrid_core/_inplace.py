"""Whole-parameter list updates done in place where the library allows it (torch, NumPy), else functionally.

The read-out and the learning-rate estimate touch every parameter; in place, on torch through one
``torch._foreach_*`` call per list, they allocate nothing parameter-sized once their buffers exist.
JAX arrays are immutable: a snapshot keeps the arrays themselves, and each list operation is one
jitted call (one dispatch instead of several per parameter). Other libraries get the array-API
expression (a new array per parameter).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import array_api_compat

from ._protocols import Array

__all__ = ["abs_sum", "abs_sums", "copy_into", "dot", "lerp_", "scale_add_"]


def _torch(arrays: Sequence[Array]) -> bool:
    return bool(arrays) and array_api_compat.is_torch_array(arrays[0])


def _numpy(arrays: Sequence[Array]) -> bool:
    return bool(arrays) and array_api_compat.is_numpy_array(arrays[0])


def _jax(arrays: Sequence[Array]) -> bool:
    return bool(arrays) and array_api_compat.is_jax_array(arrays[0])


@functools.cache
def _jax_ops() -> dict[str, Any]:
    """The list operations as jitted JAX functions (compiled once per list structure; weights are traced)."""
    import jax
    import jax.numpy as jnp

    return {
        "lerp": jax.jit(lambda t, s, w: [a + w * (b - a) for a, b in zip(t, s)]),
        "scale_add": jax.jit(lambda t, c, s, w: [c * a + w * b for a, b in zip(t, s)]),
        "dot": jax.jit(lambda x, y: sum(jnp.vdot(a.ravel(), b.ravel().astype(a.dtype)) for a, b in zip(x, y))),
        "abs_sum": jax.jit(lambda x: sum(jnp.sum(jnp.abs(a)) for a in x)),
    }


def copy_into(target: list[Array] | None, source: Sequence[Array]) -> list[Array]:
    """``source``'s values in ``target``'s buffers when it has them (torch, NumPy), else in fresh arrays."""
    if target is not None and _torch(target):
        import torch

        with torch.no_grad():
            torch._foreach_copy_(target, list(source))
        return target
    if target is not None and _numpy(target):
        for t, s in zip(target, source):
            t[...] = s
        return target
    if _torch(source):
        return [s.detach().clone() for s in source]
    if _jax(source):
        return list(source)  # immutable: the arrays themselves are the snapshot
    return [s * 1 for s in source]


def lerp_(target: list[Array], source: Sequence[Array], weight: float) -> list[Array]:
    """target ← target + weight·(source − target), in place where possible; returns the result."""
    if _torch(target):
        import torch

        with torch.no_grad():
            torch._foreach_lerp_(target, list(source), float(weight))
        return target
    if _numpy(target):
        for t, s in zip(target, source):
            t *= 1.0 - weight
            t += weight * s
        return target
    if _jax(target):
        return list(_jax_ops()["lerp"](list(target), list(source), float(weight)))
    return [(1.0 - weight) * t + weight * s for t, s in zip(target, source)]


def scale_add_(target: list[Array], scale: float, source: Sequence[Array], weight: float) -> list[Array]:
    """target ← scale·target + weight·source, in place where possible; returns the result."""
    if _torch(target):
        import torch

        with torch.no_grad():
            torch._foreach_mul_(target, float(scale))
            torch._foreach_add_(target, list(source), alpha=float(weight))
        return target
    if _numpy(target):
        for t, s in zip(target, source):
            t *= scale
            t += weight * s
        return target
    if _jax(target):
        return list(_jax_ops()["scale_add"](list(target), float(scale), list(source), float(weight)))
    return [scale * t + weight * s for t, s in zip(target, source)]


def dot(xp: Any, first: Sequence[Array], second: Sequence[Array]) -> Array:
    """Σᵢ ⟨firstᵢ, secondᵢ⟩ as a 0-d device array (torch: no parameter-sized temporary)."""
    if _torch(first):
        import torch

        with torch.no_grad():
            dots = [torch.dot(a.reshape(-1), b.reshape(-1).to(a.dtype)) for a, b in zip(first, second)]
            return torch.stack(dots).sum()
    if _jax(first):
        return _jax_ops()["dot"](list(first), list(second))
    total = None
    for a, b in zip(first, second):
        term = xp.sum(a * b)
        total = term if total is None else total + term
    return total


def abs_sum(xp: Any, arrays: Sequence[Array]) -> Array:
    """Σ |x| over every entry, a 0-d device array (torch: one ``_foreach_norm``)."""
    if _torch(arrays):
        import torch

        with torch.no_grad():
            return torch.stack(torch._foreach_norm(list(arrays), 1)).sum()
    if _jax(arrays):
        return _jax_ops()["abs_sum"](list(arrays))
    total = None
    for a in arrays:
        term = xp.sum(xp.abs(a))
        total = term if total is None else total + term
    return total


def abs_sums(xp: Any, arrays: Sequence[Array]) -> Array:
    """[Σ |x| of each array] as one 1-D float32 device array (torch: one ``_foreach_norm``)."""
    if _torch(arrays):
        import torch

        with torch.no_grad():
            return torch.stack([n.to(torch.float32) for n in torch._foreach_norm(list(arrays), 1)])
    return xp.stack([xp.astype(xp.sum(xp.abs(a)), xp.float32) for a in arrays])
