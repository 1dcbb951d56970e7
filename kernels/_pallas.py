"""Pallas kernels on JAX arrays (GPU/TPU, or CPU with ``interpret=True``).

Pallas has no pointer tables, so the list ops run as one ``pallas_call`` per dtype
over a flat buffer (the tensors concatenated and zero-padded to whole blocks),
inside one jitted function so XLA fuses the packing and unpacking. Arrays on a
CPU device run in the Pallas interpreter.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["fused_axpy", "fused_stats", "gru_ensemble_rollout"]

BLOCK = 1024
_WIDTH = 8  # per-block partials: Σg², Σu², Σg·u, max|g| (NaN ignored), non-finite count, NaN count, 2 spare


def fused_axpy(params: Sequence[Any], direction: Sequence[Any], scale: float) -> list[Any]:
    """θ_i + s·d_i for every array: one Pallas call per parameter dtype."""
    if not params:
        return []
    return list(_axpy(list(params), list(direction), scale, interpret=_on_cpu(params[0])))


def fused_stats(loss: Any, grads: Sequence[Any], updates: Sequence[Any] | None) -> Any:
    """`reference.fused_stats`: one Pallas call writes per-block partials, XLA reduces them."""
    return _stats(loss, list(grads), None if updates is None else list(updates), interpret=_on_cpu(loss))


def gru_ensemble_rollout(w_x: Any, w_h: Any, b_x: Any, b_h: Any, h0: Any, x: Any) -> Any:
    """`reference.gru_ensemble_rollout` as one Pallas call, one program per ensemble member."""
    return _gru(w_x, w_h, b_x, b_h, h0, x, interpret=_on_cpu(x))


def _on_cpu(x: Any) -> bool:
    if isinstance(x, jax.core.Tracer):  # called under the caller's jit: no concrete device yet
        return jax.default_backend() == "cpu"
    return all(d.platform == "cpu" for d in x.devices())


def _pack(arrays: Sequence[Any], dtype: Any) -> Any:
    flat = jnp.concatenate([jnp.ravel(a).astype(dtype) for a in arrays])
    return jnp.pad(flat, (0, -flat.shape[0] % BLOCK))


def _axpy_kernel(p_ref: Any, d_ref: Any, s_ref: Any, o_ref: Any) -> None:
    o_ref[...] = (p_ref[...] + s_ref[0] * d_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _axpy(params: list[Any], direction: list[Any], scale: Any, *, interpret: bool) -> list[Any]:
    out: list[Any] = list(params)
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.dtype, []).append(i)
    for dtype, idx in groups.items():
        flat_p = _pack([params[i] for i in idx], dtype)
        if flat_p.shape[0] == 0:
            continue
        block = pl.BlockSpec((BLOCK,), lambda b: (b,))
        flat = pl.pallas_call(
            _axpy_kernel,
            out_shape=jax.ShapeDtypeStruct(flat_p.shape, dtype),
            grid=(flat_p.shape[0] // BLOCK,),
            in_specs=[block, block, pl.BlockSpec((1,), lambda b: (0,))],
            out_specs=block,
            interpret=interpret,
        )(flat_p, _pack([direction[i] for i in idx], dtype), jnp.full((1,), scale, dtype))
        offset = 0
        for i in idx:
            size = params[i].size
            out[i] = flat[offset:offset + size].reshape(params[i].shape)
            offset += size
    return out


def _partials_kernel(g_ref: Any, *refs: Any) -> None:
    *u_refs, o_ref = refs
    g = g_ref[...].astype(jnp.float32)
    a = jnp.abs(g)
    nan = jnp.isnan(g)
    zero = jnp.zeros((), jnp.float32)
    update_sq = dot = zero
    if u_refs:
        u = u_refs[0][...].astype(jnp.float32)
        update_sq, dot = jnp.sum(u * u), jnp.sum(g * u)
    values = [jnp.sum(g * g), update_sq, dot, jnp.max(jnp.where(nan, 0.0, a)),
              jnp.sum(~jnp.isfinite(g)).astype(jnp.float32), jnp.sum(nan).astype(jnp.float32), zero, zero]
    o_ref[...] = jnp.stack(values).reshape(1, _WIDTH)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _stats(loss: Any, grads: list[Any], updates: list[Any] | None, *, interpret: bool) -> Any:
    dtype = loss.dtype
    inputs = [_pack(grads, dtype)] if grads else [jnp.zeros((0,), dtype)]
    if updates is not None and grads:
        inputs.append(_pack(updates, dtype))
    n_blocks = inputs[0].shape[0] // BLOCK
    if n_blocks == 0:
        zero = jnp.zeros((), dtype)
        return jnp.stack([jnp.reshape(loss, ()), zero, zero, zero, zero, zero])
    partials = pl.pallas_call(
        _partials_kernel,
        out_shape=jax.ShapeDtypeStruct((n_blocks, _WIDTH), jnp.float32),
        grid=(n_blocks,),
        in_specs=[pl.BlockSpec((BLOCK,), lambda b: (b,))] * len(inputs),
        out_specs=pl.BlockSpec((1, _WIDTH), lambda b: (b, 0)),
        interpret=interpret,
    )(*inputs)
    sums = jnp.sum(partials, axis=0)
    grad_max = jnp.where(sums[5] > 0, jnp.nan, jnp.max(partials[:, 3]))
    values = [sums[0], sums[1], sums[2], grad_max, sums[4]]
    return jnp.stack([jnp.reshape(loss, ()), *(v.astype(dtype) for v in values)])


def _gru_kernel(w_x_ref: Any, w_h_ref: Any, b_x_ref: Any, b_h_ref: Any, h0_ref: Any, x_ref: Any,
                o_ref: Any) -> None:
    hidden = h0_ref.shape[-1]
    w_h = w_h_ref[...].astype(jnp.float32)
    b_h = b_h_ref[...].astype(jnp.float32)
    # The input projection does not depend on h: one matmul for all T steps.
    a_all = jnp.dot(x_ref[...].astype(jnp.float32), w_x_ref[...].astype(jnp.float32),
                    preferred_element_type=jnp.float32) + b_x_ref[...].astype(jnp.float32)

    def step(t: Any, h: Any) -> Any:
        a = jax.lax.dynamic_slice_in_dim(a_all, t, 1, axis=0)
        g = jnp.dot(h, w_h, preferred_element_type=jnp.float32) + b_h
        r = jax.nn.sigmoid(a[:, :hidden] + g[:, :hidden])
        z = jax.nn.sigmoid(a[:, hidden:2 * hidden] + g[:, hidden:2 * hidden])
        n = jnp.tanh(a[:, 2 * hidden:] + r * g[:, 2 * hidden:])
        h = (1.0 - z) * n + z * h
        o_ref[pl.ds(t, 1), :] = h.astype(o_ref.dtype)
        return h

    jax.lax.fori_loop(0, x_ref.shape[0], step, h0_ref[...].astype(jnp.float32).reshape(1, hidden))


@functools.partial(jax.jit, static_argnames=("interpret",))
def _gru(w_x: Any, w_h: Any, b_x: Any, b_h: Any, h0: Any, x: Any, *, interpret: bool) -> Any:
    ensemble, steps, inputs = x.shape
    hidden = h0.shape[-1]
    if ensemble == 0 or steps == 0:
        return jnp.zeros((ensemble, steps, hidden), h0.dtype)

    def member(*shape: int) -> pl.BlockSpec:
        # The leading ensemble axis is squeezed away (None): the kernel sees one member's arrays.
        return pl.BlockSpec((None, *shape), lambda e: (e,) + (0,) * len(shape))

    return pl.pallas_call(
        _gru_kernel,
        out_shape=jax.ShapeDtypeStruct((ensemble, steps, hidden), h0.dtype),
        grid=(ensemble,),
        in_specs=[member(inputs, 3 * hidden), member(hidden, 3 * hidden), member(3 * hidden), member(3 * hidden),
                  member(hidden), member(steps, inputs)],
        out_specs=member(steps, hidden),
        interpret=interpret,
    )(w_x, w_h, b_x, b_h, h0, x)
