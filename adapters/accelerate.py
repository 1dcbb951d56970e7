"""Hugging Face Accelerate: a `HybridTrainer` inside an ``accelerate``-prepared training loop.

The loop an Accelerate user writes keeps its ``Accelerator``, its ``prepare`` call and its data; the body of
the loop becomes one `HybridTrainer.step` (docs/integrations.md)::

    accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=2)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    trainer = prepare(accelerator, model, optimizer, lambda m, batch: m(**batch).loss, scheduler, config)
    for batch in loader:
        trainer.step(batch)
    accelerator.save_state("ckpt")          # the hybrid trainer's state included

What each Accelerate feature becomes:

- ``accelerator.backward``: every backward pass of the trainer goes through it (`AcceleratedModel.backward`),
  so the loss is scaled as Accelerate scales it.
- *Mixed precision*: the prepared model's forward runs under Accelerate's autocast (``"bf16"``, on CPU too);
  ``"fp16"`` needs Accelerate's GradScaler around the optimizer step and is refused.
- *Gradient accumulation* (``gradient_accumulation_steps=k``): one trainer step is one optimizer step, so each
  batch given to `HybridTrainer.step` is cut into k micro-batches along its first dimension (`TorchModel`'s
  ``accumulate``): give the loader batches k times the micro-batch. Gradients are synchronised across
  processes on the last micro-batch only (``accelerator.no_sync`` on the others).
- *Processes* (``accelerate launch --num_processes 2``): the prepared model is DDP, so each backward pass is
  all-reduced; the trainer's decisions are agreed among the ranks through ``torch.distributed``
  (`hybrid_core._collective`). The scheduler is stepped once per training step, predicted ones included, on
  every rank (not ``num_processes`` times as Accelerate's prepared scheduler does): size it in training steps.
- *Checkpoints*: `prepare` registers the trainer with ``accelerator.register_for_checkpointing``, so
  ``accelerator.save_state``/``load_state`` carry its whole state (`HybridTrainer.save`'s file as bytes);
  register nothing else between `prepare` and ``load_state`` that was not registered when saving.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import accelerate
import torch

from hybrid_core._config import HybridConfig
from hybrid_core._errors import ConfigError, ModelError
from hybrid_core._protocols import DynamicsModel
from hybrid_core._trainer import HybridTrainer

from ._torch_model import _collective_errors, train_mode
from ._trainer_bytes import restore_from_bytes, trainer_bytes
from .torch import TorchModel, TorchOptimizer

__all__ = ["AcceleratedModel", "HybridState", "prepare"]

_PRECISIONS = ("no", "bf16")


class AcceleratedModel(TorchModel):
    """A `TorchModel` of an Accelerate-prepared module whose backward passes run through ``accelerator.backward``.

    ``accumulate`` is the accelerator's ``gradient_accumulation_steps``; see `prepare` for the rest.
    """

    def __init__(self, accelerator: accelerate.Accelerator, module: torch.nn.Module,
                 loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], *, eval_for_loss: bool = True) -> None:
        if not isinstance(accelerator, accelerate.Accelerator):
            raise ConfigError(f"accelerator is a {type(accelerator).__name__}, not an accelerate.Accelerator")
        precision = str(accelerator.mixed_precision)
        if precision not in _PRECISIONS:
            raise ConfigError(f"mixed_precision={precision!r}: the hybrid trainer runs with 'no' or 'bf16'",
                              "fp16 needs Accelerate's GradScaler around its own optimizer step; use bf16.")
        super().__init__(module, loss_fn, eval_for_loss=eval_for_loss,
                         accumulate=int(accelerator.gradient_accumulation_steps))
        self.accelerator = accelerator

    def backward(self, batch: Any, scale: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Forward and ``accelerator.backward`` over the micro-batches of a prepared ``batch``, adding into
        ``p.grad``; gradients are synchronised across processes on the last micro-batch only. Returns the
        detached loss of the whole batch."""
        if scale is not None:
            raise ConfigError("AcceleratedModel takes no GradScaler of its own",
                              "Build the TorchOptimizer without scaler=; Accelerate owns the precision.")
        micro = self._micro_batches(batch)
        count = len(micro)
        mode = contextlib.nullcontext() if self.module.training else train_mode(self.module, True)
        total: torch.Tensor | None = None
        with torch.enable_grad(), mode:
            for i, (weight, part_batch) in enumerate(micro):
                sync = contextlib.nullcontext() if i == count - 1 else self.accelerator.no_sync(self.module)
                with sync, _collective_errors(self._ddp):  # a failed all-reduce is a BackendError, as in TorchModel
                    part = self._scalar(self.loss_fn(self.module, part_batch))
                    if not part.requires_grad:
                        raise ModelError("the loss does not depend on any trainable parameter",
                                         "Compute the loss from the prepared model's output, outside torch.no_grad().")
                    # accelerator.backward divides by gradient_accumulation_steps (= count); the factor keeps
                    # each micro-batch's share of the examples instead (the same when they are of equal size).
                    self.accelerator.backward(part if count == 1 else part * (weight * count))
                weighted = part.detach() if weight == 1.0 else part.detach() * weight
                total = weighted if total is None else total + weighted
        assert total is not None
        return total


class HybridState:
    """The trainer as Accelerate checkpoints it (``register_for_checkpointing``): ``{"hybrid_trainer": bytes}``.

    ``state_dict`` is collective in a run of several processes (every rank calls it in ``save_state``).
    """

    def __init__(self, trainer: HybridTrainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        """The trainer's checkpoint file as bytes (None on ranks other than 0, whose copy Accelerate does not write)."""
        return {"hybrid_trainer": trainer_bytes(self.trainer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the trainer (`HybridTrainer.restore`'s checks; `CheckpointError` and nothing changed)."""
        restore_from_bytes(self.trainer, state.get("hybrid_trainer") if isinstance(state, dict) else state)


def prepare(accelerator: accelerate.Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], scheduler: Any = None,
            config: HybridConfig | None = None, *, dynamics: DynamicsModel | None = None,
            clip_grad_norm: float | None = None, eval_for_loss: bool = True,
            checkpointing: bool = True) -> HybridTrainer:
    """A `HybridTrainer` around the objects ``accelerator.prepare`` returned, registered for ``save_state``.

    ``loss_fn(model, batch) -> 0-d tensor`` is the forward pass (the trainer runs the backward through
    ``accelerator.backward``); ``scheduler`` (prepared or not) is stepped on every training step;
    ``clip_grad_norm`` clips before each update (``accelerator.clip_grad_norm_`` would clip only where you
    call it). ``checkpointing=False`` skips ``register_for_checkpointing``. Call it on every process.
    """
    if not isinstance(accelerator, accelerate.Accelerator):
        raise ConfigError(f"accelerator is a {type(accelerator).__name__}, not an accelerate.Accelerator")
    raw_optimizer = optimizer.optimizer if isinstance(optimizer, accelerate.optimizer.AcceleratedOptimizer) \
        else optimizer
    raw_scheduler = scheduler.scheduler if isinstance(scheduler, accelerate.scheduler.AcceleratedScheduler) \
        else scheduler
    hybrid_model = AcceleratedModel(accelerator, model, loss_fn, eval_for_loss=eval_for_loss)
    hybrid = HybridTrainer(hybrid_model, TorchOptimizer(hybrid_model, raw_optimizer, raw_scheduler, clip_grad_norm),
                           config, dynamics)
    if checkpointing:
        accelerator.register_for_checkpointing(HybridState(hybrid))
    return hybrid
