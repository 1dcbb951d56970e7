"""How much do predicted steps cost in accuracy? PyTorch digits MLP, hybrid versus plain training.

Runs, per seed, plain ``torch.optim.Adam`` training for ``--steps`` steps and the same model,
optimizer, learning rate and batches through `HybridTrainer`, then prints the validation loss of
both, the plain run's loss after the hybrid run's number of backward passes (so a predicted step
can be valued against simply stopping early), the share of steps without a backward pass and the
relative gap. This is the measurement behind the predict/correct issue's figures::

    python examples/predict_gap_torch.py --steps 1000 --seeds 3
    python examples/predict_gap_torch.py --steps 1000 --seeds 3 --direction linefit
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from hybrid_core import HybridConfig, HybridTrainer
from hybrid_core.adapters.torch import TorchModel, TorchOptimizer
from hybrid_core.apps.data import split_digits


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run every seed, print one line per seed and the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--direction", choices=("extrapolate", "linefit"), default="extrapolate")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    split = split_digits(seed=0)
    x, y = torch.tensor(split.x_train, dtype=torch.float32), torch.tensor(split.y_train)
    xv, yv = torch.tensor(split.x_val, dtype=torch.float32), torch.tensor(split.y_val)
    loss_fn = torch.nn.functional.cross_entropy

    def network(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))

    def batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(np.random.default_rng(seed * 1_000_003 + step).choice(len(y), 64, replace=False))
        return x[idx], y[idx]

    def validate(net: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(loss_fn(net(xv), yv))

    gaps, shares = [], []
    for seed in range(args.seeds):
        net = network(seed)
        model = TorchModel(net, lambda m, b: loss_fn(m(b[0]), b[1]))
        trainer = HybridTrainer(model, TorchOptimizer(model, torch.optim.Adam(net.parameters(), lr=args.lr)),
                                HybridConfig(seed=seed, direction=args.direction))
        for step in range(args.steps):
            trainer.step(batch(seed, step))
        hybrid = validate(net)
        backward = trainer.metrics.summary()["backward_passes"]

        net = network(seed)
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
        at_backward = float("nan")
        for step in range(args.steps):
            xb, yb = batch(seed, step)
            opt.zero_grad()
            loss_fn(net(xb), yb).backward()
            opt.step()
            if step + 1 == backward:
                at_backward = validate(net)
        plain = validate(net)
        share = 1.0 - backward / args.steps
        gaps.append(hybrid / plain - 1.0)
        shares.append(share)
        print(f"seed {seed}: plain {plain:.4f}  hybrid {hybrid:.4f}  plain after {backward} steps {at_backward:.4f}  "
              f"no-backward {100 * share:.1f}%  gap {100 * gaps[-1]:+.1f}%")
    print(f"median over {args.seeds} seeds: no-backward {100 * statistics.median(shares):.1f}%  "
          f"gap {100 * statistics.median(gaps):+.1f}% (direction={args.direction})")


if __name__ == "__main__":
    main()
