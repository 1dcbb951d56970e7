"""`hybrid-train bench`: the one way a speed figure is made (the protocol: docs/benchmarks.md, "Protocol").

Runs, in one process with fixed seeds: the same-settings baseline and the learning-rate tuned
baseline (×0.5, ×1, ×2, ×4, best kept), both the framework's own training loop (`NativeRun`), each
also read out through LAWA (tuned + LAWA); on torch tasks Schedule-Free AdamW swept the same way;
and the hybrid trainer. Reports time-to-target ratios against every peer and against the sweep
with its cost included, the interleaved overhead probe against the native step, and the targets
(`TARGETS`).
"""

from ._report import SCHEMA, format_table, summarize
from ._runner import RunResult, run_benchmark
from ._targets import TARGETS, Target
from ._tasks import TASKS, BenchTask, NativeRun, TaskSetup

__all__ = ["SCHEMA", "TARGETS", "TASKS", "BenchTask", "NativeRun", "RunResult", "Target", "TaskSetup",
           "format_table", "run_benchmark", "summarize"]
