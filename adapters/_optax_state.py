"""Finding and replacing pieces of a (chained, nested) optax state without knowing its shape.

optax states are NamedTuples, tuples (``optax.chain``), lists and dicts (``named_chain``) of
each other; these helpers walk that tree in a fixed order (depth first, fields in order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import optax

__all__ = ["INJECTED", "SCHEDULE_COUNTS", "advance_schedules", "find_all", "has_schedule", "injected_holding",
           "replace_node"]

INJECTED: tuple[type, ...] = (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)
"""The state types of ``optax.inject_hyperparams`` (current and legacy)."""

try:  # where optax keeps the state of a schedule wrapped by inject_hyperparams (not exported)
    from optax.schedules._inject import WrappedScheduleState as _Wrapped

    _WRAPPED: tuple[type, ...] = (_Wrapped,)
except ImportError:  # an optax without it: schedules inside inject_hyperparams then live in its own count
    _WRAPPED = ()

SCHEDULE_COUNTS: tuple[type, ...] = (optax.ScaleByScheduleState, *_WRAPPED, *INJECTED)
"""The states whose ``count`` drives a learning-rate (or other hyperparameter) schedule: ``scale_by_schedule``
(what ``optax.adam(learning_rate=schedule)`` builds), a schedule wrapped by ``inject_hyperparams``, and the
``inject_hyperparams`` state's own count. Not Adam's ``count``: that one counts the gradients in its moments."""


def _children(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return list(node.values())
    if isinstance(node, (tuple, list)):
        return list(node)
    return []


def _walk(node: Any) -> Iterator[Any]:
    yield node
    for child in _children(node):
        yield from _walk(child)


def find_all(state: Any, kind: type | tuple[type, ...]) -> list[Any]:
    """Every node of ``state`` that is an instance of ``kind``, in walk order."""
    return [node for node in _walk(state) if isinstance(node, kind)]


def injected_holding(state: Any, name: str, inner: Any = None) -> Any:
    """The first ``inject_hyperparams`` state holding ``name`` (and wrapping ``inner`` if given), or None."""
    for node in find_all(state, INJECTED):
        if name in node.hyperparams and (inner is None or any(n is inner for n in _walk(node.inner_state))):
            return node
    return None


def replace_node(state: Any, target: Any, make: Callable[[Any], Any]) -> Any:
    """``state`` rebuilt with the node ``target`` (found by identity) replaced by ``make(target)``."""
    if state is target:
        return make(state)
    if isinstance(state, dict):
        return {k: replace_node(v, target, make) for k, v in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(replace_node(v, target, make) for v in state))
    if isinstance(state, (tuple, list)):
        return type(state)(replace_node(v, target, make) for v in state)
    return state


def has_schedule(state: Any) -> bool:
    """Whether ``state`` holds a schedule's count: a ``scale_by_schedule`` or a scheduled hyperparameter of
    ``inject_hyperparams`` (one that injects constants only has a count that drives nothing)."""
    scheduled = (optax.ScaleByScheduleState, *_WRAPPED, optax.InjectHyperparamsState)
    return bool(find_all(state, scheduled))


def advance_schedules(state: Any) -> Any:
    """``state`` rebuilt with every schedule count one higher (saturating, as optax's own increment)."""
    if isinstance(state, SCHEDULE_COUNTS):
        inner = type(state)(*(advance_schedules(v) for v in state))
        return inner._replace(count=optax.safe_increment(state.count))
    if isinstance(state, dict):
        return {k: advance_schedules(v) for k, v in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(advance_schedules(v) for v in state))
    if isinstance(state, (tuple, list)):
        return type(state)(advance_schedules(v) for v in state)
    return state
