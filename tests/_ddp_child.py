"""One rank of a torch DDP run for tests/test_ddp.py (launched by `tests._ddp_launch` or torchrun).

``python _ddp_child.py MODE OUT STEPS AT [TIMEOUT]`` with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set.
Each rank trains a small float64 MLP wrapped in ``DistributedDataParallel`` (gloo) on its own data shard
(the batch of step s on rank r is drawn from seed (r, s)), Adam, predictions on with a zero confidence
threshold, through `HybridTrainer.step`, its reads agreed by a `TorchCollective` (timeout TIMEOUT s, also
the training group's timeout).

MODE:
- ``train``: STEPS steps; with AT > 0 a checkpoint OUT/ckpt.bin is saved after step AT (every rank calls save).
- ``resume``: load OUT/ckpt.bin and train up to STEPS steps.
- ``single``: one process, no DDP and no process group: load OUT/ckpt.bin (written by 2 ranks), train to STEPS
  on rank 0's shard.
- ``kill`` / ``stop``: STEPS steps, but rank 1 SIGKILLs / SIGSTOPs itself before step AT; the other rank
  reports the error it got and how long after it started step AT. With AT < 0: the second step of the
  first PREDICT phase from step -AT on (a step with no collective of DDP: the next one is a check's read).

Every rank that finishes writes OUT/rank{r}.json (phases, events, error) and OUT/rank{r}.params (the raw bytes
of every parameter, in order).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import time
from datetime import timedelta

import numpy as np
import torch

from hybrid_core import HybridConfig, HybridError, HybridTrainer
from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

CONFIG = HybridConfig(warmup_steps=20, min_full_steps=10, max_predict_steps=10, horizon_arms=(0, 5, 10),
                      check_interval=3, correct_steps=3, confidence_threshold=0.0, use_bandit=False)


def batch_at(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of step ``step`` on rank ``rank``: the same on every run, different on every rank."""
    rng = np.random.default_rng((1000 + rank, step))
    x = rng.normal(size=(32, 8))
    y = np.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3] + 0.05 * rng.normal(size=(32, 1))
    return torch.from_numpy(x), torch.from_numpy(y)


def loss_fn(module: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.mse_loss(module(batch[0]), batch[1])


def build(distributed: bool, timeout: float, accumulate: int = 1) -> tuple[TorchModel, TorchOptimizer, object]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).double()
    collective = None
    if distributed:
        from hybrid_core.adapters.torch import TorchCollective

        net = torch.nn.parallel.DistributedDataParallel(net)
        collective = TorchCollective(timeout=timedelta(seconds=timeout))
    model = TorchModel(net, loss_fn, accumulate=accumulate)
    adam = torch.optim.Adam(model.module.parameters(), lr=1e-2)
    return model, TorchOptimizer(model, adam), collective


def main() -> None:
    mode, out, steps, at = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
    torch.set_num_threads(1)
    distributed = mode != "single"
    if distributed:
        torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    rank = torch.distributed.get_rank() if distributed else 0
    model, optimizer, collective = build(distributed, timeout)
    if mode in ("resume", "single"):
        trainer = HybridTrainer.load(out / "ckpt.bin", model, optimizer, collective=collective)
    else:
        trainer = HybridTrainer(model, optimizer, CONFIG, collective=collective)
    result: dict = {"rank": rank, "start": trainer.steps_done}
    started = None
    try:
        while trainer.steps_done < steps:
            step = trainer.steps_done
            if mode in ("kill", "stop") and started is None and step >= abs(at) and (
                    at > 0 or (trainer.phase.value == "predict" and trainer.phase_state.steps_in_phase == 1)):
                if rank == 1:
                    os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
                started = time.monotonic()
            trainer.step(batch_at(rank, step))
            if mode == "train" and trainer.steps_done == at:
                trainer.save(out / "ckpt.bin")
        trainer.flush()
    except HybridError as exc:
        result.update(error=type(exc).__name__, message=exc.message, recovery=exc.recovery,
                      elapsed=None if started is None else time.monotonic() - started)
    summary = trainer.metrics.summary()
    result.update(phases=[r.phase for r in trainer.metrics.records], losses=[r.loss for r in trainer.metrics.records],
                  events=summary["events"], steps_per_phase=summary["steps_per_phase"],
                  steps_done=trainer.steps_done, world_size=trainer.collective.world_size)
    (out / f"rank{rank}.params").write_bytes(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if "error" in result:
        os._exit(3)  # the group is broken: tearing it down could wait on the dead rank
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
