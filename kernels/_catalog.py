"""The declared implementations of every op, in selection order: GPU kernels, CPU fast paths, reference.

Only class attributes live here, so importing this module imports no array
library; each implementation's module is imported by `Kernel.load` on first use.
"""

from __future__ import annotations

import sys

from ._registry import Kernel, register

__all__: list[str] = []

_GPU_FLOATS = ("float16", "bfloat16", "float32")


class _Triton(Kernel):
    """Abstract: Triton kernels on torch tensors; on CPU only under Triton's interpreter (float32)."""

    name = "triton"
    backends = ("torch",)
    devices = ("cuda",)
    dtypes = _GPU_FLOATS
    interpret_devices = ("cpu",)
    interpret_dtypes = ("float32",)
    interpret_env = ("TRITON_INTERPRET", "1")
    requires = (("torch", "2.4"), ("triton", "3.0"))

    @classmethod
    def _interpreter_problems(cls, device: str) -> list[str]:
        problems = super()._interpreter_problems(device)
        # @triton.jit reads TRITON_INTERPRET when a module is imported, not at launch: both triton's
        # own library (tl.sum, ...) and our kernels must have been built for the interpreter.
        language = sys.modules.get("triton.language")
        ours = sys.modules.get(f"{__package__}._triton_kernels")
        if not problems and language is not None and not _interpreted(language.sum):
            problems.append("triton was imported before TRITON_INTERPRET=1 was set (torch.compile and "
                            "torch._dynamo import it): set the variable before anything imports triton")
        elif not problems and ours is not None and not ours.INTERPRETED:
            problems.append("the Triton kernels were imported before TRITON_INTERPRET=1 was set (restart Python)")
        return problems


def _interpreted(function: object) -> bool:
    from triton.runtime.interpreter import InterpretedFunction  # triton is imported already: no cost

    return isinstance(function, InterpretedFunction)


@register
class TritonAxpy(_Triton):
    """`fused_axpy` as Triton kernels, one launch per parameter dtype."""

    op = "fused_axpy"
    entry = "_torch:triton_axpy"


@register
class TritonStats(_Triton):
    """`fused_stats` as two Triton launches (per-block partials, then one reducing program)."""

    op = "fused_stats"
    entry = "_torch:triton_stats"


@register
class TritonGRU(_Triton):
    """`gru_ensemble_rollout` as one Triton launch, one program per ensemble member."""

    op = "gru_ensemble_rollout"
    entry = "_torch:triton_gru"


class _Pallas(Kernel):
    """Abstract: Pallas kernels on JAX arrays; on CPU only with ``interpret=True`` (float32)."""

    name = "pallas"
    backends = ("jax",)
    devices = ("gpu", "tpu")
    dtypes = _GPU_FLOATS
    interpret_devices = ("cpu",)
    interpret_dtypes = ("float32",)
    requires = (("jax", "0.4.30"),)


@register
class PallasAxpy(_Pallas):
    """`fused_axpy` as one Pallas call per parameter dtype over the flattened parameters."""

    op = "fused_axpy"
    entry = "_pallas:fused_axpy"


@register
class PallasStats(_Pallas):
    """`fused_stats` as one Pallas call writing per-block partials, reduced by XLA."""

    op = "fused_stats"
    entry = "_pallas:fused_stats"


@register
class PallasGRU(_Pallas):
    """`gru_ensemble_rollout` as one Pallas call, one program per ensemble member."""

    op = "gru_ensemble_rollout"
    entry = "_pallas:gru_ensemble_rollout"


class _Cupy(Kernel):
    """Abstract: CUDA C kernels from ``kernels/cuda/*.cu`` on CuPy arrays (needs a GPU)."""

    name = "cupy"
    backends = ("cupy",)
    devices = ("cuda",)
    dtypes = ("float32", "float64")
    requires = (("cupy", "13.0"),)


@register
class CupyAxpy(_Cupy):
    """`fused_axpy` as one `RawModule` launch per parameter dtype (pointer table)."""

    op = "fused_axpy"
    entry = "_cupy:fused_axpy"


@register
class CupyStats(_Cupy):
    """`fused_stats` as two launches (per-block partials, then one reducing block)."""

    op = "fused_stats"
    entry = "_cupy:fused_stats"


@register
class CupyGRU(_Cupy):
    """`gru_ensemble_rollout` as one launch, one thread block per ensemble member."""

    op = "gru_ensemble_rollout"
    entry = "_cupy:gru_ensemble_rollout"


class _Foreach(Kernel):
    """Abstract: PyTorch's multi-tensor ``torch._foreach_*`` ops (one call over all tensors)."""

    name = "foreach"
    backends = ("torch",)
    requires = (("torch", "2.1"),)


@register
class ForeachAxpy(_Foreach):
    """`fused_axpy` as one ``torch._foreach_add``."""

    op = "fused_axpy"
    entry = "_torch:foreach_axpy"


@register
class ForeachStats(_Foreach):
    """`fused_stats` from ``torch._foreach_norm`` calls plus one dot per tensor."""

    op = "fused_stats"
    entry = "_torch:foreach_stats"


class _Jit(Kernel):
    """Abstract: one ``jax.jit``-compiled function over the whole list (a tree map or a scan)."""

    name = "jit"
    backends = ("jax",)
    requires = (("jax", "0.4.30"),)


@register
class JitAxpy(_Jit):
    """`fused_axpy` as one jitted tree map."""

    op = "fused_axpy"
    entry = "_jax:fused_axpy"


@register
class JitStats(_Jit):
    """`fused_stats` as one jitted reduction over the concatenated gradients."""

    op = "fused_stats"
    entry = "_jax:fused_stats"


@register
class JitGRU(_Jit):
    """`gru_ensemble_rollout` as one jitted ``lax.scan``."""

    op = "gru_ensemble_rollout"
    entry = "_jax:gru_ensemble_rollout"


class _Reference(Kernel):
    """Abstract: the array-API reference (any backend, device and dtype)."""

    name = "reference"


@register
class ReferenceAxpy(_Reference):
    """`reference.fused_axpy`."""

    op = "fused_axpy"
    entry = "reference:fused_axpy"


@register
class ReferenceStats(_Reference):
    """`reference.fused_stats`."""

    op = "fused_stats"
    entry = "reference:fused_stats"


@register
class ReferenceGRU(_Reference):
    """`reference.gru_ensemble_rollout`."""

    op = "gru_ensemble_rollout"
    entry = "reference:gru_ensemble_rollout"

