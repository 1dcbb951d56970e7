"""Finding and replacing pieces of a (chained, nested) optax state without knowing its shape.

optax states are NamedTuples, tuples (``optax.chain``), lists and dicts (``named_chain``) of
each other; these helpers walk that tree in a fixed order (depth first, fields in order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import optax

__all__ = ["INJECTED", "find_all", "injected_holding", "replace_node"]

INJECTED: tuple[type, ...] = (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)
"""The state types of ``optax.inject_hyperparams`` (current and legacy)."""


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
