"""`TorchModel`: a ``torch.nn.Module`` and a loss seen as a `hybrid_core.Model` (re-exported by
`hybrid_core.adapters.torch`), and its parameter groups for layer freezing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from hybrid_core._backend import namespace_of
from hybrid_core._errors import BackendError, BatchError, ConfigError, ModelError
from hybrid_core.models._checks import check_like_parameters

from ._batch import batch_leaves, library_of
from ._torch_batch import split_batch, to_device

__all__ = ["TorchModel", "module_groups", "train_mode"]


@contextlib.contextmanager
def train_mode(module: torch.nn.Module, training: bool) -> Iterator[None]:
    """Put ``module`` in train or eval mode, then restore every submodule's own previous mode."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


class TorchModel:
    """A ``torch.nn.Module`` and ``loss_fn(module, batch) -> 0-d tensor`` seen as a `hybrid_core.Model`.

    `parameters` returns the module's trainable tensors themselves (live: they change when the
    model is updated), in ``module.parameters()`` order, fixed at construction.

    Modes: `loss_and_grad` runs in train mode (a module in eval mode is switched for the pass and
    restored; a module already training keeps any submodule the user put in eval). `loss`, the
    forward-only pass of the trainer's checks and line searches, runs in eval mode by default
    (``eval_for_loss=True``): the trainer compares those losses with each other and with its
    predictions, so they must be repeatable — in train mode dropout draws a new mask on every call
    (two checks of the same weights differ) and batch-norm would fold the probe batches (including
    the points of a line search, which are not on the training path) into its running statistics.
    ``eval_for_loss=False`` runs `loss` in the module's current mode instead. The previous mode of
    every submodule is restored afterwards.

    Devices: with ``move_batch=True`` (the default) every tensor of a batch (inside tuples, lists and
    mappings) that is not on the model's device is moved there (``Tensor.to(device, non_blocking=True)``)
    before the forward pass; a tensor already there is used as is (no copy). A module whose parameters
    span several devices gets no move. ``move_batch=False`` leaves batches alone. Either way a tensor on
    another device than the model's, or on the ``meta`` device, is a `BackendError`.

    Precision: the parameters keep the dtype the module has (``module.to(torch.bfloat16)`` trains in
    bfloat16). ``autocast=torch.bfloat16`` or ``torch.float16`` runs every forward pass under
    ``torch.autocast(device_type, dtype)`` (mixed precision: float32 weights, low-precision matmuls);
    float16 wants a ``torch.amp.GradScaler``, given to `TorchOptimizer` (``scaler=``).

    Gradient accumulation: with ``accumulate=k`` each batch is cut along its first dimension into k
    micro-batches (``torch.tensor_split``; tensors without a dimension go whole into each), the
    forward and backward passes run one micro-batch at a time (activations of one micro-batch in
    memory) and the gradients add up, each micro-batch's loss weighted by its share of the examples.
    For a ``loss_fn`` that averages over the examples this is the loss and gradient of the whole batch
    (up to rounding), so the optimizer takes one step per batch and the trainer counts steps as
    optimizer steps. `loss` is computed the same way. Batch-norm then normalises per micro-batch.

    Data parallel (docs/distributed.md): ``module`` may be a ``DistributedDataParallel`` wrapper. Real steps
    (`loss_and_grad`, `backward`) run through it, so its backward pass all-reduces the gradients; with
    ``accumulate=k`` the first k-1 micro-batches run under ``no_sync()`` and the last one all-reduces. The
    forward-only passes (`loss`: checks, line searches, read-out probes) call ``loss_fn`` with the module
    inside the wrapper (``module.module``), so DDP prepares no gradient reduction for them: ``loss_fn`` must
    only call the module it is given. A failed all-reduce (a rank died or stalled) is a `BackendError`.
    Layer freezing is refused under DDP (`ConfigError`). A module sharded by FSDP2 (``fully_shard``, DTensor
    parameters) is refused (`ModelError`, which says what does not work yet).

    Layer freezing (`parameter_groups`, `set_trainable`): by default one group per top-level child of the
    module, in registration order (the root's own parameters, such as a positional embedding, join the
    first group); ``groups`` gives them as lists of parameter names instead. A frozen group's tensors get
    ``requires_grad=False``, so autograd does not compute their gradients at all.
    """

    def __init__(self, module: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], *,
                 eval_for_loss: bool = True, groups: Sequence[Sequence[str]] | None = None,
                 autocast: torch.dtype | None = None, move_batch: bool = True, accumulate: int = 1) -> None:
        if not isinstance(module, torch.nn.Module):
            raise ModelError(f"TorchModel needs a torch.nn.Module, got {type(module).__name__}")
        if not callable(loss_fn):
            raise ModelError("loss_fn is not callable", "Pass loss_fn(module, batch) -> 0-d tensor.")
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ModelError("the module has no parameter with requires_grad=True: there is nothing to train",
                             "Unfreeze at least one parameter before wrapping the module.")
        if any(torch.is_complex(p) for p in params):
            raise ModelError("complex parameters are not supported",
                             "Split them into real and imaginary parts.")
        _refuse_sharded(module, params)
        devices = {p.device for p in params}
        self._device = next(iter(devices)) if len(devices) == 1 else None
        _check_options(autocast, accumulate, self._device, devices)
        self.module = module
        self._ddp = isinstance(module, torch.nn.parallel.DistributedDataParallel)
        self._forward_module = module.module if self._ddp else module
        """What forward-only passes (`loss`) call: the module inside a DDP wrapper, so DDP's reducer is not armed."""
        self.loss_fn = loss_fn
        self.eval_for_loss = bool(eval_for_loss)
        self.move_batch = bool(move_batch)
        self.autocast = autocast
        self.accumulate = accumulate
        self._params = params
        self._xp = namespace_of(params, what="the module's parameters")
        self._devices = devices
        self._groups = module_groups(module, params, groups)

    @property
    def device(self) -> torch.device | None:
        """The device of every parameter, or None when they span several."""
        return self._device

    @property
    def loss_in_eval_mode(self) -> bool:
        """`Model`'s optional flag (``eval_for_loss``): `loss` runs in eval mode, so the trainer pairs a
        read-out's loss with the raw weights' `loss`, not with the training loss (dropout would make the raw
        weights look worse than they are)."""
        return self.eval_for_loss

    def parameters(self) -> list[torch.Tensor]:
        """The trainable parameter tensors themselves (live), in ``module.parameters()`` order."""
        return list(self._params)

    def loss(self, batch: Any) -> torch.Tensor:
        """Forward pass under ``torch.no_grad()`` (eval mode by default): the loss as a tensor (no host read)."""
        batch = self.prepare(batch)
        mode = train_mode(self.module, False) if self.eval_for_loss else contextlib.nullcontext()
        total: torch.Tensor | None = None
        with torch.no_grad(), mode:
            for weight, micro in self._micro_batches(batch):
                with self._autocast():
                    part = self._scalar(self.loss_fn(self._forward_module, micro))
                part = part if weight == 1.0 else part * weight
                total = part if total is None else total + part
        assert total is not None
        return total.detach()

    def loss_and_grad(self, batch: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward and backward in train mode: the detached loss and ``p.grad`` of every parameter.

        Gradients are fresh tensors each call (grads are reset to ``None`` first); a parameter the
        loss does not reach gets a zero gradient, which is also stored in its ``.grad``. A frozen one
        (`set_trainable`) gets a zero gradient too, but its ``.grad`` stays ``None``, so that
        ``torch.optim`` leaves it and its state alone.
        """
        batch = self.prepare(batch)
        self.module.zero_grad(set_to_none=True)
        loss = self.backward(batch)
        grads = []
        for p in self._params:
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)
            grads.append(torch.zeros_like(p) if p.grad is None else p.grad)
        return loss, grads

    def prepare(self, batch: Any, check: bool = True) -> Any:
        """``batch`` moved to the model's device (with ``move_batch``) and, with ``check``, its tensors'
        library and device checked (`BackendError`)."""
        if self.move_batch and self._device is not None:
            batch = to_device(batch, self._device)
        if check:
            self._check_batch(batch)
        return batch

    def backward(self, batch: Any, scale: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Forward and backward passes in train mode over the micro-batches of a prepared ``batch``, adding
        into ``p.grad`` (the caller zeroes them first); ``scale`` (a ``GradScaler.scale``) is applied to each
        loss before its backward pass. Returns the detached loss of the whole batch."""
        mode = contextlib.nullcontext() if self.module.training else train_mode(self.module, True)
        total: torch.Tensor | None = None
        micros = self._micro_batches(batch)
        with torch.enable_grad(), mode:
            for k, (weight, micro) in enumerate(micros):
                # DDP: all-reduce the gradients once, in the last micro-batch's backward pass
                sync = self.module.no_sync() if self._ddp and k < len(micros) - 1 else contextlib.nullcontext()
                with sync, _collective_errors(self._ddp):
                    with self._autocast():
                        part = self._scalar(self.loss_fn(self.module, micro))
                    if not part.requires_grad:
                        raise ModelError("the loss does not depend on any trainable parameter",
                                         "Compute the loss from module(batch) in loss_fn, outside torch.no_grad().")
                    part = part if weight == 1.0 else part * weight
                    (part if scale is None else scale(part)).backward()
                total = part.detach() if total is None else total + part.detach()
        assert total is not None
        return total

    def _micro_batches(self, batch: Any) -> list[tuple[float, Any]]:
        return [(1.0, batch)] if self.accumulate == 1 else split_batch(batch, self.accumulate)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None or self._device is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device.type, dtype=self.autocast)

    def parameter_groups(self) -> list[list[int]]:
        """Indices into `parameters` by group, input side first (see the class docstring).

        `ConfigError` for a ``DistributedDataParallel`` module: its reducer fixes at construction which
        parameters receive gradients, so layer freezing (which turns ``requires_grad`` off) cannot run under it.
        """
        if self._ddp:
            raise ConfigError("layer freezing is not supported for a DistributedDataParallel module: DDP fixes at "
                              "construction which parameters get gradients, and freezing turns requires_grad off",
                              "Use HybridConfig(layer_freeze='off') for a DDP run.")
        return [list(g) for g in self._groups]

    def set_trainable(self, flags: Sequence[bool]) -> None:
        """Train (True) or freeze (False) each group: ``requires_grad_`` on its tensors; a frozen one's
        ``.grad`` is dropped, so no optimizer step moves it."""
        self.parameter_groups()  # ConfigError under DDP
        if len(flags) != len(self._groups) or not all(isinstance(f, bool) for f in flags):
            raise ModelError(f"set_trainable needs {len(self._groups)} bools (one per group), got {list(flags)!r}")
        for group, flag in zip(self._groups, flags):
            for i in group:
                p = self._params[i]
                p.requires_grad_(flag)
                if not flag:
                    p.grad = None

    def set_parameters(self, values: Sequence[torch.Tensor]) -> None:
        """Copy ``values`` into the live parameter tensors (one ``torch._foreach_copy_``)."""
        values = check_like_parameters(self._xp, self._params, values, "the parameters")
        with torch.no_grad():
            torch._foreach_copy_(self._params, values)

    def apply_update(self, update: Sequence[torch.Tensor], scale: float) -> None:
        """θ ← θ + scale·update for all parameters in one ``torch._foreach_add_``."""
        update = check_like_parameters(self._xp, self._params, update, "the update")
        with torch.no_grad():
            torch._foreach_add_(self._params, update, alpha=float(scale))

    def _scalar(self, loss: Any) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor):
            raise ModelError(f"loss_fn returned a {type(loss).__name__}, not a torch.Tensor",
                             "Return the loss tensor itself (no .item()).")
        if tuple(loss.shape) not in ((), (1,)):
            raise BatchError(f"loss_fn returned a loss of shape {tuple(loss.shape)}; a scalar was expected",
                             "Reduce the loss to a scalar (e.g. .mean() over the batch) inside loss_fn.")
        return loss

    def _check_batch(self, batch: Any) -> None:
        devices = ", ".join(sorted(str(d) for d in self._devices))
        for leaf in batch_leaves(batch):
            if isinstance(leaf, torch.Tensor):
                if leaf.device not in self._devices:
                    raise BackendError(
                        f"the batch holds a tensor on {leaf.device} but the model is on {devices}",
                        f"Move the batch to {devices} (tensor.to(device)) before the step.")
            else:
                library = library_of(leaf)
                if library is not None:
                    raise BackendError(f"the batch holds a {library} array but the model uses torch",
                                       f"Convert the batch to torch tensors on {devices} (torch.as_tensor).")

    def __repr__(self) -> str:
        return f"TorchModel({type(self.module).__name__}, {len(self._params)} parameter tensors)"


@contextlib.contextmanager
def _collective_errors(ddp: bool) -> Iterator[None]:
    """Under DDP, a failed gradient all-reduce (a rank died or timed out) as `BackendError`, not as an error
    of the batch (the trainer turns a model's own errors into `BatchError`)."""
    if not ddp:
        yield
        return
    try:
        yield
    except RuntimeError as exc:
        dist_error = getattr(torch.distributed, "DistError", ())
        text = str(exc)
        if not (isinstance(exc, dist_error) or any(m in text for m in _COLLECTIVE_FAILURES)):
            raise
        dist = torch.distributed
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 0)
        who = f"rank {1 - rank}" if world == 2 else f"a rank other than {rank}"
        raise BackendError(
            f"DDP gradient all-reduce (backward pass): {who} did not answer, on rank {rank} "
            f"({type(exc).__name__}: {text.strip().splitlines()[0][:300] if text.strip() else ''})",
            "A rank died or stalled: read its log, restart every rank and resume from the last checkpoint "
            "(HybridTrainer.load). The wait is bounded by init_process_group(timeout=...).") from exc


def _refuse_sharded(module: torch.nn.Module, params: Sequence[torch.Tensor]) -> None:
    """`ModelError` for a module sharded by FSDP2 (``fully_shard``: its parameters are DTensors)."""
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    fsdp = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None)
    sharded = dtensor is not None and any(isinstance(p, dtensor) for p in params)
    if sharded or (fsdp is not None and any(isinstance(m, fsdp) for m in module.modules())):
        raise ModelError(
            f"the module is sharded by FSDP2 (fully_shard: {type(module).__name__}, DTensor parameters), which "
            "the trainer does not support yet: measured on CPU/gloo (torch 2.13), the fused step's statistics "
            "flatten the gradients (view(-1) of a sharded dimension needs a redistribution), rollbacks copy into "
            "the parameters with torch._foreach_copy_ (no sharding strategy for DTensors) and checkpoints read "
            "the parameters with .numpy() (not supported for DTensors)",
            "Train data-parallel with DistributedDataParallel (docs/distributed.md), which keeps every "
            "parameter whole on every rank.")


_COLLECTIVE_FAILURES = ("gloo", "Connection closed by peer", "Timed out waiting", "NCCL", "ProcessGroup")
"""Text of the RuntimeErrors torch raises (not always as DistError) when a collective of DDP fails."""


def _check_options(autocast: Any, accumulate: Any, device: torch.device | None, devices: set[torch.device]) -> None:
    problems = []
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or not 1 <= accumulate <= 1_000_000:
        problems.append(f"accumulate={accumulate!r}: must be an integer >= 1 (micro-batches per optimizer step)")
    if autocast is not None:
        if autocast not in (torch.bfloat16, torch.float16):
            problems.append(f"autocast={autocast!r}: must be None, torch.bfloat16 or torch.float16")
        elif device is None:
            problems.append(f"autocast: the parameters span several devices ({', '.join(sorted(map(str, devices)))})")
        elif not torch.amp.is_autocast_available(device.type):
            problems.append(f"autocast: torch has no autocast for {device.type} tensors")
    if problems:
        raise ConfigError(problems, "Use autocast=torch.bfloat16 (or float16 with a GradScaler) on one cpu or "
                          "cuda device; accumulate is the number of micro-batches a batch is cut into.")


def module_groups(module: torch.nn.Module, params: Sequence[torch.Tensor],
                  names: Sequence[Sequence[str]] | None = None) -> list[list[int]]:
    """Groups of indices into ``params`` (the module's trainable tensors), in forward order.

    Without ``names``: one group per top-level child that holds any of ``params``, in registration order;
    the root module's own parameters (a positional embedding) join the first group, and a tensor shared by
    two children (tied weights) belongs to the first. With ``names``: the groups of parameter names given
    (``module.named_parameters()`` names), which must cover every trainable tensor exactly once.
    """
    position = {id(p): i for i, p in enumerate(params)}
    if names is not None:
        return _named_groups(module, position, names)
    seen: set[int] = set()
    groups: list[list[int]] = []
    for child in module.children():
        group = []
        for p in child.parameters():
            i = position.get(id(p))
            if i is not None and i not in seen:
                group.append(i)
                seen.add(i)
        if group:
            groups.append(group)
    rest = [i for i in range(len(params)) if i not in seen]
    if not groups:
        return [rest]
    groups[0] = sorted(groups[0] + rest)
    return groups


def _named_groups(module: torch.nn.Module, position: dict[int, int],
                  names: Sequence[Sequence[str]]) -> list[list[int]]:
    if isinstance(names, str) or any(isinstance(g, str) for g in names):
        raise ModelError("groups must be a list of lists of parameter names",
                         "e.g. groups=[['embed.weight', 'position'], ['head.weight', 'head.bias']].")
    by_name = {name: position[id(p)] for name, p in module.named_parameters() if id(p) in position}
    groups: list[list[int]] = []
    taken: dict[int, str] = {}
    problems = []
    for group in names:
        idx = []
        for name in group:
            i = by_name.get(name)
            if i is None:
                problems.append(f"{name!r} is not a trainable parameter of the module")
            elif i in taken:
                problems.append(f"{name!r} is in two groups (or shares its tensor with {taken[i]!r})")
            else:
                taken[i] = name
                idx.append(i)
        if not group:
            problems.append("a group is empty")
        groups.append(idx)
    missing = sorted(name for name, i in by_name.items() if i not in taken)
    if missing:
        problems.append(f"no group holds {', '.join(missing)}")
    if problems:
        raise ModelError(f"groups: {'; '.join(problems)}",
                         "Give groups that split the module's trainable named_parameters() names, each once.")
    return groups
