"""`RSSMDynamics.state_dict` / `load_state_dict`: everything that decides its next outputs, checked on load.

A state is plain data (numbers, lists, host or namespace arrays), so the trainer's
msgpack checkpoints hold it. Loading validates every part before it replaces
anything: a state of another format, other sizes or broken arrays raises
`CheckpointError` and leaves the model as it was.
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Any

import numpy as np

from .._backend import to_numpy
from .._errors import CheckpointError
from ._accuracy import AccuracyTracker
from ._adam import Adam
from ._normalizer import RunningNormalizer, RunningScale

# The model is passed in (an `RSSMDynamics`); this module does not import it back, so the two
# modules form no import loop even for type checkers.
RSSMModel = Any

__all__ = ["FORMAT", "check", "dump", "load"]

FORMAT = "RSSMDynamics/3"
"""The state format; states of earlier formats are refused (their layout differs)."""

_SHAPE_KEYS = ("feature_dim", "hidden", "latent", "ensemble", "window", "log_loss_slot", "train_every", "windows")
_ROW_KEYS = ("features", "log_loss", "level", "trend", "scale_target", "scale_mask", "weight")


def dump(model: RSSMModel) -> dict[str, Any]:
    """The state of ``model`` as a dict of copies."""
    xp, adam = model._xp, model._adam

    def copied(value: Any) -> Any:
        return None if value is None else xp.asarray(value, copy=True)

    rows = model._stored_rows() if model._rows else None
    return {
        "format": FORMAT,
        "config": dict(model._config),
        "weights": copied(model._flat),
        "adam_step": adam.step_count,
        "exp_avg": copied(adam.exp_avg),
        "exp_avg_sq": copied(adam.exp_avg_sq),
        "h_run": copied(model._h_run),
        "h_before": [copied(h) for h in model._h_before],
        "unscored": [list(t) for t in model._unscored],
        "features": model._features.state_dict(),
        "targets": model._targets.state_dict(),
        "rng": copy.deepcopy(model._rng.bit_generator.state),
        "rows": {k: (np.zeros(0) if rows is None else getattr(rows, k)) for k in _ROW_KEYS},  # fresh arrays
        "seen": model._seen,
        "accuracy": model._accuracy.state_dict(),
        "spread": model._spread,
        "last_log_loss": model._last_log_loss,
        "holt": list(model._holt),
    }


def check(model: RSSMModel, state: dict[str, Any]) -> dict[str, Any]:
    """The attributes `load` would set from ``state``; `CheckpointError` if it is malformed (nothing changes)."""
    try:
        return _read(model, state)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"RSSMDynamics state is malformed ({type(exc).__name__}: {exc})",
                              "Load a state_dict() saved by RSSMDynamics with the same sizes.") from exc


def load(model: RSSMModel, state: dict[str, Any]) -> None:
    """Replace ``model``'s state with ``state`` (as `dump` made it), or raise `CheckpointError` first."""
    for name, value in check(model, state).items():
        setattr(model, name, value)


def _read(model: RSSMModel, state: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"state format {found!r} is not {FORMAT!r}",
                              "Load a state_dict() saved by this version of RSSMDynamics.")
    config = dict(state["config"])
    wrong = [k for k in _SHAPE_KEYS if config[k] != model._config[k]]
    if wrong:
        raise CheckpointError(
            "state was saved by an RSSMDynamics with other sizes: "
            + ", ".join(f"{k}={config[k]!r} (here {model._config[k]!r})" for k in wrong),
            "Construct RSSMDynamics with the saved sizes before loading.")
    as_xp = _converter(model)
    flat = as_xp(state["weights"])
    adam = Adam(float(config["lr"]), float(config["clip"]))
    adam.step_count = int(state["adam_step"])
    if adam.step_count:
        adam.exp_avg, adam.exp_avg_sq = as_xp(state["exp_avg"]), as_xp(state["exp_avg_sq"])
    if any(tuple(a.shape) != tuple(model._flat.shape)
           for a in [flat, *([adam.exp_avg, adam.exp_avg_sq] if adam.step_count else [])]):
        raise CheckpointError("state weights have the wrong shape", "Load a state saved with the same sizes.")
    h_run = as_xp(state["h_run"])
    if len(state["h_before"]) > model._rows.maxlen:
        raise CheckpointError(f"state holds {len(state['h_before'])} GRU states, more than {model._rows.maxlen}",
                              "Load an unmodified state_dict().")
    h_before = [as_xp(h) for h in state["h_before"]]
    state_shape = tuple(model._h_run.shape)
    if any(tuple(h.shape) != state_shape for h in [h_run, *h_before]):
        raise CheckpointError("state GRU states have the wrong shape", "Load a state saved with the same sizes.")
    arrays = [flat, h_run, *h_before, *([adam.exp_avg, adam.exp_avg_sq] if adam.step_count else [])]
    if not all(np.all(np.isfinite(to_numpy(a))) for a in arrays):
        raise CheckpointError("state weights, Adam moments or GRU states hold NaN or Inf",
                              "Load an earlier checkpoint.")
    rows = _read_rows(state["rows"], len(h_before), config)
    unscored = [(float(a), float(b)) for a, b in state["unscored"]]
    if len(unscored) > min(len(h_before), config["train_every"]):
        raise CheckpointError(f"state holds {len(unscored)} unscored rows, more than it can score",
                              "Load an unmodified state_dict().")
    features = RunningNormalizer(config["feature_dim"])
    features.load_state_dict(state["features"])
    if features.mean.shape != (config["feature_dim"],) or features.var.shape != features.mean.shape:
        raise CheckpointError("state feature statistics have the wrong shape", "Load an unmodified state_dict().")
    targets = RunningScale(1.0)
    targets.load_state_dict(state["targets"])
    rng = np.random.default_rng()
    rng.bit_generator.state = copy.deepcopy(state["rng"])
    accuracy = AccuracyTracker(model._accuracy.lookahead, model._accuracy.span, model._accuracy.step_rate,
                               model._accuracy.forecast_rate)
    accuracy.load_state_dict(state["accuracy"])
    level, trend = (float(v) for v in state["holt"])
    keep = model._rows.maxlen
    seen = int(state["seen"])
    if seen < 0 or len(rows) != min(seen, keep):
        raise CheckpointError(f"state has {len(rows)} stored rows after {seen} observations (expected "
                              f"{min(max(seen, 0), keep)})", "Load an unmodified state_dict().")
    return {
        "_config": config, "_flat": flat, "_adam": adam, "_h_run": h_run,
        "_h_before": deque(h_before, maxlen=keep), "_rows": deque(rows, maxlen=keep),
        "_unscored": unscored, "_features": features,
        "_targets": targets, "_rng": rng, "_seen": seen, "_accuracy": accuracy,
        "_spread": float(state["spread"]), "_last_log_loss": float(state["last_log_loss"]),
        "_holt": (level, trend),
    }


def _read_rows(saved: dict[str, Any], count: int, config: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The stored rows as `RSSMDynamics` keeps them, after checking there are ``count`` of each shape."""
    if count == 0:
        return []
    columns = {k: np.array(saved[k], dtype=np.float64) for k in _ROW_KEYS}
    expected = {"features": (count, config["feature_dim"]), "weight": (count, config["ensemble"])}
    for key, column in columns.items():
        if column.shape != expected.get(key, (count,)):
            raise CheckpointError(f"state rows {key!r} have shape {column.shape}, expected "
                                  f"{expected.get(key, (count,))}", "Load an unmodified state_dict().")
    rows = []
    for i in range(count):
        rows.append((columns["features"][i].copy(), *(float(columns[k][i]) for k in _ROW_KEYS[1:-1]),
                     columns["weight"][i].copy()))
    return rows


def _converter(model: RSSMModel) -> Any:
    def as_xp(value: Any) -> Any:
        host = np.asarray(value) if isinstance(value, (list, float, int)) else to_numpy(value)
        return model._to_xp(np.array(host, dtype=np.float64))

    return as_xp
