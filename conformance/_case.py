"""`ConformanceCase`: what the conformance suite needs to check one model and optimizer."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from hybrid_core._errors import ConfigError
from hybrid_core._protocols import Model, Optimizer

__all__ = ["ConformanceCase", "load_cases"]


@dataclass(frozen=True)
class ConformanceCase:
    """A model/optimizer pair under test.

    ``make_model(seed)`` builds a fresh model whose weights depend only on ``seed``;
    ``make_optimizer(model)`` wraps it; ``make_batches(seed)`` yields batches the model
    accepts, the same sequence for the same seed. ``grad_rtol`` and ``fd_eps`` set the
    finite-difference gradient check (``None`` = chosen from the parameters' dtype);
    ``skip_reason`` skips every contract with that reason (e.g. no GPU); ``reseed``, if
    given, is called before every evaluation of the model, so stochastic layers (dropout)
    draw the same masks each time and contracts that compare evaluations stay meaningful.
    """

    name: str
    make_model: Callable[[int], Model]
    make_optimizer: Callable[[Model], Optimizer]
    make_batches: Callable[[int], Iterator[Any]]
    grad_rtol: float | None = None
    fd_eps: float | None = None
    round_trip_atol: float | None = None
    skip_reason: str | None = None
    reseed: Callable[[], Any] | None = None


def load_cases(spec: str) -> list[ConformanceCase]:
    """Import ``MODULE:FACTORY`` and call the factory; it returns one case or a list of them."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--hybrid-case {spec!r}: expected MODULE:FACTORY, e.g. mypkg.cases:make_case")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--hybrid-case {spec!r}: cannot load it ({exc})",
                          "Check the module is importable from the current environment.") from exc
    made = factory()
    cases = list(made) if isinstance(made, (list, tuple)) else [made]
    bad = [type(c).__name__ for c in cases if not isinstance(c, ConformanceCase)]
    if bad or not cases:
        raise ConfigError(f"--hybrid-case {spec!r}: the factory must return ConformanceCase objects, got {bad}")
    return cases
