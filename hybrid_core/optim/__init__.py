"""Reference optimizers in the pure array API, with `extrapolate()` from their own state."""

from ._adam import Adam, AdamW
from ._sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
