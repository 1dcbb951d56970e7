"""One BLAS thread while the dynamics model trains on NumPy: its products are far too small to share out.

OpenBLAS splits a matrix product over its threads once m·n·k passes a threshold, and
the training tick's products (a few hundred thousand multiply-adds per member) pass
it. Split that finely, a product gains nothing, and when another process keeps the
cores busy each split waits for a descheduled thread: the tick ran about 4× slower
with one competing process on this 2-core machine (and up to 30× in one run). The
limit is set for the tick only and put back after it, through threadpoolctl;
without threadpoolctl, or for other namespaces, nothing is changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import array_api_compat

__all__ = ["one_blas_thread"]

_controller: Any = None


@contextlib.contextmanager
def one_blas_thread(xp: ModuleType) -> Iterator[None]:
    """Within the block, NumPy's BLAS runs on one thread (when ``xp`` is NumPy and threadpoolctl is installed)."""
    controller = _numpy_blas() if array_api_compat.is_numpy_namespace(xp) else None
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


def _numpy_blas() -> Any:
    """A threadpoolctl controller of the BLAS libraries loaded now (NumPy's among them), built once: the scan
    costs milliseconds. A BLAS library loaded later (SciPy's, say) is left alone."""
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _controller = False
        else:
            _controller = ThreadpoolController()
    return _controller or None
