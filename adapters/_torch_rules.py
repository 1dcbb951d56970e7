"""Closed-form next updates of torch.optim.SGD, Adam and AdamW, read from their own state.

Each rule works on one parameter group with ``torch._foreach_*`` ops and allocates the
returned tensors plus at most one temporary list of the same size; it never writes into
the optimizer state or the parameters. Hyper-parameters are Python numbers (checked by
`rule_for`), so nothing here reads a device value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

__all__ = ["GroupView", "adam_next", "rule_for", "sgd_next"]

_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay")
_ADAM_KEYS = ("lr", "eps", "weight_decay")


class GroupView(NamedTuple):
    """One parameter group as the rules see it: hyper-parameters, live params, state and step counts."""

    group: dict[str, Any]
    params: list[torch.Tensor]
    states: list[dict[str, Any]]
    steps: list[int]
    last_grads: list[torch.Tensor] | None


Rule = Callable[[GroupView], list[torch.Tensor] | None]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(group: dict[str, Any], keys: Sequence[str]) -> bool:
    return all(_is_number(group.get(k, 0.0)) for k in keys)


def rule_for(optimizer: torch.optim.Optimizer) -> Rule | None:
    """The closed-form rule for ``optimizer``'s exact class, or ``None`` (then the last update is used).

    Subclasses are not matched (they may change the arithmetic), nor are groups with tensor
    hyper-parameters (reading them would cost a device sync) or complex parameters.
    """
    groups = optimizer.param_groups
    if any(torch.is_complex(p) for g in groups for p in g["params"]):
        return None
    if type(optimizer) is torch.optim.SGD:
        return sgd_next if all(_numbers(g, _SGD_KEYS) for g in groups) else None
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        ok = all(_numbers(g, _ADAM_KEYS) and all(_is_number(b) for b in g["betas"]) for g in groups)
        return adam_next if ok else None
    return None


def sgd_next(view: GroupView) -> list[torch.Tensor] | None:
    """SGD's next update if the next gradient equals the last one (``None`` without a last gradient).

    d = ±g + weight_decay·θ; with momentum buf' = momentum·buf + (1 − dampening)·d (buf' = d
    where no buffer exists yet); the update is −lr·(d + momentum·buf') with Nesterov, else −lr·buf'.
    """
    if view.last_grads is None:
        return None
    g = view.group
    lr, mu, damp, wd = g["lr"], g["momentum"], g["dampening"], g["weight_decay"]
    out = torch._foreach_neg(view.last_grads) if g.get("maximize", False) else torch._foreach_clone(
        view.last_grads)
    if wd:
        torch._foreach_add_(out, view.params, alpha=wd)
    if mu:
        have = [i for i, s in enumerate(view.states) if s.get("momentum_buffer") is not None]
        fresh = [out[i] for i in range(len(out)) if view.states[i].get("momentum_buffer") is None]
        if fresh and g["nesterov"]:
            torch._foreach_mul_(fresh, 1.0 + mu)
        if have:
            mine = [out[i] for i in have]
            bufs = [view.states[i]["momentum_buffer"] for i in have]
            if g["nesterov"]:
                new_buf = torch._foreach_mul(bufs, mu)
                torch._foreach_add_(new_buf, mine, alpha=1.0 - damp)
                torch._foreach_add_(mine, new_buf, alpha=mu)
            else:
                torch._foreach_mul_(mine, 1.0 - damp)
                torch._foreach_add_(mine, bufs, alpha=mu)
    torch._foreach_mul_(out, -lr)
    return out


def adam_next(view: GroupView) -> list[torch.Tensor] | None:
    """Adam/AdamW's next update at step t+1 if the next gradient equals m̂_t = m_t/(1 − β₁ᵗ).

    Per parameter: g = m̂ (+ weight_decay·θ for L2 decay); m' = β₁m + (1 − β₁)g;
    v' = β₂v + (1 − β₂)g², or max(v_max, v') with amsgrad; Δθ = −lr/(1 − β₁ᵗ⁺¹) · m' /
    (√v'/√(1 − β₂ᵗ⁺¹) + eps), minus lr·weight_decay·θ for decoupled decay (AdamW).
    Parameters without state yet get zeros; ``None`` if no parameter has state. With
    ``maximize`` the assumption is about the negated gradient, the one the moments average.
    """
    pairs = zip(view.states, view.steps, strict=True)
    live = [i for i, (s, t) in enumerate(pairs) if t > 0 and "exp_avg" in s]
    if not live:
        return None
    g = view.group
    b1, b2 = g["betas"]
    lr, eps, wd = g["lr"], g["eps"], g["weight_decay"]
    decoupled = g.get("decoupled_weight_decay", False)
    params = [view.params[i] for i in live]
    steps = [view.steps[i] for i in live]
    m = [view.states[i]["exp_avg"] for i in live]
    v = [view.states[i]["exp_avg_sq"] for i in live]
    upd = torch._foreach_div(m, [1.0 - b1**t for t in steps])
    if wd and not decoupled:
        torch._foreach_add_(upd, params, alpha=wd)
    denom = torch._foreach_mul(upd, upd)
    torch._foreach_mul_(denom, 1.0 - b2)
    torch._foreach_add_(denom, v, alpha=b2)
    if g["amsgrad"]:
        torch._foreach_maximum_(denom, [view.states[i]["max_exp_avg_sq"] for i in live])
    torch._foreach_sqrt_(denom)
    torch._foreach_div_(denom, [math.sqrt(1.0 - b2 ** (t + 1)) for t in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(upd, 1.0 - b1)
    torch._foreach_add_(upd, m, alpha=b1)
    torch._foreach_div_(upd, denom)
    torch._foreach_mul_(upd, [-lr / (1.0 - b1 ** (t + 1)) for t in steps])
    if wd and decoupled:
        torch._foreach_add_(upd, params, alpha=-lr * wd)
    by_index = dict(zip(live, upd, strict=True))
    return [by_index[i] if i in by_index else torch.zeros_like(p) for i, p in enumerate(view.params)]
