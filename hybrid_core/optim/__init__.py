"""Reference optimizers in the pure array API, each with `extrapolate()` from its own state."""

from ._adam import Adam, AdamW
from ._clip import ClipGradNorm
from ._iht import HardThresholding
from ._sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "ClipGradNorm", "HardThresholding"]
