"""Input checks and host reads the trainer applies to whatever a user's model returns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._backend import same_namespace
from ._errors import BatchError, HybridError, ModelError
from ._protocols import Model

__all__ = ["call_model", "check_loss_and_grads", "has_method", "require_protocol"]


def call_model(method: Callable[[Any], Any], batch: Any, name: str) -> Any:
    """Call a model method on a batch; the model's own errors become `BatchError` (chained)."""
    try:
        return method(batch)
    except HybridError:
        raise
    except Exception as exc:
        raise BatchError(
            f"Model.{name} failed on this batch: {type(exc).__name__}: {exc}",
            "Check the batch's shapes, dtypes and device against the model; the trainer was not changed.",
        ) from exc


def check_loss_and_grads(xp: Any, model: Model, loss: Any, grads: list[Any] | None) -> None:
    """The loss is a scalar of ``xp``; the gradients (if given) match the parameters."""
    same_namespace(xp, [loss], "the loss")
    if tuple(loss.shape) not in ((), (1,)):
        raise BatchError(
            f"the model returned a loss of shape {tuple(loss.shape)}; a scalar was expected",
            "Reduce the loss to a scalar (e.g. mean over the batch) inside Model.loss/loss_and_grad.",
        )
    if grads is None:
        return
    params = model.parameters()
    if len(grads) != len(params):
        raise ModelError(f"loss_and_grad returned {len(grads)} gradients for {len(params)} parameters")
    same_namespace(xp, grads, "the gradients")
    for i, (g, p) in enumerate(zip(grads, params)):
        if tuple(g.shape) != tuple(p.shape):
            raise ModelError(f"gradient {i} has shape {tuple(g.shape)} but parameter {i} has {tuple(p.shape)}")


def require_protocol(obj: Any, protocol: type, what: str) -> None:
    """`ModelError` naming the missing methods unless ``obj`` implements ``protocol``."""
    if not isinstance(obj, protocol):
        missing = sorted(n for n in vars(protocol) if not n.startswith("_") and not hasattr(obj, n))
        raise ModelError(
            f"{what} ({type(obj).__name__}) does not implement {protocol.__name__}: missing {', '.join(missing)}",
            f"Implement {', '.join(missing)} (see hybrid_core.{protocol.__name__}).",
        )


def has_method(obj: Any, name: str) -> bool:
    """Whether ``obj`` offers the optional method ``name`` (models with buffers expose ``state_dict``)."""
    return callable(getattr(obj, name, None))
