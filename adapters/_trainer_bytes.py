"""A `HybridTrainer`'s whole state as the bytes of its checkpoint file, for frameworks that keep their own
checkpoints (Lightning's ``on_save_checkpoint``, Accelerate's ``register_for_checkpointing``): the file format,
its checksum and every check of `HybridTrainer.restore` come along unchanged."""

from __future__ import annotations

import os
import tempfile

from hybrid_core._errors import CheckpointError
from hybrid_core._trainer import HybridTrainer

__all__ = ["restore_from_bytes", "trainer_bytes"]


def trainer_bytes(trainer: HybridTrainer) -> bytes | None:
    """`HybridTrainer.save` into memory. Every rank of a distributed run calls it (the save is collective);
    rank 0 gets the bytes, the other ranks None."""
    with tempfile.TemporaryDirectory(prefix="hybrid-state-") as tmp:
        path = os.path.join(tmp, "hybrid.ckpt")
        trainer.save(path)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return f.read()


def restore_from_bytes(trainer: HybridTrainer, data: object) -> None:
    """`HybridTrainer.restore` from `trainer_bytes` output; `CheckpointError` (nothing changed) if it is not."""
    if not isinstance(data, bytes):
        raise CheckpointError(f"the saved hybrid trainer state is a {type(data).__name__}, not bytes",
                              "Load a checkpoint written with the hybrid trainer's integration.")
    with tempfile.TemporaryDirectory(prefix="hybrid-state-") as tmp:
        path = os.path.join(tmp, "hybrid.ckpt")
        with open(path, "wb") as f:
            f.write(data)
        trainer.restore(path)
