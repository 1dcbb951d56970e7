"""Mixed precision for `TorchOptimizer`: checking a ``torch.amp.GradScaler`` against the optimizer and model,
telling a step the scaler skipped from one it took (without a host read of our own), and its state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hybrid_core._errors import CheckpointError

__all__ = ["StepWatch", "check_scaler_state", "finite_or_zero", "scaler_problems", "scaler_state"]


def scaler_problems(scaler: Any, optimizer: torch.optim.Optimizer, model: Any) -> list[str]:
    """Why ``scaler`` cannot drive ``optimizer``'s steps on ``model`` (empty when it can)."""
    from ._torch_model import TorchModel

    if not isinstance(scaler, torch.amp.GradScaler):
        return [f"scaler is a {type(scaler).__name__}, not a torch.amp.GradScaler"]
    problems = []
    if not isinstance(model, TorchModel):
        problems.append("scaler: a GradScaler needs a TorchModel (the adapter scales the loss before its backward)")
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        problems.append("scaler: a fused=True torch optimizer skips inf steps on the device, where the adapter "
                        "cannot count them without a host read; build the optimizer without fused=True")
    elif scaler.is_enabled() and any(p.dtype == torch.float16 for p in model.parameters()):
        problems.append("scaler: torch cannot unscale float16 gradients; keep the parameters in float32 and "
                        "pass autocast=torch.float16 to the TorchModel")
    kind = getattr(scaler, "_device", None)
    device = getattr(model, "device", None)
    if scaler.is_enabled() and isinstance(kind, str) and device is not None and kind != device.type:
        problems.append(f"scaler: it was built for {kind!r} but the model is on {device}; "
                        f"use torch.amp.GradScaler({device.type!r})")
    return problems


class StepWatch:
    """Whether ``optimizer.step`` ran since `arm` (a step post-hook: ``GradScaler.step`` skips it on inf
    gradients after reading its found-inf flag itself, so knowing costs no extra host read)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.fired = False
        self._handle = optimizer.register_step_post_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.fired = True

    def arm(self) -> None:
        """Forget earlier steps."""
        self.fired = False


def finite_or_zero(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``grads``, or zeros when any entry is not finite (decided on the device: no host read)."""
    total = torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum()
    ok = torch.isfinite(total)
    return [torch.where(ok, g, torch.zeros((), dtype=g.dtype, device=g.device)) for g in grads]


def scaler_state(scaler: torch.amp.GradScaler, skipped: int) -> dict[str, Any]:
    """What a `TorchOptimizer` state holds for its scaler: torch's own state and the count of skipped steps."""
    return {"state": scaler.state_dict(), "skipped_steps": skipped}


def check_scaler_state(scaler: torch.amp.GradScaler | None, saved: Any, hint: str) -> int:
    """The skipped-step count of a saved scaler state, after checking it fits ``scaler``
    (`CheckpointError` otherwise; nothing is changed)."""
    if (saved is None) != (scaler is None):
        raise CheckpointError("the state and this optimizer disagree on having a GradScaler", hint)
    if saved is None:
        return 0
    assert scaler is not None
    ok = (isinstance(saved, Mapping) and set(saved) == {"state", "skipped_steps"}
          and isinstance(saved["state"], Mapping) and set(saved["state"]) == set(scaler.state_dict())
          and isinstance(saved["skipped_steps"], int) and not isinstance(saved["skipped_steps"], bool)
          and saved["skipped_steps"] >= 0)
    if not ok:
        raise CheckpointError("the saved GradScaler state does not fit this optimizer's GradScaler", hint)
    return int(saved["skipped_steps"])
