"""Child process for the kill-and-rerun tests: one `fit(max_steps=600, checkpoint=...)` run, maybe killed.

``python _kill_child.py BACKEND MODE WORKDIR KILL_AT`` trains on ``torch`` (a DataLoader with a seeded
generator and shuffle, AdamW and OneCycleLR sized to the run) or ``numpy`` (the reference MLP and Adam,
a re-iterable of batches shuffled by epoch), with predictions on, a ValidationLogger and a JSONLLogger
writing into WORKDIR, checkpoints every 50 steps into WORKDIR/ckpts, run id "r". MODE ``plain`` runs to
600 steps; ``stop`` adds an EarlyStopping that triggers after step 350. With KILL_AT > 0 the process
SIGKILLs itself right after step KILL_AT's callbacks (before that step's checkpoint), unless
WORKDIR/killed exists: so running the same command again resumes and finishes the run. The result goes
to WORKDIR/result.json.
"""

import json
import os
import pathlib
import signal
import sys

import numpy as np

from hybrid_core import CheckpointPolicy, HybridConfig, HybridTrainer
from hybrid_core.callbacks import EarlyStopping, JSONLLogger, ValidationLogger

MAX_STEPS = 600
CONFIG = HybridConfig(warmup_steps=20, min_full_steps=10, max_predict_steps=10, horizon_arms=(0, 5, 10),
                      check_interval=5, correct_steps=3, confidence_threshold=0.0, use_bandit=False)
# Tuned so that the uninterrupted run stops after the kill point at step 350, with its best evaluation at or
# before the last checkpoint (step 300): the count of evaluations without improvement crosses the kill.
STOP = {"torch": {"every": 25, "patience": 6, "min_delta": 0.15}, "numpy": {"every": 25, "patience": 8,
                                                                             "min_delta": 0.04}}


def data(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    y = np.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2] * x[:, 2:3] + 0.05 * rng.normal(size=(n, 1))
    return x, y


def torch_run():
    import torch

    from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

    torch.set_num_threads(1)
    x, y = (torch.from_numpy(a) for a in data(0, 704))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))  # 22 batches a pass
    val = tuple(torch.from_numpy(a) for a in data(1, 256))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).double()
    model = TorchModel(net, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    adamw = torch.optim.AdamW(net.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(adamw, max_lr=1e-2, total_steps=MAX_STEPS)
    trainer = HybridTrainer(model, TorchOptimizer(model, adamw, scheduler=schedule), CONFIG)
    return trainer, loader, lambda: float(model.loss(val)), lambda: {"last_epoch": schedule.last_epoch}


class Shuffled:
    """Batches of 32 in an order drawn from the epoch number (`fit` calls `set_epoch` at every pass)."""

    def __init__(self, x, y):
        self.x, self.y, self.epoch = x, y, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.y) // 32

    def __iter__(self):
        order = np.random.default_rng([7, self.epoch]).permutation(len(self.y))
        for k in range(len(self)):
            idx = order[32 * k:32 * (k + 1)]
            yield self.x[idx], self.y[idx]


def numpy_run():
    from hybrid_core.models import MLP
    from hybrid_core.optim import Adam

    x, y = data(0, 704)
    labels = (y[:, 0] > 0).astype(np.int64) + (x[:, 3] > 0.5).astype(np.int64)
    val_x, val_y = data(1, 256)
    val = (val_x, (val_y[:, 0] > 0).astype(np.int64) + (val_x[:, 3] > 0.5).astype(np.int64))
    model = MLP([8, 32, 3], dtype=np.float64, seed=0)
    trainer = HybridTrainer(model, Adam(model, lr=3e-3), CONFIG)
    return trainer, Shuffled(x, labels), lambda: float(model.loss(val)), dict


class Killer:
    """SIGKILLs this process after step ``at``'s other callbacks, once (the marker file says it happened)."""

    def __init__(self, at, marker):
        self.at, self.marker = at, marker

    def __call__(self, trainer, result):
        if self.at and result.step + 1 == self.at and not self.marker.exists():
            self.marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    backend, mode, workdir, kill_at = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), int(sys.argv[4])
    trainer, batches, evaluate, extra = torch_run() if backend == "torch" else numpy_run()
    validation = ValidationLogger(lambda: {"loss": evaluate()}, every=25, path=workdir / "val.jsonl")
    callbacks = [validation, JSONLLogger(workdir / "run.jsonl")]
    stopper = None
    if mode == "stop":
        stopper = EarlyStopping(evaluate, **STOP[backend])
        callbacks.insert(0, stopper)
    callbacks.append(Killer(kill_at, workdir / "killed"))
    summary = trainer.fit(batches, max_steps=MAX_STEPS, progress=False, callbacks=callbacks,
                          checkpoint=CheckpointPolicy(workdir / "ckpts", every=50, run_id="r"))
    result = {"steps_done": trainer.steps_done, "params": [np.asarray(p.detach() if hasattr(p, "detach") else p)
                                                            .tobytes().hex() for p in trainer.model.parameters()],
              "steps_per_phase": summary["steps_per_phase"], "events": summary["events"],
              "epochs": summary["epochs"], "epoch_batches": summary["epoch_batches"],
              "stopped": None if stopper is None else stopper.stopped_step,
              "best_step": None if stopper is None else stopper.best_step, **extra()}
    (workdir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
