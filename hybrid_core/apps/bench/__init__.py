"""`hybrid-train bench`: the one way a speed figure is made (the protocol: docs/benchmarks.md, "Protocol").

Runs, in one process with fixed seeds: the same-settings baseline, the learning-rate
tuned baseline (×0.5, ×1, ×2, ×4, best kept) and the hybrid trainer, and reports
time-to-target ratios against both.
"""

from ._report import SCHEMA, format_table, summarize
from ._runner import RunResult, run_benchmark
from ._tasks import TASKS, BenchTask, TaskSetup

__all__ = ["SCHEMA", "TASKS", "BenchTask", "RunResult", "TaskSetup", "format_table", "run_benchmark", "summarize"]
