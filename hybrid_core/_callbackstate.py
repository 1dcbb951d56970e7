"""`CallbackStates`: the state of the callbacks attached to a trainer, saved and restored with its checkpoints.

A callback *has state* when it offers ``state_dict()`` and ``load_state_dict(state)`` (and, optionally,
``check_state_dict(state)``: raise exactly when the load would refuse, change nothing). `fit` attaches the
callbacks it is given (they stay attached until the next `fit`), and every checkpoint then holds the
state of each under its key: the callback's ``key`` attribute when it has one (a non-empty string), else
its class name and its rank among the stateful callbacks of that class, ``"EarlyStopping#0"``.

Loading a checkpoint hands each attached callback its saved state, checked with every other part before
any is applied. A saved state whose callback is not attached (yet) waits: it is kept, saved again with
later checkpoints, and handed to a callback of that key when one is attached (the `fit` after a
``HybridTrainer.load``). An attached callback the file has no state for keeps its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._errors import CheckpointError, ConfigError, HybridError
from ._persist import copied_state

__all__ = ["CallbackStates", "callback_key", "stateful"]


def stateful(callback: Any) -> bool:
    """Whether ``callback`` has state to save (``state_dict`` and ``load_state_dict``)."""
    return callable(getattr(callback, "state_dict", None)) and callable(getattr(callback, "load_state_dict", None))


def callback_key(callback: Any, rank: int) -> str:
    """The key of a stateful callback: its ``key`` attribute, or ``"ClassName#rank"``."""
    key = getattr(callback, "key", None)
    if key is not None:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{type(callback).__name__}.key={key!r}: a callback's key must be a non-empty string")
        return key
    return f"{type(callback).__name__}#{rank}"


class CallbackStates:
    """The attached callbacks' states as one trainer part, ``callbacks`` (see the module docstring)."""

    def __init__(self) -> None:
        self._attached: dict[str, Any] = {}
        self._waiting: dict[str, Any] = {}

    @property
    def attached(self) -> dict[str, Any]:
        """The attached stateful callbacks by key."""
        return dict(self._attached)

    @property
    def waiting(self) -> list[str]:
        """Keys of saved states no attached callback has taken yet."""
        return sorted(self._waiting)

    def attach(self, callbacks: Sequence[Any]) -> None:
        """Make the stateful ones among ``callbacks`` the attached callbacks, handing each its waiting state.

        `ConfigError` for two callbacks with one key; a waiting state a callback refuses raises
        `CheckpointError` naming its key. Either way nothing changes (states are checked before any is loaded).
        """
        keyed: dict[str, Any] = {}
        ranks: dict[str, int] = {}
        for cb in callbacks:
            if not stateful(cb):
                continue
            name = type(cb).__name__
            key = callback_key(cb, ranks.get(name, 0))
            ranks[name] = ranks.get(name, 0) + 1
            if key in keyed:
                raise ConfigError(f"two callbacks have the key {key!r}", "Give each a distinct `key` attribute.")
            keyed[key] = cb
        due = {k: self._waiting[k] for k in keyed if k in self._waiting}
        _check(keyed, due)
        _load(keyed, due)
        self._attached = keyed
        self._waiting = {k: v for k, v in self._waiting.items() if k not in due}

    def state_dict(self) -> dict[str, Any]:
        """``{key: state}``: each attached callback's ``state_dict()``, and the states still waiting."""
        return {**self._waiting, **{k: cb.state_dict() for k, cb in self._attached.items()}}

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuse (naming the key) what `load_state_dict` would refuse; change nothing."""
        if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
            raise ValueError("the callbacks' states are not a dict by key")
        _check(self._attached, state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Hand each attached callback its state; keep the others waiting (all or none, see `attach`)."""
        self.check_state_dict(state)
        mine = {k: v for k, v in state.items() if k in self._attached}
        _load(self._attached, mine)
        self._waiting = {k: copied_state(v) for k, v in state.items() if k not in self._attached}

    def __repr__(self) -> str:
        return f"CallbackStates(attached={list(self._attached)}, waiting={self.waiting})"


def _check(callbacks: Mapping[str, Any], states: Mapping[str, Any]) -> None:
    """Each callback's ``check_state_dict`` of its state; `CheckpointError` naming the key."""
    for key, state in states.items():
        cb = callbacks.get(key)
        validate = getattr(cb, "check_state_dict", None)
        if callable(validate):
            try:
                validate(state)
            except HybridError as exc:
                raise CheckpointError(f"callback {key!r}: {exc.message}", exc.recovery) from exc
            except ValueError as exc:  # the readers of `_statecheck` name the field
                raise CheckpointError(f"callback {key!r}: {exc}", "Resume with callbacks built as in the saved "
                                      "run.") from exc
            except Exception as exc:
                raise CheckpointError(f"callback {key!r}: {type(exc).__name__}: {exc}",
                                      "Resume with callbacks built as in the saved run.") from exc


def _load(callbacks: Mapping[str, Any], states: Mapping[str, Any]) -> None:
    """Load ``states`` into their callbacks; if one refuses, put those already loaded back first."""
    backups = {k: copied_state(callbacks[k].state_dict()) for k in states}
    done: list[str] = []
    for key, state in states.items():
        try:
            callbacks[key].load_state_dict(copied_state(state))
        except Exception as exc:
            for k in reversed([*done, key]):
                callbacks[k].load_state_dict(backups[k])
            raise CheckpointError(f"callback {key!r} refused its saved state ({type(exc).__name__}: {exc})",
                                  "Resume with callbacks built as in the saved run.") from exc
        done.append(key)
