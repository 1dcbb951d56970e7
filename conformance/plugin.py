"""The pytest plugin (entry point ``pytest11``): ``--hybrid-case`` and the ``hybrid_case`` fixture."""

from __future__ import annotations

from typing import Any

import pytest

__all__ = ["pytest_addoption", "pytest_generate_tests"]


def pytest_addoption(parser: Any) -> None:
    """Add ``--hybrid-case MODULE:FACTORY`` (repeatable)."""
    group = parser.getgroup("hybrid-conformance")
    group.addoption(
        "--hybrid-case", action="append", default=[], metavar="MODULE:FACTORY",
        help="run the hybrid_core conformance suite on the ConformanceCase(s) FACTORY() returns; repeatable. "
             "Without it the built-in cases run.",
    )


def pytest_generate_tests(metafunc: Any) -> None:
    """Parametrize every test that takes ``hybrid_case`` over the selected cases."""
    if "hybrid_case" not in metafunc.fixturenames:
        return
    from hybrid_core.conformance import builtin_cases, load_cases

    specs = metafunc.config.getoption("hybrid_case")
    cases = [c for spec in specs for c in load_cases(spec)] if specs else builtin_cases()
    params = [
        pytest.param(c, id=c.name, marks=[pytest.mark.skip(reason=c.skip_reason)] if c.skip_reason else [])
        for c in cases
    ]
    metafunc.parametrize("hybrid_case", params)
