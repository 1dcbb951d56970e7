"""The cost of the trainer's decision collectives in a torch DDP run: ``lm-stdlib`` on N gloo processes.

Run: python -m hybrid_core.apps.bench.ddp [--nproc 2] [--seeds 3] [--steps 150] [--chunk 25] [--out FILE.json]

It launches ``--nproc`` ranks on 127.0.0.1 (a free port, a hard timeout) and, for each seed, trains three runs of
the ``lm-stdlib`` transformer under ``DistributedDataParallel`` from the same initial weights, each rank on its
own batches (the task's batch stream of seed ``seed * 1000 + rank``), interleaved in chunks of ``--chunk`` steps
(the order of the three rotates every chunk; a barrier before and after each timed chunk):

- ``ddp``: the plain DDP loop, ``zero_grad``, ``loss.backward()``, ``optimizer.step()`` (torch.optim.Adam);
- ``hybrid``: `HybridTrainer` with the task's config (predictions on) over the same DDP module;
- ``hybrid-real``: the same with ``warmup_steps`` past the run's end: real steps only, so its difference to
  ``ddp`` is the trainer's whole overhead (reads, statistics, decision collectives), with no skipped backward.

The time spent inside the decision collectives (every gloo all-gather of the trainer's `TorchCollective`,
waiting for the other rank included) is measured directly, as a fraction of the hybrid runs' time; and the
latency of one exchange alone (``--latency-calls`` all-gathers back to back, no waiting for a slower rank)
times the collectives per step, as a fraction of the step time. Rank 0
prints the medians and spreads over seeds and writes them (with every chunk's time) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import numpy as np

__all__ = ["main"]

ARMS = ("ddp", "hybrid", "hybrid-real")


def _launch(argv: list[str], nproc: int, timeout: float) -> int:
    """Run this module as ``nproc`` ranks on 127.0.0.1; kill them all after ``timeout`` seconds."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "hybrid_core.apps.bench.ddp", *argv],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        codes = [1]
        print(f"the benchmark did not finish within {timeout:g} s: stopped", file=sys.stderr)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return max(abs(c) for c in codes)


def _rank_main(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from hybrid_core import HybridTrainer
    from hybrid_core.adapters.torch import TorchCollective, TorchModel, TorchOptimizer

    from ._lm import loss_fn, module_and_data
    from ._tasks import get_task

    class TimedCollective(TorchCollective):
        """`TorchCollective` that adds up the seconds spent in its all-gathers."""

        seconds = 0.0

        def _gather(self, tensor: Any, what: str) -> list[np.ndarray]:
            start = time.perf_counter()
            try:
                return super()._gather(tensor, what)
            finally:
                self.seconds += time.perf_counter() - start

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    task = get_task("lm-stdlib")
    lr = task.lr
    per_seed: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        _, batch, _ = module_and_data(seed * 1000 + rank)  # this rank's own shard of the batch stream

        def fresh(seed: int = seed) -> Any:
            module, _, _ = module_and_data(seed)  # the same initial weights on every rank and in every arm
            return torch.nn.parallel.DistributedDataParallel(module)

        plain = fresh()
        adam = torch.optim.Adam(plain.parameters(), lr=lr)
        runs: dict[str, Any] = {}
        for arm in ("hybrid", "hybrid-real"):
            model = TorchModel(fresh(), loss_fn)
            optimizer = TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=lr))
            config = task.config if arm == "hybrid" else task.config.replace(warmup_steps=args.steps + 1)
            coll = TimedCollective(timeout=120)
            runs[arm] = (HybridTrainer(model, optimizer, config, collective=coll), coll)
        done = dict.fromkeys(ARMS, 0)
        chunks: dict[str, list[float]] = {a: [] for a in ARMS}
        for c in range(-(-args.steps // args.chunk)):
            order = ARMS[c % 3:] + ARMS[:c % 3]
            for arm in order:
                n = min(args.chunk, args.steps - done[arm])
                dist.barrier()
                start = time.perf_counter()
                for _ in range(n):
                    step = done[arm]
                    if arm == "ddp":
                        adam.zero_grad(set_to_none=True)
                        loss_fn(plain, batch(step)).backward()
                        adam.step()
                    else:
                        runs[arm][0].step(batch(step))
                    done[arm] += 1
                if arm != "ddp":
                    runs[arm][0].flush()
                dist.barrier()
                chunks[arm].append((time.perf_counter() - start) / n)
        row: dict[str, Any] = {"seed": seed, "seconds_per_step": {a: statistics.median(chunks[a]) for a in ARMS},
                               "chunk_seconds_per_step": chunks}
        for arm in ("hybrid", "hybrid-real"):
            trainer, coll = runs[arm]
            total = sum(chunks[arm]) * args.chunk  # every chunk is full when steps is a multiple of chunk
            row[arm] = {"collective_seconds": coll.seconds, "collectives": coll.calls,
                        "collectives_per_step": coll.calls / args.steps,
                        "collective_fraction": coll.seconds / total,
                        "steps_per_phase": trainer.metrics.summary()["steps_per_phase"]}
        lat = TimedCollective(timeout=120)
        lat.all_gather(np.zeros(64), "warm-up")
        times = []
        for _ in range(args.latency_calls):  # back to back, the ranks in step: the exchange itself, no waiting
            start = time.perf_counter()
            lat.all_gather(np.zeros(64), "latency")
            times.append(time.perf_counter() - start)
        row["latency_ms"] = 1e3 * statistics.median(times)
        for arm in ("hybrid", "hybrid-real"):
            row[arm]["latency_fraction"] = (row["latency_ms"] / 1e3 * row[arm]["collectives_per_step"]
                                            / row["seconds_per_step"][arm])
        per_seed.append(row)
        if rank == 0:
            print(f"seed {seed}: " + ", ".join(f"{a} {row['seconds_per_step'][a] * 1e3:.1f} ms/step" for a in ARMS)
                  + f"; collectives: {row['hybrid']['collective_fraction']:.2%} of the hybrid run's time",
                  flush=True)
    if rank == 0:
        _report(args, world, per_seed)
    dist.destroy_process_group()
    return 0


def _median_spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _report(args: argparse.Namespace, world: int, per_seed: list[dict[str, Any]]) -> None:
    def ratio(arm: str) -> dict[str, float]:
        return _median_spread([r["seconds_per_step"][arm] / r["seconds_per_step"]["ddp"] for r in per_seed])

    summary = {
        "seconds_per_step": {a: _median_spread([r["seconds_per_step"][a] for r in per_seed]) for a in ARMS},
        "time_ratio_vs_ddp": {a: ratio(a) for a in ARMS[1:]},
        "collective_fraction": {a: _median_spread([r[a]["collective_fraction"] for r in per_seed]) for a in ARMS[1:]},
        "collectives_per_step": {a: _median_spread([r[a]["collectives_per_step"] for r in per_seed])
                                 for a in ARMS[1:]},
        "latency_ms": _median_spread([r["latency_ms"] for r in per_seed]),
        "latency_fraction": {a: _median_spread([r[a]["latency_fraction"] for r in per_seed]) for a in ARMS[1:]},
        "collective_ms_per_call": {a: _median_spread([1e3 * r[a]["collective_seconds"] / max(1, r[a]["collectives"])
                                                      for r in per_seed]) for a in ARMS[1:]},
    }
    command = (f"python -m hybrid_core.apps.bench.ddp --nproc {world} --seeds {args.seeds} --steps {args.steps} "
               f"--chunk {args.chunk}" + (f" --out {args.out}" if args.out else ""))
    doc = {"task": "lm-stdlib", "world_size": world, "backend": "gloo (CPU)", "steps": args.steps,
           "chunk": args.chunk, "seeds": args.seeds, "command": command, "summary": summary, "per_seed": per_seed}
    s = summary
    print(f"{world} ranks, {args.seeds} seeds x {args.steps} steps (medians over seeds, [min, max]):")
    for arm in ARMS:
        v = s["seconds_per_step"][arm]
        print(f"  {arm:<12} {v['median'] * 1e3:7.1f} ms/step [{v['min'] * 1e3:.1f}, {v['max'] * 1e3:.1f}]")
    for arm in ARMS[1:]:
        f, r = s["collective_fraction"][arm], s["time_ratio_vs_ddp"][arm]
        print(f"  {arm}: decision collectives {f['median']:.2%} of its time [{f['min']:.2%}, {f['max']:.2%}], "
              f"{s['collectives_per_step'][arm]['median']:.3f} per step, "
              f"{s['collective_ms_per_call'][arm]['median']:.2f} ms each; time / ddp {r['median']:.3f} "
              f"[{r['min']:.3f}, {r['max']:.3f}]")
    lat = s["latency_ms"]
    print(f"  one decision all-gather back to back: {lat['median']:.3f} ms [{lat['min']:.3f}, {lat['max']:.3f}]; "
          "x collectives per step / step time: " + ", ".join(
              f"{a} {s['latency_fraction'][a]['median']:.3%}" for a in ARMS[1:]))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.write("\n")
        print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Launch the ranks (or, inside one, run it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    parser.add_argument("--steps", type=int, default=150, help="steps per arm and seed (default 150)")
    parser.add_argument("--chunk", type=int, default=25, help="steps per interleaved chunk (default 25)")
    parser.add_argument("--latency-calls", type=int, default=200,
                        help="back-to-back all-gathers timed for the latency of one exchange (default 200)")
    parser.add_argument("--out", default=None, help="JSON file rank 0 writes")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the ranks are stopped")
    args = parser.parse_args(argv)
    if args.nproc < 2 or args.seeds < 1 or args.steps < 1 or not 1 <= args.chunk <= args.steps:
        parser.error("--nproc must be >= 2, --seeds and --steps >= 1, --chunk in [1, steps]")
    if args.steps % args.chunk:
        parser.error("--steps must be a multiple of --chunk")
    if "RANK" in os.environ:
        return _rank_main(args)
    return _launch(sys.argv[1:] if argv is None else argv, args.nproc, args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
