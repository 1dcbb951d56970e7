"""Checkpoint directories shared by runs: file names, run ids, listing and pruning.

An automatic checkpoint is named ``step-000000500-<run id>.ckpt``: the step it was written at
and the id of the run that wrote it (the id is also stored inside the file). Files named
``step-000000500.ckpt`` were written before runs had ids; they belong to no run here, so they
are never resumed automatically and never pruned. Only regular files are considered: anything
else named like a checkpoint (a FIFO, a directory, a socket) is skipped with a warning and
never opened, so it cannot block a resume.
"""

from __future__ import annotations

import os
import re
import stat
import uuid
import warnings
from pathlib import Path
from typing import NamedTuple

from ._errors import CheckpointError

__all__ = ["RUN_ID", "CheckpointFile", "checkpoint_path", "make_directory", "new_run_id", "newest_checkpoint",
           "prune_run", "run_id_problem", "scan_directory"]

RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a run id may be (with ``fullmatch``): 1 to 64 ASCII letters, digits, ``_`` or ``-`` (it goes into file
names)."""

_NAME = re.compile(r"step-([0-9]{9,})(?:-([A-Za-z0-9_-]{1,64}))?\.ckpt")  # used with fullmatch

_WRITE_HINT = "Check the directory's permissions and free space; the run's earlier checkpoints are intact."


class CheckpointFile(NamedTuple):
    """A regular file named like an automatic checkpoint."""

    path: Path
    step: int
    run_id: str | None
    """The id in the file name; None for a file written before runs had ids."""


def new_run_id() -> str:
    """A fresh random run id (12 hex digits)."""
    return uuid.uuid4().hex[:12]


def run_id_problem(value: object) -> str | None:
    """Why ``value`` is not a valid run id, or None if it is one."""
    if not isinstance(value, str) or not RUN_ID.fullmatch(value):
        return f"run_id={value!r}: must be 1 to 64 letters, digits, '_' or '-'"
    return None


def checkpoint_path(directory: str | os.PathLike[str], step: int, run_id: str) -> Path:
    """Where run ``run_id``'s automatic checkpoint of ``step`` goes."""
    return Path(directory) / f"step-{step:09d}-{run_id}.ckpt"


def scan_directory(directory: str | os.PathLike[str]) -> list[CheckpointFile]:
    """The regular files in ``directory`` named like checkpoints, newest step first.

    A missing directory holds none. Entries named like checkpoints that are not regular files
    are skipped with a `UserWarning` (they are looked at with ``stat`` only, never opened).
    `CheckpointError` if the directory cannot be listed.
    """
    folder = Path(directory)
    found: list[CheckpointFile] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                match = _NAME.fullmatch(entry.name)
                if match is None:
                    continue
                path = folder / entry.name
                try:
                    mode = os.stat(path).st_mode  # follows a symlink: what it points to must be a regular file
                except OSError as exc:
                    warnings.warn(f"hybrid_core: skipping checkpoint {path}: cannot stat it ({exc})", stacklevel=3)
                    continue
                if not stat.S_ISREG(mode):
                    warnings.warn(f"hybrid_core: skipping {path}: named like a checkpoint but not a regular file "
                                  f"({_kind(mode)}); it was not opened", stacklevel=3)
                    continue
                found.append(CheckpointFile(path, int(match.group(1)), match.group(2)))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CheckpointError(f"{os.fspath(folder)}: cannot list the checkpoint directory ({exc})",
                              "Check that the path is a readable directory.") from exc
    return sorted(found, key=lambda f: (f.step, f.path.name), reverse=True)


def newest_checkpoint(directory: str | os.PathLike[str], run_id: str | None = None) -> list[Path]:
    """The checkpoint files of run ``run_id`` in ``directory`` (with None: of every run), newest first."""
    return [f.path for f in scan_directory(directory) if run_id is None or f.run_id == run_id]


def prune_run(directory: str | os.PathLike[str], run_id: str, written_step: int, keep: int) -> list[Path]:
    """After run ``run_id`` wrote its checkpoint of ``written_step``: remove its superseded files; return them.

    Superseded are the run's files from later steps (a timeline the run left: files that failed
    to load at resume) and, among the rest, all but the newest ``keep`` (the one just written
    is always kept). Files of other runs and files without a run id are never touched.
    `CheckpointError` (naming the file) if one cannot be removed.
    """
    own = [f for f in scan_directory(directory) if f.run_id == run_id]
    later = [f for f in own if f.step > written_step]
    kept = [f for f in own if f.step <= written_step]
    doomed = later + kept[max(keep, 1):]
    for f in doomed:
        try:
            f.path.unlink(missing_ok=True)
        except OSError as exc:
            raise CheckpointError(f"{f.path}: cannot remove an old checkpoint of run {run_id} ({exc})",
                                  _WRITE_HINT) from exc
    return [f.path for f in doomed]


def make_directory(directory: str | os.PathLike[str]) -> None:
    """Create ``directory`` (and its parents) if missing; `CheckpointError` naming it if that fails."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"{os.fspath(directory)}: cannot create the checkpoint directory ({exc})",
                              _WRITE_HINT) from exc


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"
