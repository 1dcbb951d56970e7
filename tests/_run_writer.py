"""Child process for the run-identity tests: one run writing automatic checkpoints into a shared directory.

``python _run_writer.py DIRECTORY RUN_ID EVERY KEEP HIDDEN STEPS`` trains an MLP with ``HIDDEN``
hidden units (a large one makes each save take long enough to be killed in the middle), resuming
run ``RUN_ID`` from ``DIRECTORY`` if it has files there, and prints ``ready`` once its first
checkpoint is on disk. ``STEPS`` 0 means forever (until killed).
"""

import sys

import numpy as np

from hybrid_core import CheckpointPolicy, HybridConfig, HybridTrainer
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

CONFIG = HybridConfig(warmup_steps=5, min_full_steps=5, correct_steps=3, confidence_threshold=0.0)


def make_trainer(hidden, seed=0):
    """The trainer every process of a run builds (same config and starting learning rate)."""
    model = MLP([6, hidden, 3], dtype=np.float64, seed=seed)
    return HybridTrainer(model, Adam(model, lr=0.01), CONFIG), model


def batch(step):
    """The batch of global step ``step``."""
    rng = np.random.default_rng(step)
    return rng.normal(size=(8, 6)), rng.integers(0, 3, size=8)


def main():
    directory, run_id, every, keep, hidden, steps = sys.argv[1:7]
    trainer, _ = make_trainer(int(hidden))
    policy = CheckpointPolicy(directory, every=int(every), keep=int(keep), run_id=run_id)
    trainer.fit(batch, int(every), progress=False, checkpoint=policy)
    print("ready", trainer.steps_done, flush=True)
    while int(steps) == 0 or trainer.steps_done < int(steps):
        trainer.fit(batch, int(every), progress=False, checkpoint=policy)
    print("done", trainer.steps_done, flush=True)


if __name__ == "__main__":
    main()
