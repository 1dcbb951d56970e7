"""hybrid-predict-trainer: train with fewer backward passes by predicting some steps.

The core is written against the Python array API standard, so the same trainer
drives NumPy, array-api-strict, PyTorch, JAX and CuPy arrays. See README.md.
"""

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
from ._version import __version__ as __version__
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
