"""Overhead of the Lightning and Accelerate integrations against each framework's own plain loop.

Run: python docs/bench/integrations_overhead.py [--seeds 0 1 2] [--steps 200] [--hidden 1024] [--json PATH]

One process, interleaved. Each framework trains the same MLP (64 → hidden → hidden → 10, AdamW and a OneCycleLR
sized to the run, synthetic 10-class data, 64 examples per optimizer step) as its users write it and through the
integration (default `HybridConfig(seed=seed)`), one torch thread.

- Lightning: automatic optimization (``training_step`` returns the loss) against `HybridLightningModule`; the
  two ``Trainer.fit`` calls run in two threads that take turns step by step (one runs, the other waits; the
  first to step alternating with the seed), each step timed from its batch's start to its end.
- Accelerate (bf16 autocast, gradient accumulation 2): the ``accelerator.accumulate``/``backward``/``step`` loop
  over batches of 32 against `hybrid_core.adapters.accelerate.prepare` over batches of 64 cut in two (the same
  examples per optimizer step), both on one Accelerator and stepped in turn, each step timed on its own (the
  hybrid's last step includes its final read).

The figures: wall-clock and the thread's CPU time per step after the first 20 steps (the trainer's periodic
reads included), their ratio integration / plain per seed, and the median
and range of that ratio over the seeds. On a machine shared with other jobs the CPU time is the steadier one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import warnings

import accelerate
import lightning.pytorch as pl
import torch

from hybrid_core import HybridConfig
from hybrid_core.adapters.accelerate import prepare
from hybrid_core.adapters.lightning import HybridLightningModule

SKIP = 20


def data(seed: int, n: int = 4096) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    y = (x @ torch.randn(64, 10, generator=g)).argmax(dim=1)
    return torch.utils.data.TensorDataset(x, y)


def mlp(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def ce(module: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(module(x), y)


def optimizers(params, steps):
    opt = torch.optim.AdamW(params, lr=1e-3)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)


def stamp() -> tuple[float, float]:
    """(wall-clock, this thread's CPU time): the CPU time moves less with other processes' load."""
    return time.perf_counter(), time.thread_time()


class _Turns(pl.Callback):
    """Two Lightning fits in two threads, taking turns step by step (one runs while the other waits), each
    step timed on its own: wall-clock and the thread's CPU time from its batch's start to its end."""

    def __init__(self, mine: threading.Event, theirs: threading.Event) -> None:
        self.mine, self.theirs = mine, theirs
        self.steps: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mine.wait()
        self.mine.clear()
        self.start = (time.perf_counter(), time.thread_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        end = (time.perf_counter(), time.thread_time())
        self.steps.append((end[0] - self.start[0], end[1] - self.start[1]))
        self.theirs.set()

    def on_train_end(self, trainer, pl_module):
        self.theirs.set()


class PlainModule(pl.LightningModule):
    def __init__(self, hidden, seed, steps):
        super().__init__()
        self.net, self.steps = mlp(hidden, seed), steps

    def training_step(self, batch, batch_idx):
        return ce(self.net, batch)

    def configure_optimizers(self):
        opt, sched = optimizers(self.parameters(), self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class HybridModule(HybridLightningModule):
    def __init__(self, hidden, seed, steps):
        super().__init__(hybrid_config=HybridConfig(seed=seed))
        self.net, self.steps = mlp(hidden, seed), steps

    def training_loss(self, batch):
        return ce(self.net, batch)

    def configure_optimizers(self):
        opt, sched = optimizers(self.parameters(), self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lightning_pair(seed: int, steps: int, hidden: int) -> dict:
    """Plain and hybrid Lightning fits in turn, step by step (the plain one starts on even seeds)."""
    turns = {"plain": threading.Event(), "hybrid": threading.Event()}
    clocks = {"plain": _Turns(turns["plain"], turns["hybrid"]), "hybrid": _Turns(turns["hybrid"], turns["plain"])}
    modules = {"plain": PlainModule(hidden, seed, steps), "hybrid": HybridModule(hidden, seed, steps)}
    errors: list[BaseException] = []

    def fit(kind: str) -> None:
        try:
            trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 callbacks=[clocks[kind]])
            loader = torch.utils.data.DataLoader(data(seed), batch_size=64, shuffle=True,
                                                 generator=torch.Generator().manual_seed(seed))
            trainer.fit(modules[kind], loader)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            clocks[kind].theirs.set()

    threads = [threading.Thread(target=fit, args=(kind,)) for kind in ("plain", "hybrid")]
    turns["plain" if seed % 2 == 0 else "hybrid"].set()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    out: dict = {}
    for kind, clock in clocks.items():
        timed = clock.steps[SKIP:]
        out[kind] = {"wall": statistics.fmean(w for w, _ in timed), "cpu": statistics.fmean(c for _, c in timed)}
    out["hybrid"]["steps_per_phase"] = modules["hybrid"].hybrid.summary()["steps_per_phase"]
    return out


def accelerate_pair(seed: int, steps: int, hidden: int) -> dict:
    """The plain Accelerate loop and the hybrid trainer, built on one Accelerator and stepped in turn, one
    optimizer step each (the first to step alternating), each step timed on its own."""
    accelerate.state.AcceleratorState._reset_state(True)
    acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    loops = {}
    for kind, batch_size in (("plain", 32), ("hybrid", 64)):
        net = mlp(hidden, seed)
        opt, sched = optimizers(net.parameters(), steps)
        loader = torch.utils.data.DataLoader(data(seed), batch_size=batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        net, opt, loader, sched = acc.prepare(net, opt, loader, sched)
        loops[kind] = (net, opt, sched, iter(_forever(loader)))
    net, opt, sched, plain_batches = loops["plain"]
    hybrid_net, hybrid_opt, hybrid_sched, hybrid_batches = loops["hybrid"]
    trainer = prepare(acc, hybrid_net, hybrid_opt, ce, hybrid_sched, HybridConfig(seed=seed), checkpointing=False)

    def plain_step():
        for _ in range(2):  # two micro-batches: accelerate steps the optimizer on the second
            with acc.accumulate(net):
                acc.backward(ce(net, next(plain_batches)))
                opt.step()
                sched.step()
                opt.zero_grad()

    spent = {"plain": [0.0, 0.0], "hybrid": [0.0, 0.0]}
    run = {"plain": plain_step, "hybrid": lambda: trainer.step(next(hybrid_batches))}
    for step in range(steps):
        for kind in (("plain", "hybrid") if step % 2 == 0 else ("hybrid", "plain")):
            before = stamp()
            run[kind]()
            if kind == "hybrid" and step == steps - 1:
                trainer.flush()
            after = stamp()
            if step >= SKIP:
                spent[kind][0] += after[0] - before[0]
                spent[kind][1] += after[1] - before[1]
    count = steps - SKIP
    out = {kind: {"wall": w / count, "cpu": c / count} for kind, (w, c) in spent.items()}
    out["hybrid"]["steps_per_phase"] = trainer.summary()["steps_per_phase"]
    return out


def _forever(loader):
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    results: dict = {"lightning": [], "accelerate": []}
    for seed in args.seeds:
        # Lightning: the two fits in two threads, taking turns step by step.
        results["lightning"].append({"seed": seed, **lightning_pair(seed, args.steps, args.hidden)})
        # Accelerate: both loops in one Accelerator, stepped in turn.
        results["accelerate"].append({"seed": seed, **accelerate_pair(seed, args.steps, args.hidden)})
        for name in results:
            r = results[name][-1]
            print(f"{name:10s} seed {seed}: wall plain {1e3 * r['plain']['wall']:.2f} ms/step, hybrid "
                  f"{1e3 * r['hybrid']['wall']:.2f} ({r['hybrid']['wall'] / r['plain']['wall']:.3f}); cpu plain "
                  f"{1e3 * r['plain']['cpu']:.2f}, hybrid {1e3 * r['hybrid']['cpu']:.2f} "
                  f"({r['hybrid']['cpu'] / r['plain']['cpu']:.3f}); phases {r['hybrid']['steps_per_phase']}",
                  flush=True)
    for name, rows in results.items():
        for key in ("wall", "cpu"):
            plain = [1e3 * r["plain"][key] for r in rows]
            hybrid = [1e3 * r["hybrid"][key] for r in rows]
            ratios = [r["hybrid"][key] / r["plain"][key] for r in rows]
            print(f"{name} {key}: plain {statistics.median(plain):.2f} ms/step [{min(plain):.2f}–{max(plain):.2f}], "
                  f"hybrid {statistics.median(hybrid):.2f} [{min(hybrid):.2f}–{max(hybrid):.2f}], ratio "
                  f"{statistics.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}] over {len(rows)} seeds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "versions": {
                "torch": torch.__version__, "lightning": pl.__version__, "accelerate": accelerate.__version__}}, f,
                indent=1)


if __name__ == "__main__":
    main()
