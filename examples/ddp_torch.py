"""Data-parallel HybridTrainer: torch DistributedDataParallel on 2 CPU processes (gloo), each on its own shard.

Run: torchrun --standalone --nproc_per_node=2 examples/ddp_torch.py [--steps 600] [--out DIR] [--timeout 60]

Each rank trains an MLP on the bundled digits, wrapped in ``DistributedDataParallel``; a
``DistributedSampler`` gives every rank its own shard. The trainer finds the process group
itself (``torch.distributed`` is initialized) and agrees every value it reads with the other
ranks, so all ranks take the same decisions: they predict, check, roll back and correct
together, and DDP's gradient all-reduces always pair up. At the end every rank saves the
checkpoint (rank 0 writes DIR/ddp_torch.ckpt), and the ranks compare their phase logs and
parameter bytes. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from hybrid_core import HybridConfig, HybridTrainer
from hybrid_core.adapters.torch import TorchCollective, TorchModel, TorchOptimizer
from hybrid_core.apps.data import split_digits


def cross_entropy(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``loss_fn(module, batch)``: ``module`` is the DDP wrapper for real steps, the inner module for
    forward-only passes, so only call it."""
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


def main(argv: list[str] | None = None) -> int:
    """Train on every rank, save once, and check that the ranks agree."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--out", default=None, help="where rank 0 writes the checkpoint (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a collective waits for a rank")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.timeout <= 0:
        parser.error("--steps must be >= 1 and --timeout > 0")
    if "RANK" not in os.environ:
        parser.error("run it under torchrun: torchrun --standalone --nproc_per_node=2 examples/ddp_torch.py")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))  # NCCL on GPUs: the same code
    rank, world = dist.get_rank(), dist.get_world_size()

    split = split_digits(seed=0)
    data = torch.utils.data.TensorDataset(torch.as_tensor(split.x_train, dtype=torch.float32),
                                          torch.as_tensor(split.y_train))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=32, sampler=sampler)  # the same count on every rank

    torch.manual_seed(0)
    net = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))
    model = TorchModel(net, cross_entropy)
    optimizer = TorchOptimizer(model, torch.optim.Adam(net.parameters(), lr=3e-3))
    config = HybridConfig(warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10)
    # The group is found by itself (collective=None); passing it sets the decision collectives' timeout.
    trainer = HybridTrainer(model, optimizer, config, collective=TorchCollective(timeout=args.timeout))

    epoch = 0
    while trainer.steps_done < args.steps:
        sampler.set_epoch(epoch)  # a new shuffle per pass, the same on every rank
        for batch in loader:
            if trainer.steps_done >= args.steps:
                break
            trainer.step(batch)
        epoch += 1
    out = pathlib.Path(args.out or tempfile.gettempdir())
    trainer.save(out / "ddp_torch.ckpt")  # every rank calls it; rank 0 writes; a barrier

    phases = hashlib.sha256(" ".join(r.phase for r in trainer.metrics.records).encode()).hexdigest()
    params = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    seen: list = [None] * world
    dist.all_gather_object(seen, (phases, params))
    if rank == 0:
        summary = trainer.metrics.summary()
        print(f"{world} ranks, {trainer.steps_done} steps, steps per phase: {summary['steps_per_phase']}")
        print(f"backward passes: {summary['backward_passes']} ({summary['backward_passes_skipped']} skipped)")
        print("events:", summary["events"])
        print(f"last agreed loss: {trainer.metrics.last.loss}")
        print(f"checkpoint: {out / 'ddp_torch.ckpt'}")
        if len(set(seen)) == 1:
            print("ranks agree: phases identical, parameters bit-identical")
        else:
            print(f"ranks DISAGREE: {seen}")
    dist.destroy_process_group()
    return 0 if len(set(seen)) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
