"""The native loops: the training loop a user of each framework writes, with no code of this library in it
where the framework has a loop of its own (`torch_native`); the reference model and optimizer called directly
on array-API namespaces without one (`reference_native`). The JAX loop is in ``_jax_mlp``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

__all__ = ["NativeRun", "reference_native", "torch_native"]


class NativeRun(NamedTuple):
    """The framework's own training loop for one run: a step on a batch, its batches and a validation loss."""

    step: Callable[[Any], None]
    """One training step on a batch, as the framework's users write it (nothing read to the host)."""
    batch: Callable[[int], Any]
    validate: Callable[[], float]
    sync: Callable[[], None] | None
    loop: str
    """The loop in words, e.g. ``"torch: zero_grad(); loss.backward(); opt.step() …"`` (stored in the JSON)."""
    parameters: Callable[[], Sequence[Any]] | None = None
    """The current parameter arrays (live or latest, not copies), for the LAWA snapshots; None: no LAWA curve."""
    validate_at: Callable[[list[Any]], float] | None = None
    """Validation loss with the given parameters (e.g. the LAWA mean) in place of the current ones, which are
    left as they were."""


def reference_native(model: Any, optimizer: Any, batch: Callable[[int], Any], validate: Callable[[], float],
                     loop: str) -> NativeRun:
    """The native loop of an array-API model: the reference model and optimizer called directly."""

    def step(b: Any) -> None:
        _, grads = model.loss_and_grad(b)
        optimizer.step(grads)

    def validate_at(params: list[Any]) -> float:
        live = model.parameters()
        model.set_parameters(params)
        try:
            return validate()
        finally:
            model.set_parameters(live)

    return NativeRun(step, batch, validate, None, loop, model.parameters, validate_at)


def torch_native(module: Any, loss_fn: Callable[[Any, Any], Any], lr: float, batch: Callable[[int], Any],
                 val: Any, what: str, schedule_free: bool = False) -> NativeRun:
    """``opt.zero_grad(); loss_fn(module, batch).backward(); opt.step()`` with ``torch.optim.Adam``, or with
    ``schedulefree.AdamWScheduleFree`` (``opt.train()`` before training, ``opt.eval()`` for each validation)."""
    import torch

    params = list(module.parameters())
    if schedule_free:
        import schedulefree

        from ._peers import SCHEDULEFREE_WARMUP

        opt = schedulefree.AdamWScheduleFree(params, lr=lr, warmup_steps=SCHEDULEFREE_WARMUP)
        opt.train()
        name = f"schedulefree.AdamWScheduleFree (warmup_steps={SCHEDULEFREE_WARMUP}; opt.train() for training, " \
               "opt.eval() for validation)"
    else:
        opt = torch.optim.Adam(params, lr=lr)
        name = "torch.optim.Adam"

    def step(b: Any) -> None:
        opt.zero_grad()
        loss_fn(module, b).backward()
        opt.step()

    def validate() -> float:
        if schedule_free:
            opt.eval()
        try:
            with torch.no_grad():
                return float(loss_fn(module, val))
        finally:
            if schedule_free:
                opt.train()

    def validate_at(values: list[Any]) -> float:
        with torch.no_grad():
            live = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, values)
            try:
                return float(loss_fn(module, val))
            finally:
                torch._foreach_copy_(params, live)

    loop = f"torch: opt.zero_grad(); loss_fn(module, batch).backward(); opt.step() on the {what} with {name}"
    if schedule_free:  # its own read-out already; no LAWA curve
        return NativeRun(step, batch, validate, None, loop)
    return NativeRun(step, batch, validate, None, loop, lambda: params, validate_at)
