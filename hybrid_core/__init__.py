"""hybrid-predict-trainer: train with fewer backward passes by predicting some steps.

The core is written against the Python array API standard, so the same trainer
drives NumPy, array-api-strict, PyTorch, JAX and CuPy arrays. See README.md.

The public names are imported on first use (PEP 562), so ``import hybrid_core`` and the
``hybrid-train`` command's argument checks do not load NumPy and the trainer until they are needed.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

if TYPE_CHECKING:
    from ._config import HybridConfig
    from ._errors import (
        BackendError,
        BatchError,
        CheckpointError,
        ConfigError,
        DivergenceError,
        HybridError,
        ModelError,
    )
    from ._features import FEATURE_DIM, FEATURE_NAMES, FEATURE_SLOTS, encode_features
    from ._metrics import MetricsCollector, StepRecord
    from ._persist import CheckpointPolicy
    from ._phase import Phase, PhaseState, Signals, initial_phase_state, next_phase
    from ._protocols import DynamicsModel, FusedStep, Model, Optimizer, Outcome, Prediction
    from ._state import TrainingState
    from ._trainer import HybridTrainer, StepResult
    from .dynamics import TrendDynamics

__all__ = [
    "FEATURE_DIM",
    "FEATURE_NAMES",
    "FEATURE_SLOTS",
    "BackendError",
    "BatchError",
    "CheckpointError",
    "CheckpointPolicy",
    "ConfigError",
    "DivergenceError",
    "DynamicsModel",
    "FusedStep",
    "HybridConfig",
    "HybridError",
    "HybridTrainer",
    "MetricsCollector",
    "Model",
    "ModelError",
    "Optimizer",
    "Outcome",
    "Phase",
    "PhaseState",
    "Prediction",
    "Signals",
    "StepRecord",
    "StepResult",
    "TrainingState",
    "TrendDynamics",
    "encode_features",
    "initial_phase_state",
    "next_phase",
]

_HOMES = {
    "HybridConfig": "._config",
    **dict.fromkeys(("BackendError", "BatchError", "CheckpointError", "ConfigError", "DivergenceError",
                     "HybridError", "ModelError"), "._errors"),
    **dict.fromkeys(("FEATURE_DIM", "FEATURE_NAMES", "FEATURE_SLOTS", "encode_features"), "._features"),
    **dict.fromkeys(("MetricsCollector", "StepRecord"), "._metrics"),
    "CheckpointPolicy": "._persist",
    **dict.fromkeys(("Phase", "PhaseState", "Signals", "initial_phase_state", "next_phase"), "._phase"),
    **dict.fromkeys(("DynamicsModel", "FusedStep", "Model", "Optimizer", "Outcome", "Prediction"), "._protocols"),
    "TrainingState": "._state",
    **dict.fromkeys(("HybridTrainer", "StepResult"), "._trainer"),
    "TrendDynamics": ".dynamics",
}
"""The module each public name is defined in (a test checks it covers `__all__`)."""


def __getattr__(name: str) -> Any:
    """Import a public name (or a subpackage) on first use and keep it."""
    home = _HOMES.get(name)
    if home is None:
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, the submodules imported so far and the module's own dunder names."""
    names = {*globals(), *__all__}
    return sorted(n for n in names if n.startswith("_") or n in __all__
                  or getattr(globals().get(n), "__name__", "").startswith(f"{__name__}."))
