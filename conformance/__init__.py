"""Conformance suite: checks that a `Model`/`Optimizer` pair keeps the protocols' contracts.

Run it on the built-in cases with ``pytest --pyargs hybrid_core.conformance`` or on your
own with ``pytest --pyargs hybrid_core.conformance --hybrid-case mypkg.cases:make_case``
(the option repeats). The pytest plugin behind the option is registered through the
``pytest11`` entry point, so installing the package is enough.
"""

from hybrid_core.conformance._builtin import builtin_cases
from hybrid_core.conformance._case import ConformanceCase, load_cases

__all__ = ["ConformanceCase", "builtin_cases", "load_cases"]
