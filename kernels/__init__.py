"""Hot whole-parameter operations; `reference` holds the array-API ground truth.

Per-backend kernels (Triton, Pallas, CuPy) and run-time selection arrive with the
kernels issue; until then the trainer calls the reference implementations directly.
"""

from .reference import fused_stats

__all__ = ["fused_stats"]
