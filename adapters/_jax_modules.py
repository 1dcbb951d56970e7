"""`EquinoxModel` and `NNXModel`: an ``eqx.Module`` or a Flax ``nnx.Module`` seen as a `JaxModel`.

Each splits the module into its trainable arrays (the `JaxModel` parameters) and the rest, which it keeps
aside and binds back inside the loss: ``eqx.partition``/``eqx.combine`` for Equinox, ``nnx.split``/``nnx.merge``
for NNX. The user's loss takes the module: ``loss_fn(module, batch) -> scalar``.

The rest is held fixed while training: it enters the compiled loss as constants. For NNX that is every
variable that is not trainable (``nnx.BatchStat`` running averages, ``nnx.RngState`` keys and counts), so
BatchNorm's running averages are not updated by the trainer (in training mode it normalises by the batch's
statistics all the same) and Dropout driven by the module's own ``nnx.Rngs`` draws the same mask every step:
take randomness from the batch instead (see docs/integrations.md).
"""

from __future__ import annotations

import functools
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from hybrid_core._errors import CheckpointError, ModelError

from ._jax_model import JaxModel, _hashable

__all__ = ["EquinoxModel", "NNXModel", "module_hint"]

_STATE_HINT = "Load a checkpoint saved from the same module (same architecture and dtypes)."


def _library(name: str, extra: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ModelError(f"{name} is not installed ({exc})",
                         f"pip install 'hybrid-predict-trainer[{extra}]'") from exc


def module_hint(tree: Any) -> str | None:
    """What to do instead when ``tree``, handed to `JaxModel`, is an Equinox or NNX module (else None)."""
    kind = _kind(tree)
    if kind == "equinox":
        return ("params is an equinox Module: pass it to EquinoxModel(loss_fn, module) (loss_fn(module, batch)), "
                "which trains its inexact arrays (eqx.partition(module, eqx.is_inexact_array)) and keeps the rest "
                "aside, or partition it yourself and give JaxModel the first half.")
    if kind == "nnx":
        return ("params is a flax nnx Module: pass it to NNXModel(loss_fn, module) (loss_fn(module, batch)), which "
                "trains its nnx.Param variables (nnx.split(module, nnx.Param, ...)) and keeps the rest aside.")
    return None


def _kind(tree: Any) -> str | None:
    for cls in type(tree).__mro__:
        top = cls.__module__.split(".")[0]
        if top == "equinox" and cls.__name__ == "Module":
            return "equinox"
        if top == "flax" and cls.__name__ in ("Module", "Object", "Pytree"):
            return "nnx"
    return None


class _BoundLoss:
    """``loss_fn`` over the trainable pytree: ``build(params, held)`` binds the parameters and the held state (both
    traced; the model feeds ``(held, batch)`` as the batch) into the module, and the user's loss takes it.

    A static argument of ``jax.jit``: equal (and so sharing compiled code) when ``key`` is, i.e. for modules of the
    same structure and the same loss; ``key`` None compares by identity (compiled once per model).
    """

    def __init__(self, loss_fn: Callable[[Any, Any], Any], build: Callable[[Any, Any], Any], key: Any) -> None:
        self.user_loss = loss_fn
        self.build = build
        self.key = key

    def __call__(self, params: Any, fed: Any) -> Any:
        held, batch = fed
        return self.user_loss(self.build(params, held), batch)

    def __hash__(self) -> int:
        return hash(self.key) if self.key is not None else id(self)

    def __eq__(self, other: object) -> bool:
        if self.key is None or not isinstance(other, _BoundLoss):
            return self is other
        return self.key == other.key and self.user_loss == other.user_loss

    def __repr__(self) -> str:
        return f"bound({getattr(self.user_loss, '__qualname__', self.user_loss)!r})"


def _check_loss(loss_fn: Any, sibling: str) -> None:
    if not callable(loss_fn):
        raise ModelError(f"loss_fn is a {type(loss_fn).__name__}, not a function",
                         f"Pass {sibling}(loss_fn, module) with loss_fn(module, batch) -> scalar.")


def _bad_leaves(tree: Any, wanted: Callable[[Any], bool]) -> list[str]:
    """The paths (``keystr``) and types of the leaves of ``tree`` that ``wanted`` refuses."""
    with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [f"{jax.tree_util.keystr(path) or '<root>'} ({_describe(leaf)})" for path, leaf in with_paths
            if not wanted(leaf)]


def _describe(leaf: Any) -> str:
    dtype = getattr(leaf, "dtype", None)
    return f"{type(leaf).__name__} {dtype}" if dtype is not None else type(leaf).__name__


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))




def _floating(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)


class _HeldState(ABC):
    """The arrays kept aside (not trained) as a checkpoint part of the model: ``{"kind", "arrays"}``.

    Typed PRNG key arrays are saved as their key data (uint32) and wrapped back on load.
    """

    kind = ""

    @abstractmethod
    def _held(self) -> list[Any]:
        """The untrained arrays, in a fixed order."""

    def state_dict(self) -> dict[str, Any]:
        """The held (untrained) arrays, PRNG keys as their key data; the trained ones are the parameters."""
        return {"kind": self.kind, "arrays": [_plain(a) for a in self._held()]}

    def check_state_dict(self, state: Any) -> list[Any]:
        """The arrays `load_state_dict` would hold; `CheckpointError` naming the array, nothing changed."""
        if not isinstance(state, dict) or set(state) != {"kind", "arrays"} or state["kind"] != self.kind:
            raise CheckpointError(f"this is not a {self.kind} state_dict", _STATE_HINT)
        live = self._held()
        saved = state["arrays"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(live):
            raise CheckpointError(f"the saved module holds {len(saved) if isinstance(saved, (list, tuple)) else '?'} "
                                  f"untrained arrays, this one {len(live)}", _STATE_HINT)
        out = []
        for i, (a, b) in enumerate(zip(saved, live, strict=True)):
            plain = _plain(b)
            if not hasattr(a, "shape") or tuple(a.shape) != tuple(plain.shape) or np.dtype(a.dtype) != plain.dtype:
                raise CheckpointError(f"untrained array {i} ({self._paths()[i]}) does not match: expected "
                                      f"{tuple(plain.shape)} {plain.dtype}", _STATE_HINT)
            value = jax.numpy.asarray(a)
            if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
                value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(b))
            out.append(value)
        return out

    @abstractmethod
    def _paths(self) -> list[str]:
        """The paths (``keystr``) of the untrained arrays, in the order of `_held`."""


def _plain(a: Any) -> Any:
    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(a)
    return a if isinstance(a, jax.Array) else np.asarray(a)


def _eqx_static(static_def: Any, flags: tuple[bool, ...], consts: tuple[Any, ...], arrays: Sequence[Any]) -> Any:
    """The static half of an Equinox module with ``arrays`` in its array slots."""
    arrays, rest = iter(arrays), iter(consts)
    return static_def.unflatten([next(arrays) if f else next(rest) for f in flags])


def _eqx_combine(eqx: Any, static_def: Any, flags: tuple[bool, ...], consts: tuple[Any, ...], params: Any,
                 arrays: Any) -> Any:
    return eqx.combine(params, _eqx_static(static_def, flags, consts, arrays))


def _nnx_merge(nnx: Any, graphdef: Any, params: Any, rest: Any) -> Any:
    # Fresh variables inside the trace (tree_map rebuilds them), so layers that write their state while the loss
    # runs (BatchNorm's running averages, RNG counts) may; what they write is dropped with the trace.
    return nnx.merge(graphdef, params, jax.tree_util.tree_map(lambda a: a, rest))


class EquinoxModel(_HeldState, JaxModel):
    """An ``eqx.Module`` and ``loss_fn(module, batch) -> scalar``, trained as a `JaxModel`.

    The trainable arrays are ``eqx.partition(module, filter_spec)``'s first half (default
    ``eqx.is_inexact_array``: every floating-point array); the rest (functions, integers, integer arrays)
    is kept aside and ``eqx.combine``-d back inside the jitted loss. `module` is the module with the current
    weights. Parameter groups for layer freezing: one per top-level field (see `JaxModel`), or ``groups``.
    """

    kind = "EquinoxModel"

    def __init__(self, loss_fn: Callable[[Any, Any], Any], module: Any, *, filter_spec: Any = None,
                 groups: Sequence[Sequence[Any]] | None = None) -> None:
        eqx = _library("equinox", "equinox")
        _check_loss(loss_fn, "EquinoxModel")
        if not isinstance(module, eqx.Module):
            raise ModelError(f"module is a {type(module).__name__}, not an equinox Module",
                             "Pass an eqx.Module (for a plain pytree of arrays use JaxModel(loss_fn, params)).")
        params, static = eqx.partition(module, eqx.is_inexact_array if filter_spec is None else filter_spec)
        bad = _bad_leaves(params, _floating)
        if bad or not jax.tree_util.tree_leaves(params):
            raise ModelError(f"the trainable part of the module must hold real floating-point arrays only "
                             f"(bad: {bad or 'no trainable leaves'})",
                             "Keep the default filter_spec (eqx.is_inexact_array), or give a filter that selects "
                             "real floating arrays; mark other fields eqx.field(static=True).")
        self._eqx = eqx
        # The static half: its arrays (integer buffers) are fed to the loss as traced arguments, the rest (functions,
        # numbers) is compiled in; modules of one structure share the compiled code.
        leaves, self._static_def = jax.tree_util.tree_flatten(static)
        self._flags = tuple(_is_array(leaf) for leaf in leaves)
        self._consts = tuple(leaf for leaf, f in zip(leaves, self._flags, strict=True) if not f)
        self._arrays = [leaf for leaf, f in zip(leaves, self._flags, strict=True) if f]
        key = (self._static_def, self._flags, self._consts)
        # The build function holds no model (the jit cache keeps it): only the structure.
        build = functools.partial(_eqx_combine, eqx, self._static_def, self._flags, self._consts)
        super().__init__(_BoundLoss(loss_fn, build, key if _hashable(key) else None), params, groups=groups)

    def _rebuild(self, arrays: Sequence[Any]) -> Any:
        return _eqx_static(self._static_def, self._flags, self._consts, arrays)

    def _combine(self, params: Any, arrays: Any) -> Any:
        return self._eqx.combine(params, self._rebuild(arrays))

    def _fed(self, batch: Any) -> Any:
        return self._arrays, batch

    @property
    def module(self) -> Any:
        """The module with the current weights (a new ``eqx.Module``: modules are immutable)."""
        return self._combine(self.params, self._arrays)

    def _held(self) -> list[Any]:
        return list(self._arrays)

    def _paths(self) -> list[str]:
        with_paths = jax.tree_util.tree_flatten_with_path(self._rebuild(self._arrays))[0]
        return [jax.tree_util.keystr(p) for (p, _), f in zip(with_paths, self._flags, strict=True) if f]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Hold the saved untrained arrays (integer buffers); `CheckpointError` and no change if they do not fit."""
        self._arrays = self.check_state_dict(state)

    def __repr__(self) -> str:
        return f"EquinoxModel({type(self.module).__name__}, {len(self.parameters())} trainable arrays)"


class NNXModel(_HeldState, JaxModel):
    """A Flax ``nnx.Module`` and ``loss_fn(module, batch) -> scalar``, trained as a `JaxModel`.

    ``nnx.split(module, trainable, ...)``: the ``trainable`` variables (default ``nnx.Param``) are the
    parameters; the rest (``nnx.BatchStat``, RNG state, …) is held fixed and ``nnx.merge``-d back inside the
    jitted loss (see the module docstring for what that means for BatchNorm and Dropout). `module` is a module
    with the current weights (a new object from ``nnx.merge``; `update_module` writes them into yours).
    """

    kind = "NNXModel"

    def __init__(self, loss_fn: Callable[[Any, Any], Any], module: Any, *, trainable: Any = None,
                 groups: Sequence[Sequence[Any]] | None = None) -> None:
        nnx = _library("flax.nnx", "flax")
        _check_loss(loss_fn, "NNXModel")
        if not isinstance(module, nnx.Module):
            raise ModelError(f"module is a {type(module).__name__}, not a flax nnx.Module",
                             "Pass an nnx.Module (a Linen module needs flax.linen's own apply: use JaxModel "
                             "with its params).")
        graphdef, params, rest = nnx.split(module, nnx.Param if trainable is None else trainable, ...)
        bad = _bad_leaves(params, _floating)
        if bad or not jax.tree_util.tree_leaves(params):
            raise ModelError(f"the trainable variables of the module must be real floating-point arrays "
                             f"(bad: {bad or 'no trainable variables'})",
                             "Keep the default trainable=nnx.Param, or give an nnx filter that selects floating "
                             "variables only (e.g. nnx.All(nnx.Param, ...)).")
        self._nnx, self._graphdef, self._rest = nnx, graphdef, rest
        key = (graphdef, jax.tree_util.tree_structure(rest))
        build = functools.partial(_nnx_merge, nnx, graphdef)
        super().__init__(_BoundLoss(loss_fn, build, key if _hashable(key) else None), params, groups=groups)

    def _fed(self, batch: Any) -> Any:
        return self._rest, batch

    @property
    def module(self) -> Any:
        """A module with the current weights and the held state (``nnx.merge``)."""
        return _nnx_merge(self._nnx, self._graphdef, self.params, self._rest)

    def update_module(self, module: Any) -> None:
        """Write the current weights and held state into ``module`` (yours, built like the one given) in place."""
        self._nnx.update(module, self.params, self._rest)

    def _held(self) -> list[Any]:
        return jax.tree_util.tree_leaves(self._rest)

    def _paths(self) -> list[str]:
        return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(self._rest)[0]]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Hold the saved non-trainable state (batch statistics, RNG state); `CheckpointError` and no change if it
        does not fit."""
        values = self.check_state_dict(state)
        self._rest = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(self._rest), values)

    def __repr__(self) -> str:
        return f"NNXModel({len(self.parameters())} trainable arrays, {len(self._held())} held)"
