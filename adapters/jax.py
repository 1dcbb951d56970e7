"""JAX/optax adapter: `JaxModel` (a loss function over a parameter pytree), `OptaxOptimizer`, and
`JaxCollective` (the processes of a ``jax.distributed`` run; docs/distributed.md)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_core._backend import namespace_of
from hybrid_core._errors import BackendError, BatchError, CheckpointError, ConfigError, ModelError
from hybrid_core.models._checks import check_like_parameters

from ._batch import library_of
from ._jax_dist import JaxCollective
from ._jax_model import JaxModel, _hashable, hold_frozen, value_and_flat_grad
from ._jax_modules import EquinoxModel, NNXModel
from ._optax_lr import LearningRate, check_hyperparam_dtypes
from ._optax_state import advance_schedules, find_all, has_schedule, injected_holding

__all__ = ["EquinoxModel", "JaxCollective", "JaxModel", "NNXModel", "OptaxOptimizer"]

_STATE_KEYS = frozenset({"kind", "structure", "leaves", "steps", "last_update", "last_grads"})
_STATE_HINT = "Load a state_dict() saved by an OptaxOptimizer with the same transformation and model."
_RULES = {"mhat": "the update for the next gradient = Adam's bias-corrected first moment m̂ (through the whole chain)",
          "replay": "the update for the next gradient = the last gradient (through the whole chain)",
          "spread": "MultiSteps: the last applied update spread over its k steps",
          "last": "fallback: the last real update (the transformation is not one of adam/adamw/sgd/momentum)"}


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


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _fused_step(loss_fn: Callable[[Any, Any], jax.Array], tx: Any, treedef: Any, trainable: tuple[bool, ...] | None,
                measure: bool, keep_grads: bool, keep_update: bool, host_lr: jax.Array | None, leaves: list[jax.Array],
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
        lr = jnp.asarray(host_lr if host_lr is not None else node.hyperparams["learning_rate"], f32)
        stats = jnp.stack([loss.astype(f32), sum(jnp.sum(g * g) for g in g32), sum(jnp.sum(u * u) for u in u32),
                           sum(jnp.sum(g * u) for g, u in zip(g32, u32, strict=True)),
                           jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in g32])),
                           sum(jnp.sum(~jnp.isfinite(g)) for g in g32).astype(f32), lr])
    return new_leaves, new_state, loss, (flat_u if keep_update else None), (flat_g if keep_grads else None), stats


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _mhat_update(tx: Any, treedef: Any, b1: float | None, state: Any, params: Any) -> list[jax.Array]:
    """The update ``tx`` would take for the gradient m̂_t of its one Adam state (``b1`` None: injected)."""
    adam = find_all(state, optax.ScaleByAdamState)[0]
    if b1 is None:
        b1 = injected_holding(state, "b1", adam).hyperparams["b1"]
    mhat = optax.tree.bias_correction(adam.mu, b1, adam.count)
    mhat = jax.tree.map(lambda m, p: m.astype(p.dtype), mhat, params)
    return _transform(tx, treedef, None, mhat, state, params)[0]


class OptaxOptimizer:
    """An optax ``GradientTransformation`` driving a `JaxModel`, seen as a `hybrid_core.Optimizer`.

    Any transformation as users write it: ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))``,
    ``optax.MultiSteps(...)``, ``optax.inject_hyperparams(...)``. The learning rate (`lr`, `LearningRate`) is known
    on the host, never read from the device per step: a schedule or constant given to an optax optimizer (or to
    ``inject_hyperparams``) is found inside the transformation; otherwise pass ``learning_rate=`` (or ``lr=``), the
    float or schedule you gave optax. A schedule is evaluated on the host at a step count kept on the host (its
    values come from the device ``4096`` steps at a time, one read per 4096 steps). Only a constant
    ``inject_hyperparams`` learning rate can be set (`lr` setter); setting a schedule's or a constant built into the
    transformation is a `ConfigError`.

    `extrapolate` runs the real ``transformation.update`` on an assumed next gradient and discards
    the new state, so the whole chain (clipping, weight decay, masks, lr) is covered exactly:

    - one ``ScaleByAdamState`` over all parameters whose ``b1`` is injected or found (``optax.adam``,
      ``optax.adamw``, chained with clipping or not): next gradient = m̂_t = μ_t/(1 − b1ᵗ);
    - otherwise, if the state has an Adam or a momentum (``TraceState``) state: next gradient = the last one;
    - ``MultiSteps(k)``: the last applied update divided by k (it applies one update per k steps);
    - any other transformation: the last update (the fallback; `summary` says which rule is in use).
      Zeros before any step.

    Schedules count every training step by default (``schedule_counts="steps"``): a real step's update
    advances their counts, and the trainer calls `schedule_step` after each step that ran no update (a
    predicted step, a real step skipped for a non-finite value), which advances the schedules' counts alone
    (``ScaleByScheduleState``, the ``inject_hyperparams`` counts) on the device, and the host's count with them.
    Adam's own ``count`` is not a schedule (its bias correction counts the gradients its moments hold) and
    is left alone. ``schedule_counts="updates"``: updates only. `lr` is the rate of the last update until the
    next one. An optax schedule has no end the trainer could step past: past its length it holds its last
    value (`schedule_left` is None).
    """

    def __init__(self, model: JaxModel, transformation: optax.GradientTransformation,
                 lr: float | Callable[[Any], Any] | None = None, *,
                 learning_rate: float | Callable[[Any], Any] | None = None, schedule_counts: str = "steps") -> None:
        if not isinstance(model, JaxModel):
            raise ModelError(f"OptaxOptimizer needs a JaxModel, got {type(model).__name__}",
                             "Wrap the model: JaxModel(loss_fn, params), EquinoxModel or NNXModel(loss_fn, module).")
        if not (callable(getattr(transformation, "init", None)) and callable(getattr(transformation, "update",
                                                                                     None))
                and _hashable(transformation)):
            raise ConfigError(f"transformation is a {type(transformation).__name__}, not an optax "
                              "GradientTransformation", "Pass e.g. optax.adam(1e-3).")
        if lr is not None and learning_rate is not None:
            raise ConfigError("both lr= and learning_rate= are given", "Give one (they mean the same).")
        if schedule_counts not in ("steps", "updates"):
            raise ConfigError(f"schedule_counts={schedule_counts!r}: must be 'steps' (every training step, predicted "
                              "ones included) or 'updates' (optimizer updates only)")
        state = transformation.init(model.params)
        check_hyperparam_dtypes(state)
        self._lr = LearningRate(transformation, state, learning_rate if lr is None else lr)
        self.model = model
        self.transformation = transformation
        self._state = state
        self.schedule_counts = schedule_counts
        """``"steps"``: the schedules count every training step; ``"updates"``: optimizer updates only."""
        self._scheduled = has_schedule(state)
        self._b1 = self._lr.found.adam_b1[0] if len(self._lr.found.adam_b1) == 1 else None
        self._rule = _rule_for(state, model.treedef, self._b1, self._lr.every_k)
        self._xp = namespace_of(model.parameters(), what="the model's parameters")
        self._steps = 0
        self._last_update: list[jax.Array] | None = None
        self._last_grads: list[jax.Array] | None = None

    @property
    def lr(self) -> float:
        """The learning rate of the last update (before any: of the first), a host float (see the class docstring)."""
        return self._lr.value(self._state)

    @property
    def adaptive(self) -> bool:
        """Whether the transformation holds one Adam state and an injected, settable learning rate."""
        return self._lr.kind == "injected" and len(find_all(self._state, optax.ScaleByAdamState)) == 1

    @property
    def lr_on_device(self) -> bool:
        """Whether reading `lr` is a device→host read: only for an ``inject_hyperparams`` schedule not found."""
        return self._lr.kind == "device"

    @lr.setter
    def lr(self, value: float) -> None:
        self._state = self._lr.set(self._state, value)

    def summary(self) -> dict[str, Any]:
        """Where the learning rate comes from and how `extrapolate` predicts (`HybridTrainer.summary` shows it)."""
        return {"learning_rate": self._lr.describe(), "extrapolate": _RULES[self._rule],
                "multisteps_k": self._lr.every_k}

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
        self._state = state
        self._stepped(list(update), grads)
        return list(update)

    def _stepped(self, update: list[jax.Array] | None, grads: list[jax.Array] | None) -> None:
        """After a real update: the host's schedule count, and what `extrapolate` keeps (the last update, for
        MultiSteps the last one it applied; the gradients only for "replay": they would pin a gradient's memory)."""
        applied = self._lr.updated()
        if self._rule != "spread" or applied:
            self._last_update = update
        if grads is not None and self._rule == "replay":
            self._last_grads = list(grads)
        self._steps += 1

    def schedule_step(self) -> None:
        """A training step ran without an update (predicted, or skipped): advance the schedules' counts by one, as
        the update would have (nothing with ``schedule_counts="updates"`` or without a schedule). No host read."""
        if self.schedule_counts == "steps" and self._scheduled:
            self._state = advance_schedules(self._state)
            self._lr.skip()

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
        (``measure``) the statistics vector, lr included (the host's, or an injected one read on the device).

        ``before_update``, if given, is called with the gradients while the model still holds the
        parameters they were taken at (the new ones are bound after it returns)."""
        model = self.model
        if measure:
            model._check_batch(batch)
        # Extrapolating with m̂ needs neither the update nor the gradients; "replay" needs the
        # gradients, "last" and "spread" the update.
        lr = self._lr.next_value() if measure else None
        leaves, state, loss, update, grads, stats = _fused_step(
            model.loss_fn, self.transformation, model.treedef, model.trainable, bool(measure),
            self._rule == "replay" or before_update is not None, self._rule in ("last", "spread"),
            None if lr is None else jax.device_put(np.float32(lr)), model.parameters(), self._state,
            model._fed(batch))
        if before_update is not None:
            before_update(list(grads))
        model._rebind(leaves)
        self._state = state
        self._stepped(None if update is None else list(update), grads)
        return loss, stats

    def extrapolate(self) -> list[jax.Array]:
        """The predicted next update (see the class docstring); changes neither model nor state."""
        params, treedef, tx = self.model.params, self.model.treedef, self.transformation
        if self._rule == "mhat" and self._steps > 0:
            return list(_mhat_update(tx, treedef, self._b1, self._state, params))
        if self._rule == "spread" and self._last_update is not None:
            return [u / self._lr.every_k for u in self._last_update]
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
                "last_grads": _listed(self._last_grads), "lr": self._lr.state_dict()}

    def check_state_dict(self, state: dict[str, Any]) -> tuple[Any, list[Any], int, Any, Any, Any]:
        """(structure, leaves, steps, last update, last gradients, lr counts) as `load_state_dict` would set them;
        `CheckpointError` naming the field, and nothing changed, on any mismatch: structure, array count, shapes,
        dtypes, NaN anywhere, ±Inf in a leaf with more than one value (a scalar such as a best-value-so-far may
        start at Inf), a step count that is not an integer >= 0."""
        if (not isinstance(state, Mapping) or not _STATE_KEYS <= set(state) <= _STATE_KEYS | {"lr"}
                or state["kind"] != "OptaxOptimizer"):
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
        # A file from before the host kept the schedule's count: the count of a run without skipped steps.
        counts = state.get("lr", {"count": steps, "mini": 0, "used": max(steps - 1, 0)})
        return (treedef, list(leaves), steps, self._arrays(state["last_update"], "last_update"),
                self._arrays(state["last_grads"], "last_grads"), self._lr.check_state_dict(counts))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output; `CheckpointError` (and no change) on any mismatch (see `check_state_dict`)."""
        treedef, leaves, steps, last_update, last_grads, counts = self.check_state_dict(state)
        self._state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in leaves])
        self._lr.load_state_dict(counts)
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


def _listed(arrays: list[jax.Array] | None) -> list[jax.Array] | None:
    return None if arrays is None else list(arrays)


def _rule_for(state: Any, treedef: Any, b1: float | None, every_k: int | None) -> str:
    """'spread', 'mhat', 'replay' or 'last': how `OptaxOptimizer.extrapolate` predicts (see its docstring)."""
    if every_k is not None:
        return "spread"
    adams = find_all(state, optax.ScaleByAdamState)
    if (len(adams) == 1 and jax.tree_util.tree_structure(adams[0].mu) == treedef
            and (b1 is not None or injected_holding(state, "b1", adams[0]) is not None)):
        return "mhat"
    if adams or find_all(state, optax.TraceState):
        return "replay"
    return "last"
