"""Train the FastGRNN router through HybridTrainer, save it, load it back and check its predictions.

Run: python examples/fastgrnn_router.py [--backend numpy|torch] [--data synthetic|digits]
                                        [--epochs 30] [--out DIR] [--seed 0]
                                        [--compress [--w-density 0.5] [--u-density 0.5]]

``synthetic`` are seeded routing logs (see `hybrid_core.apps.router.routing_logs` for the features and
the labelling rule); ``digits`` is the bundled handwritten-digits set read row by row (8 steps of
8 pixels), 0-4 vs 5-9. The output folder receives ``epochs.jsonl`` (per-epoch metrics),
``summary.json`` and ``router.ckpt`` (weights and normaliser). With ``--compress`` the router is then
pruned by iterative hard thresholding, fine-tuned on its support and quantized to int8
(`compress_router`): the accuracy/size table is printed and ``router.fgq`` (the int8 export) and
``compression.json`` are written too.
"""

from __future__ import annotations

import argparse
import importlib

import numpy as np

from hybrid_core.apps.data import sequential_digits
from hybrid_core.apps.router import (
    CompressConfig,
    RouterConfig,
    compress_router,
    format_stages,
    load_quantized_router,
    load_router,
    routing_logs,
    train_router,
)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, train, print the per-epoch table and the save/load check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("numpy", "torch"), default="numpy")
    parser.add_argument("--data", choices=("synthetic", "digits"), default="synthetic")
    parser.add_argument("--epochs", type=int, default=30, help="at most this many epochs (default 30)")
    parser.add_argument("--out", default="fastgrnn-router-out", help="output folder (default ./fastgrnn-router-out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=4000, help="synthetic windows to generate (default 4000)")
    parser.add_argument("--compress", action="store_true", help="then prune, fine-tune and quantize to int8")
    parser.add_argument("--w-density", type=float, default=0.5, help="share of W1, W2 kept (default 0.5)")
    parser.add_argument("--u-density", type=float, default=0.5, help="share of U1, U2 kept (default 0.5)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.windows < 10:
        parser.error("--epochs must be >= 1 and --windows >= 10")
    if not (0 < args.w_density <= 1 and 0 < args.u_density <= 1):
        parser.error("--w-density and --u-density must be in (0, 1]")

    xp = None
    if args.backend == "torch":
        xp = importlib.import_module("torch")
        # Each op here is tiny: intra-op threads cost more in hand-offs than they save,
        # and on a busy machine they can make a step tens of times slower.
        xp.set_num_threads(1)
    x, y = sequential_digits() if args.data == "digits" else routing_logs(args.windows, seed=args.seed)
    config = RouterConfig(epochs=args.epochs, seed=args.seed)
    print(f"{args.data}: {x.shape[0]} windows of {x.shape[1]} steps x {x.shape[2]} features, "
          f"{y.mean():.0%} positive; backend {args.backend}")

    result = train_router(x, y, config, xp=xp, out_dir=args.out)

    print(f"\n{'epoch':>5}  {'lr':>8}  {'train obj':>9}  {'val loss':>8}  {'val acc':>7}")
    for row in result.history:
        print(f"{row['epoch']:>5}  {row['lr']:>8.5f}  {row['train_loss']:>9.4f}  {row['val_loss']:>8.4f}  "
              f"{row['val_accuracy']:>7.2%}")
    stopped = "ran every epoch" if result.stopped_epoch is None else f"early stop at epoch {result.stopped_epoch}"
    teacher = "-" if result.teacher_val_accuracy is None else f"{result.teacher_val_accuracy:.2%}"
    print(f"\nbest epoch {result.best_epoch} ({stopped}); validation accuracy {result.val_accuracy:.2%}, "
          f"loss {result.val_loss:.4f}; MLP teacher {teacher}")
    run = result.trainer
    print(f"trainer: {run['steps']} steps, {run['backward_passes']} backward passes, "
          f"phases {run['steps_per_phase']}")

    val = result.val_indices
    loaded = load_router(f"{args.out}/router.ckpt", xp=xp)
    same = np.array_equal(loaded.predict(x[val]), result.router.predict(x[val]))
    print(f"reloaded {args.out}/router.ckpt: identical predictions on {len(val)} validation windows: "
          f"{'yes' if same else 'NO'}")
    if not same or not args.compress:
        return 0 if same else 1

    compressed = compress_router(result, x, y, CompressConfig(w_density=args.w_density, u_density=args.u_density),
                                 seed=args.seed, out_dir=args.out)
    print()
    print(format_stages(compressed.stages))
    exported = load_quantized_router(f"{args.out}/router.fgq")
    same = np.array_equal(exported.predict(x[val]), compressed.quantized.predict(x[val]))
    print(f"reloaded {args.out}/router.fgq: identical integer predictions on {len(val)} validation windows: "
          f"{'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
