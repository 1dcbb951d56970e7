"""A PyTorch MLP on the bundled digits, trained by HybridTrainer through the torch adapter, against plain Adam.

Run: python examples/torch_mlp.py [--steps 600] [--seed 0] [--lr 3e-3] [--hidden 64] [--batch-size 64]

The hybrid run and the plain runs start from the same weights and see the same
batches. Both plain runs are ordinary ``torch.optim.Adam`` loops: one for as many
steps as the hybrid run took, one for as many steps as it made backward passes.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn

from hybrid_core import HybridConfig, HybridTrainer
from hybrid_core.adapters.torch import TorchModel, TorchOptimizer
from hybrid_core.apps.data import split_digits


def cross_entropy(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The loss function the adapter calls: ``loss_fn(module, batch) -> 0-d tensor``."""
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


def plain_run(module: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> float:
    """An ordinary Adam loop over ``batches``; returns its wall-clock seconds."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    start = time.perf_counter()
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        cross_entropy(module, batch).backward()
        opt.step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Train hybrid and plain, then print the hybrid run's metrics and the validation losses side by side."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights and batches")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units (default 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    args = parser.parse_args(argv)
    if min(args.steps, args.hidden, args.batch_size) < 1 or args.lr <= 0:
        parser.error("--steps, --hidden and --batch-size must be >= 1 and --lr > 0")
    torch.set_num_threads(1)  # small model: threads cost more than they give

    split = split_digits(seed=args.seed)
    x_train = torch.as_tensor(split.x_train, dtype=torch.float32)
    y_train = torch.as_tensor(split.y_train)
    val = (torch.as_tensor(split.x_val, dtype=torch.float32), torch.as_tensor(split.y_val))
    rng = np.random.default_rng(args.seed)
    batches = []
    for _ in range(args.steps):
        idx = torch.as_tensor(rng.choice(len(y_train), size=args.batch_size, replace=False))
        batches.append((x_train[idx], y_train[idx]))

    torch.manual_seed(args.seed)
    initial = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))

    net = copy.deepcopy(initial)
    model = TorchModel(net, cross_entropy)
    optimizer = TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=args.lr))
    config = HybridConfig(warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10)
    trainer = HybridTrainer(model, optimizer, config)
    summary = trainer.fit(batches, progress=False)

    same_steps = copy.deepcopy(initial)
    seconds_same = plain_run(same_steps, batches, args.lr)
    same_backward = copy.deepcopy(initial)
    seconds_backward = plain_run(same_backward, batches[:summary["backward_passes"]], args.lr)

    print("steps per phase:", summary["steps_per_phase"])
    print(f"backward passes: {summary['backward_passes']} of {summary['steps']} steps "
          f"({summary['backward_passes_skipped']} skipped)")
    print("events:", summary["events"])
    print("bandit arms (horizon: pulls, mean reward):",
          {arm: (v["pulls"], round(v["mean_reward"], 3)) for arm, v in summary["bandit"].items()})
    rows = [("hybrid", summary["steps"], summary["backward_passes"], summary["wall_seconds"], net),
            ("plain, same steps", len(batches), len(batches), seconds_same, same_steps),
            ("plain, same backward passes", summary["backward_passes"], summary["backward_passes"],
             seconds_backward, same_backward)]
    with torch.no_grad():
        val_loss = {name: float(cross_entropy(module, val)) for name, *_, module in rows}
    print(f"{'run':<28} {'steps':>5} {'backward':>8} {'wall s':>7} {'val loss':>8}")
    for name, steps, backward, seconds, _ in rows:
        print(f"{name:<28} {steps:>5} {backward:>8} {seconds:>7.2f} {val_loss[name]:>8.4f}")
    print(f"final validation loss: hybrid {val_loss['hybrid']:.4f} vs plain {val_loss['plain, same steps']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
