"""Checkpoints of named parts: ``{part name: part.state_dict()}`` in one msgpack file (see `_codec`).

Nothing here knows the trainer: a checkpoint is a format tag, the library version, the
config as a plain dict, and the parts' states. `restore_parts` loads them all or none: it
decodes and checks every part's state before it changes anything, then applies them, and
puts every part back from a copy if one still refuses, so a failed load leaves the objects
as they were.
"""

from __future__ import annotations

import copy
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import array_api_compat
import numpy as np

from ._backend import dtype_name, from_numpy, library_name, namespace_for, to_numpy
from ._checks import has_method
from ._codec import DEFAULT_MAX_BYTES, ForeignArray, encode, read_file, write_atomic
from ._errors import CheckpointError, ConfigError, HybridError
from ._ledger import copies
from ._protocols import Model
from ._rundir import checkpoint_path, newest_checkpoint, run_id_problem
from ._statecheck import arrays_like, fields
from ._version import __version__ as _version

__all__ = ["TRAINER_FORMAT", "CheckpointPolicy", "ModelState", "Part", "checkpoint_path", "copied_state",
           "newest_checkpoint", "read_checkpoint", "restore_parts", "write_checkpoint"]

TRAINER_FORMAT = 2
"""Layout of the trainer's state inside a checkpoint file. 1: before the trainer was a composition
of parts (refused with `CheckpointError`); 2: ``{"parts": {name: state_dict}}``."""

class Part(Protocol):
    """Anything with a state of its own.

    A part may also offer ``check_state_dict(state)``: raise (naming the field) exactly when
    ``load_state_dict(state)`` would refuse ``state``, and change nothing. `restore_parts` calls it
    for every part before it loads any.
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class CheckpointPolicy:
    """Automatic checkpoints for `HybridTrainer.fit`: every ``every`` steps into ``directory``, keep ``keep``.

    The files belong to one run: ``run_id`` if given, else the trainer's own `HybridTrainer.run_id`
    (a fresh id for a new trainer, the file's id for a loaded one). With ``resume`` (the default)
    `fit` first restores the newest good checkpoint *of that run* that is ahead of the trainer;
    files of other runs in the directory are never resumed or removed. Naming another run's
    ``run_id`` is how a new process continues it (the trainer then takes that id). ``every`` and
    ``keep`` are integers >= 1; anything else raises `ConfigError` here.
    """

    directory: str | os.PathLike[str]
    every: int = 1000
    keep: int = 3
    resume: bool = True
    run_id: str | None = None

    def __post_init__(self) -> None:
        problems = []
        try:
            folder = os.fspath(self.directory)
        except TypeError:
            folder = None
        if not isinstance(folder, str) or not folder:
            problems.append(f"directory={self.directory!r}: must be a non-empty str or os.PathLike path")
        for name in ("every", "keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                problems.append(f"{name}={value!r}: must be an integer >= 1")
            else:
                object.__setattr__(self, name, int(value))
        if not isinstance(self.resume, bool):
            problems.append(f"resume={self.resume!r}: must be True or False")
        if self.run_id is not None and (problem := run_id_problem(self.run_id)) is not None:
            problems.append(problem)
        if problems:
            raise ConfigError(problems, "CheckpointPolicy(directory, every=N >= 1, keep=K >= 1, resume=True|False, "
                                        "run_id=None or a name).")


class ModelState:
    """The model as a part: its parameters and, if it has one, its own ``state_dict`` (buffers)."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        """Parameters (live arrays; the codec copies them) and the model's extra state."""
        model = self.model
        extra = model.state_dict() if has_method(model, "state_dict") else None
        return {"params": list(model.parameters()), "extra": extra}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse (naming the field) what `load_state_dict` would refuse; change nothing."""
        self._parsed(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the parameters exactly (θ − θ is 0, 0 + θ_saved is θ_saved) after checking count, library,
        device, shapes, dtypes and that every value is finite."""
        saved, extra = self._parsed(state)
        if extra is not None and has_method(self.model, "load_state_dict"):
            self.model.load_state_dict(extra)
        if has_method(self.model, "set_parameters"):
            self.model.set_parameters(saved)
        else:
            params = self.model.parameters()
            self.model.apply_update(copies(params), -1.0)
            self.model.apply_update(saved, 1.0)

    def _parsed(self, state: Any) -> tuple[list[Any], Any]:
        fields(state, ("params", "extra"), what="model state")
        try:
            saved = arrays_like(state["params"], "params", self.model.parameters())
        except ValueError as exc:
            raise CheckpointError(f"{exc}", "Load a checkpoint saved from this model (same architecture and "
                                  "dtype), from before the run diverged.") from exc
        extra = state["extra"]
        validate = getattr(self.model, "check_state_dict", None)
        if extra is not None and callable(validate):
            validate(extra)
        return saved, extra


def write_checkpoint(path: str | os.PathLike[str], config: Mapping[str, Any], parts: Mapping[str, Part],
                     extra: Mapping[str, Any] | None = None) -> None:
    """Write ``{format, library_version, config, parts: {name: state_dict}}`` to ``path`` atomically."""
    doc = {"trainer_format": TRAINER_FORMAT, "library_version": _version, "config": dict(config),
           **(extra or {}), "parts": {name: part.state_dict() for name, part in parts.items()}}
    write_atomic(path, encode(doc, _host))


def read_checkpoint(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """The checkpoint document of ``path``, its format checked; arrays still as decoded (see `restore_parts`)."""
    raw = read_file(path, max_bytes)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{os.fspath(path)}: the file does not hold a trainer state")
    found = raw.get("trainer_format", 1)
    if isinstance(found, bool) or not isinstance(found, int) or found != TRAINER_FORMAT:
        written = raw.get("library_version", "an unknown version")
        raise CheckpointError(
            f"{os.fspath(path)}: trainer-state format {found!r} (written by hybrid-predict-trainer "
            f"{written}); this version reads format {TRAINER_FORMAT}",
            "Resume it with the version that wrote it, or start the run again: format 1 predates the "
            "trainer's redesign into parts and cannot be converted.",
        )
    if not isinstance(raw.get("parts"), dict) or not isinstance(raw.get("config"), dict):
        raise CheckpointError(f"{os.fspath(path)}: the checkpoint lacks its parts or config")
    strange = [k for k in ("library_version", "dynamics_type") if k in raw and not isinstance(raw[k], str)]
    if strange:
        raise CheckpointError(f"{os.fspath(path)}: the checkpoint's {', '.join(map(repr, strange))} must be text")
    return raw


def restore_parts(parts: Mapping[str, Part], saved: Mapping[str, Any], xp: Any, device: Any,
                  where: str = "", optional: tuple[str, ...] = (),
                  check: Callable[[Mapping[str, Any]], None] | None = None) -> None:
    """Load every part's saved state, all of them or none: `CheckpointError` naming the part otherwise.

    1. Decode: arrays become ``xp`` arrays on ``device`` (or arrays of the library they were saved from).
    2. Validate, before anything changes: each part that has ``check_state_dict(state)`` checks its state,
       then ``check(states)`` checks that the parts fit together (and fit the model).
    3. Apply in the order of ``parts``. As a safety net for parts whose ``load_state_dict`` refuses what
       no check caught (a user's optimizer or dynamics model), every part's state is copied first (arrays
       copied, not referenced) and, if any ``load_state_dict`` raises, loaded back into every part already
       touched, the failing one included, last to first.

    Parts named in ``optional`` (added to the format later) keep their fresh state when absent.
    """
    parts = {name: part for name, part in parts.items() if name in saved or name not in optional}
    missing = sorted(set(parts) - set(saved))
    if missing:
        raise CheckpointError(f"{where}the checkpoint lacks the parts {', '.join(missing)}")
    live = _Converter(library_name(xp), xp, device)
    states = {name: _refused_as_checkpoint_error(where, name, live, saved[name]) for name in parts}
    for name, part in parts.items():
        validate = getattr(part, "check_state_dict", None)
        if callable(validate):
            _refused_as_checkpoint_error(where, name, validate, states[name])
    if check is not None:
        try:
            check(states)
        except HybridError as exc:
            raise CheckpointError(f"{where}{exc.message}", exc.recovery or _RECOVERY) from exc
        except Exception as exc:
            raise CheckpointError(f"{where}the parts do not fit together ({type(exc).__name__}: {exc})",
                                  _RECOVERY) from exc
    backups = {name: copied_state(part.state_dict()) for name, part in parts.items()}
    touched: list[str] = []
    for name, part in parts.items():
        touched.append(name)
        try:
            part.load_state_dict(states[name])
        except BaseException as exc:
            failed = _put_back(parts, backups, touched)
            if not isinstance(exc, Exception):
                raise
            error = _as_checkpoint_error(where, name, exc)
            if failed:
                raise CheckpointError(f"{error.message}; putting back {', '.join(failed)} failed too, so the "
                                      "trainer may be inconsistent", "Build the trainer afresh.") from exc
            raise error from exc


def copied_state(value: Any) -> Any:
    """A deep copy of a state dict: containers rebuilt, arrays copied (JAX arrays are immutable: kept)."""
    if isinstance(value, Mapping):
        return {k: copied_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copied_state(v) for v in value]
    if isinstance(value, tuple):
        items = [copied_state(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if value is None or isinstance(value, (str, bytes, bool, int, float, complex)):
        return value
    if isinstance(value, np.ndarray):
        return value.copy()
    try:
        array_api_compat.array_namespace(value)
    except TypeError:
        return copy.deepcopy(value)
    return copies([value])[0]


_RECOVERY = "Load an earlier checkpoint; the live trainer was left unchanged."


def _refused_as_checkpoint_error(where: str, name: str, fn: Callable[[Any], Any], state: Any) -> Any:
    try:
        return fn(state)
    except Exception as exc:
        raise _as_checkpoint_error(where, name, exc) from exc


def _as_checkpoint_error(where: str, name: str, exc: Exception) -> CheckpointError:
    if isinstance(exc, HybridError):
        return CheckpointError(f"{where}part {name!r}: {exc.message}", exc.recovery or _RECOVERY)
    if type(exc) is ValueError:  # the readers of `_statecheck` name the field
        return CheckpointError(f"{where}part {name!r}: {exc}", _RECOVERY)
    return CheckpointError(f"{where}part {name!r} is not a valid state ({type(exc).__name__}: {exc})", _RECOVERY)


def _put_back(parts: Mapping[str, Part], backups: Mapping[str, Any], touched: list[str]) -> list[str]:
    """Load the copies taken before into the touched parts, last first; the names of those that refused."""
    failed = []
    for name in reversed(touched):
        try:
            parts[name].load_state_dict(copied_state(backups[name]))
        except Exception:
            failed.append(name)
    return failed


def _host(value: Any) -> tuple[np.ndarray, str, str] | None:
    try:
        xp = array_api_compat.array_namespace(value)
    except TypeError:
        return None
    # bfloat16 comes back as float32 (NumPy has none); its own dtype name tells the codec to store 16 bits.
    return np.array(to_numpy(value), copy=True), library_name(xp), dtype_name(value)


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
        dtype = value.dtype or arr.dtype.name  # a bfloat16 array is decoded as float32 with the same values
        if value.library == self.library:
            return from_numpy(self.xp, arr, dtype=getattr(self.xp, dtype), device=self.device)
        try:
            xp = namespace_for(value.library)
        except HybridError as exc:
            raise CheckpointError(f"the checkpoint holds {value.library} arrays: {exc.message}",
                                  f"Install {value.library} to load this checkpoint.") from exc
        return from_numpy(xp, arr, dtype=getattr(xp, dtype))
