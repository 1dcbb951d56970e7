"""Runs the native baseline, the tuned baseline and the hybrid trainer in one process, and the overhead probe."""

from __future__ import annotations

import itertools
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hybrid_core import DynamicsModel, HybridConfig, HybridTrainer, Phase
from hybrid_core._progress import Progress

from ._tasks import BenchTask, NativeRun, TaskSetup

__all__ = ["LR_FACTORS", "DynamicsFactory", "RunResult", "active_config", "overhead_probe", "run_benchmark",
           "warm_process"]

DynamicsFactory = Callable[[], DynamicsModel]
"""Makes a fresh dynamics model for one hybrid run."""

MEMORY_STEPS = 150
"""Length of the separate, untimed, traced runs that measure peak memory."""

OVERHEAD_BLOCKS = 24
"""Timed blocks per kind in the interleaved overhead probe (each block runs every kind once)."""

OVERHEAD_BLOCK_STEPS = 8
"""Steps per block of the overhead probe: the default ``read_every``, so every block holds one read."""

PROBE_KINDS = ("native", "idle", "active")
"""The overhead probe's kinds: the native loop, an idle trainer, and a trainer that never predicts nor idles."""

LR_FACTORS = (0.5, 1.0, 2.0, 4.0)
"""Learning-rate multipliers the tuned baseline sweeps."""


def active_config(config: HybridConfig) -> HybridConfig:
    """``config`` for a trainer that never predicts and never idles: every step after warm-up is a FULL step
    with all the bookkeeping (statistics every ``read_every`` steps, features, the dynamics model fed).

    Only arm 0 (keep training) is offered; ``confidence_threshold=1`` would not do, since a dynamics
    model's confidence can be exactly 1.
    """
    return config.replace(horizon_arms=(0,), max_full_steps=10**9, idle_after=0)


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
    """Wall seconds of each step by kind: ``plain`` (native loop), or the hybrid phase, ``predict_checked`` apart."""
    loop: str = ""
    """What ran, in words: the native loop (baseline, tuned) or what the hybrid trainer drives."""
    peak_bytes: int = 0
    """Peak traced allocation (Python and NumPy memory; not PyTorch/JAX memory), from a separate
    untimed run of the same seed: tracing slows Python allocations, so timed runs never trace."""
    predict_spans: list[list[int]] = field(default_factory=list)
    """Hybrid only: [first step, last step] of every PREDICT phase."""
    probe_seconds: dict[str, list[float]] = field(default_factory=dict)
    """Hybrid only: seconds per step of each block of the interleaved overhead probe, by kind
    (`PROBE_KINDS`), in block order (see `overhead_probe`)."""
    probe_checks: dict[str, Any] = field(default_factory=dict)
    """Hybrid only: what the probe's trainers were doing at its end (phase, idle, steps predicted)."""
    events: dict[str, Any] = field(default_factory=dict)
    process_warmup: dict[str, float] = field(default_factory=dict)
    """The process's untimed warm-up (`warm_process`), the same for every run of one invocation."""

    @property
    def final_val(self) -> float:
        """Validation loss at the end of the run."""
        return self.curve[-1][3]


RUN_BLOCK_STEPS = 10
"""The timed runs of one seed advance together, this many steps of each in turn (see `run_benchmark`)."""

StepFn = Callable[[int, Any], tuple[str, bool]]
"""Runs step ``i`` on a batch; returns (step kind, whether it ran a backward pass)."""


class _Run:
    """One timed run, advanced a block of steps at a time; validation (untimed) at step 0, every
    ``eval_every`` steps and at the end. ``finish`` runs, timed, right after the last step; ``on_end``
    (untimed) once the run is complete."""

    def __init__(self, result: RunResult, batch: Callable[[int], Any], step: StepFn, validate: Callable[[], float],
                 sync: Callable[[], None] | None, steps: int, eval_every: int,
                 finish: Callable[[], None] | None = None, on_end: Callable[[], None] | None = None) -> None:
        self.result, self._batch, self._step, self._validate, self._sync = result, batch, step, validate, sync
        self._steps, self._eval_every, self._finish, self._on_end = steps, eval_every, finish, on_end
        self._i = 0
        self._wall = 0.0
        self._backward = 0
        result.curve.append([0.0, 0, 0, validate()])

    def advance(self, n: int, show: Progress | None = None, done: list[int] | None = None) -> None:
        """Take the next ``n`` steps (fewer if the run ends first)."""
        result, times = self.result, self.result.step_seconds
        for _ in range(min(n, self._steps - self._i)):
            i = self._i
            b = self._batch(i)
            start = time.perf_counter()
            key, did_backward = self._step(i, b)
            if self._finish is not None and i + 1 == self._steps:
                self._finish()
            if self._sync is not None:
                self._sync()
            seconds = time.perf_counter() - start
            self._wall += seconds
            self._backward += int(did_backward)
            times.setdefault(key, []).append(seconds)
            self._i = i + 1
            if self._i % self._eval_every == 0 or self._i == self._steps:
                result.curve.append([self._wall, self._backward, self._i, self._validate()])
            if done is not None:
                done[0] += 1
                if show is not None:
                    show.update(done[0], f"seed {result.seed} {result.kind} lr {result.lr:g}")
        if self._i == self._steps and self._on_end is not None:
            self._on_end()
            self._on_end = None


def _native(run: NativeRun, kind: str, seed: int, lr: float, steps: int, eval_every: int) -> _Run:
    def step(i: int, b: Any) -> tuple[str, bool]:
        run.step(b)
        return "plain", True

    return _Run(RunResult(seed, kind, lr, loop=run.loop), run.batch, step, run.validate, run.sync, steps, eval_every)


def _hybrid(setup: TaskSetup, seed: int, lr: float, steps: int, eval_every: int, config: HybridConfig,
            dynamics: DynamicsFactory | None = None) -> _Run:
    result = RunResult(seed, "hybrid", lr, loop=setup.loop)
    trainer = HybridTrainer(setup.model, setup.optimizer, config, None if dynamics is None else dynamics())
    span_start: list[int | None] = [None]

    def step(i: int, b: Any) -> tuple[str, bool]:
        r = trainer.step(b)
        key = r.phase.value + ("_checked" if r.phase is Phase.PREDICT and r.loss is not None else "")
        if r.phase is Phase.PREDICT and span_start[0] is None:
            span_start[0] = i
        if r.phase is not Phase.PREDICT and span_start[0] is not None:
            result.predict_spans.append([span_start[0], i - 1])
            span_start[0] = None
        return key, r.backward

    def on_end() -> None:
        if span_start[0] is not None:
            result.predict_spans.append([span_start[0], steps - 1])
        summary = trainer.metrics.summary()
        result.events = {"events": summary["events"], "bandit": summary["bandit"],
                         "steps_per_phase": summary["steps_per_phase"], "host_syncs": trainer.host_syncs}

    # The last step also reads what is still pending (`fit` does the same), inside the timer.
    return _Run(result, setup.batch, step, setup.validate, setup.sync, steps, eval_every, trainer.flush, on_end)


def _traced(run: _Run, steps: int) -> int:
    """Peak traced bytes of ``run`` taken alone from start to end (untimed use only: tracing slows allocations)."""
    tracemalloc.start()
    try:
        run.advance(steps)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def overhead_probe(task: BenchTask, backend: str, seed: int, config: HybridConfig,
                   dynamics: DynamicsFactory | None = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds per step of the native loop, an idle trainer and an active trainer, timed in rotating blocks.

    Three fresh runs of the same seed, on the same batches:

    - ``native``: the baseline's loop (`NativeRun`);
    - ``idle``: a trainer with ``config``; after the warm-up its cadence is put into an idle spell
      that never ends, so every timed step is an idle FULL step (what a user pays once the
      trainer has learned not to predict);
    - ``active``: a trainer with `active_config` (only arm 0, no FULL-phase bound, never idle), so
      every timed step is a FULL step with all the bookkeeping.

    All three first take ``warmup_steps + 1`` untimed steps (out of WARMUP; caches warm; JIT
    compiled). Then `OVERHEAD_BLOCKS` blocks of `OVERHEAD_BLOCK_STEPS` steps each, every kind
    once per block, in an order that rotates through the six permutations, so all three run under
    the same machine load. Returns (seconds per step of each block by kind, what the trainers
    were doing at the end).
    """
    native = task.native_setup(backend, seed, task.lr)
    trainers = {}
    syncs: dict[str, Callable[[], None] | None] = {"native": native.sync}
    for kind, cfg in (("idle", config), ("active", active_config(config))):
        setup = task.setup(backend, seed, task.lr)
        trainers[kind] = HybridTrainer(setup.model, setup.optimizer, cfg, None if dynamics is None else dynamics())
        syncs[kind] = setup.sync

    def stepper(kind: str) -> Callable[[Any], None]:
        sync = syncs[kind]
        if kind == "native":
            def run(b: Any) -> None:
                native.step(b)
                if sync is not None:
                    sync()
        else:
            trainer = trainers[kind]

            def run(b: Any) -> None:
                trainer.step(b)
                if sync is not None:
                    sync()
        return run

    steppers = {kind: stepper(kind) for kind in PROBE_KINDS}
    warm = config.warmup_steps + 1
    for i in range(warm):  # untimed: leave WARMUP, warm caches and compile
        b = native.batch(i)
        for kind in PROBE_KINDS:
            steppers[kind](b)
    idle = trainers["idle"]
    idle.cadence.start_idle(idle.steps_done, 10**9)
    orders = list(itertools.permutations(PROBE_KINDS))
    out: dict[str, list[float]] = {kind: [] for kind in PROBE_KINDS}
    i = warm
    for block in range(OVERHEAD_BLOCKS):
        batches = [native.batch(i + j) for j in range(OVERHEAD_BLOCK_STEPS)]
        for kind in orders[block % len(orders)]:
            run = steppers[kind]
            start = time.perf_counter()
            for b in batches:
                run(b)
            out[kind].append((time.perf_counter() - start) / OVERHEAD_BLOCK_STEPS)
        i += OVERHEAD_BLOCK_STEPS
    checks = {}
    for kind, trainer in trainers.items():
        trainer.flush()
        steps = trainer.metrics.summary()["steps_per_phase"]
        checks[kind] = {"phase": trainer.phase.value, "idle": trainer.idle,
                        "predicted_steps": int(steps.get(Phase.PREDICT.value, 0)),
                        "steps": trainer.steps_done, "host_syncs": trainer.host_syncs}
    return out, checks


def warm_process(task: BenchTask, backend: str, config: HybridConfig,
                 dynamics: DynamicsFactory | None = None) -> dict[str, float]:
    """Untimed, once per process before any timed run: ``2 * read_every`` native steps and as many steps of a
    throw-away hybrid trainer (two reads), so one-time costs of the process (first autograd call, kernel
    selection at the first measured step, lazy imports) are not charged to whichever run comes first.

    Returns the wall seconds each took (JSON ``process_warmup_s``), so those one-time costs stay visible.
    """
    steps = 2 * config.read_every
    native = task.native_setup(backend, 0, task.lr)
    start = time.perf_counter()
    for i in range(steps):
        native.step(native.batch(i))
        if native.sync is not None:
            native.sync()
    native_s = time.perf_counter() - start
    setup = task.setup(backend, 0, task.lr)
    trainer = HybridTrainer(setup.model, setup.optimizer, config, None if dynamics is None else dynamics())
    start = time.perf_counter()
    for i in range(steps):
        trainer.step(setup.batch(i))
        if setup.sync is not None:
            setup.sync()
    trainer.flush()
    return {"steps": steps, "native": native_s, "hybrid": time.perf_counter() - start}


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
    """All runs of ``task`` on ``backend``: per seed the native baseline, each tuned lr, and the hybrid.

    ``dynamics`` makes the hybrid trainer's dynamics model (default: the trainer's own).

    The runs of one seed are timed together: each takes `RUN_BLOCK_STEPS` steps in turn, in an
    order reversed every block, so slow drifts of a shared machine hit every kind of run alike
    and ratios between runs of a seed compare work done under the same load.
    """
    steps = task.steps if steps is None else steps
    config = task.config if config is None else config
    factors = [f for f in lr_factors if f != 1.0]
    per_seed = 2 + len(factors)
    show = Progress(steps * per_seed * len(seeds), f"bench {task.name}/{backend}") if progress else None
    done = [0]
    results: list[RunResult] = []
    warmup = warm_process(task, backend, config, dynamics)
    for n, seed in enumerate(seeds):
        plan: list[tuple[str, float]] = [("baseline", task.lr)]
        plan += [("tuned", task.lr * f) for f in factors]
        plan.append(("hybrid", task.lr))
        if n % 2:
            plan.reverse()
        runs = []
        for kind, lr in plan:  # every run is built (and JIT-compiled) before any of them is timed
            if log is not None:
                log(f"seed {seed}: {kind} lr {lr:g}")
            if kind == "hybrid":
                runs.append(_hybrid(task.setup(backend, seed, lr), seed, lr, steps, task.eval_every, config,
                                    dynamics))
            else:
                runs.append(_native(task.native_setup(backend, seed, lr), kind, seed, lr, steps, task.eval_every))
        # The runs advance together, RUN_BLOCK_STEPS steps each in turn, the order reversed every block,
        # so a change in machine load hits every run of the seed alike.
        for block in range(-(-steps // RUN_BLOCK_STEPS)):
            for run in runs if block % 2 == 0 else runs[::-1]:
                run.advance(RUN_BLOCK_STEPS, show, done)
        results += [run.result for run in runs]
        hybrid_run = next(r for r in results if r.seed == seed and r.kind == "hybrid")
        hybrid_run.probe_seconds, hybrid_run.probe_checks = overhead_probe(task, backend, seed, config, dynamics)
        traced_steps = min(steps, MEMORY_STEPS)
        traced = {"baseline": _native(task.native_setup(backend, seed, task.lr), "baseline", seed, task.lr,
                                      traced_steps, task.eval_every),
                  "hybrid": _hybrid(task.setup(backend, seed, task.lr), seed, task.lr, traced_steps, task.eval_every,
                                    config, dynamics)}
        for kind, run in traced.items():
            next(r for r in results if r.seed == seed and r.kind == kind).peak_bytes = _traced(run, traced_steps)
    if show is not None:
        show.close()
    for r in results:
        r.process_warmup = warmup
    return results


def median_step(result: RunResult, *keys: str) -> float:
    """Median wall seconds of the steps of the given kinds (NaN when there were none)."""
    values = [v for key in keys for v in result.step_seconds.get(key, [])]
    return float(np.median(values)) if values else float("nan")


def probe_overhead_pct(probe: dict[str, list[float]], kind: str) -> float:
    """100 × (median over blocks of ``kind``'s seconds per step / the native loop's in the same block − 1)."""
    ratios = [k / n for k, n in zip(probe.get(kind, []), probe.get("native", []), strict=True) if n > 0]
    return 100.0 * (float(np.median(ratios)) - 1.0) if ratios else float("nan")
