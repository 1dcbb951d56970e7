"""JAX/optax adapter: `JaxModel` (a loss function over a parameter pytree) and `OptaxOptimizer`."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_core._backend import namespace_of
from hybrid_core._errors import BackendError, BatchError, CheckpointError, ConfigError, ModelError
from hybrid_core.models._checks import check_like_parameters

from ._batch import batch_leaves, library_of
from ._optax_state import find_all, injected_holding, replace_node

__all__ = ["JaxModel", "OptaxOptimizer"]

_STATE_KEYS = frozenset({"kind", "structure", "leaves", "steps", "last_update", "last_grads"})
_STATE_HINT = "Load a state_dict() saved by an OptaxOptimizer with the same transformation and model."
_LR_HINT = ("Build the transformation with optax.inject_hyperparams, e.g. optax.inject_hyperparams("
            "optax.adam)(learning_rate=1e-3), so the learning rate lives in its state.")


# Module-level jitted functions with the user's function or transformation as a static argument:
# models and optimizers built from the same loss_fn / transformation share compiled code.


@jax.jit
def _add_scaled(leaves: list[jax.Array], update: list[jax.Array], scale: Any) -> list[jax.Array]:
    return [p + scale * u for p, u in zip(leaves, update, strict=True)]


@functools.partial(jax.jit, static_argnums=0)
def _loss(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any) -> jax.Array:
    return loss_fn(params, batch)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grad(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                    batch: Any) -> tuple[jax.Array, Any]:
    return jax.value_and_grad(loss_fn)(params, batch)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _transform(tx: Any, treedef: Any, grads: Any, state: Any, params: Any) -> tuple[list[jax.Array], Any]:
    """``tx.update`` with the updates as a flat list cast to the parameters' dtypes, and the new state."""
    updates, new_state = tx.update(grads, state, params)
    pairs = zip(treedef.flatten_up_to(updates), treedef.flatten_up_to(params), strict=True)
    return [u.astype(p.dtype) for u, p in pairs], new_state


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _fused_step(loss_fn: Callable[[Any, Any], jax.Array], tx: Any, treedef: Any, measure: bool, keep_grads: bool,
                keep_update: bool, fixed_lr: float | None, leaves: list[jax.Array], state: Any,
                batch: Any) -> tuple[Any, ...]:
    """One real step in one computation: loss and gradients, the optax update applied, and (``measure``)
    the statistics ``[loss, Σg², Σu², Σg·u, max|g|, non-finite count, lr]``. The update and the
    gradients are returned only when asked (each output costs a buffer per step)."""
    params = treedef.unflatten(leaves)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, new_state = tx.update(grads, state, params)
    flat_u = [u.astype(p.dtype) for u, p in zip(treedef.flatten_up_to(updates), leaves, strict=True)]
    new_leaves = [p + u for p, u in zip(leaves, flat_u, strict=True)]
    flat_g = treedef.flatten_up_to(grads)
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
    return _transform(tx, treedef, mhat, state, params)[0]


class JaxModel:
    """``loss_fn(params, batch) -> scalar`` over a parameter pytree, seen as a `hybrid_core.Model`.

    `parameters` is the flat list of leaves in ``jax.tree_util.tree_flatten`` order. `loss` and
    `loss_and_grad` are ``jax.jit``-compiled once per ``loss_fn`` (which must be hashable; models
    sharing it share the compiled code) and batch shape, and `apply_update` rebinds the leaves
    through one jitted map; JAX arrays are immutable, so lists returned earlier keep the old
    values. Batches may hold JAX or NumPy arrays.
    """

    def __init__(self, loss_fn: Callable[[Any, Any], jax.Array], params: Any) -> None:
        if not callable(loss_fn) or not _hashable(loss_fn):
            raise ModelError("loss_fn must be a hashable callable (it is a static argument of jax.jit)",
                             "Pass a function loss_fn(params, batch) -> scalar.")
        leaves, treedef = jax.tree_util.tree_flatten(params)
        leaves = [jnp.asarray(leaf) if isinstance(leaf, np.ndarray) else leaf for leaf in leaves]
        bad = [i for i, leaf in enumerate(leaves)
               if not isinstance(leaf, jax.Array) or not jnp.issubdtype(leaf.dtype, jnp.floating)]
        if not leaves or bad:
            raise ModelError(f"params must be a pytree of floating-point arrays (bad: {bad or 'no leaves'})",
                             "Pass jnp arrays (real floating dtypes) as the pytree's leaves.")
        self.loss_fn = loss_fn
        self._treedef = treedef
        self._leaves = leaves
        self._params = jax.tree_util.tree_unflatten(treedef, leaves)
        self._xp = namespace_of(leaves, what="params")
        self._devices = frozenset().union(*(leaf.devices() for leaf in leaves))

    @property
    def params(self) -> Any:
        """The current parameter pytree."""
        return self._params

    @property
    def treedef(self) -> Any:
        """The pytree structure of `params` (the order of `parameters`)."""
        return self._treedef

    def parameters(self) -> list[jax.Array]:
        """The flat list of parameter leaves."""
        return list(self._leaves)

    def loss(self, batch: Any) -> jax.Array:
        """The jitted loss on ``batch`` (a device scalar, not read to the host)."""
        self._check_batch(batch)
        loss = _loss(self.loss_fn, self._params, batch)
        shape = tuple(jnp.shape(loss))
        if shape not in ((), (1,)):
            raise BatchError(f"loss_fn returned a loss of shape {shape}; a scalar was expected",
                             "Reduce the loss to a scalar (e.g. jnp.mean over the batch) inside loss_fn.")
        return loss

    def loss_and_grad(self, batch: Any) -> tuple[jax.Array, list[jax.Array]]:
        """The jitted ``jax.value_and_grad``: the loss and one gradient per leaf."""
        self._check_batch(batch)
        loss, grads = _value_and_grad(self.loss_fn, self._params, batch)
        return loss, self._treedef.flatten_up_to(grads)

    def apply_update(self, update: Sequence[jax.Array], scale: float) -> None:
        """Rebind the leaves to θ + scale·update (one jitted call; ``scale`` is traced, so no recompiling)."""
        update = check_like_parameters(self._xp, self._leaves, update, "the update")
        self._leaves = list(_add_scaled(self._leaves, update, float(scale)))
        self._params = jax.tree_util.tree_unflatten(self._treedef, self._leaves)

    def set_parameters(self, values: Sequence[jax.Array]) -> None:
        """Rebind the leaves to ``values`` (same shapes, dtypes; JAX arrays)."""
        self._rebind(check_like_parameters(self._xp, self._leaves, values, "the parameters"))

    def _rebind(self, leaves: Sequence[jax.Array]) -> None:
        """Take ``leaves`` as the parameters, unchecked (for this module's own jitted updates)."""
        self._leaves = list(leaves)
        self._params = jax.tree_util.tree_unflatten(self._treedef, self._leaves)

    def _check_batch(self, batch: Any) -> None:
        for leaf in batch_leaves(batch):
            if isinstance(leaf, jax.Array):
                if not leaf.devices() <= self._devices:
                    where = ", ".join(sorted(str(d) for d in self._devices))
                    found = ", ".join(sorted(str(d) for d in leaf.devices()))
                    raise BackendError(f"the batch holds an array on {found} but the model is on {where}",
                                       f"Move the batch with jax.device_put(x, {where}).")
            else:
                library = library_of(leaf)
                if library not in (None, "numpy"):
                    raise BackendError(f"the batch holds a {library} array but the model uses jax",
                                       "Convert the batch to jax (jnp.asarray) or NumPy arrays.")

    def __repr__(self) -> str:
        return f"JaxModel({len(self._leaves)} leaves)"


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
    """

    def __init__(self, model: JaxModel, transformation: optax.GradientTransformation,
                 lr: float | None = None) -> None:
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
        self.model = model
        self.transformation = transformation
        self._state = state
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
        update, state = _transform(self.transformation, treedef, treedef.unflatten(grads), self._state,
                                   self.model.params)
        self.model.apply_update(update, 1.0)
        self._state, self._last_update = state, list(update)
        if self._rule == "replay":  # only replaying needs them; otherwise they would pin a gradient's memory
            self._last_grads = grads
        self._steps += 1
        return list(update)

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
            model.loss_fn, self.transformation, model.treedef, bool(measure),
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
            return list(_transform(tx, treedef, treedef.unflatten(self._last_grads), self._state, params)[0])
        if self._last_update is not None:
            return list(self._last_update)
        return [jnp.zeros_like(p) for p in self.model.parameters()]

    def state_dict(self) -> dict[str, Any]:
        """The optax state as flat leaves plus its structure, the step count, last update and gradients."""
        leaves, treedef = jax.tree_util.tree_flatten(self._state)
        return {"kind": "OptaxOptimizer", "structure": str(treedef), "leaves": list(leaves),
                "steps": self._steps, "last_update": _listed(self._last_update),
                "last_grads": _listed(self._last_grads)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output; `CheckpointError` (and no change) on any mismatch."""
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
        for i, (saved, live) in enumerate(zip(leaves, current, strict=True)):
            if library_of(saved) not in ("jax", "numpy") or tuple(saved.shape) != tuple(jnp.shape(live)) or (
                    np.dtype(saved.dtype) != np.dtype(live.dtype)):
                raise CheckpointError(f"optax state array {i} does not match: expected {jnp.shape(live)} "
                                      f"{live.dtype} (jax or numpy)", _STATE_HINT)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise CheckpointError(f"steps={steps!r}: expected an integer >= 0", _STATE_HINT)
        last_update = self._arrays(state["last_update"], "last_update")
        last_grads = self._arrays(state["last_grads"], "last_grads")
        self._state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in leaves])
        self._host_lr = None
        self._steps, self._last_update, self._last_grads = steps, last_update, last_grads

    def _arrays(self, value: Any, name: str) -> list[jax.Array] | None:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)):
            raise CheckpointError(f"{name} is a {type(value).__name__}, not a list of arrays", _STATE_HINT)
        value = [jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in value]
        try:
            return check_like_parameters(self._xp, self.model.parameters(), value, name)
        except (BatchError, BackendError) as exc:
            raise CheckpointError(exc.message, exc.recovery) from exc

    def __repr__(self) -> str:
        return f"OptaxOptimizer(rule={self._rule!r}, steps={self._steps})"


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


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
