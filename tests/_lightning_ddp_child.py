"""Lightning DDP child: ``python _lightning_ddp_child.py WORKDIR`` trains `Net` with ``strategy="ddp"`` on 2 CPU
processes (Lightning starts the second by running this script again), checkpointing every 100 steps, then
resumes a second run from the step-100 checkpoint; each rank writes its weights and hybrid summaries to
WORKDIR/rank{R}.pt."""

import sys

import lightning.pytorch as pl
import torch
from _lightning_net import STEPS, Net, comparable, dataset
from lightning.pytorch.callbacks import ModelCheckpoint


def _trainer(**kw):
    return pl.Trainer(max_steps=STEPS, max_epochs=20, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def main(workdir):
    # 800 examples: 400 per rank, 25 batches of 16 per epoch, so the checkpoints fall on epoch ends.
    loader = torch.utils.data.DataLoader(dataset(n=800), batch_size=16, shuffle=False)
    net = Net()
    trainer = _trainer(callbacks=[ModelCheckpoint(dirpath=f"{workdir}/ckpt", every_n_train_steps=100, save_top_k=-1)])
    trainer.fit(net, loader)
    resumed = Net()
    again = _trainer(enable_checkpointing=False)
    again.fit(resumed, loader, ckpt_path=f"{workdir}/ckpt/epoch=3-step=100.ckpt")
    torch.save({"rank": trainer.global_rank, "world": trainer.world_size, "steps": again.global_step,
                "weights": [p.detach().clone() for p in net.parameters()],
                "resumed_weights": [p.detach().clone() for p in resumed.parameters()],
                "summary": comparable(net.hybrid.summary()), "resumed_summary": comparable(resumed.hybrid.summary()),
                "world_seen": net.hybrid.collective.world_size}, f"{workdir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
