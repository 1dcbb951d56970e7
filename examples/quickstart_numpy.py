"""The README's quick usage as a script: the reference MLP on the bundled digits, trained by HybridTrainer.

Run: python examples/quickstart_numpy.py [--steps 300] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np

from hybrid_core import HybridConfig, HybridTrainer
from hybrid_core.apps.data import split_digits
from hybrid_core.models import MLP
from hybrid_core.optim import Adam


def main(argv: list[str] | None = None) -> int:
    """Train, then print the phases, the backward passes saved and the validation metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights and batches")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    split = split_digits(seed=args.seed)
    model = MLP([64, 32, 10], dtype=np.float64, seed=args.seed)  # any array-API namespace: xp=torch, ...
    config = HybridConfig(warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10)
    trainer = HybridTrainer(model, Adam(model, lr=3e-3), config)
    rng = np.random.default_rng(args.seed)

    def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.choice(len(split.y_train), size=64, replace=False)
        return split.x_train[idx], split.y_train[idx]

    summary = trainer.fit(batch, steps=args.steps, progress=False)
    val = (split.x_val, split.y_val)
    print("steps per phase:", summary["steps_per_phase"])
    print(f"backward passes: {summary['backward_passes']} of {summary['steps']} steps "
          f"({summary['backward_passes_skipped']} skipped)")
    print(f"validation loss: {float(model.loss(val)):.4f}")
    print(f"validation accuracy: {float(model.accuracy(val)):.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
