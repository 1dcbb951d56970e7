"""`JaxModel`: a loss over a parameter pytree seen as a `hybrid_core.Model` (re-exported by
`hybrid_core.adapters.jax`), its parameter groups for layer freezing, and the traced gradient that
leaves frozen leaves out of the backward pass."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_core._backend import namespace_of
from hybrid_core._errors import BackendError, BatchError, ModelError
from hybrid_core.models._checks import check_like_parameters

from ._batch import batch_leaves, library_of

__all__ = ["JaxModel", "hold_frozen", "value_and_flat_grad"]


def value_and_flat_grad(loss_fn: Callable[[Any, Any], jax.Array], treedef: Any, trainable: tuple[bool, ...] | None,
                        leaves: Sequence[jax.Array], batch: Any) -> tuple[jax.Array, list[jax.Array]]:
    """The loss and one gradient per leaf, differentiated only with respect to the trainable leaves
    (``trainable`` None: all). Frozen leaves enter the loss as constants, so JAX builds no backward
    computation for them (their weight gradients, and the input gradients of a frozen input-side
    prefix, are not in the jaxpr); their gradients come back as zeros. Traced code: call it inside
    ``jax.jit`` with ``trainable`` static."""
    if trainable is None or all(trainable):
        loss, grads = jax.value_and_grad(loss_fn)(treedef.unflatten(list(leaves)), batch)
        return loss, treedef.flatten_up_to(grads)
    live = [leaf for leaf, t in zip(leaves, trainable, strict=True) if t]

    def partial_loss(live: list[jax.Array]) -> jax.Array:
        it = iter(live)
        full = [next(it) if t else leaf for leaf, t in zip(leaves, trainable, strict=True)]
        return loss_fn(treedef.unflatten(full), batch)

    loss, live_grads = jax.value_and_grad(partial_loss)(live)
    it = iter(live_grads)
    return loss, [next(it) if t else jnp.zeros_like(leaf) for leaf, t in zip(leaves, trainable, strict=True)]


def hold_frozen(new: Any, old: Any, treedef: Any, trainable: tuple[bool, ...] | None) -> Any:
    """``new`` (an optax state, or the leaves) with the frozen leaves of every subtree shaped like the
    parameters (``treedef``: Adam's μ and ν, a momentum trace, …) taken from ``old``. Other state (a
    step count shared by all leaves) is ``new``'s. Traced code, like `value_and_flat_grad`."""
    if trainable is None or all(trainable):
        return new

    def shaped_like_params(node: Any) -> bool:
        return jax.tree_util.tree_structure(node) == treedef

    def pick(n: Any, o: Any) -> Any:
        if not shaped_like_params(n):
            return n
        pairs = zip(treedef.flatten_up_to(n), treedef.flatten_up_to(o), trainable, strict=True)
        return treedef.unflatten([a if t else b for a, b, t in pairs])

    return jax.tree.map(pick, new, old, is_leaf=shaped_like_params)


# Module-level jitted functions with the user's function as a static argument: models built from the
# same loss_fn share compiled code.


@jax.jit
def _add_scaled(leaves: list[jax.Array], update: list[jax.Array], scale: Any) -> list[jax.Array]:
    return [p + scale * u for p, u in zip(leaves, update, strict=True)]


@functools.partial(jax.jit, static_argnums=0)
def _loss(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any) -> jax.Array:
    return loss_fn(params, batch)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _value_and_grad(loss_fn: Callable[[Any, Any], jax.Array], treedef: Any, trainable: tuple[bool, ...] | None,
                    leaves: list[jax.Array], batch: Any) -> tuple[jax.Array, list[jax.Array]]:
    return value_and_flat_grad(loss_fn, treedef, trainable, leaves, batch)


def _top_key(path: tuple[Any, ...]) -> Any:
    """The first entry of a leaf's key path as a plain value (a dict key, a sequence index, an attribute)."""
    if not path:
        return None
    key = path[0]
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


class JaxModel:
    """``loss_fn(params, batch) -> scalar`` over a parameter pytree, seen as a `hybrid_core.Model`.

    `parameters` is the flat list of leaves in ``jax.tree_util.tree_flatten`` order. `loss` and
    `loss_and_grad` are ``jax.jit``-compiled once per ``loss_fn`` (which must be hashable; models
    sharing it share the compiled code) and batch shape, and `apply_update` rebinds the leaves
    through one jitted map; JAX arrays are immutable, so lists returned earlier keep the old
    values. Batches may hold JAX or NumPy arrays.

    Layer freezing (`parameter_groups`, `set_trainable`): by default one group per top-level entry of
    the pytree (a dict key, a list or tuple index), in flatten order — a dict's keys sorted, so name
    them input side first (``"0_embed"``, ``"1_block"``, …) or give ``groups``, lists of top-level
    keys. A frozen group's leaves enter the loss as constants: JAX differentiates only the trainable
    ones, so the frozen groups' gradients are not computed at all (compiled once per frozen pattern).
    """

    def __init__(self, loss_fn: Callable[[Any, Any], jax.Array], params: Any, *,
                 groups: Sequence[Sequence[Any]] | None = None) -> None:
        if not callable(loss_fn) or not _hashable(loss_fn):
            raise ModelError("loss_fn must be a hashable callable (it is a static argument of jax.jit)",
                             "Pass a function loss_fn(params, batch) -> scalar.")
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
        paths = [path for path, _ in with_paths]
        leaves = [jnp.asarray(leaf) if isinstance(leaf, np.ndarray) else leaf for _, leaf in with_paths]
        bad = [f"{jax.tree_util.keystr(paths[i]) or f'leaf {i}'} ({type(leaf).__name__} {getattr(leaf, 'dtype', '')})"
               .replace(" )", ")") for i, leaf in enumerate(leaves)
               if not isinstance(leaf, jax.Array) or not jnp.issubdtype(leaf.dtype, jnp.floating)]
        if not leaves or bad:
            from ._jax_modules import module_hint

            raise ModelError(f"params must be a pytree of floating-point arrays (bad: {bad or 'no leaves'})",
                             module_hint(params) or "Pass jnp arrays (real floating dtypes) as the pytree's leaves; "
                             "keep other values out of it (e.g. in loss_fn's closure).")
        self.loss_fn = loss_fn
        self._treedef = treedef
        self._leaves = leaves
        self._params = jax.tree_util.tree_unflatten(treedef, leaves)
        self._xp = namespace_of(leaves, what="params")
        self._devices = frozenset().union(*(leaf.devices() for leaf in leaves))
        self._groups = _groups_of([_top_key(p) for p in paths], groups)
        self._trainable: tuple[bool, ...] | None = None  # None: every leaf trains

    @property
    def params(self) -> Any:
        """The current parameter pytree."""
        return self._params

    @property
    def treedef(self) -> Any:
        """The pytree structure of `params` (the order of `parameters`)."""
        return self._treedef

    @property
    def trainable(self) -> tuple[bool, ...] | None:
        """One flag per leaf, False for the leaves of frozen groups; None when every leaf trains."""
        return self._trainable

    def parameters(self) -> list[jax.Array]:
        """The flat list of parameter leaves."""
        return list(self._leaves)

    def loss(self, batch: Any) -> jax.Array:
        """The jitted loss on ``batch`` (a device scalar, not read to the host)."""
        self._check_batch(batch)
        loss = _loss(self.loss_fn, self._params, self._fed(batch))
        shape = tuple(jnp.shape(loss))
        if shape not in ((), (1,)):
            raise BatchError(f"loss_fn returned a loss of shape {shape}; a scalar was expected",
                             "Reduce the loss to a scalar (e.g. jnp.mean over the batch) inside loss_fn.")
        return loss

    def loss_and_grad(self, batch: Any) -> tuple[jax.Array, list[jax.Array]]:
        """The jitted ``jax.value_and_grad``: the loss and one gradient per leaf (zeros, not computed,
        for frozen leaves)."""
        self._check_batch(batch)
        return _value_and_grad(self.loss_fn, self._treedef, self._trainable, self._leaves, self._fed(batch))

    def parameter_groups(self) -> list[list[int]]:
        """Indices into `parameters` by group, in flatten order (see the class docstring)."""
        return [list(g) for g in self._groups]

    def set_trainable(self, flags: Sequence[bool]) -> None:
        """Train (True) or freeze (False) each group; a frozen group's gradient is not computed."""
        if len(flags) != len(self._groups) or not all(isinstance(f, bool) for f in flags):
            raise ModelError(f"set_trainable needs {len(self._groups)} bools (one per group), got {list(flags)!r}")
        per_leaf = [True] * len(self._leaves)
        for group, flag in zip(self._groups, flags, strict=True):
            for i in group:
                per_leaf[i] = flag
        self._trainable = None if all(per_leaf) else tuple(per_leaf)

    def apply_update(self, update: Sequence[jax.Array], scale: float) -> None:
        """Rebind the leaves to θ + scale·update (one jitted call; ``scale`` is traced, so no recompiling)."""
        update = check_like_parameters(self._xp, self._leaves, update, "the update")
        self._leaves = list(_add_scaled(self._leaves, update, float(scale)))
        self._params = jax.tree_util.tree_unflatten(self._treedef, self._leaves)

    def set_parameters(self, values: Sequence[jax.Array]) -> None:
        """Rebind the leaves to ``values`` (same shapes, dtypes; JAX arrays)."""
        self._rebind(check_like_parameters(self._xp, self._leaves, values, "the parameters"))

    def _rebind(self, leaves: Sequence[jax.Array]) -> None:
        """Take ``leaves`` as the parameters, unchecked (for this package's own jitted updates)."""
        self._leaves = list(leaves)
        self._params = jax.tree_util.tree_unflatten(self._treedef, self._leaves)

    def _fed(self, batch: Any) -> Any:
        """What the jitted functions pass to ``loss_fn`` as its batch: ``batch`` itself here; a subclass may add
        arrays its loss needs that are not trained (`EquinoxModel`, `NNXModel`: the state they hold aside), so
        they are traced arguments, not constants compiled into the code."""
        return batch

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


def _groups_of(top_keys: list[Any], groups: Sequence[Sequence[Any]] | None) -> list[list[int]]:
    """Leaf indices by group: one group per top-level key in flatten order, or as ``groups`` names them."""
    order: list[Any] = []
    for key in top_keys:
        if key not in order:
            order.append(key)
    if groups is None:
        return [[i for i, k in enumerate(top_keys) if k == key] for key in order]
    if isinstance(groups, (str, bytes)) or not all(isinstance(g, Sequence) and not isinstance(g, str)
                                                   for g in groups):
        raise ModelError("groups must be lists of top-level keys of params",
                         f"For example groups=[[{order[0]!r}], …]; the top-level keys are {order!r}.")
    seen: dict[Any, int] = {}
    for n, group in enumerate(groups):
        if not group:
            raise ModelError(f"group {n} is empty", "Drop it, or name the top-level keys it should hold.")
        for key in group:
            if key not in order:
                raise ModelError(f"groups names {key!r}, which is not a top-level key of params",
                                 f"The top-level keys are {order!r}.")
            if key in seen:
                raise ModelError(f"{key!r} is in two groups ({seen[key]} and {n})", "Name each key once.")
            seen[key] = n
    missing = [k for k in order if k not in seen]
    if missing:
        raise ModelError(f"no group holds {', '.join(map(repr, missing))}", "Every top-level key must be in a group.")
    return [[i for i, k in enumerate(top_keys) if seen[k] == n] for n in range(len(groups))]


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
