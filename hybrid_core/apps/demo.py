"""The `hybrid-train demo`: the reference MLP on the bundled digits, hybrid versus plain training.

Runs three trainings from the same initial weights and the same batches, in one
process: the hybrid trainer for ``steps`` steps, plain training for the same
number of steps, and plain training for as many steps as the hybrid run made
backward passes (the fair peer when backward passes are the cost).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from hybrid_core import ConfigError, HybridConfig, HybridTrainer, Phase
from hybrid_core._backend import from_numpy, namespace_for, to_numpy
from hybrid_core._progress import Progress
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

from .data import split_digits

__all__ = ["BACKENDS", "DemoRow", "format_table", "load_backend", "run_demo"]

BACKENDS = ("numpy", "array_api_strict", "torch", "jax")
"""Backend names the demo accepts: the CPU backends of `hybrid_core._backend.BACKEND_MODULES`."""


class DemoRow(NamedTuple):
    """One training run of the demo."""

    run: str
    steps: int
    backward_passes: int
    steps_per_phase: dict[str, int]
    wall_seconds: float
    val_loss: float
    val_accuracy: float
    lr: float = math.nan
    """The learning rate the run ended with (the hybrid's recommendation may have raised it)."""
    weights: str = "raw"
    """Which weights were evaluated: ``raw``, or the hybrid's read-out (``lawa``, ``ema``)."""


def load_backend(name: str) -> ModuleType:
    """The array namespace for a demo backend name; `BackendError` if it is not installed."""
    if name not in BACKENDS:
        raise ConfigError(f"backend={name!r}: must be one of {', '.join(BACKENDS)}")
    return namespace_for(name)


def _batches(xp: Any, x: Any, y: Any, n: int, batch_size: int, seed: int) -> Iterator[tuple[Any, Any]]:
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = from_numpy(xp, order[start:start + batch_size])
            yield xp.take(x, idx, axis=0), xp.take(y, idx, axis=0)


def run_demo(
    backend: str = "numpy",
    steps: int = 600,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    hidden: int = 64,
    config: HybridConfig | None = None,
    progress: bool = True,
) -> tuple[list[DemoRow], HybridTrainer]:
    """Train hybrid and plain side by side; return one `DemoRow` per run and the hybrid trainer."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r}: must be an integer >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: must be an integer >= 1")
    xp = load_backend(backend)
    split = split_digits(seed=seed)
    # float32 where that is the framework's norm; float64 on the reference namespaces.
    dtype = xp.float32 if backend in ("torch", "jax") else xp.float64
    x_tr = from_numpy(xp, split.x_train, dtype=dtype)
    y_tr = from_numpy(xp, split.y_train)
    val = (from_numpy(xp, split.x_val, dtype=dtype), from_numpy(xp, split.y_val))
    n = split.y_train.shape[0]
    config = config if config is not None else HybridConfig(seed=seed)

    def fresh() -> tuple[MLP, Adam]:
        model = MLP([64, hidden, 10], xp=xp, seed=seed, dtype=dtype)
        return model, Adam(model, lr=lr)

    model, opt = fresh()
    trainer = HybridTrainer(model, opt, config)
    start = time.perf_counter()
    summary = trainer.fit(_batches(xp, x_tr, y_tr, n, batch_size, seed), steps, progress=progress)
    seconds = time.perf_counter() - start
    with trainer.evaluation_parameters() as weights:
        rows = [_row("hybrid", model, val, summary["steps"], summary["backward_passes"],
                     summary["steps_per_phase"], seconds, float(opt.lr), weights)]
    rows.append(_row("hybrid, raw weights", model, val, summary["steps"], summary["backward_passes"],
                     summary["steps_per_phase"], seconds, float(opt.lr)))
    for label, count in (("plain, same steps", steps), ("plain, same backward passes", summary["backward_passes"])):
        rows.append(_plain(label, fresh(), _batches(xp, x_tr, y_tr, n, batch_size, seed), count, val, progress))
    return rows, trainer


def _plain(label: str, pair: tuple[MLP, Adam], batches: Iterator[Any], count: int, val: Any,
           progress: bool) -> DemoRow:
    model, opt = pair
    show = Progress(count, label) if progress else None
    start = time.perf_counter()
    for i in range(count):
        _, grads = model.loss_and_grad(next(batches))
        opt.step(grads)
        if show is not None:
            show.update(i + 1)
    if show is not None:
        show.close()
    phases = {p.value: 0 for p in Phase} | {Phase.FULL.value: count}
    return _row(label, model, val, count, count, phases, time.perf_counter() - start, float(opt.lr))


def _row(label: str, model: MLP, val: Any, steps: int, backward: int, phases: dict[str, int],
         seconds: float, lr: float, weights: str = "raw") -> DemoRow:
    loss = float(to_numpy(model.loss(val)))
    acc = float(to_numpy(model.accuracy(val)))
    return DemoRow(label, steps, backward, dict(phases), seconds, loss, acc, lr, weights)


def format_table(rows: list[DemoRow]) -> str:
    """A plain-text table of the demo runs."""
    head = ("run", "steps", "backward", "warmup", "full", "predict", "correct", "lr", "weights", "wall s",
            "val loss", "val acc")
    body = [
        (r.run, str(r.steps), str(r.backward_passes),
         *(str(r.steps_per_phase.get(p.value, 0)) for p in Phase), f"{r.lr:.3g}", r.weights,
         f"{r.wall_seconds:.2f}", f"{r.val_loss:.4f}" if math.isfinite(r.val_loss) else "nan",
         f"{100 * r.val_accuracy:.1f}%")
        for r in rows
    ]
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *(fmt(b) for b in body)])
