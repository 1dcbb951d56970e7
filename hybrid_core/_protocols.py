"""The three contracts the trainer drives: `Model`, `Optimizer`, `DynamicsModel`.

They are structural (`typing.Protocol`, runtime-checkable), so a user's class
satisfies them by having the methods; nothing needs to inherit from here.
Arrays are whatever array-API namespace the model uses (NumPy, array-api-strict,
PyTorch, JAX, CuPy); parameters, gradients and updates are flat lists of
arrays in one fixed order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = [
    "Array",
    "DynamicsModel",
    "FusedStep",
    "Model",
    "Optimizer",
    "Outcome",
    "Prediction",
]

Array = Any
"""An array of any array-API namespace (kept loose on purpose: the core is backend-neutral)."""


@runtime_checkable
class Model(Protocol):
    """A trainable model seen as a flat list of parameter arrays.

    Optional methods the trainer uses when present: ``set_parameters(values)`` (θ ← values; lets
    the trainer read losses in batches and still come back from non-finite weights — without it
    every real step is read before its update), ``state_dict()``/``load_state_dict()`` for state
    beyond the parameters (batch-norm buffers). An optional attribute ``loss_in_eval_mode = True``
    says that `loss` runs in another mode than `loss_and_grad` (dropout off, as `TorchModel` does by
    default), so its values are not comparable with the training losses: the trainer then pairs a
    read-out's loss with the raw weights' `loss` on the same batch (one more forward pass per
    comparison) instead of with the step's training loss.

    Layer freezing (`HybridConfig.layer_freeze`) needs two more:

    - ``parameter_groups() -> list[list[int]]``: indices into `parameters`, grouped (each index in
      exactly one group, no group empty), groups in forward order, input side first; the last group
      (the head) is never frozen. Fixed for the model's life.
    - ``set_trainable(flags: Sequence[bool]) -> None``: one flag per group; a group set False is
      frozen: its gradient is not computed at all (torch: ``requires_grad_(False)``, so the backward
      pass stops there) and `loss_and_grad` returns zeros for it. True trains it again.

    The optimizer must then leave frozen parameters still (``Optimizer.skips_frozen``).
    """

    def parameters(self) -> list[Array]:
        """The current parameter arrays, in a fixed order shared by gradients and updates.

        They may be the live arrays (PyTorch updates them in place) or values that a later
        update rebinds (NumPy reference, JAX): callers that need a snapshot copy them.
        """
        ...

    def loss(self, batch: Any) -> Array:
        """Forward pass only: the scalar loss on ``batch``, in the model's namespace.

        0-d is expected; a shape-(1,) array is accepted too.
        """
        ...

    def loss_and_grad(self, batch: Any) -> tuple[Array, list[Array]]:
        """Forward and backward pass: the scalar loss and one gradient per parameter."""
        ...

    def apply_update(self, update: Sequence[Array], scale: float) -> None:
        """θ ← θ + scale·update for every parameter (functional backends rebind)."""
        ...


@runtime_checkable
class Optimizer(Protocol):
    """Turns gradients into parameter updates and can guess the next update.

    An optimizer whose learning rate lives on a device (an optax schedule) may set
    ``lr_on_device = True`` (or a property): the trainer then counts each `lr` read in
    ``host_syncs``. A fused step (`FusedStep`) reads it with the statistics instead.

    An optimizer of the Adam family (an update normalised per coordinate, so its learning rate is
    a step length in parameter units) may set ``adaptive = True``: the trainer's learning-rate
    recommendation then applies to it (see `HybridConfig.lr_recommend`).

    An optimizer whose `step` (and ``fused_step``) leaves the parameters of groups frozen by
    ``Model.set_trainable`` unchanged, their optimizer state included (no momentum, no weight decay
    for them), may set ``skips_frozen = True``: layer freezing (`HybridConfig.layer_freeze`) needs it.

    An optimizer may offer ``summary() -> dict``: `HybridTrainer.summary` puts it under ``"optimizer"``.
    """

    @property
    def lr(self) -> float:
        """The current learning rate."""
        ...

    @lr.setter
    def lr(self, value: float) -> None: ...

    def step(self, grads: Sequence[Array]) -> list[Array]:
        """Apply one real update to the model and return the update Δθ it applied.

        The returned arrays stay valid until the next `step` or `load_state_dict` call; the
        caller must not change them and must not keep them past that call (an optimizer may
        reuse their memory then — the PyTorch adapter does, to avoid a parameter-sized
        allocation per step).
        """
        ...

    def extrapolate(self) -> list[Array]:
        """The predicted next update Δθ from the optimizer's own state, with no new gradient.

        Does not change the model or the optimizer state; the arrays belong to the caller
        (the trainer keeps them for a whole PREDICT phase).
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: scalars and arrays.

        A snapshot: later steps must not change the arrays it holds (the trainer keeps it as the
        point to roll back to when a late read finds a non-finite value).
        """
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        ...


class Outcome(NamedTuple):
    """What a real step showed, fed to `DynamicsModel.observe`.

    ``loss`` is the loss measured after the features were taken; ``step_scale``
    is the best scale for a predicted step when a correction measured one
    (``None`` otherwise).
    """

    loss: float
    step_scale: float | None = None


class Prediction(NamedTuple):
    """A predicted loss trajectory for the next ``horizon`` steps.

    ``loss[k]``, ``lower[k]``, ``upper[k]`` are the expected loss and a band
    around it after ``k + 1`` predicted steps; ``step_scale[k]`` is how far the
    ``k``-th predicted step should go along its direction (1.0 = one full
    optimizer update). ``confidence`` is in [0, 1].
    """

    loss: tuple[float, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    step_scale: tuple[float, ...]
    confidence: float


@runtime_checkable
class DynamicsModel(Protocol):
    """Learns the loss trajectory from features and predicts the next steps.

    A model whose `observe` ignores its ``features`` may set a class attribute
    ``observes_features = False``: the trainer then skips encoding them on every real
    step and passes zeros to `observe` (`predict` always gets the real features).
    """

    def observe(self, features: Array, outcome: Outcome) -> None:
        """Learn from one real step: ``features`` before it, ``outcome`` after it."""
        ...

    def predict(self, features: Array, horizon: int) -> Prediction:
        """Predict the next ``horizon`` steps from ``features``."""
        ...

    def confidence(self) -> float:
        """Trust in the predictions, in [0, 1]; cached until the next `observe`."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: scalars and arrays."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        ...


@runtime_checkable
class FusedStep(Protocol):
    """Optional: an `Optimizer` that runs a whole real step of its model in one call.

    The trainer uses it when the optimizer drives the trainer's own model (``optimizer.model``
    is the model), so a framework's step runs the way its users write it: torch's
    ``zero_grad(); loss.backward(); opt.step()``, one ``jax.jit``-ed computation for JAX.
    """

    @property
    def model(self) -> Model:
        """The model this optimizer updates."""
        ...

    def fused_step(self, batch: Any, measure: bool) -> tuple[Array, Array | None]:
        """Forward, backward and one optimizer update on ``batch``; nothing is read to the host.

        Returns the loss (a device scalar) and, when ``measure``, the statistics vector
        ``[loss, Σg², Σu², Σg·u, max|g|, non-finite count, lr]`` (g this step's gradients, u the
        update this step applied, lr the learning rate used) as one device array; else ``None``.
        A non-finite gradient is applied like any other (the trainer rolls back when it reads it).
        """
        ...
