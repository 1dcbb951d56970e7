"""Reference models written in the pure array API (run on every backend), and the FastGRNN's int8 form."""

from ._export import load_quantized, model_size_bytes, save_quantized
from ._quantized import QuantizedFastGRNN
from .fastgrnn import FastGRNN
from .mlp import MLP

__all__ = ["MLP", "FastGRNN", "QuantizedFastGRNN", "load_quantized", "model_size_bytes", "save_quantized"]
