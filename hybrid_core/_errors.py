"""Error types: every failure the library reports is a `HybridError` with a recovery hint."""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BatchError",
    "CheckpointError",
    "ConfigError",
    "DivergenceError",
    "HybridError",
    "ModelError",
]


class HybridError(Exception):
    """Base of every error the library raises on purpose.

    ``recovery`` says what the caller can do about it; it is appended to the
    message so a traceback alone is enough to act on.
    """

    default_recovery = "See the message above."

    def __init__(self, message: str, recovery: str | None = None) -> None:
        self.message = message
        self.recovery = recovery or self.default_recovery
        super().__init__(f"{message}\n  recovery: {self.recovery}")


class ConfigError(HybridError, ValueError):
    """A `HybridConfig` (or another setting) is invalid; lists every bad field."""

    default_recovery = "Fix the listed fields; each names its allowed range."

    def __init__(self, problems: list[str] | str, recovery: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}", recovery)


class DivergenceError(HybridError, ArithmeticError):
    """Training diverged (non-finite loss or gradients, exploding loss)."""

    default_recovery = (
        "Lower the learning rate, clip gradients, or set on_nonfinite='skip' to drop bad batches."
    )


class CheckpointError(HybridError, OSError):
    """A checkpoint cannot be written or read (truncated, corrupted, foreign, too new)."""

    default_recovery = "Load an earlier checkpoint; the live trainer was left unchanged."


class BackendError(HybridError, TypeError):
    """Arrays of different libraries/devices were mixed, or a backend cannot run here."""

    default_recovery = "Put the model, optimizer state and batches on one array library and device."


class BatchError(HybridError, ValueError):
    """A batch is malformed: wrong shape, wrong dtype, empty, or not what the model expects."""

    default_recovery = "Check the batch's shapes and dtypes against the model's input and target sizes."


class ModelError(HybridError, TypeError):
    """A model, optimizer or dynamics model does not keep its protocol's contract."""

    default_recovery = "Implement the protocol's methods as documented in hybrid_core.Model / Optimizer."
