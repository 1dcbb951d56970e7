"""Overhead of the Lightning and Accelerate integrations against each framework's own plain loop.

Run: python docs/bench/integrations_overhead.py [--seeds 0 1 2] [--steps 200] [--hidden 1024] [--json PATH]

One process, interleaved: for each seed, each framework trains the same MLP (64 → hidden → hidden → 10, AdamW
and a OneCycleLR sized to the run, synthetic 10-class data, batches of 64) once as its users write it and once
through the integration (default `HybridConfig(seed=seed)`), the order alternating with the seed. Lightning:
automatic optimization (``training_step`` returns the loss) against `HybridLightningModule`. Accelerate (bf16
autocast, gradient accumulation 2): the ``accelerator.accumulate``/``backward``/``step`` loop over batches of 32
against `hybrid_core.adapters.accelerate.prepare` over batches of 64 cut in two (the same examples per
optimizer step). Per seed the runs go plain, hybrid, hybrid, plain (or the reverse) and each kind's two runs
are averaged. The figures: the mean wall-clock seconds per step after the first 20 steps (periodic costs such
as the trainer's reads included, its last read inside the timing) and the median step, and the ratio
integration / plain per seed, whose median and range over seeds are printed at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
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


class _Clock(pl.Callback):
    """The time at the end of every step, and at the end of training (after the trainer's last read)."""

    def __init__(self):
        self.times = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.times.append(time.perf_counter())


def timing(times: list[float]) -> dict:
    """Mean seconds per step from the end of step SKIP to the end (periodic costs included), and the median
    step (robust to a burst of load from other processes on a shared machine)."""
    steps = times[SKIP:]
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    return {"seconds_per_step": (steps[-1] - steps[0]) / (len(steps) - 2), "median_step": statistics.median(gaps)}


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


def lightning_run(kind: str, seed: int, steps: int, hidden: int) -> dict:
    module = (HybridModule if kind == "hybrid" else PlainModule)(hidden, seed, steps)
    clock = _Clock()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    loader = torch.utils.data.DataLoader(data(seed), batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    trainer.fit(module, loader)
    out = timing(clock.times)
    if kind == "hybrid":
        out["steps_per_phase"] = module.hybrid.summary()["steps_per_phase"]
    return out


def accelerate_run(kind: str, seed: int, steps: int, hidden: int) -> dict:
    accelerate.state.AcceleratorState._reset_state(True)
    acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    net = mlp(hidden, seed)
    opt, sched = optimizers(net.parameters(), steps)
    loader = torch.utils.data.DataLoader(data(seed), batch_size=64 if kind == "hybrid" else 32, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    net, opt, loader, sched = acc.prepare(net, opt, loader, sched)
    batches = iter(_forever(loader))
    times = []
    if kind == "hybrid":
        trainer = prepare(acc, net, opt, ce, sched, HybridConfig(seed=seed), checkpointing=False)
        for _ in range(steps):
            trainer.step(next(batches))
            times.append(time.perf_counter())
        trainer.flush()
        times.append(time.perf_counter())
        return {**timing(times), "steps_per_phase": trainer.summary()["steps_per_phase"]}
    for _ in range(steps):
        for _ in range(2):  # two micro-batches: accelerate steps the optimizer on the second
            with acc.accumulate(net):
                acc.backward(ce(net, next(batches)))
                opt.step()
                sched.step()
                opt.zero_grad()
        times.append(time.perf_counter())
    times.append(time.perf_counter())
    return timing(times)


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
    runs = {"lightning": lightning_run, "accelerate": accelerate_run}
    results: dict = {name: [] for name in runs}
    for seed in args.seeds:
        # A-B-B-A per seed (the first kind alternating with the seed), each kind's two runs averaged: a load
        # that drifts during the seed's four runs falls on both kinds alike.
        first, second = ("plain", "hybrid") if seed % 2 == 0 else ("hybrid", "plain")
        for name, run in runs.items():
            got: dict = {"plain": [], "hybrid": []}
            for kind in (first, second, second, first):
                got[kind].append(run(kind, seed, args.steps, args.hidden))
            row = {"seed": seed, "runs": got}
            for key in ("seconds_per_step", "median_step"):
                row[key] = {kind: statistics.fmean(r[key] for r in got[kind]) for kind in got}
                row[key]["ratio"] = row[key]["hybrid"] / row[key]["plain"]
            row["steps_per_phase"] = got["hybrid"][0]["steps_per_phase"]
            results[name].append(row)
            mean, median = row["seconds_per_step"], row["median_step"]
            print(f"{name:10s} seed {seed}: mean plain {1e3 * mean['plain']:.2f} ms/step, hybrid "
                  f"{1e3 * mean['hybrid']:.2f}, ratio {mean['ratio']:.3f}; median step ratio {median['ratio']:.3f}; "
                  f"phases {row['steps_per_phase']}", flush=True)
    for name, rows in results.items():
        for key in ("seconds_per_step", "median_step"):
            plain = [1e3 * r[key]["plain"] for r in rows]
            hybrid = [1e3 * r[key]["hybrid"] for r in rows]
            ratios = [r[key]["ratio"] for r in rows]
            print(f"{name} {key}: plain {statistics.median(plain):.2f} ms [{min(plain):.2f}–{max(plain):.2f}], "
                  f"hybrid {statistics.median(hybrid):.2f} [{min(hybrid):.2f}–{max(hybrid):.2f}], ratio "
                  f"{statistics.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}] over {len(rows)} seeds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "versions": {
                "torch": torch.__version__, "lightning": pl.__version__, "accelerate": accelerate.__version__}}, f,
                indent=1)


if __name__ == "__main__":
    main()
