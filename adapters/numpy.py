"""The NumPy (and any array-API namespace) reference path: the pure array-API MLP and optimizers."""

from hybrid_core.models import MLP
from hybrid_core.optim import SGD, Adam, AdamW

__all__ = ["MLP", "SGD", "Adam", "AdamW"]
