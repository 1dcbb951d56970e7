"""JAX/optax adapter: `JaxModel` (a loss function over a parameter pytree), `OptaxOptimizer`, and
`JaxCollective` (the processes of a ``jax.distributed`` run; docs/distributed-jax.md)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_core._backend import dtype_name, is_low_precision, namespace_of
from hybrid_core._errors import BackendError, BatchError, CheckpointError, ConfigError, ModelError
from hybrid_core.models._checks import check_like_parameters

from ._batch import library_of
from ._jax_dist import JaxCollective
from ._jax_model import JaxModel, _hashable, hold_frozen, value_and_flat_grad
from ._optax_state import INJECTED, advance_schedules, find_all, has_schedule, injected_holding, replace_node

__all__ = ["JaxCollective", "JaxModel", "OptaxOptimizer"]

_STATE_KEYS = frozenset({"kind", "structure", "leaves", "steps", "last_update", "last_grads"})
_STATE_HINT = "Load a state_dict() saved by an OptaxOptimizer with the same transformation and model."
_LR_HINT = ("Build the transformation with optax.inject_hyperparams, e.g. optax.inject_hyperparams("
            "optax.adam)(learning_rate=1e-3), so the learning rate lives in its state.")


# Module-level jitted functions with the user's transformation as a static argument: optimizers
# built from the same transformation share compiled code.


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _transform(tx: Any, treedef: Any, trainable: tuple[bool, ...] | None, grads: Any, state: Any,
               params: Any) -> tuple[list[jax.Array], Any]:
    """``tx.update`` with the updates as a flat list cast to the parameters' dtypes, and the new state;
    frozen leaves (``trainable``) get a zero update and keep their state."""
    updates, new_state = tx.update(grads, state, params)
    return _held_updates(treedef, trainable, updates, params), hold_frozen(new_state, state, treedef, trainable)


def _held_updates(treedef: Any, trainable: tuple[bool, ...] | None, updates: Any, params: Any) -> list[jax.Array]:
    """The flat updates cast to the parameters' dtypes, zero for frozen leaves (traced code)."""
    flags = trainable or (True,) * treedef.num_leaves
    pairs = zip(treedef.flatten_up_to(updates), treedef.flatten_up_to(params), flags, strict=True)
    return [u.astype(p.dtype) if t else jnp.zeros_like(p) for u, p, t in pairs]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7))
def _fused_step(loss_fn: Callable[[Any, Any], jax.Array], tx: Any, treedef: Any, trainable: tuple[bool, ...] | None,
                measure: bool, keep_grads: bool, keep_update: bool, fixed_lr: float | None, leaves: list[jax.Array],
                state: Any, batch: Any) -> tuple[Any, ...]:
    """One real step in one computation: loss and gradients (of the trainable leaves only), the optax
    update applied (frozen leaves and their state held), and (``measure``) the statistics
    ``[loss, Σg², Σu², Σg·u, max|g|, non-finite count, lr]``. The update and the gradients are returned
    only when asked (each output costs a buffer per step)."""
    params = treedef.unflatten(leaves)
    loss, flat_g = value_and_flat_grad(loss_fn, treedef, trainable, leaves, batch)
    updates, new_state = tx.update(treedef.unflatten(flat_g), state, params)
    new_state = hold_frozen(new_state, state, treedef, trainable)
    flat_u = _held_updates(treedef, trainable, updates, params)
    new_leaves = [p + u for p, u in zip(leaves, flat_u, strict=True)]
    stats = None
    if measure:
        f32 = jnp.float32
        g32 = [g.astype(f32) for g in flat_g]
        u32 = [u.astype(f32) for u in flat_u]
        node = injected_holding(new_state, "learning_rate")
        lr = jnp.asarray(fixed_lr if node is None else node.hyperparams["learning_rate"], f32)
        stats = jnp.stack([loss.astype(f32), sum(jnp.sum(g * g) for g in g32), sum(jnp.sum(u * u) for u in u32),
                           sum(jnp.sum(g * u) for g, u in zip(g32, u32, strict=True)),
                           jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in g32])),
                           sum(jnp.sum(~jnp.isfinite(g)) for g in g32).astype(f32), lr])
    return new_leaves, new_state, loss, (flat_u if keep_update else None), (flat_g if keep_grads else None), stats


@functools.partial(jax.jit, static_argnums=(0, 1))
def _mhat_update(tx: Any, treedef: Any, state: Any, params: Any) -> list[jax.Array]:
    """The update ``tx`` would take for the gradient m̂_t of its one (injected-b1) Adam state."""
    adam = find_all(state, optax.ScaleByAdamState)[0]
    b1 = injected_holding(state, "b1", adam).hyperparams["b1"]
    mhat = optax.tree.bias_correction(adam.mu, b1, adam.count)
    mhat = jax.tree.map(lambda m, p: m.astype(p.dtype), mhat, params)
    return _transform(tx, treedef, None, mhat, state, params)[0]


class OptaxOptimizer:
    """An optax ``GradientTransformation`` driving a `JaxModel`, seen as a `hybrid_core.Optimizer`.

    Learning rate: if the transformation is built with ``optax.inject_hyperparams`` (anywhere in a
    chain), `lr` reads and writes its ``learning_rate`` hyperparameter (reading it is one scalar host
    read; a scheduled learning rate cannot be set). Otherwise pass ``lr``, the value the transformation
    uses: then `lr` is read-only. Giving both, or neither, is a `ConfigError`.

    `extrapolate` runs the real ``transformation.update`` on an assumed next gradient and discards
    the new state, so the whole chain (clipping, weight decay, masks, lr) is covered exactly:

    - one ``ScaleByAdamState`` over all parameters whose ``b1`` is injected (e.g.
      ``inject_hyperparams(optax.adamw)``): next gradient = m̂_t = μ_t/(1 − b1ᵗ);
    - otherwise, if the state has an Adam or a momentum (``TraceState``) state: next gradient = the
      last one (a plain ``optax.adam`` keeps b1 out of its state, so m̂ cannot be formed);
    - any other transformation: the last update. Zeros before any step.

    Schedules (``optax.adam(learning_rate=schedule)``, ``inject_hyperparams(...)(learning_rate=schedule)``,
    ``optax.scale_by_schedule``) count every training step by default (``schedule_counts="steps"``): a
    real step's update advances their counts, and the trainer calls `schedule_step` after each step that
    ran no update (a predicted step, a real step skipped for a non-finite value), which advances the
    schedules' counts alone (``ScaleByScheduleState``, the ``inject_hyperparams`` counts), on the device.
    Adam's own ``count`` is not a schedule (its bias correction counts the gradients its moments hold) and
    is left alone. ``schedule_counts="updates"``: updates only. The `lr` an injected schedule shows is the
    rate of the last update until the next one. An optax schedule has no end the trainer could step past:
    past its length it holds its last value (`schedule_left` is None).
    """

    def __init__(self, model: JaxModel, transformation: optax.GradientTransformation,
                 lr: float | None = None, *, schedule_counts: str = "steps") -> None:
        if not isinstance(model, JaxModel):
            raise ModelError(f"OptaxOptimizer needs a JaxModel, got {type(model).__name__}")
        if not (callable(getattr(transformation, "init", None)) and callable(getattr(transformation, "update",
                                                                                     None))
                and _hashable(transformation)):
            raise ConfigError(f"transformation is a {type(transformation).__name__}, not an optax "
                              "GradientTransformation", "Pass e.g. optax.adam(1e-3).")
        state = transformation.init(model.params)
        injected = injected_holding(state, "learning_rate") is not None
        if lr is not None and injected:
            raise ConfigError("lr is given but the transformation injects its own learning_rate",
                              "Drop lr=; read and set the learning rate through OptaxOptimizer.lr.")
        if lr is None and not injected:
            raise ConfigError("the learning rate is not visible in this transformation's state", _LR_HINT)
        if lr is not None and not _positive(lr):
            raise ConfigError(f"lr={lr!r}: must be a finite number > 0")
        if schedule_counts not in ("steps", "updates"):
            raise ConfigError(f"schedule_counts={schedule_counts!r}: must be 'steps' (every training step, predicted "
                              "ones included) or 'updates' (optimizer updates only)")
        _check_hyperparam_dtypes(state)
        self.model = model
        self.transformation = transformation
        self._state = state
        self.schedule_counts = schedule_counts
        """``"steps"``: the schedules count every training step; ``"updates"``: optimizer updates only."""
        self._scheduled = has_schedule(state)
        self._fixed_lr = None if lr is None else float(lr)
        self._host_lr: float | None = None  # host copy of a constant injected lr: reading it must not sync
        self._rule = _rule_for(state, model.treedef)
        self._xp = namespace_of(model.parameters(), what="the model's parameters")
        self._steps = 0
        self._last_update: list[jax.Array] | None = None
        self._last_grads: list[jax.Array] | None = None

    @property
    def lr(self) -> float:
        """The learning rate (the injected hyperparameter, or the ``lr`` given at construction)."""
        node = injected_holding(self._state, "learning_rate")
        if node is None:
            return self._fixed_lr
        if "learning_rate" in getattr(node, "hyperparams_states", {}):
            return float(node.hyperparams["learning_rate"])  # a schedule moves it on the device
        if self._host_lr is None:  # constant between `lr` sets and state loads: read it once
            self._host_lr = float(node.hyperparams["learning_rate"])
        return self._host_lr

    @property
    def adaptive(self) -> bool:
        """Whether the transformation holds one Adam state and an injected, settable learning rate."""
        node = injected_holding(self._state, "learning_rate")
        settable = node is not None and "learning_rate" not in getattr(node, "hyperparams_states", {})
        return settable and len(find_all(self._state, optax.ScaleByAdamState)) == 1

    @property
    def lr_on_device(self) -> bool:
        """Whether reading `lr` is a device→host read (a scheduled learning rate lives on the device)."""
        node = injected_holding(self._state, "learning_rate")
        return node is not None and "learning_rate" in getattr(node, "hyperparams_states", {})

    @lr.setter
    def lr(self, value: float) -> None:
        node = injected_holding(self._state, "learning_rate")
        if node is None:
            raise ConfigError("this transformation's learning rate is fixed inside it", _LR_HINT)
        if "learning_rate" in getattr(node, "hyperparams_states", {}):
            raise ConfigError("the learning rate is a schedule, which would overwrite it at the next step",
                              "Change the schedule, or inject a constant learning_rate to set it by hand.")
        if not _positive(value):
            raise ConfigError(f"lr={value!r}: must be a finite number > 0")
        old = node.hyperparams["learning_rate"]
        hyper = {**node.hyperparams, "learning_rate": jnp.asarray(value, dtype=old.dtype)}
        self._state = replace_node(self._state, node, lambda n: n._replace(hyperparams=hyper))
        self._host_lr = float(value)

    @property
    def opt_state(self) -> Any:
        """The current optax state (read-only view; it is replaced, never mutated)."""
        return self._state

    def step(self, grads: Sequence[jax.Array]) -> list[jax.Array]:
        """``transformation.update`` (jitted), applied to the model; returns the flat list of updates."""
        grads = check_like_parameters(self._xp, self.model.parameters(), grads, "the gradients")
        treedef = self.model.treedef
        update, state = _transform(self.transformation, treedef, self.model.trainable, treedef.unflatten(grads),
                                   self._state, self.model.params)
        self.model.apply_update(update, 1.0)
        self._state, self._last_update = state, list(update)
        if self._rule == "replay":  # only replaying needs them; otherwise they would pin a gradient's memory
            self._last_grads = grads
        self._steps += 1
        return list(update)

    def schedule_step(self) -> None:
        """A training step ran without an update (predicted, or skipped): advance the schedules' counts by one, as
        the update would have (nothing with ``schedule_counts="updates"`` or without a schedule). No host read."""
        if self.schedule_counts == "steps" and self._scheduled:
            self._state = advance_schedules(self._state)

    def schedule_left(self) -> None:
        """None: an optax schedule holds its last value past its length, so there is no end to guard."""
        return None

    skips_frozen = True
    """Leaves of groups frozen through `JaxModel.set_trainable` get no gradient and a zero update, and their
    parts of the optax state (every subtree shaped like the parameters: Adam's μ and ν, momentum) are held.
    A step count shared by all leaves (Adam's ``count``) still advances: after an unfreeze the group's
    bias correction uses it, a difference that fades as 1 − βᵗ → 1."""

    accepts_before_update = True
    """`fused_step` takes ``before_update``: the trainer's learning-rate search keeps the fused step."""

    def fused_step(self, batch: Any, measure: bool,
                   before_update: Callable[[list[jax.Array]], None] | None = None,
                   ) -> tuple[jax.Array, jax.Array | None]:
        """One real step as one ``jax.jit``-ed computation: value_and_grad, the optax update applied, and
        (``measure``) the statistics vector, lr included (read from the state on the device, no host read).

        ``before_update``, if given, is called with the gradients while the model still holds the
        parameters they were taken at (the new ones are bound after it returns)."""
        model = self.model
        if measure:
            model._check_batch(batch)
        # Extrapolating with m̂ needs neither the update nor the gradients; "replay" needs the
        # gradients, "last" the update.
        leaves, state, loss, update, grads, stats = _fused_step(
            model.loss_fn, self.transformation, model.treedef, model.trainable, bool(measure),
            self._rule == "replay" or before_update is not None, self._rule == "last", self._fixed_lr,
            model.parameters(), self._state, batch)
        if before_update is not None:
            before_update(list(grads))
        model._rebind(leaves)
        self._state = state
        self._last_update = None if update is None else list(update)
        if grads is not None and self._rule == "replay":
            self._last_grads = list(grads)
        self._steps += 1
        return loss, stats

    def extrapolate(self) -> list[jax.Array]:
        """The predicted next update (see the class docstring); changes neither model nor state."""
        params, treedef, tx = self.model.params, self.model.treedef, self.transformation
        if self._rule == "mhat" and self._steps > 0:
            return list(_mhat_update(tx, treedef, self._state, params))
        if self._rule == "replay" and self._last_grads is not None:
            return list(_transform(tx, treedef, None, treedef.unflatten(self._last_grads), self._state, params)[0])
        if self._last_update is not None:
            return list(self._last_update)
        return [jnp.zeros_like(p) for p in self.model.parameters()]

    def state_dict(self) -> dict[str, Any]:
        """The optax state as flat leaves plus its structure, the step count, last update and gradients."""
        leaves, treedef = jax.tree_util.tree_flatten(self._state)
        return {"kind": "OptaxOptimizer", "structure": str(treedef), "leaves": list(leaves),
                "steps": self._steps, "last_update": _listed(self._last_update),
                "last_grads": _listed(self._last_grads)}

    def check_state_dict(self, state: dict[str, Any]) -> tuple[Any, list[Any], int, Any, Any]:
        """(structure, leaves, steps, last update, last gradients) as `load_state_dict` would set them;
        `CheckpointError` naming the field, and nothing changed, on any mismatch: structure, array count, shapes,
        dtypes, NaN anywhere, ±Inf in a leaf with more than one value (a scalar such as a best-value-so-far may
        start at Inf), a step count that is not an integer >= 0."""
        if not isinstance(state, Mapping) or set(state) != _STATE_KEYS or state["kind"] != "OptaxOptimizer":
            raise CheckpointError("this is not an OptaxOptimizer state_dict", _STATE_HINT)
        current, treedef = jax.tree_util.tree_flatten(self._state)
        if state["structure"] != str(treedef):
            raise CheckpointError("the saved optax state has another structure than this transformation's",
                                  _STATE_HINT)
        leaves = state["leaves"]
        steps = state["steps"]
        if not isinstance(leaves, (list, tuple)) or len(leaves) != len(current):
            raise CheckpointError("the saved optax state has a different number of arrays", _STATE_HINT)
        stepped = self._stepped_dtypes(len(current))
        for i, (saved, live) in enumerate(zip(leaves, current, strict=True)):
            if library_of(saved) not in ("jax", "numpy") or tuple(saved.shape) != tuple(jnp.shape(live)) or (
                    np.dtype(saved.dtype) not in (np.dtype(live.dtype), stepped[i])):
                raise CheckpointError(f"optax state array {i} does not match: expected {jnp.shape(live)} "
                                      f"{live.dtype} (jax or numpy)", _STATE_HINT)
            host = np.asarray(saved)
            if np.issubdtype(host.dtype, np.inexact) and (np.isnan(host).any() or (
                    host.size > 1 and np.isinf(host).any())):
                raise CheckpointError(f"optax state array {i} (shape {host.shape}) holds NaN or Inf",
                                      "Load an earlier checkpoint, saved before the run diverged.")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise CheckpointError(f"steps={steps!r}: expected an integer >= 0", _STATE_HINT)
        return (treedef, list(leaves), steps, self._arrays(state["last_update"], "last_update"),
                self._arrays(state["last_grads"], "last_grads"))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output; `CheckpointError` (and no change) on any mismatch (see `check_state_dict`)."""
        treedef, leaves, steps, last_update, last_grads = self.check_state_dict(state)
        self._state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in leaves])
        self._host_lr = None
        self._steps, self._last_update, self._last_grads = steps, last_update, last_grads

    def _stepped_dtypes(self, count: int) -> list[Any]:
        """The dtypes of the state's leaves after one more update (``jax.eval_shape``: nothing runs).

        A saved state may hold these instead of the current ones: optax's update can widen a leaf
        (a bfloat16 Adam moment times a float32 ``b1`` is float32 after the first step).
        """
        params = self.model.params
        try:
            shapes = jax.eval_shape(lambda s, p: self.transformation.update(p, s, p)[1], self._state, params)
        except Exception:  # an update that needs more arguments (a loss value): the current dtypes only
            return [None] * count
        dtypes = [np.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(shapes)]
        return dtypes if len(dtypes) == count else [None] * count

    def _arrays(self, value: Any, name: str) -> list[jax.Array] | None:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)):
            raise CheckpointError(f"{name} is a {type(value).__name__}, not a list of arrays", _STATE_HINT)
        value = [jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in value]
        try:
            arrays = check_like_parameters(self._xp, self.model.parameters(), value, name)
        except (BatchError, BackendError) as exc:
            raise CheckpointError(exc.message, exc.recovery) from exc
        if not all(bool(jnp.isfinite(a).all()) for a in arrays):
            raise CheckpointError(f"{name} holds NaN or Inf", "Load an earlier checkpoint, saved before the run "
                                  "diverged.")
        return arrays

    def __repr__(self) -> str:
        return f"OptaxOptimizer(rule={self._rule!r}, steps={self._steps})"


def _check_hyperparam_dtypes(state: Any) -> None:
    """`ConfigError` if ``optax.inject_hyperparams`` keeps a float hyperparameter in bfloat16 or float16.

    Without ``hyperparam_dtype`` optax stores them in the parameters' dtype, and in bfloat16 Adam's
    ``b2=0.999`` is 1.0, so its bias correction divides by zero at the first step (NaN everywhere).
    """
    for node in find_all(state, INJECTED):
        low = sorted(k for k, v in node.hyperparams.items() if is_low_precision(v))
        if low:
            dtype = dtype_name(node.hyperparams[low[0]])
            raise ConfigError(
                f"optax.inject_hyperparams keeps {', '.join(low)} in {dtype} (the parameters' dtype), where they "
                f"round: b2=0.999 is 1.0 in bfloat16 and Adam divides by zero",
                "Build it with optax.inject_hyperparams(..., hyperparam_dtype=jnp.float32).")


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _listed(arrays: list[jax.Array] | None) -> list[jax.Array] | None:
    return None if arrays is None else list(arrays)


def _rule_for(state: Any, treedef: Any) -> str:
    """'mhat', 'replay' or 'last': how `OptaxOptimizer.extrapolate` predicts (see its docstring)."""
    adams = find_all(state, optax.ScaleByAdamState)
    if (len(adams) == 1 and jax.tree_util.tree_structure(adams[0].mu) == treedef
            and injected_holding(state, "b1", adams[0]) is not None):
        return "mhat"
    if adams or find_all(state, optax.TraceState):
        return "replay"
    return "last"
