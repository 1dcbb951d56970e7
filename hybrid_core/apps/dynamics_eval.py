"""`hybrid-train dynamics-eval`: record real training trajectories and score dynamics models on them.

A trajectory is what the trainer would feed its dynamics model during plain training:
the 64-slot feature vector taken before each real step and the loss that step measured.
It is recorded by running `HybridTrainer` itself with a recording dynamics model whose
confidence is always 0, so no step is ever predicted and the features are exactly the
trainer's. Each recorded trajectory is then replayed through `evaluate_dynamics` for
`RSSMDynamics` and the baseline `TrendDynamics`.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from hybrid_core import (
    FEATURE_DIM,
    CheckpointError,
    ConfigError,
    DynamicsModel,
    HybridConfig,
    HybridTrainer,
    Outcome,
    Prediction,
    __version__,
)
from hybrid_core._features import LOG_LOSS_SLOT
from hybrid_core._progress import Progress
from hybrid_core.dynamics import RSSMDynamics, TrendDynamics, evaluate_dynamics

from .bench._tasks import get_task

__all__ = [
    "DEFAULT_STEPS",
    "DYNAMICS",
    "SCHEMA",
    "TASK_BACKENDS",
    "Trajectory",
    "format_table",
    "record_trajectory",
    "run_dynamics_eval",
    "score_trajectory",
]

SCHEMA = "hybrid-dynamics-eval/1"
"""Version tag of the JSON document written by ``--out``."""

TASK_BACKENDS = {"digits-mlp": "numpy", "lm-stdlib": "torch"}
"""Tasks a trajectory can be recorded on, and the backend each is trained with."""

DEFAULT_STEPS = {"digits-mlp": 1500, "lm-stdlib": 2000}
"""Training steps recorded per task when ``--steps`` is not given (lm-stdlib: about two minutes on one core)."""

HORIZONS = (1, 10, 50)
WARMUP = 100  # the trainer's default WARMUP: nothing is predicted before it
EVERY = 5
PREDICT_HORIZON = 10  # the horizon whose predict() cost is timed on its own
PREDICT_REPEATS = 30

DYNAMICS: dict[str, Callable[[int], DynamicsModel]] = {
    "RSSMDynamics": lambda seed: RSSMDynamics(FEATURE_DIM, ensemble=5, seed=seed, log_loss_slot=LOG_LOSS_SLOT),
    "TrendDynamics": lambda seed: TrendDynamics(),
}
"""The dynamics models scored, by name, each built from a seed (NumPy, default settings, 5 RSSM members)."""


class Trajectory(NamedTuple):
    """Features (T, 64) taken before each real step, the losses (T,) measured, and the recording cost."""

    task: str
    backend: str
    seed: int
    features: np.ndarray
    losses: np.ndarray
    seconds: float


class _Recorder:
    """A `DynamicsModel` that stores what it observes and never trusts itself, so nothing is predicted."""

    def __init__(self) -> None:
        self.features: list[np.ndarray] = []
        self.losses: list[float] = []

    def observe(self, features: Any, outcome: Outcome) -> None:
        self.features.append(np.array(features, dtype=np.float64))
        self.losses.append(float(outcome.loss))

    def predict(self, features: Any, horizon: int) -> Prediction:
        raise AssertionError("a recording run never predicts")  # confidence 0 keeps the trainer in FULL

    def confidence(self) -> float:
        return 0.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:  # a recorder keeps nothing worth resuming: only its own empty state fits
            raise CheckpointError("a recording dynamics model has no state to load",
                                  "Record a trajectory in one run; do not resume it from a checkpoint.")


def record_trajectory(task: str, steps: int, seed: int = 0, *, progress: bool = True) -> Trajectory:
    """Train ``task`` for ``steps`` plain real steps through `HybridTrainer` and return what its dynamics saw."""
    if task not in TASK_BACKENDS:
        raise ConfigError(f"task={task!r}: must be one of {', '.join(TASK_BACKENDS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"steps={steps!r}: must be an integer >= 2")
    spec = get_task(task)
    backend = TASK_BACKENDS[task]
    setup = spec.setup(backend, seed, spec.lr)
    recorder = _Recorder()
    # Confidence 0 never earns a PREDICT; an unreachable FULL bound rules out probes.
    config = HybridConfig(max_full_steps=10**9, seed=seed, lr_recommend=False)  # the forecasters see the given rate
    trainer = HybridTrainer(setup.model, setup.optimizer, config, recorder)
    show = Progress(steps, f"record {task}/{backend}") if progress else None
    start = time.perf_counter()
    for i in range(steps):
        result = trainer.step(setup.batch(i))
        if not result.backward:
            raise AssertionError(f"step {i} was predicted during a recording run")
        if show is not None:
            show.update(i + 1, f"loss {result.loss:.4f}")
    seconds = time.perf_counter() - start
    if show is not None:
        show.close()
    return Trajectory(task, backend, seed, np.stack(recorder.features), np.array(recorder.losses), seconds)


def score_trajectory(trajectory: Trajectory, name: str, make: Callable[[int], DynamicsModel], *,
                     warmup: int = WARMUP) -> dict[str, Any]:
    """`evaluate_dynamics` of ``make(seed)`` on ``trajectory``, plus the median and least cost of predict(horizon=10).

    ``predict_ms_longest`` is `evaluate_dynamics`'s mean cost of its calls, which ask for the longest horizon.
    """
    built: list[DynamicsModel] = []

    def factory() -> DynamicsModel:
        built.append(make(trajectory.seed))
        return built[-1]

    scores = evaluate_dynamics(factory, trajectory.features, trajectory.losses, HORIZONS, warmup, every=EVERY)
    query = trajectory.features[-1]
    times = []
    for _ in range(PREDICT_REPEATS):
        start = time.perf_counter()
        built[-1].predict(query, PREDICT_HORIZON)
        times.append(time.perf_counter() - start)
    return {
        "task": trajectory.task,
        "dynamics": name,
        **{key: {str(h): _number(v) for h, v in scores[key].items()} for key in ("r2", "skill", "coverage", "count")},
        "observe_ms": scores["observe_ms"],
        "predict_ms_longest": scores["predict_ms"],
        "predict10_ms": 1e3 * float(np.median(times)),
        "predict10_ms_min": 1e3 * min(times),
        "predictions": scores["predictions"],
    }


def run_dynamics_eval(
    tasks: Sequence[str],
    steps: int | None = None,
    seed: int = 0,
    *,
    progress: bool = True,
    dynamics: dict[str, Callable[[int], DynamicsModel]] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Record each task's trajectory and score every dynamics model on it; the JSON-ready document."""
    models = DYNAMICS if dynamics is None else dynamics
    rows, recorded = [], []
    for task in tasks:
        n = DEFAULT_STEPS.get(task, 0) if steps is None else steps
        trajectory = record_trajectory(task, n, seed, progress=progress)
        recorded.append({"task": task, "backend": trajectory.backend, "steps": n,
                         "record_seconds": trajectory.seconds, "first_loss": float(trajectory.losses[0]),
                         "last_loss": float(trajectory.losses[-1])})
        for name, make in models.items():
            if progress:
                print(f"scoring {name} on {task} ({n} steps)", file=sys.stderr, flush=True)
            rows.append(score_trajectory(trajectory, name, make, warmup=min(WARMUP, n - 1)))
    return {"schema": SCHEMA, "command": command, "seed": seed, "horizons": list(HORIZONS), "warmup": WARMUP,
            "every": EVERY, "predict_horizon": PREDICT_HORIZON, "machine": _machine(), "trajectories": recorded,
            "rows": rows}


def format_table(doc: dict[str, Any]) -> str:
    """The rows as a fixed-width text table."""
    hs = [str(h) for h in doc["horizons"]]
    head = ["task", "dynamics", *(f"R2 h={h}" for h in hs), *(f"cov90 h={h}" for h in hs), "observe ms",
            f"predict(h={doc['predict_horizon']}) ms"]
    lines = [head]
    for row in doc["rows"]:
        lines.append([row["task"], row["dynamics"], *(_fmt(row["r2"][h], "{:.3f}") for h in hs),
                      *(_fmt(row["coverage"][h], "{:.2f}") for h in hs), f"{row['observe_ms']:.3f}",
                      f"{row['predict10_ms']:.3f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _number(value: float) -> float | None:
    """JSON has no NaN: undefined scores are null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "hybrid_core": __version__}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info
