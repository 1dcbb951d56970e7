"""The overhead probe (the native loop, an idle and an active trainer timed in rotating blocks) and the
process's untimed warm-up before the timed runs of `hybrid-train bench`."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hybrid_core import DynamicsModel, HybridConfig, HybridTrainer, Phase

from ._tasks import BenchTask

__all__ = ["OVERHEAD_BLOCKS", "OVERHEAD_BLOCK_STEPS", "PROBE_KINDS", "DynamicsFactory", "active_config",
           "overhead_probe", "probe_overhead_pct", "warm_process"]

DynamicsFactory = Callable[[], DynamicsModel]
"""Makes a fresh dynamics model for one hybrid run."""

OVERHEAD_BLOCKS = 24
"""Timed blocks per kind in the interleaved overhead probe (each block runs every kind once)."""

OVERHEAD_BLOCK_STEPS = 8
"""Steps per block of the overhead probe: the default ``read_every``, so every block holds one read."""

PROBE_KINDS = ("native", "idle", "idle_no_readout", "active")
"""The overhead probe's kinds: the native loop, an idle trainer, the same without the read-out, and a trainer
that never predicts nor idles."""


def active_config(config: HybridConfig) -> HybridConfig:
    """``config`` for a trainer that never predicts and never idles: every step after warm-up is a FULL step
    with all the bookkeeping (statistics every ``read_every`` steps, features, the dynamics model fed).

    Only arm 0 (keep training) is offered; ``confidence_threshold=1`` would not do, since a dynamics
    model's confidence can be exactly 1.
    """
    return config.replace(horizon_arms=(0,), max_full_steps=10**9, idle_after=0)


def overhead_probe(task: BenchTask, backend: str, seed: int, config: HybridConfig,
                   dynamics: DynamicsFactory | None = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds per step of the native loop, an idle trainer and an active trainer, timed in rotating blocks.

    Three fresh runs of the same seed, on the same batches:

    - ``native``: the baseline's loop (`NativeRun`);
    - ``idle``: a trainer with ``config``; after the warm-up its cadence is put into an idle spell
      that never ends, so every timed step is an idle FULL step (what a user pays once the
      trainer has learned not to predict);
    - ``idle_no_readout``: the same with ``readout=()``: ``idle`` over it is what the read-out costs;
    - ``active``: a trainer with `active_config` (only arm 0, no FULL-phase bound, never idle), so
      every timed step is a FULL step with all the bookkeeping.

    All first take ``max(warmup_steps, lr_search_steps) + 1`` untimed steps (out of WARMUP and past
    the learning-rate search, whose cost the whole-run figure shows; caches warm; JIT compiled).
    Then `OVERHEAD_BLOCKS` blocks of `OVERHEAD_BLOCK_STEPS` steps each, every kind once per block,
    in an order that rotates through the permutations, so all run under the same machine load.
    Returns (seconds per step of each block by kind, what the trainers
    were doing at the end).
    """
    native = task.native_setup(backend, seed, task.lr)
    trainers = {}
    syncs: dict[str, Callable[[], None] | None] = {"native": native.sync}
    for kind, cfg in (("idle", config), ("idle_no_readout", config.replace(readout=())),
                      ("active", active_config(config))):
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
    warm = max(config.warmup_steps, config.lr_search_steps) + 1
    for i in range(warm):  # untimed: leave WARMUP and the learning-rate search, warm caches and compile
        b = native.batch(i)
        for kind in PROBE_KINDS:
            steppers[kind](b)
    for kind in ("idle", "idle_no_readout"):
        trainers[kind].cadence.start_idle(trainers[kind].steps_done, 10**9)
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
                 dynamics: DynamicsFactory | None = None, schedulefree: bool = False) -> dict[str, float]:
    """Untimed, once per process before any timed run: ``2 * read_every`` native steps, as many steps of a
    throw-away hybrid trainer (two reads) and, with ``schedulefree``, of a Schedule-Free run, so one-time costs
    of the process (first autograd call, kernel selection at the first measured step, lazy imports) are not
    charged to whichever run comes first.

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
    out = {"steps": steps, "native": native_s, "hybrid": time.perf_counter() - start}
    if schedulefree:
        peer = task.schedulefree_setup(backend, 0, task.lr)
        start = time.perf_counter()
        for i in range(steps):
            peer.step(peer.batch(i))
        out["schedulefree"] = time.perf_counter() - start
    return out


def probe_overhead_pct(probe: dict[str, list[float]], kind: str, against: str = "native") -> float:
    """100 × (median over blocks of ``kind``'s seconds per step / ``against``'s in the same block − 1)."""
    ratios = [k / n for k, n in zip(probe.get(kind, []), probe.get(against, []), strict=True) if n > 0]
    return 100.0 * (float(np.median(ratios)) - 1.0) if ratios else float("nan")
