"""The FastGRNN router pipeline: synthetic routing logs, training through `HybridTrainer`, save/load.

`routing_logs` makes seeded request windows with a documented labelling rule;
`train_router` trains a `hybrid_core.models.FastGRNN` on them (or on any windows, e.g.
`hybrid_core.apps.data.sequential_digits`) with Adam, mini-batches, a validation split, early
stopping, learning-rate decay, gradient clipping, L2, distillation from an MLP teacher and
z-score normalisation; `save_router` / `load_router` keep the weights and the normaliser.
`compress_router` prunes (IHT), fine-tunes and quantizes it to int8 (`QuantizedRouter`, exported by
`save_quantized_router`).
"""

from ._compress import CompressConfig, CompressResult, compress_router, format_stages
from ._io import QuantizedRouter, load_quantized_router, load_router, save_quantized_router, save_router
from ._logs import ROUTING_FEATURES, routing_logs
from ._pipeline import RouterConfig, RouterResult, train_router
from ._router import Router, ZScore

__all__ = [
    "ROUTING_FEATURES",
    "CompressConfig",
    "CompressResult",
    "QuantizedRouter",
    "Router",
    "RouterConfig",
    "RouterResult",
    "ZScore",
    "compress_router",
    "format_stages",
    "load_quantized_router",
    "load_router",
    "routing_logs",
    "save_quantized_router",
    "save_router",
    "train_router",
]
