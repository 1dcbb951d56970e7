"""PyTorch Lightning: `HybridLightningModule`, a ``LightningModule`` whose training steps run through `HybridTrainer`.

A Lightning user changes three things: the base class, ``super().__init__(hybrid_config=...)``, and the name
of the loss: ``training_loss(batch)`` returns the loss where ``training_step`` did (forward only — the
trainer runs the backward pass, or none on a predicted step). ``configure_optimizers``, the data, the
``Trainer`` (its ``max_steps``, callbacks, loggers, ``ModelCheckpoint``, ``strategy="ddp"``) stay as they were::

    class Net(HybridLightningModule):
        def __init__(self):
            super().__init__(hybrid_config=HybridConfig(warmup_steps=50))
            self.layer = torch.nn.Linear(8, 1)

        def training_loss(self, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    lightning.Trainer(max_steps=300).fit(Net(), loader)

How it meets Lightning's loops (docs/integrations.md):

- *Optimization* is manual (``automatic_optimization = False``): `training_step` hands the batch to
  `HybridTrainer.step`, which runs ``training_loss`` and the backward pass and steps the torch optimizer
  (a real step), or applies a predicted update (no backward pass). Every training step, predicted ones
  included, counts as one optimizer step in ``trainer.global_step``, so ``max_steps`` is the run's total as in
  `HybridTrainer.fit`. One optimizer; its scheduler (``interval="step"``, ``frequency=1``) is stepped on every
  training step by `TorchOptimizer`. ``Trainer(gradient_clip_val=...)`` and ``accumulate_grad_batches`` are
  Lightning's automatic-optimization features: pass ``clip_grad_norm`` and ``accumulate`` here instead.
- *Precision*: ``"32-true"``, ``"64-true"``, ``"bf16-true"`` and ``"bf16-mixed"`` (Lightning's autocast wraps the
  step); ``"16-mixed"`` needs Lightning's GradScaler around its own backward call and is refused.
- *Logging* (``self.log``, on step): ``hybrid/phase`` (0 WARMUP, 1 FULL, 2 PREDICT, 3 CORRECT) and
  ``hybrid/backward_skipped`` (predicted steps so far) on the steps Lightning's loggers write
  (``log_every_n_steps``) and on those whose loss has been read (every ``read_every`` steps;
  `HybridTrainer.flush`), which also log ``train_loss``.
- *Checkpoints*: ``on_save_checkpoint`` puts the whole hybrid trainer (`HybridTrainer.save`'s file, its
  checksum included) under ``checkpoint["hybrid_trainer"]``; ``Trainer.fit(ckpt_path=...)`` restores it at
  ``on_train_start``, after Lightning restored the weights, optimizer and scheduler, so the resumed run
  continues bit for bit (on a deterministic CPU run, with data in the same order).
- *DDP* (``strategy="ddp"``): each rank's backward pass is all-reduced by Lightning's DDP reducer, and the
  trainer's decisions are agreed among the ranks through ``torch.distributed`` (`hybrid_core._collective`).
"""

from __future__ import annotations

import abc
from typing import Any

import lightning.pytorch as pl
import torch

from hybrid_core._config import HybridConfig
from hybrid_core._errors import CheckpointError, ConfigError
from hybrid_core._phase import Phase
from hybrid_core._protocols import DynamicsModel
from hybrid_core._result import StepResult
from hybrid_core._trainer import HybridTrainer

from ._trainer_bytes import restore_from_bytes, trainer_bytes
from .torch import TorchModel, TorchOptimizer

__all__ = ["CHECKPOINT_KEY", "PHASE_CODES", "HybridLightningModule"]

CHECKPOINT_KEY = "hybrid_trainer"
"""Where ``on_save_checkpoint`` puts the hybrid trainer's state (the bytes of its checkpoint file)."""

PHASE_CODES = {phase: float(i) for i, phase in enumerate(Phase)}
"""The number logged as ``hybrid/phase`` for each phase (WARMUP 0, FULL 1, PREDICT 2, CORRECT 3)."""

_PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-true", "bf16-mixed")


class HybridLightningModule(pl.LightningModule, abc.ABC):
    """A ``LightningModule`` trained through `HybridTrainer`: implement `training_loss` instead of ``training_step``.

    ``hybrid_config`` (default ``HybridConfig()``), ``dynamics``: as for `HybridTrainer`. ``clip_grad_norm``,
    ``accumulate`` (micro-batches per step) and ``eval_for_loss``: as for `TorchOptimizer` and `TorchModel`.
    The trainer is built when training starts (`hybrid`), around the optimizer and scheduler of
    ``configure_optimizers``.
    """

    def __init__(self, *args: Any, hybrid_config: HybridConfig | None = None, dynamics: DynamicsModel | None = None,
                 clip_grad_norm: float | None = None, accumulate: int = 1, eval_for_loss: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = HybridConfig() if hybrid_config is None else hybrid_config
        if not isinstance(config, HybridConfig):
            raise ConfigError(f"hybrid_config must be a HybridConfig, got {type(config).__name__}")
        self.automatic_optimization = False
        self.hybrid_config = config
        """The trainer's configuration."""
        self.hybrid: HybridTrainer | None = None
        """The `HybridTrainer`, from the start of training on (None before)."""
        self._hybrid_options = {"dynamics": dynamics, "clip_grad_norm": clip_grad_norm, "accumulate": accumulate,
                                "eval_for_loss": eval_for_loss}
        self._hybrid_resume: bytes | None = None

    @abc.abstractmethod
    def training_loss(self, batch: Any) -> torch.Tensor:
        """The training loss of ``batch`` (a 0-d tensor), forward pass only; the trainer also calls it for its
        forward-only checks (in eval mode, under ``torch.no_grad``), so keep it free of side effects."""

    # -- the step ------------------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One `HybridTrainer.step` on ``batch``, counted as one optimizer step, and its values logged."""
        hybrid = self.hybrid
        if hybrid is None:
            raise ConfigError("the hybrid trainer is built when Trainer.fit starts training (on_train_start)",
                              "Train the module with lightning.Trainer.fit.")
        optimizer = self.optimizers()
        # Lightning counts manual-optimization steps around LightningOptimizer.step; the trainer steps the
        # torch optimizer itself (or predicts), so every hybrid step is announced the same way.
        optimizer._on_before_step()
        result = hybrid.step(batch)
        optimizer._on_after_step()
        self._log_step(hybrid, result)

    def _log_step(self, hybrid: HybridTrainer, result: StepResult) -> None:
        # Each self.log call runs Lightning's bookkeeping (a tensor per value, a result-collection update), a
        # measurable share of a small model's step: log where it is used — the steps Lightning's loggers write
        # (log_every_n_steps) and those whose loss was read.
        connector = getattr(self.trainer, "_logger_connector", None)
        if result.loss is None and connector is not None and not connector.should_update_logs:
            return
        self.log("hybrid/phase", PHASE_CODES[result.phase], on_step=True, on_epoch=False)
        self.log("hybrid/backward_skipped", float(hybrid.metrics.backward_passes_skipped), on_step=True,
                 on_epoch=False)
        if result.loss is not None:
            self.log("train_loss", float(result.loss), on_step=True, on_epoch=False, prog_bar=True)

    def _loss(self, module: torch.nn.Module, batch: Any) -> torch.Tensor:
        loss = self.training_loss(batch)
        if torch.is_grad_enabled() and isinstance(loss, torch.Tensor) and loss.requires_grad:
            # The trainer's backward pass follows: under DDP, arm the reducer as manual_backward would.
            self.trainer.strategy.pre_backward(loss)
        return loss

    # -- building and resuming ----------------------------------------------------------------

    def on_train_start(self) -> None:
        """Build the trainer around the configured optimizer and, on a resumed fit, restore its state."""
        super().on_train_start()
        self._build_hybrid()

    def on_train_end(self) -> None:
        """Read what is pending, so the last steps' losses are recorded."""
        super().on_train_end()
        if self.hybrid is not None:
            self.hybrid.flush()

    def _build_hybrid(self) -> HybridTrainer:
        optimizer, scheduler = self._optimizer_and_scheduler()
        opts = self._hybrid_options
        model = TorchModel(self, self._loss, eval_for_loss=opts["eval_for_loss"], accumulate=opts["accumulate"])
        hybrid = HybridTrainer(model, TorchOptimizer(model, optimizer, scheduler, opts["clip_grad_norm"]),
                               self.hybrid_config, opts["dynamics"])
        saved, self._hybrid_resume = self._hybrid_resume, None
        if saved is not None:
            # Lightning has already put the checkpoint's optimizer state back, so the rate in force is the
            # scheduled one, not the run's starting rate: the file's own record is taken (see _runinfo).
            hybrid.run_lr = None
            restore_from_bytes(hybrid, saved)
        self.hybrid = hybrid
        return hybrid

    def _optimizer_and_scheduler(self) -> tuple[torch.optim.Optimizer, Any]:
        trainer = self.trainer
        problems = []
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            problems.append(f"configure_optimizers gave {len(optimizers)} optimizers; the hybrid trainer drives one")
        configs = trainer.lr_scheduler_configs
        if len(configs) > 1:
            problems.append(f"configure_optimizers gave {len(configs)} schedulers; chain them into one "
                            "(torch.optim.lr_scheduler.ChainedScheduler or SequentialLR)")
        for cfg in configs:
            if cfg.interval != "step" or cfg.frequency != 1:
                problems.append(f"the scheduler has interval={cfg.interval!r}, frequency={cfg.frequency}: the trainer "
                                "steps it once per training step (interval='step', frequency=1)")
            if cfg.reduce_on_plateau:
                problems.append("ReduceLROnPlateau needs a metric; step it yourself")
        precision = str(trainer.precision)
        if precision not in _PRECISIONS:
            problems.append(f"precision={precision!r}: use one of {', '.join(_PRECISIONS)} ('16-mixed' scales the "
                            "loss inside Lightning's own backward call, which the hybrid trainer does not make)")
        if problems:
            raise ConfigError(problems, "Give the module one optimizer with at most one per-step scheduler; pass "
                              "clip_grad_norm=/accumulate= to HybridLightningModule.__init__ for clipping and "
                              "gradient accumulation.")
        return optimizers[0], configs[0].scheduler if configs else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the hybrid trainer's state (its checkpoint file's bytes) into Lightning's checkpoint.

        Every rank calls it (Lightning builds the checkpoint on all ranks and rank 0 writes it), as
        `HybridTrainer.save` wants; only rank 0's dictionary gets the bytes.
        """
        super().on_save_checkpoint(checkpoint)
        if self.hybrid is None:
            if self._hybrid_resume is not None:  # saved before training resumed: keep what was loaded
                checkpoint[CHECKPOINT_KEY] = self._hybrid_resume
            return
        data = trainer_bytes(self.hybrid)
        if data is not None:
            checkpoint[CHECKPOINT_KEY] = data

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the hybrid trainer's state of a Lightning checkpoint; it is restored when training starts.

        A checkpoint without it (saved by a plain module) starts a fresh trainer from the loaded weights.
        """
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None and not isinstance(saved, bytes):
            raise CheckpointError(f"checkpoint[{CHECKPOINT_KEY!r}] is a {type(saved).__name__}, not bytes",
                                  "Load a checkpoint written by HybridLightningModule.on_save_checkpoint.")
        self._hybrid_resume = saved
        self.hybrid = None

