"""An Accelerate run through the hybrid trainer, saved and resumed with ``accelerator.save_state``/``load_state``.

Imported by tests/test_accelerate.py (one process) and run by ``accelerate launch --num_processes 2`` as
``python _accelerate_run.py WORKDIR``: every rank trains 300 steps (bf16 autocast, gradient accumulation 2),
saving the state at step 150, then a second trainer loads that state and trains steps 150..300 again; each
rank writes its final weights of both runs and its phase counts to WORKDIR/rank{R}.pt.
"""

import sys

import torch
from accelerate import Accelerator

from hybrid_core import HybridConfig
from hybrid_core.adapters.accelerate import prepare

CONFIG = HybridConfig(warmup_steps=20, min_full_steps=10, max_predict_steps=10, horizon_arms=(0, 5, 10),
                      check_interval=5, correct_steps=3, confidence_threshold=0.0, use_bandit=False)
STEPS = 300
SAVE_AT = 150


def mse(module, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(module(x), y)


def build(accelerator, steps=STEPS, batch_size=32):
    """A small MLP, AdamW and a OneCycleLR sized to ``steps``, a 16-batch loader; prepared, with the trainer."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3] + 0.05 * torch.randn(512, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    net, opt, loader, sched = accelerator.prepare(net, opt, loader, sched)
    return net, prepare(accelerator, net, opt, mse, sched, CONFIG), loader


def train(trainer, loader, start, stop):
    """Steps ``start`` … ``stop - 1`` of the run (the loader passed over again and again; epochs replayed)."""
    step = 0
    while step < stop:
        for batch in loader:
            if step >= stop:
                break
            if step >= start:
                trainer.step(batch)
            step += 1
    trainer.flush()


def run(workdir, **accelerator_options):
    """The uninterrupted run (state saved at `SAVE_AT`) and the resumed one; their weights and summaries."""
    accelerator = Accelerator(cpu=True, **accelerator_options)
    net, trainer, loader = build(accelerator)
    train(trainer, loader, 0, SAVE_AT)
    accelerator.save_state(f"{workdir}/state")
    train(trainer, loader, SAVE_AT, STEPS)
    again = Accelerator(cpu=True, **accelerator_options)
    net2, resumed, loader2 = build(again)
    again.load_state(f"{workdir}/state")
    at = resumed.steps_done
    train(resumed, loader2, SAVE_AT, STEPS)
    weights = [p.detach().clone() for p in net.parameters()]
    weights2 = [p.detach().clone() for p in net2.parameters()]
    return {"weights": weights, "resumed_weights": weights2, "resumed_at": at,
            "phases": trainer.summary()["steps_per_phase"], "resumed_phases": resumed.summary()["steps_per_phase"],
            "rank": accelerator.process_index, "world": accelerator.num_processes}


if __name__ == "__main__":
    out = run(sys.argv[1], mixed_precision="bf16", gradient_accumulation_steps=2)
    torch.save(out, f"{sys.argv[1]}/rank{out['rank']}.pt")
