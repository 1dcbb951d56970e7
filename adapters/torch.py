"""PyTorch adapter: `TorchModel` (an ``nn.Module`` plus a loss), `TorchOptimizer` (any ``torch.optim``) and
`TorchCollective` (the ranks of a ``torch.distributed`` run, docs/distributed.md)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hybrid_core._backend import namespace_of
from hybrid_core._errors import BackendError, BatchError, CheckpointError, ConfigError, ModelError
from hybrid_core._protocols import Model
from hybrid_core._schedule import Room
from hybrid_core.kernels import fused_stats
from hybrid_core.models._checks import check_like_parameters

from ._torch_amp import StepWatch, check_scaler_state, finite_or_zero, scaler_problems, scaler_state
from ._torch_dist import TorchCollective
from ._torch_model import TorchModel
from ._torch_rules import GroupView, rule_for, sgd_next
from ._torch_schedule import SCHEDULE_COUNTS, scheduler_room
from ._torch_state import check_scheduler, checked_steps, cloned, group_indices

__all__ = ["TorchCollective", "TorchModel", "TorchOptimizer"]

_STATE_KEYS = frozenset({"kind", "optimizer_class", "optimizer", "scheduler", "last_update", "last_grads"})
_SCALER_KEY = "scaler"
"""In the state only when the optimizer has a GradScaler (so states without one keep their old keys)."""
_STATE_HINT = "Load a state_dict() saved by a TorchOptimizer around the same torch optimizer class and model."


class TorchOptimizer:
    """Any ``torch.optim`` optimizer (all its parameter groups) seen as a `hybrid_core.Optimizer`.

    ``optimizer`` must hold every tensor of ``model.parameters()`` (in any groups and order) and no
    other trainable tensor; gradients and updates are lists in ``model.parameters()`` order.

    `step` installs the gradients as ``p.grad`` (by reference, so clipping scales them in place),
    clips them with ``torch.nn.utils.clip_grad_norm_`` if ``clip_grad_norm`` is set, and measures
    Δθ = θ_after − θ_before against one parameter-sized buffer that is reused across steps (copied
    into, never reallocated); Δθ is then computed in that buffer in place and returned, so a real
    step allocates nothing parameter-sized beyond what ``torch.optim`` itself does. The returned
    tensors are valid until the next `step` (as the `Optimizer` protocol allows).

    `extrapolate` is closed-form for ``torch.optim.SGD`` (next gradient = the last one, kept by
    reference: do not write into gradients after `step`) and ``Adam``/``AdamW`` (next gradient =
    m̂_t); for any other optimizer it is a copy of the last update; zeros before any step. It
    allocates its result and at most one temporary of the same size, never a copy of the state.

    Schedulers count every training step by default (``schedule_counts="steps"``): `step` and
    `fused_step` call ``scheduler.step()`` after the update, and the trainer calls `schedule_step` after
    each step that ran no update (a predicted step, a real step skipped for a non-finite value), so a
    scheduler sized to the run (``OneCycleLR(total_steps=N)`` for ``fit(max_steps=N)``) ends with it.
    ``schedule_counts="updates"`` steps it on updates only (`schedule_step` does nothing), as before.
    The scheduler's state is part of `state_dict`, so the trainer's rollbacks and replays take it back
    with the weights and step it again with the replayed steps: its count stays the trainer's.
    `schedule_left` tells the trainer how many steps a ``OneCycleLR`` (alone or in a
    ``ChainedScheduler``) has left, so it is never stepped past its end (see `hybrid_core._schedule`).

    Step counts are read from the torch state once, at construction and in `load_state_dict`, and
    counted in Python afterwards, so no method reads a device value: step the torch optimizer
    only through this class.

    Frozen parameters (``requires_grad=False``, see `TorchModel.set_trainable`) are left alone: `step`
    drops their ``.grad`` (the fused step never computes it) and ``torch.optim`` skips a parameter
    without one, its state included (`skips_frozen`).

    Mixed precision (``scaler``, a ``torch.amp.GradScaler``; the model a `TorchModel`, typically with
    ``autocast=torch.float16``): the fused step scales the loss before each backward pass
    (``scaler.scale``), unscales the gradients before clipping, the learning-rate feed and the statistics
    (``scaler.unscale_``), then ``scaler.step`` and ``scaler.update``. A step the scaler skips for inf/NaN
    gradients leaves the weights and the torch optimizer state as they were; it is counted in
    `skipped_steps` (``trainer.summary()["optimizer"]``), still steps the scheduler (the trainer counts it
    as a step) and returns no statistics, so the trainer records its loss like an unmeasured step: no
    rollback, no `DivergenceError`, no learning-rate back-off. A non-finite *loss* is still a divergence.
    The scaler's state and the skipped count are part of `state_dict`. Only the fused step scales: steps
    that take the trainer's unfused path (``HybridConfig(read_every=1)``, the replay after a rollback, the
    measured steps of layer freezing) run ``model.loss_and_grad`` and a plain ``optimizer.step()``.
    ``GradScaler.step`` reads its found-inf flag to the host at every step (torch's design for non-fused
    optimizers; ``fused=True`` optimizers are refused with a scaler), and its ``state_dict`` reads the scale.
    """

    skips_frozen = True
    """Parameters frozen through `TorchModel.set_trainable`, and their optimizer state, stay untouched."""

    def __init__(self, model: Model, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 clip_grad_norm: float | None = None, *, scaler: torch.amp.GradScaler | None = None,
                 schedule_counts: str = "steps") -> None:
        if not isinstance(model, Model):
            raise ModelError(f"{type(model).__name__} does not implement hybrid_core.Model")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer is a {type(optimizer).__name__}, not a torch.optim.Optimizer")
        problems = []
        if clip_grad_norm is not None and not (_is_number(clip_grad_norm) and 0 < clip_grad_norm < math.inf):
            problems.append(f"clip_grad_norm={clip_grad_norm!r}: must be None or a finite number > 0")
        if scheduler is not None:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                problems.append("scheduler: ReduceLROnPlateau needs a metric; call its step(loss) yourself")
            elif getattr(scheduler, "optimizer", None) is not optimizer:
                problems.append("scheduler: it was built for another optimizer")
        if schedule_counts not in SCHEDULE_COUNTS:
            problems.append(f"schedule_counts={schedule_counts!r}: must be 'steps' (every training step, predicted "
                            "ones included) or 'updates' (optimizer updates only)")
        if scaler is not None:
            problems += scaler_problems(scaler, optimizer, model)
        if problems:
            raise ConfigError(problems)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.schedule_counts = schedule_counts
        """``"steps"``: the scheduler counts every training step; ``"updates"``: optimizer updates only."""
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self._params = list(model.parameters())
        self._xp = namespace_of(self._params, what="model.parameters()")
        self._groups = group_indices(optimizer, self._params)
        self._check_float_lrs()
        self._rule = rule_for(optimizer)
        self._steps = self._read_steps()
        self._buffer: list[torch.Tensor] | None = None
        self._has_update = False
        self._last_grads: list[torch.Tensor] | None = None
        self.scaler = scaler
        self.skipped_steps = 0
        """Fused steps the GradScaler skipped for inf/NaN gradients (saved with the state)."""
        self._watch = None if scaler is None else StepWatch(optimizer)

    @property
    def adaptive(self) -> bool:
        """Whether the torch optimizer is of the Adam family (Adam, AdamW, NAdam, RAdam, Adamax)."""
        return type(self.optimizer) in (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
                                        torch.optim.Adamax)

    @property
    def lr(self) -> float:
        """The first parameter group's learning rate.

        Setting it scales every group by the same factor (new / first group's lr), so ratios between
        groups survive. A scheduler that recomputes lr from its base values overrides it at its next step.
        """
        return float(self.optimizer.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        if not (_is_number(value) and 0 < value < math.inf):
            raise ConfigError(f"lr={value!r}: must be a finite number > 0")
        groups = self.optimizer.param_groups
        first = groups[0]["lr"]
        if first == 0:
            raise ConfigError("the first parameter group has lr=0, so it cannot set the scale of the others",
                              "Set each group's lr on the torch optimizer directly.")
        factor = value / first
        for group in groups[1:]:
            group["lr"] = group["lr"] * factor
        groups[0]["lr"] = float(value)

    def step(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Apply one real update (clip, ``optimizer.step()``, ``scheduler.step()``) and return its Δθ.

        The returned tensors are this adapter's own buffer: valid until the next `step` (the
        protocol allows it), which saves a parameter-sized allocation on every step.
        """
        params = self._params
        grads = check_like_parameters(self._xp, params, grads, "the gradients")
        for p, g in zip(params, grads, strict=True):
            if not p.requires_grad:
                p.grad = None  # frozen: torch.optim skips it
            elif p.grad is not g:
                p.grad = g.detach()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        with torch.no_grad():
            if self._buffer is None:
                self._buffer = torch._foreach_clone(params)
            else:
                torch._foreach_copy_(self._buffer, params)
            self._has_update = False
            self.optimizer.step()
            # Δθ in place, without a parameter-sized allocation per step: old − new, negated
            # (IEEE subtraction is exactly anti-commutative, so this equals new − old bit for bit).
            torch._foreach_sub_(self._buffer, params)
            torch._foreach_neg_(self._buffer)
            update = self._buffer
        self._has_update = True
        if self._rule is sgd_next:  # only SGD's extrapolation needs them; others would pin their memory
            self._last_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self._steps = [s + (p.grad is not None) for s, p in zip(self._steps, params)]
        self._step_scheduler()
        return list(update)

    accepts_before_update = True
    """`fused_step` takes ``before_update``: the trainer's learning-rate search keeps the fused step."""

    def fused_step(self, batch: Any, measure: bool,
                   before_update: Callable[[list[torch.Tensor]], None] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One real step as torch users write it: ``zero_grad``, ``loss.backward()``, ``optimizer.step()``.

        Nothing is read to the host. The batch's library and devices are checked on every step (a walk
        over its leaves, no tensor op). Only with ``measure`` is Δθ measured in the reused buffer and the
        statistics ``[loss, Σg², Σu², Σg·u, max|g|, non-finite count, lr]`` computed (one device vector);
        otherwise the step costs what the plain loop costs. The batch goes through `TorchModel.prepare`
        (moved to the model's device) and `TorchModel.backward` (autocast, micro-batches); with a scaler see
        the class docstring: a skipped step returns ``(loss, None)`` even when measured. A model that is not
        a `TorchModel` takes the unfused path. ``before_update``, if given, is called with the gradients
        (zeros for parameters without one) after the backward pass and clipping, before the optimizer's
        update, while the parameters still hold their old values (with a scaler: unscaled, and all zeros on
        a step the scaler will skip).
        """
        model = self.model
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step uses (a scheduler moves it after)
        if not isinstance(model, TorchModel):
            loss, grads = model.loss_and_grad(batch)
            if before_update is not None:
                before_update(list(grads))
            update = self.step(grads)
            return loss, (self._stats(loss, list(grads), update, lr) if measure else None)
        batch = model.prepare(batch)
        params, scaler = self._params, self.scaler
        model.module.zero_grad(set_to_none=True)
        loss = model.backward(batch, None if scaler is None else scaler.scale)
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        if before_update is not None:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            before_update(grads if scaler is None else finite_or_zero(grads))
        self._has_update = False
        with torch.no_grad():
            if measure:
                if self._buffer is None:
                    self._buffer = torch._foreach_clone(params)
                else:
                    torch._foreach_copy_(self._buffer, params)
            stepped = self._optimizer_step()
            if measure:
                torch._foreach_sub_(self._buffer, params)
                torch._foreach_neg_(self._buffer)
                self._has_update = stepped
        if stepped:
            if self._rule is sgd_next:
                self._last_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            self._steps = [s + (p.grad is not None) for s, p in zip(self._steps, params)]
        else:
            self.skipped_steps += 1
        self._step_scheduler()
        if not measure or not stepped:
            return loss, None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        return loss, self._stats(loss, grads, self._buffer, lr)

    def _optimizer_step(self) -> bool:
        """``optimizer.step()``, through the scaler if there is one; whether the step was taken."""
        if self.scaler is None or self._watch is None:
            self.optimizer.step()
            return True
        self._watch.arm()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self._watch.fired

    def _step_scheduler(self) -> None:
        if self.scheduler is None:
            return
        with warnings.catch_warnings():  # a first step skipped by the scaler is not a misordered call
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()

    def schedule_step(self) -> None:
        """A training step ran without an update from this optimizer (predicted, or skipped): step the scheduler
        as the update would have (nothing with ``schedule_counts="updates"`` or without a scheduler)."""
        if self.schedule_counts == "steps":
            self._step_scheduler()

    def schedule_left(self) -> Room | None:
        """How many more steps the scheduler takes before torch refuses (``OneCycleLR``: ``total_steps`` minus the
        steps taken; the least of a ``ChainedScheduler``'s), or None: no scheduler, or one without an end."""
        if self.scheduler is None:
            return None
        return scheduler_room(self.scheduler)

    def summary(self) -> dict[str, Any]:
        """The steps the GradScaler skipped and, with a scaler, its current scale (one host read)."""
        out: dict[str, Any] = {"skipped_steps": self.skipped_steps}
        if self.scaler is not None:
            out["loss_scale"] = float(self.scaler.get_scale())
        return out

    @staticmethod
    def _stats(loss: torch.Tensor, grads: list[torch.Tensor], update: Sequence[torch.Tensor],
               lr: float) -> torch.Tensor:
        stats = fused_stats(loss, grads, list(update))
        return torch.cat([stats, torch.tensor([lr], dtype=stats.dtype, device=stats.device)])

    def extrapolate(self) -> list[torch.Tensor]:
        """The predicted next Δθ (fresh tensors); changes neither the model nor the optimizer state."""
        params = self._params
        with torch.no_grad():
            if self._rule is not None:
                out: list[torch.Tensor | None] = [None] * len(params)
                state = self.optimizer.state
                for gi, idx in enumerate(self._groups):
                    ps = [params[i] for i in idx]
                    view = GroupView(self.optimizer.param_groups[gi], ps, [state.get(p, {}) for p in ps],
                                     [self._steps[i] for i in idx],
                                     None if self._last_grads is None else [self._last_grads[i] for i in idx])
                    for i, u in zip(idx, self._rule(view) or [None] * len(idx), strict=True):
                        out[i] = u
                if all(u is not None for u in out):
                    return out
            if self._has_update and self._buffer is not None:
                return torch._foreach_clone(self._buffer)
            return [torch.zeros_like(p) for p in params]

    def state_dict(self) -> dict[str, Any]:
        """A snapshot, tensors cloned: torch optimizer and scheduler state, the steps taken per parameter, the
        last update and gradients.

        The last gradients are kept only for SGD, whose extrapolation needs them. With a GradScaler the
        state also holds ``"scaler"``: the scaler's ``state_dict()`` and `skipped_steps`.
        """
        keep_grads = self._rule is sgd_next
        scaler = {} if self.scaler is None else {_SCALER_KEY: scaler_state(self.scaler, self.skipped_steps)}
        return {**scaler,
            "kind": "TorchOptimizer",
            "optimizer_class": type(self.optimizer).__name__,
            "optimizer": cloned(self.optimizer.state_dict()),
            "scheduler": None if self.scheduler is None else cloned(self.scheduler.state_dict()),
            "steps": list(self._steps),
            "last_update": cloned(self._buffer) if self._has_update else None,
            "last_grads": cloned(self._last_grads) if keep_grads and self._last_grads is not None else None,
        }

    def check_state_dict(self, state: dict[str, Any]) -> tuple[list[int], Any, Any, int]:
        """(steps, last update, last gradients, skipped steps) as `load_state_dict` would set them;
        `CheckpointError` naming the field, and nothing changed, if ``state`` does not fit this optimizer and
        model (see `checked_steps`: shapes, dtypes, NaN or Inf in any buffer, a missing state for a parameter
        that has stepped; a GradScaler state that does not fit this optimizer's scaler)."""
        if not isinstance(state, Mapping) or not _STATE_KEYS <= set(state) <= _STATE_KEYS | {"steps", _SCALER_KEY}:
            raise CheckpointError("this is not a TorchOptimizer state_dict", _STATE_HINT)
        skipped = check_scaler_state(self.scaler, state.get(_SCALER_KEY), _STATE_HINT)
        if state["kind"] != "TorchOptimizer" or state["optimizer_class"] != type(self.optimizer).__name__:
            raise CheckpointError(f"the state is for a {state['optimizer_class']!r} in a {state['kind']!r}, "
                                  f"not a {type(self.optimizer).__name__} in a TorchOptimizer", _STATE_HINT)
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise CheckpointError("the state and this optimizer disagree on having a scheduler", _STATE_HINT)
        if self.scheduler is not None:
            check_scheduler(state["scheduler"], self.scheduler.state_dict())
        steps = checked_steps(self.optimizer, self._params, state["optimizer"], state.get("steps"),
                              state["last_update"] is not None)
        return (steps, self._buffers(state["last_update"], "last_update"),
                self._buffers(state["last_grads"], "last_grads"), skipped)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output; `CheckpointError` and no change if it does not fit (see `check_state_dict`).

        Should torch or the scheduler still refuse it, the state from before is loaded back.
        """
        plan = self.check_state_dict(state)
        backup = self.state_dict()
        try:
            self._apply(state, *plan)
        except Exception as exc:
            self._apply(backup, backup["steps"], backup["last_update"], backup["last_grads"], self.skipped_steps)
            raise CheckpointError(f"torch could not load the optimizer state ({type(exc).__name__}: {exc})",
                                  _STATE_HINT) from exc

    def _apply(self, state: Mapping[str, Any], steps: list[int], last_update: Any, last_grads: Any,
               skipped: int) -> None:
        # torch keeps the given tensors when dtype and device already fit: clone so that two
        # optimizers loading one state dict do not share (and mutate) the same buffers.
        self.optimizer.load_state_dict(cloned(state["optimizer"]))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(cloned(state["scheduler"]))
        if self.scaler is not None:
            self.scaler.load_state_dict(dict(state[_SCALER_KEY]["state"]))
        self._check_float_lrs()
        self._rule = rule_for(self.optimizer)
        self._steps = list(steps)
        self._has_update = last_update is not None
        self._buffer = None if last_update is None else cloned(last_update)
        self._last_grads = None if last_grads is None else cloned(last_grads)
        self.skipped_steps = skipped

    def _buffers(self, value: Any, name: str) -> list[torch.Tensor] | None:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)):
            raise CheckpointError(f"{name} is a {type(value).__name__}, not a list of tensors", _STATE_HINT)
        try:
            tensors = check_like_parameters(self._xp, self._params, value, name)
        except (BatchError, BackendError) as exc:
            raise CheckpointError(exc.message, exc.recovery) from exc
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise CheckpointError(f"{name} holds NaN or Inf", "Load an earlier checkpoint, saved before the run "
                                  "diverged.")
        return tensors

    def _check_float_lrs(self) -> None:
        bad = [i for i, g in enumerate(self.optimizer.param_groups) if not _is_number(g["lr"])]
        if bad:
            raise ConfigError(f"parameter groups {bad} have a tensor lr; reading it would cost a device sync",
                              "Build the torch optimizer with a float lr.")

    def _read_steps(self) -> list[int]:
        steps = []
        for p in self._params:
            step = self.optimizer.state.get(p, {}).get("step")
            steps.append(0 if step is None else int(step))
        return steps

    def __repr__(self) -> str:
        return (f"TorchOptimizer({type(self.optimizer).__name__}, lr={self.lr!r}, "
                f"{len(self._groups)} group(s), clip_grad_norm={self.clip_grad_norm!r}"
                f"{'' if self.scaler is None else ', with a GradScaler'})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
