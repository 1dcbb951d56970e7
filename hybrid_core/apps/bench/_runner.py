"""Runs the baseline, the tuned baseline and the hybrid trainer in one process."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hybrid_core import DynamicsModel, HybridConfig, HybridTrainer, Phase
from hybrid_core._progress import Progress

from ._tasks import BenchTask, TaskSetup

__all__ = ["LR_FACTORS", "DynamicsFactory", "RunResult", "run_benchmark"]

DynamicsFactory = Callable[[], DynamicsModel]
"""Makes a fresh dynamics model for one hybrid run."""

MEMORY_STEPS = 150
"""Length of the separate, untimed, traced runs that measure peak memory."""

OVERHEAD_BLOCKS = 12
"""Alternating timed blocks per kind in the interleaved overhead probe."""

OVERHEAD_BLOCK_STEPS = 5
"""Steps per block of the overhead probe."""

LR_FACTORS = (0.5, 1.0, 2.0, 4.0)
"""Learning-rate multipliers the tuned baseline sweeps."""


@dataclass
class RunResult:
    """One training run: its validation curve and per-step costs."""

    seed: int
    kind: str
    """``baseline``, ``tuned`` (one lr of the sweep) or ``hybrid``."""
    lr: float
    curve: list[list[float]] = field(default_factory=list)
    """Rows ``[wall seconds, backward passes, step, validation loss]``; wall excludes evaluation."""
    step_seconds: dict[str, list[float]] = field(default_factory=dict)
    """Wall seconds of each step by kind: ``plain``, or the hybrid phase, ``predict_checked`` apart."""
    peak_bytes: int = 0
    """Peak traced allocation (Python and NumPy memory; not PyTorch/JAX memory), from a separate
    untimed run of the same seed: tracing slows Python allocations, so timed runs never trace."""
    predict_spans: list[list[int]] = field(default_factory=list)
    """Hybrid only: [first step, last step] of every PREDICT phase."""
    probe_seconds: dict[str, list[float]] = field(default_factory=dict)
    """Hybrid only: seconds per step of each block of the interleaved overhead probe, for
    ``plain`` steps and hybrid ``full`` steps (see `overhead_probe`)."""
    events: dict[str, Any] = field(default_factory=dict)

    @property
    def final_val(self) -> float:
        """Validation loss at the end of the run."""
        return self.curve[-1][3]


def _run(setup: TaskSetup, kind: str, seed: int, lr: float, steps: int, eval_every: int,
         config: HybridConfig | None, show: Progress | None, done: list[int], trace: bool = False,
         dynamics: DynamicsFactory | None = None) -> RunResult:
    result = RunResult(seed, kind, lr)
    trainer = None
    if config is not None:
        trainer = HybridTrainer(setup.model, setup.optimizer, config, None if dynamics is None else dynamics())
    times: dict[str, list[float]] = {}
    wall = 0.0
    backward = 0
    span_start = None
    if trace:
        tracemalloc.start()
    result.curve.append([0.0, 0, 0, setup.validate()])
    for i in range(steps):
        batch = setup.batch(i)
        start = time.perf_counter()
        if trainer is None:
            _, grads = setup.model.loss_and_grad(batch)
            setup.optimizer.step(grads)
            key, did_backward = "plain", True
        else:
            r = trainer.step(batch)
            did_backward = r.backward
            key = r.phase.value + ("_checked" if r.phase is Phase.PREDICT and r.loss is not None else "")
            if r.phase is Phase.PREDICT and span_start is None:
                span_start = i
            if r.phase is not Phase.PREDICT and span_start is not None:
                result.predict_spans.append([span_start, i - 1])
                span_start = None
        if setup.sync is not None:
            setup.sync()
        seconds = time.perf_counter() - start
        wall += seconds
        backward += int(did_backward)
        times.setdefault(key, []).append(seconds)
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            result.curve.append([wall, backward, i + 1, setup.validate()])
        done[0] += 1
        if show is not None:
            show.update(done[0], f"seed {seed} {kind} lr {lr:g}")
    if span_start is not None:
        result.predict_spans.append([span_start, steps - 1])
    if trace:
        result.peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    result.step_seconds = times
    if trainer is not None:
        summary = trainer.metrics.summary()
        result.events = {"events": summary["events"], "bandit": summary["bandit"],
                         "steps_per_phase": summary["steps_per_phase"], "host_syncs": trainer.host_syncs}
    return result


def overhead_probe(task: BenchTask, backend: str, seed: int, config: HybridConfig,
                   dynamics: DynamicsFactory | None = None) -> dict[str, list[float]]:
    """Seconds per step of plain steps and of hybrid FULL steps, timed in alternating blocks.

    Two fresh runs of the same seed: plain steps, and a trainer with ``config`` except that it
    never predicts (confidence threshold 1, no FULL-phase bound), so every step after warm-up
    is a FULL step with all the hybrid machinery. Alternating short blocks puts both under the
    same machine load, which separate runs minutes apart do not.
    """
    plain = task.setup(backend, seed, task.lr)
    hybrid = task.setup(backend, seed, task.lr)
    trainer = HybridTrainer(hybrid.model, hybrid.optimizer,
                            config.replace(confidence_threshold=1.0, max_full_steps=10**9),
                            None if dynamics is None else dynamics())

    def plain_step(i: int) -> None:
        _, grads = plain.model.loss_and_grad(plain.batch(i))
        plain.optimizer.step(grads)
        if plain.sync is not None:
            plain.sync()

    def hybrid_step(i: int) -> None:
        trainer.step(hybrid.batch(i))
        if hybrid.sync is not None:
            hybrid.sync()

    for i in range(config.warmup_steps + 1):  # untimed: leave WARMUP, warm caches and JIT
        hybrid_step(i)
        plain_step(i)
    out: dict[str, list[float]] = {"plain": [], "full": []}
    i = config.warmup_steps + 1
    for block in range(OVERHEAD_BLOCKS):
        order = (("plain", plain_step), ("full", hybrid_step))
        for key, step in order if block % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for j in range(OVERHEAD_BLOCK_STEPS):
                step(i + j)
            out[key].append((time.perf_counter() - start) / OVERHEAD_BLOCK_STEPS)
        i += OVERHEAD_BLOCK_STEPS
    return out


def run_benchmark(
    task: BenchTask,
    backend: str,
    seeds: Sequence[int],
    steps: int | None = None,
    config: HybridConfig | None = None,
    progress: bool = True,
    lr_factors: Sequence[float] = LR_FACTORS,
    log: Callable[[str], None] | None = None,
    dynamics: DynamicsFactory | None = None,
) -> list[RunResult]:
    """All runs of ``task`` on ``backend``: per seed the baseline, each tuned lr, and the hybrid.

    ``dynamics`` makes the hybrid trainer's dynamics model (default: the trainer's own).

    Runs alternate their order from seed to seed so slow drifts of a shared machine
    do not always hit the same kind of run.
    """
    steps = task.steps if steps is None else steps
    config = task.config if config is None else config
    factors = [f for f in lr_factors if f != 1.0]
    per_seed = 2 + len(factors)
    show = Progress(steps * per_seed * len(seeds), f"bench {task.name}/{backend}") if progress else None
    done = [0]
    results: list[RunResult] = []
    for n, seed in enumerate(seeds):
        plan: list[tuple[str, float, HybridConfig | None]] = [("baseline", task.lr, None)]
        plan += [("tuned", task.lr * f, None) for f in factors]
        plan.append(("hybrid", task.lr, config))
        if n % 2:
            plan.reverse()
        for kind, lr, cfg in plan:
            if log is not None:
                log(f"seed {seed}: {kind} lr {lr:g}")
            setup = task.setup(backend, seed, lr)
            results.append(_run(setup, kind, seed, lr, steps, task.eval_every, cfg, show, done,
                                dynamics=dynamics))
        hybrid_run = next(r for r in results if r.seed == seed and r.kind == "hybrid")
        hybrid_run.probe_seconds = overhead_probe(task, backend, seed, config, dynamics)
        for kind, cfg in (("baseline", None), ("hybrid", config)):
            traced = _run(task.setup(backend, seed, task.lr), kind, seed, task.lr, min(steps, MEMORY_STEPS),
                          task.eval_every, cfg, None, [0], trace=True, dynamics=dynamics)
            next(r for r in results if r.seed == seed and r.kind == kind).peak_bytes = traced.peak_bytes
    if show is not None:
        show.close()
    return results


def median_step(result: RunResult, *keys: str) -> float:
    """Median wall seconds of the steps of the given kinds (NaN when there were none)."""
    values = [v for key in keys for v in result.step_seconds.get(key, [])]
    return float(np.median(values)) if values else float("nan")
