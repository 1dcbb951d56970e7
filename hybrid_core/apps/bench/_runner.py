"""Runs, in one process, the native baseline and its learning-rate sweep (each also read out through LAWA),
the Schedule-Free sweep on torch tasks, and the hybrid trainer; then the overhead probe and the traced runs."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hybrid_core import HybridConfig, HybridTrainer, Phase
from hybrid_core._progress import Progress

from ._peers import LAWA_EVERY, LR_FACTORS, SCHEDULEFREE_LR, Lawa, schedulefree_available
from ._probe import PROBE_KINDS, DynamicsFactory, active_config, overhead_probe, probe_overhead_pct, warm_process
from ._tasks import BenchTask, NativeRun, TaskSetup

# The overhead probe lives in `_probe` (its constants too, e.g. `_probe.OVERHEAD_BLOCKS`); re-exported here.
__all__ = ["LR_FACTORS", "PROBE_KINDS", "DynamicsFactory", "RunResult", "active_config",
           "median_step", "overhead_probe", "probe_overhead_pct", "run_benchmark", "run_plan", "warm_process"]

MEMORY_STEPS = 150
"""Length of the separate, untimed, traced runs that measure peak memory."""


@dataclass
class RunResult:
    """One training run: its validation curve(s) and per-step costs."""

    seed: int
    kind: str
    """``baseline``, ``tuned`` (one other lr of the sweep), ``schedulefree`` (one lr of its sweep) or ``hybrid``."""
    lr: float
    curve: list[list[float]] = field(default_factory=list)
    """Rows ``[wall seconds, backward passes, step, validation loss]``; wall excludes evaluation. The hybrid's
    is on its read-out weights (inside ``trainer.evaluation_parameters()``), Schedule-Free's in eval mode."""
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    """Second curves, same rows and evaluations: ``lawa`` (baseline and tuned: on the mean of the LAWA
    snapshots), ``raw`` (hybrid: on its raw weights)."""
    step_seconds: dict[str, list[float]] = field(default_factory=dict)
    """Wall seconds of each step by kind: ``plain`` (native loop), or the hybrid phase, ``predict_checked`` apart."""
    loop: str = ""
    """What ran, in words: the native loop (baseline, tuned, schedulefree) or what the hybrid trainer drives."""
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
    side_seconds: float = 0.0
    """Native runs with LAWA: wall seconds of the snapshots, timed apart from the steps; they count toward the
    ``lawa`` curve's wall-clock, not the main curve's (the raw-weights user takes none)."""
    process_warmup: dict[str, float] = field(default_factory=dict)
    """The process's untimed warm-up (`warm_process`), the same for every run of one invocation."""

    @property
    def final_val(self) -> float:
        """Validation loss at the end of the run."""
        return self.curve[-1][3]

    def final(self, curve: str | None = None) -> float:
        """Final validation loss of the main curve (None) or of the second curve called ``curve``."""
        return (self.curve if curve is None else self.curves[curve])[-1][3]


RUN_BLOCK_STEPS = 10
"""The timed runs of one seed advance together, this many steps of each in turn (see `run_benchmark`)."""

StepFn = Callable[[int, Any], tuple[str, bool]]
"""Runs step ``i`` on a batch; returns (step kind, whether it ran a backward pass)."""


class _Run:
    """One timed run, advanced a block of steps at a time; validation (untimed) at step 0, every
    ``eval_every`` steps and at the end, of the main curve and of each ``extra`` curve. ``finish``
    runs, timed, right after the last step; ``on_end`` (untimed) once the run is complete. ``side(i)``
    runs after step ``i``, timed apart: work only the ``extra`` curves need (LAWA snapshots), whose
    seconds count toward their wall-clock and not the main curve's."""

    def __init__(self, result: RunResult, batch: Callable[[int], Any], step: StepFn, validate: Callable[[], float],
                 sync: Callable[[], None] | None, steps: int, eval_every: int,
                 finish: Callable[[], None] | None = None, on_end: Callable[[], None] | None = None,
                 extra: dict[str, Callable[[], float]] | None = None,
                 side: Callable[[int], None] | None = None) -> None:
        self.result, self._batch, self._step, self._validate, self._sync = result, batch, step, validate, sync
        self._steps, self._eval_every, self._finish, self._on_end = steps, eval_every, finish, on_end
        self._extra, self._side = extra or {}, side
        self._i = 0
        self._wall = 0.0
        self._backward = 0
        self._evaluate()

    def _evaluate(self) -> None:
        result = self.result
        result.curve.append([self._wall, self._backward, self._i, self._validate()])
        for name, validate in self._extra.items():
            row = [self._wall + result.side_seconds, self._backward, self._i, validate()]
            result.curves.setdefault(name, []).append(row)

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
            if self._side is not None:
                start = time.perf_counter()
                self._side(i)
                result.side_seconds += time.perf_counter() - start
            self._i = i + 1
            if self._i % self._eval_every == 0 or self._i == self._steps:
                self._evaluate()
            if done is not None:
                done[0] += 1
                if show is not None:
                    show.update(done[0], f"seed {result.seed} {result.kind} lr {result.lr:g}")
        if self._i == self._steps and self._on_end is not None:
            self._on_end()
            self._on_end = None


def _native(run: NativeRun, kind: str, seed: int, lr: float, steps: int, eval_every: int,
            lawa: bool = False) -> _Run:
    """A native run; with ``lawa`` (and a run that exposes its parameters) it takes a LAWA snapshot after the
    optimizer step of every `LAWA_EVERY`-th step (timed, charged to the ``lawa`` curve only) and validates on
    the snapshots' mean too."""
    def step(i: int, b: Any) -> tuple[str, bool]:
        run.step(b)
        return "plain", True

    result = RunResult(seed, kind, lr, loop=run.loop)
    get, validate_at = run.parameters, run.validate_at
    if not lawa or get is None or validate_at is None:
        return _Run(result, run.batch, step, run.validate, run.sync, steps, eval_every)
    keeper = Lawa()

    def snapshot(i: int) -> None:
        if (i + 1) % LAWA_EVERY == 0:
            keeper.snapshot(get())

    def validate_lawa() -> float:
        mean = keeper.average()
        return run.validate() if mean is None else validate_at(mean)

    return _Run(result, run.batch, step, run.validate, run.sync, steps, eval_every, extra={"lawa": validate_lawa},
                side=snapshot)


def _hybrid(setup: TaskSetup, seed: int, lr: float, steps: int, eval_every: int, config: HybridConfig,
            dynamics: DynamicsFactory | None = None) -> _Run:
    """The hybrid run: validated on the trainer's read-out weights (``trainer.evaluation_parameters()``), the
    main curve, and on its raw weights (``curves["raw"]``)."""
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

    def validate() -> float:
        with trainer.evaluation_parameters():
            return setup.validate()

    def on_end() -> None:
        if span_start[0] is not None:
            result.predict_spans.append([span_start[0], steps - 1])
        summary = trainer.metrics.summary()
        # The learning-rate recommendation and the read-out's choice, where the trainer reports them.
        full = {**summary, **(trainer.summary() if callable(getattr(trainer, "summary", None)) else {})}
        lr_state, readout = full.get("lr"), full.get("readout")
        result.events = {"events": summary["events"], "bandit": summary["bandit"],
                         "steps_per_phase": summary["steps_per_phase"], "host_syncs": trainer.host_syncs,
                         "lr_multiplier": lr_state.get("multiplier") if isinstance(lr_state, dict) else None,
                         "readout": readout if isinstance(readout, dict) else None}

    # The last step also reads what is still pending (`fit` does the same), inside the timer.
    return _Run(result, setup.batch, step, validate, setup.sync, steps, eval_every, trainer.flush, on_end,
                extra={"raw": setup.validate})


def _traced(run: _Run, steps: int) -> int:
    """Peak traced bytes of ``run`` taken alone from start to end (untimed use only: tracing slows allocations)."""
    tracemalloc.start()
    try:
        run.advance(steps)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def run_plan(task: BenchTask, backend: str, lr_factors: Sequence[float] = LR_FACTORS,
             peers: bool = True) -> list[tuple[str, float]]:
    """(kind, learning rate) of every timed run of one seed, in build order: the baseline, the other rates of
    the sweep, with ``peers`` the Schedule-Free sweep (torch tasks, ``schedulefree`` installed), the hybrid."""
    plan: list[tuple[str, float]] = [("baseline", task.lr)]
    plan += [("tuned", task.lr * f) for f in lr_factors if f != 1.0]
    if peers and task.has_schedulefree(backend) and schedulefree_available():
        plan += [("schedulefree", SCHEDULEFREE_LR * f) for f in lr_factors]
    plan.append(("hybrid", task.lr))
    return plan


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
    peers: bool = True,
) -> list[RunResult]:
    """All runs of ``task`` on ``backend`` (`run_plan`): per seed the native baseline and each other lr of
    its sweep, the Schedule-Free sweep where there is one, and the hybrid.

    ``dynamics`` makes the hybrid trainer's dynamics model (default: the trainer's own). ``peers=False``
    leaves out the Schedule-Free runs and the LAWA curves (quick runs).

    The runs of one seed are timed together: each takes `RUN_BLOCK_STEPS` steps in turn, in an
    order reversed every block, so slow drifts of a shared machine hit every kind of run alike
    and ratios between runs of a seed compare work done under the same load.
    """
    steps = task.steps if steps is None else steps
    config = task.config if config is None else config
    base_plan = run_plan(task, backend, lr_factors, peers)
    show = Progress(steps * len(base_plan) * len(seeds), f"bench {task.name}/{backend}") if progress else None
    done = [0]
    results: list[RunResult] = []
    warmup = warm_process(task, backend, config, dynamics, any(k == "schedulefree" for k, _ in base_plan))
    for n, seed in enumerate(seeds):
        plan = base_plan[::-1] if n % 2 else base_plan
        runs = []
        for kind, lr in plan:  # every run is built (and JIT-compiled) before any of them is timed
            if log is not None:
                log(f"seed {seed}: {kind} lr {lr:g}")
            if kind == "hybrid":
                runs.append(_hybrid(task.setup(backend, seed, lr), seed, lr, steps, task.eval_every, config,
                                    dynamics))
            elif kind == "schedulefree":
                runs.append(_native(task.schedulefree_setup(backend, seed, lr), kind, seed, lr, steps,
                                    task.eval_every))
            else:
                runs.append(_native(task.native_setup(backend, seed, lr), kind, seed, lr, steps, task.eval_every,
                                    lawa=peers))
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
