"""Saving and restoring a whole `HybridTrainer` (see `_codec` for the file format)."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import array_api_compat
import numpy as np

from ._backend import from_numpy, library_name, to_numpy
from ._codec import DEFAULT_MAX_BYTES, ForeignArray, encode, read_file, write_atomic
from ._config import HybridConfig
from ._cycle import PredictCycle
from ._errors import CheckpointError, HybridError
from ._phase import Phase, PhaseState
from ._protocols import DynamicsModel, Model, Optimizer, Prediction
from ._version import __version__ as _version

if TYPE_CHECKING:
    from ._trainer import HybridTrainer

__all__ = ["CheckpointPolicy", "checkpoint_path", "load_trainer", "newest_checkpoint", "save_trainer"]

_NAME = re.compile(r"^step-(\d{9,})\.ckpt$")
_TUPLE_FIELDS = ("horizon_arms", "correction_fractions")


class CheckpointPolicy(NamedTuple):
    """Automatic checkpoints for `HybridTrainer.fit`: every ``every`` steps into ``directory``, keep ``keep``.

    With ``resume`` (the default) `fit` first restores the newest good checkpoint there.
    """

    directory: str | os.PathLike[str]
    every: int = 1000
    keep: int = 3
    resume: bool = True


def _host(value: Any) -> tuple[np.ndarray, str] | None:
    try:
        xp = array_api_compat.array_namespace(value)
    except TypeError:
        return None
    return np.array(to_numpy(value), copy=True), library_name(xp)


def save_trainer(trainer: HybridTrainer, path: str | os.PathLike[str]) -> None:
    """Write everything needed to continue ``trainer`` bit for bit to ``path`` (atomically)."""
    model = trainer.model
    state = {
        "library_version": _version,
        "config": trainer.config.to_dict(),
        "params": list(model.parameters()),
        "model_state": model.state_dict() if _has(model, "state_dict") else None,
        "optimizer": trainer.optimizer.state_dict(),
        "dynamics": {"type": type(trainer.dynamics).__name__, "state": trainer.dynamics.state_dict()},
        "state": trainer.state.state_dict(),
        "metrics": trainer.metrics.state_dict(),
        "bandit": trainer.bandit.state_dict(),
        "residuals": trainer.residuals.state_dict(),
        "corrector": trainer.corrector.state_dict(),
        "directions": trainer.directions.state_dict(),
        "phase": list(trainer.phase_state._replace(phase=trainer.phase.value)),
        "last_update": trainer._last_update,
        "cycle": _cycle_state(trainer._cycle),
        "pending": None if trainer._pending is None else [trainer._pending[0], trainer._pending[1]],
        "horizon_scale": trainer._horizon_scale,
        "host_syncs": trainer.host_syncs,
    }
    write_atomic(path, encode(state, _host))


def load_trainer(
    cls: type[HybridTrainer],
    path: str | os.PathLike[str],
    model: Model,
    optimizer: Optimizer,
    dynamics: DynamicsModel | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> HybridTrainer:
    """A trainer restored from ``path`` around ``model`` and ``optimizer`` (whose states are overwritten).

    The whole file is read and checked first; on any problem a `CheckpointError` is
    raised before ``model``, ``optimizer`` or ``dynamics`` are touched.
    """
    raw = read_file(path, max_bytes)
    try:
        return _restore(cls, raw, model, optimizer, dynamics)
    except HybridError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{os.fspath(path)}: {exc.message}", exc.recovery) from exc
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"{os.fspath(path)}: the checkpoint's contents are not a trainer state "
                              f"({type(exc).__name__}: {exc})") from exc


def newest_checkpoint(directory: str | os.PathLike[str]) -> list[Path]:
    """The ``step-*.ckpt`` files in ``directory``, newest first."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_path(directory: str | os.PathLike[str], step: int) -> Path:
    """Where the automatic checkpoint of ``step`` goes."""
    return Path(directory) / f"step-{step:09d}.ckpt"


def _restore(cls: type[HybridTrainer], raw: Any, model: Model, optimizer: Optimizer,
             dynamics: DynamicsModel | None) -> HybridTrainer:
    if not isinstance(raw, dict):
        raise CheckpointError("the checkpoint does not hold a trainer state")
    config_fields = dict(raw["config"])
    for name in _TUPLE_FIELDS:
        if name in config_fields:
            config_fields[name] = tuple(config_fields[name])
    config = HybridConfig(**config_fields)
    trainer = cls(model, optimizer, config, dynamics)
    saved_dyn = raw["dynamics"]["type"]
    if type(trainer.dynamics).__name__ != saved_dyn:
        raise CheckpointError(f"the checkpoint was saved with dynamics {saved_dyn}, "
                              f"not {type(trainer.dynamics).__name__}",
                              f"Pass dynamics={saved_dyn}(...) to load it.")
    params = model.parameters()
    xp = trainer.xp
    device = array_api_compat.device(params[0])
    to_live = _Converter(library_name(xp), xp, device)
    saved = [to_live(p) for p in raw["params"]]
    if len(saved) != len(params):
        raise CheckpointError(f"the checkpoint holds {len(saved)} parameters, the model has {len(params)}")
    for i, (s, p) in enumerate(zip(saved, params)):
        if tuple(s.shape) != tuple(p.shape) or s.dtype != p.dtype:
            raise CheckpointError(f"parameter {i}: checkpoint has {tuple(s.shape)} {s.dtype}, "
                                  f"model has {tuple(p.shape)} {p.dtype}")
    # Each component validates its own state; if a later one refuses, the earlier ones are put
    # back, so a failed load leaves the objects the caller passed as they were. Parameters go last.
    restored: list[tuple[Any, Any]] = []
    parts = [(optimizer, raw["optimizer"]), (trainer.dynamics, raw["dynamics"]["state"])]
    if raw["model_state"] is not None and _has(model, "load_state_dict"):
        parts.append((model, raw["model_state"]))
    try:
        for component, saved_state in parts:
            backup = component.state_dict()
            component.load_state_dict(to_live(saved_state))
            restored.append((component, backup))
    except BaseException:
        for component, backup in reversed(restored):
            component.load_state_dict(backup)
        raise
    # θ − θ is exactly 0 and 0 + θ_saved is exactly θ_saved: an exact set through apply_update.
    model.apply_update([p * 1 for p in model.parameters()], -1.0)
    model.apply_update(saved, 1.0)
    trainer.state.load_state_dict(raw["state"])
    trainer.metrics.load_state_dict(raw["metrics"])
    trainer.bandit.load_state_dict(raw["bandit"])
    trainer.residuals.load_state_dict(raw["residuals"])
    trainer.corrector.load_state_dict(raw["corrector"])
    trainer.directions.load_state_dict(to_live(raw["directions"]))
    phase, steps, horizon, probe = raw["phase"]
    trainer._phase = PhaseState(Phase(phase), int(steps), int(horizon), bool(probe))
    trainer._last_update = None if raw["last_update"] is None else [to_live(u) for u in raw["last_update"]]
    trainer._cycle = _cycle_from(raw["cycle"], to_live)
    pending = raw["pending"]
    trainer._pending = None if pending is None else (
        int(pending[0]), None if pending[1] is None else np.asarray(pending[1], dtype=np.float64))
    trainer._horizon_scale = float(raw["horizon_scale"])
    trainer.host_syncs = int(raw["host_syncs"])
    return trainer


class _Converter:
    """Turns decoded arrays back into live arrays of the library they were saved from."""

    def __init__(self, library: str, xp: Any, device: Any) -> None:
        self.library, self.xp, self.device = library, xp, device

    def __call__(self, value: Any) -> Any:
        if isinstance(value, ForeignArray):
            return self._array(value)
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, np.ndarray) and self.library == "numpy":
            return value.copy()
        return value

    def _array(self, value: ForeignArray) -> Any:
        arr = value.array
        if value.library == self.library:
            return from_numpy(self.xp, arr, dtype=getattr(self.xp, arr.dtype.name), device=self.device)
        module = {"jax": "jax.numpy"}.get(value.library, value.library)
        try:
            from ._backend import as_namespace

            xp = as_namespace(importlib.import_module(module))
        except ImportError as exc:
            raise CheckpointError(f"the checkpoint holds {value.library} arrays but {module} does not import",
                                  f"Install {value.library} to load this checkpoint.") from exc
        return from_numpy(xp, arr, dtype=getattr(xp, arr.dtype.name))


def _cycle_state(cycle: PredictCycle | None) -> dict[str, Any] | None:
    if cycle is None:
        return None
    out = {}
    for f in dataclasses.fields(cycle):
        value = getattr(cycle, f.name)
        out[f.name] = [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(
            value, Prediction) else value
    return out


def _cycle_from(raw: dict[str, Any] | None, to_live: _Converter) -> PredictCycle | None:
    if raw is None:
        return None
    values = dict(raw)
    for name in ("prediction", "correct_prediction", "correct_raw"):
        if values[name] is not None:
            loss, lower, upper, scale, conf = values[name]
            values[name] = Prediction(tuple(loss), tuple(lower), tuple(upper), tuple(scale), float(conf))
    for name in ("context", "correct_context"):
        if values[name] is not None:
            values[name] = np.asarray(values[name], dtype=np.float64)
    values["direction"] = [to_live(d) for d in values["direction"]]
    return PredictCycle(**values)


def _has(obj: Any, name: str) -> bool:
    # Optional capability: models with extra state (batch-norm buffers, …) expose state_dict().
    return callable(getattr(obj, name, None))
