"""A trainer to and from a checkpoint file: `save`, `load` and `restore` of `HybridTrainer`.

A checkpoint also says what run it belongs to: the run id, the learning rate it started with, its config.
`load` and `restore` check these against what the caller passed *before* anything is restored:
a differing config or starting learning rate is a `ConfigError` listing the differences (nothing
is replaced silently), a file of another run is refused with `CheckpointError`.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import array_api_compat

from ._codec import DEFAULT_MAX_BYTES, decode, encode
from ._collective import Collective, gather_flags
from ._config import HybridConfig
from ._errors import CheckpointError, ConfigError, HybridError
from ._partcheck import check_parts_fit
from ._persist import _host, read_checkpoint, restore_parts, write_checkpoint
from ._protocols import DynamicsModel, Model, Optimizer
from ._rundir import run_id_problem
from .dynamics import RSSMDynamics

if TYPE_CHECKING:
    from ._trainer import HybridTrainer

__all__ = [
    "SavedRun",
    "load_trainer",
    "require_same_start",
    "restore_into",
    "restore_trainer",
    "save_trainer",
    "saved_config",
    "saved_run",
    "start_lr",
]

T = TypeVar("T", bound="HybridTrainer")


class SavedRun(NamedTuple):
    """The ``"run"`` record of a checkpoint (both None in a file written before runs had ids)."""

    id: str | None
    lr: float | None
    """The optimizer's learning rate when the run started (None when it was not a readable number)."""


def start_lr(optimizer: Optimizer) -> float | None:
    """The optimizer's learning rate as a finite float, or None (not readable, or a schedule on the device)."""
    if getattr(optimizer, "lr_on_device", False) is True:
        return None  # a schedule: the rate moves with the step, and reading it is a device read
    try:
        lr = float(optimizer.lr)
    except (AttributeError, TypeError, ValueError, HybridError):
        return None
    return lr if math.isfinite(lr) else None


def saved_run(path: str | os.PathLike[str], raw: dict[str, Any]) -> SavedRun:
    """The run record of the checkpoint document ``raw``; `CheckpointError` if it is malformed."""
    run = raw.get("run")
    if run is None:
        return SavedRun(None, None)
    if not isinstance(run, dict) or run_id_problem(run.get("id")) is not None:
        raise CheckpointError(f"{os.fspath(path)}: the checkpoint's run record is malformed ({run!r:.200})")
    lr = run.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)):
        raise CheckpointError(f"{os.fspath(path)}: the checkpoint's starting learning rate {lr!r} is not a number")
    return SavedRun(run["id"], None if lr is None else float(lr))


def saved_config(path: str | os.PathLike[str], raw: dict[str, Any]) -> HybridConfig:
    """The config stored in the checkpoint document ``raw``; `CheckpointError` if it is not a valid one."""
    try:
        return HybridConfig.from_dict(raw["config"])
    except Exception as exc:  # anything a malformed dict makes the config's checks raise
        raise CheckpointError(f"{os.fspath(path)}: the saved config is not valid ({exc})") from exc


def require_same_start(path: str | os.PathLike[str], saved: HybridConfig, mine: HybridConfig,
                       saved_lr: float | None, my_lr: float | None) -> None:
    """`ConfigError` listing every config field and the learning rate in which the caller differs from the file.

    The learning rates are compared only when both are known (a file from before run records
    holds none; a scheduled rate on the device is not compared).
    """
    theirs, ours = saved.to_dict(), mine.to_dict()
    problems = [f"{name}: the checkpoint has {theirs[name]!r}, this run {ours[name]!r}"
                for name in theirs if theirs[name] != ours[name]]
    if saved_lr is not None and my_lr is not None and saved_lr != my_lr:
        problems.append(f"learning rate: the checkpoint's run started with {saved_lr!r}, this one with {my_lr!r}")
    if problems:
        raise ConfigError(
            problems,
            f"{os.fspath(path)} was saved with these settings. Resume with them (HybridTrainer.load(..., "
            "config=None) takes the file's config; build the optimizer with the run's starting learning rate, "
            "then set optimizer.lr to change it), or start a new run (another run_id or directory).",
        )


def load_trainer(cls: type[T], path: str | os.PathLike[str], model: Model, optimizer: Optimizer,
                 config: HybridConfig | None, dynamics: DynamicsModel | None,
                 max_bytes: int = DEFAULT_MAX_BYTES, collective: Collective | None = None) -> T:
    """`HybridTrainer.load` (see there): every check before the trainer is built and the parts restored."""
    if config is not None and not isinstance(config, HybridConfig):
        raise ConfigError(f"config must be a HybridConfig or None, got {type(config).__name__}")
    raw = read_checkpoint(path, max_bytes)
    saved = saved_config(path, raw)
    run = saved_run(path, raw)
    require_same_start(path, saved, saved if config is None else config, run.lr, start_lr(optimizer))
    if dynamics is None and raw.get("dynamics_type") == "RSSMDynamics":
        dynamics = RSSMDynamics(seed=saved.seed)
    trainer = cls(model, optimizer, saved if config is None else config, dynamics, collective=collective)
    restore_into(trainer, path, raw)
    _adopt(trainer, run)
    return trainer


def restore_trainer(trainer: HybridTrainer, path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES,
                    run_id: str | None = None) -> None:
    """`HybridTrainer.restore` (see there)."""
    raw = read_checkpoint(path, max_bytes)
    run = saved_run(path, raw)
    if run_id is not None and run.id != run_id:
        raise CheckpointError(f"{os.fspath(path)}: written by run {run.id or '(no id)'}, not by run {run_id}",
                              "Pass the file's run_id to resume that run.")
    require_same_start(path, saved_config(path, raw), trainer.config, run.lr, trainer.run_lr)
    restore_into(trainer, path, raw)
    _adopt(trainer, run)


def _adopt(trainer: HybridTrainer, run: SavedRun) -> None:
    """Continue the loaded run: its id and starting rate (a file without a run record keeps the trainer's)."""
    if run.id is not None:
        trainer.run_id = run.id
    if run.lr is not None:
        trainer.run_lr = run.lr


def save_trainer(trainer: HybridTrainer, path: str | os.PathLike[str]) -> None:
    """`HybridTrainer.save` (see there): pending steps read, then every part and the run record written.

    With several ranks, every rank's random generators are gathered (one collective), rank 0 writes, and
    a second collective tells every rank whether the file was written (a barrier).
    """
    trainer.flush()
    extra: dict[str, Any] = {"dynamics_type": type(trainer.dynamics).__name__,
                             "run": {"id": trainer.run_id, "lr": trainer.run_lr}}
    coll = trainer.collective
    if coll.world_size > 1:
        extra["world_size"] = coll.world_size
        extra["rng_by_rank"] = coll.gather_bytes(encode(trainer.rng.state_dict(), _host), "checkpoint: random state")
    failure: CheckpointError | None = None
    if coll.rank == 0:
        try:
            write_checkpoint(path, trainer.config.to_dict(), trainer.parts(), extra)
        except CheckpointError as exc:
            failure = exc
    if not all(gather_flags(coll, failure is None, "checkpoint: written")):
        if failure is not None:
            raise failure
        raise CheckpointError(f"{os.fspath(path)}: rank 0 could not write the checkpoint (its error says why)",
                              "Fix what rank 0 reported (disk space, permissions) and save again.")


def restore_into(trainer: HybridTrainer, path: str | os.PathLike[str], raw: dict[str, Any]) -> None:
    """Every part of ``trainer`` from the checkpoint document ``raw``: all checked first, then applied, or nothing."""
    saved_dyn = raw.get("dynamics_type")
    if type(trainer.dynamics).__name__ != saved_dyn:
        raise CheckpointError(f"{os.fspath(path)}: saved with dynamics {saved_dyn}, "
                              f"not {type(trainer.dynamics).__name__}", f"Pass dynamics={saved_dyn}(...) to load it.")
    trainer.flush()
    raw = _own_random_state(path, raw, trainer.collective.rank, trainer.collective.world_size)
    params = trainer.model.parameters()
    config, dim = trainer.config, trainer.bandit.dim
    restore_parts(trainer.parts(), raw["parts"], trainer.xp, array_api_compat.device(params[0]),
                  f"{os.fspath(path)}: ", optional=("readout", "lr", "freeze", "rng", "data", "callbacks"),
                  check=lambda s: check_parts_fit(s, params, config, dim))
    trainer.ledger.verify(trainer.model, trainer.optimizer)


def _own_random_state(path: str | os.PathLike[str], raw: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """``raw`` with this rank's random generators as its ``rng`` part when the file holds every rank's
    (written by a run of as many processes); otherwise the file's (rank 0's) for every rank."""
    by_rank = raw.get("rng_by_rank")
    if by_rank is not None and raw.get("world_size") != world_size:
        warnings.warn(f"hybrid_core: {os.fspath(path)} was written by a run of {raw.get('world_size')} processes and "
                      f"is resumed by {world_size}: every rank takes rank 0's random state; the data shards are "
                      "yours to re-split", stacklevel=5)
    if by_rank is None or raw.get("world_size") != world_size:
        return raw
    if not isinstance(by_rank, list) or len(by_rank) != world_size or not isinstance(by_rank[rank], bytes):
        raise CheckpointError(f"{os.fspath(path)}: the per-rank random states are malformed")
    parts = raw.get("parts")
    if not isinstance(parts, dict):
        return raw  # restore_parts says what is wrong with the parts
    return {**raw, "parts": {**parts, "rng": decode(by_rank[rank])}}
