"""Reference models written in the pure array API (run on every backend)."""

from .fastgrnn import FastGRNN
from .mlp import MLP

__all__ = ["MLP", "FastGRNN"]
