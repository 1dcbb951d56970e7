"""The Lightning module and data of the Lightning tests (and of their DDP child processes)."""

import warnings

import torch

from hybrid_core import HybridConfig
from hybrid_core.adapters.lightning import HybridLightningModule

CONFIG = HybridConfig(warmup_steps=20, min_full_steps=10, max_predict_steps=10, horizon_arms=(0, 5, 10),
                      check_interval=5, correct_steps=3, confidence_threshold=0.0, use_bandit=False)
"""Predictions on at once (no confidence needed, no bandit), so a short run visits every phase."""

STEPS = 300
# Lightning's ModelCheckpoint warns on every save of a manual-optimization run that the weights are taken
# after the optimizer step; that is the state the step counter describes, which is what a resume needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class Net(HybridLightningModule):
    """A small regression MLP trained with AdamW and a OneCycleLR sized to the run."""

    def __init__(self, steps=STEPS, lr=1e-2, **kw):
        super().__init__(hybrid_config=kw.pop("hybrid_config", CONFIG), **kw)
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.steps, self.lr = steps, lr

    def training_loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2 * self.lr, total_steps=self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def dataset(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3] + 0.05 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def loader(batch_size=16, shuffle=False):
    """25 batches per epoch (400 examples): checkpoints every 100 steps fall on epoch ends."""
    return torch.utils.data.DataLoader(dataset(), batch_size=batch_size, shuffle=shuffle)


def comparable(summary):
    """A hybrid summary without its wall-clock times (and NaN-free, so two equal runs compare equal)."""
    out = {k: v for k, v in summary.items() if not k.startswith("wall_seconds")}
    out["lr"] = {k: v for k, v in out["lr"].items() if k != "base"}
    return out
