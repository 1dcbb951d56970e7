"""Checkpoints of named parts: ``{part name: part.state_dict()}`` in one msgpack file (see `_codec`).

Nothing here knows the trainer: a checkpoint is a format tag, the library version, the
config as a plain dict, and the parts' states. `restore_parts` loads them in order and,
if any part refuses its state, puts the earlier ones back, so a failed load leaves the
objects as they were.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import array_api_compat
import numpy as np

from ._backend import dtype_name, from_numpy, library_name, namespace_for, to_numpy
from ._checks import has_method
from ._codec import DEFAULT_MAX_BYTES, ForeignArray, encode, read_file, write_atomic
from ._errors import CheckpointError, HybridError
from ._ledger import copies
from ._protocols import Model
from ._version import __version__ as _version

__all__ = ["TRAINER_FORMAT", "CheckpointPolicy", "ModelState", "Part", "checkpoint_path", "newest_checkpoint",
           "read_checkpoint", "restore_parts", "write_checkpoint"]

TRAINER_FORMAT = 2
"""Layout of the trainer's state inside a checkpoint file. 1: before the trainer was a composition
of parts (refused with `CheckpointError`); 2: ``{"parts": {name: state_dict}}``."""

_NAME = re.compile(r"^step-(\d{9,})\.ckpt$")


class Part(Protocol):
    """Anything with a state of its own."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointPolicy(NamedTuple):
    """Automatic checkpoints for `HybridTrainer.fit`: every ``every`` steps into ``directory``, keep ``keep``.

    With ``resume`` (the default) `fit` first restores the newest good checkpoint there.
    """

    directory: str | os.PathLike[str]
    every: int = 1000
    keep: int = 3
    resume: bool = True


class ModelState:
    """The model as a part: its parameters and, if it has one, its own ``state_dict`` (buffers)."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        """Parameters (live arrays; the codec copies them) and the model's extra state."""
        model = self.model
        extra = model.state_dict() if has_method(model, "state_dict") else None
        return {"params": list(model.parameters()), "extra": extra}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the parameters exactly (θ − θ is 0, 0 + θ_saved is θ_saved) after checking shapes and dtypes."""
        params = self.model.parameters()
        saved = list(state["params"])
        if len(saved) != len(params):
            raise CheckpointError(f"the checkpoint holds {len(saved)} parameters, the model has {len(params)}")
        for i, (s, p) in enumerate(zip(saved, params)):
            if tuple(s.shape) != tuple(p.shape) or s.dtype != p.dtype:
                raise CheckpointError(f"parameter {i}: checkpoint has {tuple(s.shape)} {s.dtype}, "
                                      f"model has {tuple(p.shape)} {p.dtype}")
        if state["extra"] is not None and has_method(self.model, "load_state_dict"):
            self.model.load_state_dict(state["extra"])
        if has_method(self.model, "set_parameters"):
            self.model.set_parameters(saved)
        else:
            self.model.apply_update(copies(params), -1.0)
            self.model.apply_update(saved, 1.0)


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
    if found != TRAINER_FORMAT:
        written = raw.get("library_version", "an unknown version")
        raise CheckpointError(
            f"{os.fspath(path)}: trainer-state format {found!r} (written by hybrid-predict-trainer "
            f"{written}); this version reads format {TRAINER_FORMAT}",
            "Resume it with the version that wrote it, or start the run again: format 1 predates the "
            "trainer's redesign into parts and cannot be converted.",
        )
    if not isinstance(raw.get("parts"), dict) or not isinstance(raw.get("config"), dict):
        raise CheckpointError(f"{os.fspath(path)}: the checkpoint lacks its parts or config")
    return raw


def restore_parts(parts: Mapping[str, Part], saved: Mapping[str, Any], xp: Any, device: Any,
                  where: str = "", optional: tuple[str, ...] = ()) -> None:
    """Load each part's saved state in the order of ``parts``; on any failure put the loaded ones back.

    Arrays are turned back into ``xp`` arrays on ``device`` (or into the library they were saved from).
    Parts named in ``optional`` (added to the format later) keep their fresh state when absent.
    """
    parts = {name: part for name, part in parts.items() if name in saved or name not in optional}
    missing = sorted(set(parts) - set(saved))
    if missing:
        raise CheckpointError(f"{where}the checkpoint lacks the parts {', '.join(missing)}")
    live = _Converter(library_name(xp), xp, device)
    done: list[tuple[Part, dict[str, Any]]] = []
    try:
        for name, part in parts.items():
            backup = part.state_dict()
            try:
                part.load_state_dict(live(saved[name]))
            except HybridError as exc:
                raise CheckpointError(f"{where}part {name!r}: {exc.message}", exc.recovery) from exc
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                raise CheckpointError(f"{where}part {name!r} is not a valid state "
                                      f"({type(exc).__name__}: {exc})") from exc
            done.append((part, backup))
    except BaseException:
        for part, backup in reversed(done):
            part.load_state_dict(backup)
        raise


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
