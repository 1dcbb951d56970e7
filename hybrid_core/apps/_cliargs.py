"""The argument parser of `hybrid-train`: every argument checked while parsing, before any work.

Usage errors print one line, ``hybrid-train CMD: error: WHAT (see hybrid-train CMD --help)``,
and exit with code 2: a value of the wrong type or out of range, an unknown choice, an input
file that does not exist, an output path that cannot be written (its directory is missing or not
writable, or it is a directory), a task run on a backend it does not support. Building the parser
imports no benchmark, demo or array library, so these errors come at once.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, NoReturn

from hybrid_core._version import __version__

__all__ = ["BENCH_TASKS", "DEMO_BACKENDS", "DYNAMICS_TASKS", "KERNEL_BACKENDS", "build_parser", "check_args"]

DEMO_BACKENDS = ("numpy", "array_api_strict", "torch", "jax")
"""The demo's backends (`hybrid_core.apps.demo.BACKENDS`; a test keeps the two equal)."""

BENCH_TASKS = {
    "digits-mlp": ("numpy", "torch"),
    "lm-stdlib": ("torch",),
    "jax-mlp": ("jax",),
    "fastgrnn-router": ("numpy", "torch"),
    "lm-finetune": ("torch",),
}
"""Each benchmark task's backends (`hybrid_core.apps.bench.TASKS`; a test keeps the two equal)."""

KERNEL_BACKENDS = ("numpy", "torch", "jax", "cupy")
"""`bench-kernels --backends` choices (`hybrid_core.apps.kernels_bench.BACKENDS`; a test keeps the two equal)."""

DYNAMICS_TASKS = ("digits-mlp", "lm-stdlib", "all")
"""`dynamics-eval --task` choices (`hybrid_core.apps.dynamics_eval.TASK_BACKENDS` and ``all``)."""


class OneLineParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose usage errors are one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE (see PROG --help)`` on stderr and exit with code 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option's help that does not state its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        default = action.default
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            shown = "on" if default else "off"
        elif isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default))
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def positive_int(text: str) -> int:
    """An integer >= 1 (`argparse.ArgumentTypeError` naming the text otherwise)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def parameter_count(text: str) -> str:
    """A parameter count such as 50000, 100k or 1m (kept as written)."""
    from .kernels_bench import parse_size

    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a parameter count like 50000, 100k or 1m") from exc
    return text


def output_path(text: str) -> str:
    """A path a file can be written to: not a directory, in an existing writable directory."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"cannot write {text}: it is a directory; give a file name")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text}: the directory {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied; choose another path")
    return text


def density(text: str) -> float:
    """A number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1]")
    return value


def output_dir(text: str) -> str:
    """A directory that exists or can be created (its parent exists and is writable)."""
    if os.path.isdir(text):
        if not os.access(text, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot write into {text}: permission denied")
        return text
    if os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text}: {parent} is missing or not writable")
    return text


def input_file(text: str) -> str:
    """An existing, readable file."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable")
    return text


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {low}")
    return value


def _sub(sub: Any, name: str, help_text: str) -> OneLineParser:
    parser: OneLineParser = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:]
                                           + ".", formatter_class=DefaultsFormatter)
    parser.set_defaults(parser=parser)
    return parser


def build_parser() -> OneLineParser:
    """The argument parser of `hybrid-train` (the command's function is ``args.func``, set by `cli.main`)."""
    parser = OneLineParser(prog="hybrid-train", formatter_class=DefaultsFormatter,
                           description="Train with fewer backward passes by predicting some training steps.")
    parser.add_argument("--version", action="version", version=f"hybrid-train {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _sub(sub, "demo", "train the reference MLP on the bundled digits, hybrid vs plain")
    demo.add_argument("--backend", default="numpy", choices=DEMO_BACKENDS, help="array library to train with")
    demo.add_argument("--steps", type=positive_int, default=600, metavar="N", help="training steps of each run")
    demo.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                      help="seed of the initial weights, the batches and the validation split")
    demo.add_argument("--batch-size", type=positive_int, default=64, metavar="B", help="examples per batch")
    demo.add_argument("--lr", type=positive_float, default=3e-3, metavar="LR", help="Adam's learning rate")
    demo.add_argument("--hidden", type=positive_int, default=64, metavar="H", help="width of the hidden layer")
    demo.add_argument("--jsonl", type=output_path, metavar="PATH",
                      help="write the hybrid run's per-step records as JSON Lines (default: not written)")
    demo.add_argument("--json", type=output_path, metavar="PATH",
                      help="write the comparison table and summary as JSON (default: not written)")
    demo.add_argument("--quiet", action="store_true", help="no progress display")

    bench = _sub(sub, "bench", "the honest benchmark: native baseline, tuned baseline (+ LAWA), "
                               "Schedule-Free (torch) and hybrid, one process; overhead probe and targets")
    bench.add_argument("--task", default="digits-mlp", choices=list(BENCH_TASKS), help="benchmark task")
    bench.add_argument("--backend", default="numpy", choices=sorted({b for bs in BENCH_TASKS.values() for b in bs}),
                       help="array library; each task runs on some: "
                            + "; ".join(f"{t} {', '.join(bs)}" for t, bs in BENCH_TASKS.items()))
    bench.add_argument("--seeds", type=positive_int, default=None, metavar="N",
                       help="number of seeds (default: the task's own)")
    bench.add_argument("--steps", type=positive_int, default=None, metavar="N",
                       help="training steps per run (default: the task's own)")
    bench.add_argument("--dynamics", choices=["rssm", "trend"], default="trend",
                       help="the hybrid run's dynamics model (default: trend, the trainer's default)")
    bench.add_argument("--no-peers", action="store_true",
                       help="quick run: no Schedule-Free sweep and no LAWA curves (default: both)")
    bench.add_argument("--out", type=output_path, metavar="JSON",
                       help="write every run, curve and figure as JSON (default: not written)")
    bench.add_argument("--plot", type=output_path, metavar="PNG",
                       help="draw validation loss against wall-clock and backward passes, needs matplotlib "
                            "(default: not drawn)")
    bench.add_argument("--quiet", action="store_true", help="no progress display")

    ddp = _sub(sub, "bench-ddp", "the cost of the trainer's decision collectives: lm-stdlib under torch DDP on N "
                                 "local gloo processes, interleaved against the plain DDP loop")
    ddp.add_argument("--nproc", type=positive_int, default=2, metavar="N", help="processes (at least 2)")
    ddp.add_argument("--seeds", type=positive_int, default=3, metavar="N", help="seeds")
    ddp.add_argument("--steps", type=positive_int, default=150, metavar="N", help="steps per arm and seed")
    ddp.add_argument("--chunk", type=positive_int, default=25, metavar="K",
                     help="steps per interleaved chunk (divides --steps)")
    ddp.add_argument("--out", type=output_path, metavar="JSON", help="write the figures as JSON (default: not written)")

    conf = _sub(sub, "conformance", "run the conformance suite (needs pytest) on built-in or your cases")
    conf.add_argument("cases", nargs="*", metavar="MODULE:FACTORY",
                      help="factories returning ConformanceCase objects (default: none, the built-in cases)")

    kern = _sub(sub, "bench-kernels", "time each kernel implementation against the unfused per-tensor loop")
    kern.add_argument("--sizes", nargs="+", type=parameter_count, default=["100k", "1m"], metavar="N",
                      help="parameter counts to time, e.g. 10k 1m")
    kern.add_argument("--repeat", type=positive_int, default=5, metavar="K",
                      help="timed calls per row; the median is shown")
    kern.add_argument("--backends", nargs="+", default=list(KERNEL_BACKENDS), choices=list(KERNEL_BACKENDS),
                      help="array libraries to time (missing ones are noted)")
    kern.add_argument("--json", type=output_path, metavar="PATH",
                      help="write the rows and a machine description as JSON (default: not written)")
    kern.add_argument("--axpy-layouts", action="store_true",
                      help="instead of the table above: time in-place axpy on torch for --axpy-total parameters "
                           "split into --axpy-counts tensors (flat buffer, foreach, loop) against one flat add_")
    kern.add_argument("--axpy-total", type=parameter_count, default="10m", metavar="N",
                      help="parameters of --axpy-layouts")
    kern.add_argument("--axpy-counts", nargs="+", type=positive_int, default=[100, 1000, 10000], metavar="K",
                      help="tensor counts of --axpy-layouts")
    kern.add_argument("--threads", type=positive_int, default=None, metavar="T",
                      help="torch intra-op threads for the run (default: torch's own choice)")

    dyn = _sub(sub, "dynamics-eval", "record real training trajectories and score the dynamics models "
                                     "(RSSM vs the trend baseline) on them")
    dyn.add_argument("--task", default="all", choices=DYNAMICS_TASKS, help="trajectory to record and score")
    dyn.add_argument("--steps", type=positive_int, default=None, metavar="N",
                     help="training steps recorded per task (default: digits-mlp 1500, lm-stdlib 2000)")
    dyn.add_argument("--seed", type=non_negative_int, default=0, metavar="S", help="seed of the recorded runs")
    dyn.add_argument("--out", type=output_path, metavar="JSON",
                     help="write every score and the machine description as JSON (default: not written)")
    dyn.add_argument("--quiet", action="store_true", help="no progress display")

    comp = _sub(sub, "fastgrnn-compress", "train the FastGRNN router, prune it (IHT), fine-tune on the support and "
                                           "quantize it to int8; print accuracy and size at each stage")
    comp.add_argument("--data", choices=["digits", "synthetic"], default="digits",
                      help="digits: the bundled digits row by row, 0-4 vs 5-9; synthetic: seeded routing logs")
    comp.add_argument("--windows", type=positive_int, default=4000, metavar="N", help="synthetic windows to generate")
    comp.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                      help="seed of the split, the batches, the teacher and the initial weights")
    comp.add_argument("--epochs", type=positive_int, default=30, metavar="N",
                      help="at most this many epochs of low-rank training (stage 1)")
    comp.add_argument("--iht-epochs", type=positive_int, default=10, metavar="N",
                      help="epochs of iterative hard thresholding (stage 2)")
    comp.add_argument("--finetune-epochs", type=positive_int, default=10, metavar="N",
                      help="at most this many epochs of fine-tuning on the fixed support (stage 3)")
    comp.add_argument("--w-density", type=density, default=0.5, metavar="D", help="share of W1 and of W2 kept")
    comp.add_argument("--u-density", type=density, default=0.5, metavar="D", help="share of U1 and of U2 kept")
    comp.add_argument("--hidden", type=positive_int, default=48, metavar="H", help="FastGRNN hidden units")
    comp.add_argument("--u-rank", type=positive_int, default=16, metavar="R", help="rank of U = U1·U2")
    comp.add_argument("--nonlinearity", choices=["exact", "pwl"], default="exact",
                      help="gates: exact σ/tanh (integer path: interpolated table) or the paper's piecewise-linear")
    comp.add_argument("--out", type=output_dir, default=None, metavar="DIR",
                      help="write router.ckpt, router.fgq (the int8 export), summary.json and compression.json "
                           "there (default: nothing written)")
    comp.add_argument("--json", type=output_path, metavar="PATH",
                      help="write the table and the settings as JSON (default: not written)")
    comp.add_argument("--quiet", action="store_true", help="no progress display")

    plot = _sub(sub, "plot", "draw a run's loss against step and wall-clock, phases shaded")
    plot.add_argument("run", type=input_file, metavar="RUN.jsonl",
                      help="step records: `hybrid-train demo --jsonl`, JSONLLogger, MetricsCollector.to_jsonl")
    plot.add_argument("-o", "--output", type=output_path, default="run.png", metavar="PNG", help="image to write")
    plot.add_argument("--validation", type=input_file, default=None, metavar="VAL.jsonl",
                      help="ValidationLogger rows to draw as a second curve (default: none)")
    plot.add_argument("--metric", default=None, metavar="NAME",
                      help="the validation column to draw (default: value, else loss, else the first number)")
    plot.add_argument("--yscale", choices=["log", "linear"], default="log", help="scale of the loss axis")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """The checks that involve more than one argument (the command's ``parser.error``: exit code 2)."""
    parser: OneLineParser = args.parser
    if args.command == "bench" and args.backend not in BENCH_TASKS[args.task]:
        parser.error(f"argument --backend: task {args.task} runs on {', '.join(BENCH_TASKS[args.task])}, "
                     f"not {args.backend}")
    outputs = [os.path.abspath(v) for k in ("json", "jsonl", "plot", "out", "output") if (v := getattr(args, k, None))]
    same = sorted({p for p in outputs if outputs.count(p) > 1})
    if same:
        parser.error(f"two outputs would write {', '.join(same)}; give each its own path")
    if args.command == "plot" and args.metric is not None and args.validation is None:
        parser.error("argument --metric: names a column of --validation, which is not given")
