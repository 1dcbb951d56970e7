"""Checking a saved torch optimizer state against a live optimizer before `TorchOptimizer` loads it.

``torch.optim.Optimizer.load_state_dict`` checks only the number of groups and of parameters per
group: it takes state tensors of any shape (the next step then fails inside torch), casts floating
ones to the parameter's dtype, and accepts NaN buffers and an empty state for an optimizer that has
stepped (the step count silently restarts). `checked_steps` refuses all of these with a
`CheckpointError` naming the parameter and the field, and changes nothing. `group_indices` maps the
optimizer's parameter groups onto the model's parameters (checked at construction), and `cloned`
copies a state's tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hybrid_core._errors import CheckpointError, ConfigError

__all__ = ["ELEMENTWISE", "check_scheduler", "checked_steps", "cloned", "group_indices"]

ELEMENTWISE = frozenset({"SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop",
                         "Rprop", "ASGD"})
"""``torch.optim`` classes whose per-parameter state tensors have the parameter's shape and dtype, or are scalars;
all but SGD keep a ``step`` per parameter once it has stepped."""

_HINT = "Load a state_dict() saved by a TorchOptimizer around the same torch optimizer class and model."


def _refuse(message: str) -> CheckpointError:
    return CheckpointError(f"torch optimizer state: {message}", _HINT)


def checked_steps(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], saved: Any,
                  steps: Any, stepped: bool) -> list[int]:
    """The per-parameter step counts to keep after loading ``saved`` (a torch ``state_dict()``) into ``optimizer``.

    ``steps`` is the adapter's saved count per parameter (None in files written before it was saved: the counts
    then come from the torch state, and ``stepped``, whether a last update was saved, tells that an empty state
    is a lost one). `CheckpointError` if ``saved`` does not fit: groups and their sizes, a
    learning rate that is not a number >= 0, NaN hyper-parameters, state for unknown parameters, non-finite
    state tensors, state tensors of another shape or dtype than their parameter (for `ELEMENTWISE` classes;
    for others, than the live state where it exists), and ``step`` entries that disagree with ``steps`` or are
    missing for a parameter that has stepped.
    """
    if not isinstance(saved, Mapping) or set(saved) != {"state", "param_groups"}:
        raise _refuse("expected a dict with 'state' and 'param_groups'")
    owner = _owners(optimizer, params, saved["param_groups"])
    state = saved["state"]
    if not isinstance(state, Mapping):
        raise _refuse(f"'state' is a {type(state).__name__}, not a dict")
    kind = type(optimizer).__name__
    elementwise = kind in ELEMENTWISE and type(optimizer).__module__.startswith("torch.optim")
    found: dict[int, Mapping[str, Any]] = {}
    for key, entry in state.items():
        if key not in owner:
            raise _refuse(f"state for parameter id {key!r}, which no parameter group holds")
        index, param, _ = owner[key]
        what = f"parameter {index}" if index is not None else f"a tensor outside model.parameters() (id {key!r})"
        if not isinstance(entry, Mapping):
            raise _refuse(f"the state of {what} is a {type(entry).__name__}, not a dict")
        live = optimizer.state.get(param, {})
        for name, value in entry.items():
            _check_value(value, f"{name!r} of {what}", param, live.get(name), elementwise and name != "step")
        if "step" in entry:
            _step_count(entry["step"], f"'step' of {what}")
        if index is not None:
            found[index] = entry
    counts = [int(_step_count(found[i]["step"], "step")) if "step" in found.get(i, {}) else 0
              for i in range(len(params))]
    if steps is None:
        if stepped and elementwise and kind != "SGD" and not found:
            raise _refuse("the optimizer has stepped (a last update was saved) but its state is empty (loading it "
                          "would silently restart the step count)")
        return counts
    if not isinstance(steps, (list, tuple)) or len(steps) != len(params) or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
        raise _refuse(f"steps must be {len(params)} integers >= 0 (one per parameter)")
    for i, (count, want) in enumerate(zip(counts, steps, strict=True)):
        entry = found.get(i, {})
        if "step" in entry and count != want:
            raise _refuse(f"parameter {i} holds step {count}, but the optimizer took {want} steps for it")
        if elementwise and want > 0 and kind != "SGD" and "step" not in entry:
            raise _refuse(f"parameter {i} has taken {want} steps but its state is missing (loading it would "
                          "silently restart the step count)")
        if kind == "SGD" and want > 0 and _momentum(saved["param_groups"], owner, i) and (
                entry.get("momentum_buffer") is None):
            raise _refuse(f"parameter {i} has taken {want} steps with momentum but has no momentum_buffer")
    return list(steps)


def check_scheduler(saved: Any, live: Mapping[str, Any]) -> None:
    """`CheckpointError` unless a saved scheduler state has the live one's keys, each of the same kind, and no NaN
    (``load_state_dict`` of a torch scheduler takes any dict; a wrong entry fails at the next step)."""
    if not isinstance(saved, Mapping) or set(saved) != set(live):
        keys = sorted(map(str, saved)) if isinstance(saved, Mapping) else type(saved).__name__
        raise CheckpointError(f"the scheduler state holds {keys}; this scheduler's holds {sorted(live)}", _HINT)
    for name, value in saved.items():
        if _has_nan(value) or not _same_kind(value, live[name]):
            raise CheckpointError(f"the scheduler state has {name}={value!r}; this scheduler has {live[name]!r}",
                                  _HINT)


def _owners(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], groups: Any
            ) -> dict[Any, tuple[int | None, torch.Tensor, int]]:
    """Saved parameter id -> (index in ``params`` or None, live tensor, group index), groups checked."""
    live = optimizer.param_groups
    if not isinstance(groups, (list, tuple)) or len(groups) != len(live):
        raise _refuse(f"the state has {len(groups) if isinstance(groups, (list, tuple)) else 'no'} parameter "
                      f"groups; the optimizer has {len(live)}")
    position = {id(p): i for i, p in enumerate(params)}
    owner: dict[Any, tuple[int | None, torch.Tensor, int]] = {}
    for g, (group, mine) in enumerate(zip(groups, live, strict=True)):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), (list, tuple)):
            raise _refuse(f"parameter group {g} is not a dict with a 'params' list")
        if len(group["params"]) != len(mine["params"]):
            raise _refuse(f"parameter group {g} holds {len(group['params'])} parameters; the optimizer's holds "
                          f"{len(mine['params'])}")
        lr = group.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr >= 0):
            raise _refuse(f"parameter group {g} has lr={lr!r}; expected a finite number >= 0")
        for name, value in group.items():
            if name != "params" and _has_nan(value):
                raise _refuse(f"parameter group {g} has {name}={value!r}")
            if name in mine and name != "params" and not _same_kind(value, mine[name]):
                raise _refuse(f"parameter group {g} has {name}={value!r}; the optimizer has {mine[name]!r}")
        for key, param in zip(group["params"], mine["params"], strict=True):
            if isinstance(key, bool) or not isinstance(key, int) or key in owner:
                raise _refuse(f"parameter group {g} holds the id {key!r} (ids are distinct integers)")
            owner[key] = (position.get(id(param)), param, g)
    return owner


def _check_value(value: Any, what: str, param: torch.Tensor, live: Any, param_like: bool) -> None:
    """A state entry: finite tensors (of the parameter's shape and dtype unless scalar, when ``param_like``; of
    the live entry's shape and dtype if there is one), finite floats, lists of those."""
    if isinstance(value, torch.Tensor):
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            raise _refuse(f"{what} holds NaN or Inf")
        if isinstance(live, torch.Tensor) and (value.shape != live.shape or value.dtype != live.dtype) and (
                not param_like or value.dim() > 0):
            raise _refuse(f"{what} has shape {tuple(value.shape)} {value.dtype}; the optimizer holds "
                          f"{tuple(live.shape)} {live.dtype}")
        if param_like and value.dim() > 0 and (value.shape != param.shape or (
                value.is_floating_point() and value.dtype != param.dtype)):
            raise _refuse(f"{what} has shape {tuple(value.shape)} {value.dtype}; the parameter is "
                          f"{tuple(param.shape)} {param.dtype}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _refuse(f"{what} is {value!r}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_value(item, what, param, None, False)


def _step_count(value: Any, what: str) -> float:
    number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not (
            math.isfinite(number) and number >= 0 and number == int(number)):
        raise _refuse(f"{what} is {value!r}; expected a whole number >= 0")
    return number


def _momentum(groups: Sequence[Mapping[str, Any]], owner: Mapping[Any, tuple[int | None, torch.Tensor, int]],
              index: int) -> bool:
    """Whether the saved group holding parameter ``index`` uses momentum."""
    held = [g for i, _, g in owner.values() if i == index]
    return bool(held) and groups[held[0]].get("momentum", 0) != 0


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, (list, tuple)):
        return any(_has_nan(v) for v in value)
    return False


def _same_kind(saved: Any, live: Any) -> bool:
    """Whether a saved hyper-parameter has the live one's kind (numbers, flags, text, sequences; None fits all)."""
    if saved is None or live is None:
        return True
    if isinstance(live, bool) or isinstance(saved, bool):
        return isinstance(live, bool) and isinstance(saved, bool)
    if isinstance(live, (int, float)):
        return isinstance(saved, (int, float))
    if isinstance(live, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(live) and all(
            _same_kind(s, v) for s, v in zip(saved, live, strict=True))
    return type(saved) is type(live)


def group_indices(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[list[int]]:
    """For each parameter group, the indices into ``params`` of the tensors it holds."""
    position = {id(p): i for i, p in enumerate(params)}
    groups: list[list[int]] = []
    seen: set[int] = set()
    extra = 0
    for group in optimizer.param_groups:
        idx = []
        for p in group["params"]:
            i = position.get(id(p))
            if i is None:
                extra += p.requires_grad
            else:
                idx.append(i)
                seen.add(i)
        groups.append(idx)
    problems = []
    missing = sorted(set(range(len(params))) - seen)
    if missing:
        problems.append(f"model.parameters() {missing} are in no parameter group of the optimizer")
    if extra:
        problems.append(f"the optimizer holds {extra} trainable tensor(s) not in model.parameters()")
    if problems:
        raise ConfigError(problems, "Build the optimizer from model.parameters() (groups may split them).")
    return groups


def cloned(value: Any) -> Any:
    """``value`` with every tensor replaced by a detached copy (containers rebuilt, other leaves shared)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: cloned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cloned(v) for v in value)
    return value
