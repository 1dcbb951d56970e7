"""The `hybrid-train` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hybrid_core import HybridError
from hybrid_core.dynamics import RSSMDynamics

from .demo import BACKENDS as DEMO_BACKENDS
from .kernels_bench import BACKENDS as KERNEL_BACKENDS

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    print(f"hybrid-train demo: reference MLP (64-{args.hidden}-10, Adam lr {args.lr}) on the bundled digits, "
          f"backend {args.backend}, {args.steps} steps, seed {args.seed}", flush=True)
    rows, trainer = run_demo(args.backend, args.steps, args.seed, args.batch_size, args.lr, args.hidden,
                             progress=not args.quiet)
    print()
    print(format_table(rows))
    hybrid, plain = rows[0], rows[2]
    skipped = hybrid.steps - hybrid.backward_passes
    summary = trainer.summary()
    events = summary["events"]
    lr = summary["lr"]
    print()
    if lr["recommend"]:
        changes = ", ".join(f"step {s}: x{m:.3g} ({why})" for s, m, why in lr["history"])
        print(f"learning rate: x{lr['multiplier']:.3g} the given {lr['base']:g} = {lr['lr']:.3g} "
              f"({changes or 'no change'})")
    else:
        print(f"learning rate: the given one; recommendation off ({lr['off_because']})")
    readout = summary["readout"]
    print(f"evaluated weights: {hybrid.weights} (read-outs kept: {', '.join(readout['kinds']) or 'none'}; "
          f"mean loss difference to the raw weights on the trainer's checks: "
          + ", ".join(f"{k} {v:+.4f}" for k, v in readout["mean_diff_vs_raw"].items() if v is not None) + ")")
    print(f"backward passes skipped: {skipped} of {hybrid.steps} ({100 * skipped / hybrid.steps:.1f}%); "
          f"forward checks {events.get('checks', 0)}, failed {events.get('checks_failed', 0)}, "
          f"rollbacks {events.get('rollbacks', 0)}, probes {events.get('probes', 0)}")
    print(f"final validation loss: hybrid {hybrid.val_loss:.4f} vs plain {plain.val_loss:.4f} (same steps) "
          f"vs {rows[3].val_loss:.4f} (same backward passes)")
    print("Wall-clock here is not a speed claim: speed is only claimed through `hybrid-train bench`, "
          "whose protocol and results are in docs/benchmarks.md.")
    if args.jsonl:
        n = trainer.metrics.to_jsonl(args.jsonl)
        print(f"wrote {n} step records to {args.jsonl}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": [r._asdict() for r in rows], "summary": trainer.summary()}, f, indent=2)
        print(f"wrote the table to {args.json}")
    return 0


def _conformance(args: argparse.Namespace) -> int:
    import pytest

    extra = [arg for spec in args.cases for arg in ("--hybrid-case", spec)]
    return int(pytest.main(["--pyargs", "hybrid_core.conformance", "-q", "-p", "no:cacheprovider", *extra]))


def _bench(args: argparse.Namespace) -> int:
    import shlex

    from .bench import format_table, run_benchmark, summarize
    from .bench._peers import schedulefree_available
    from .bench._report import plot
    from .bench._tasks import get_task

    task = get_task(args.task)
    seeds = list(range(args.seeds or task.seeds))
    command = "hybrid-train " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else (
        f"hybrid-train bench --task {args.task} --backend {args.backend} --seeds {len(seeds)} "
        f"--steps {args.steps or task.steps} --dynamics {args.dynamics}" + (" --no-peers" if args.no_peers else ""))
    peers = "no peers" if args.no_peers else "each also read out through LAWA" + (
        ", Schedule-Free AdamW (lr x0.5/x1/x2/x4 of 0.0025)"
        if task.has_schedulefree(args.backend) and schedulefree_available() else "")
    print(f"{task.name}: {task.description}; backend {args.backend}; native baseline, tuned native baseline "
          f"(lr x0.5/x1/x2/x4; {peers}) and hybrid, {len(seeds)} seed(s), one process", flush=True)
    # None: the trainer's default, TrendDynamics.
    dynamics = (lambda: RSSMDynamics(seed=0)) if args.dynamics == "rssm" else None
    results = run_benchmark(task, args.backend, seeds, args.steps, progress=not args.quiet, dynamics=dynamics,
                            peers=not args.no_peers)
    doc = summarize(results, task.name, args.backend, args.steps or task.steps, command, args.dynamics,
                    task.eval_every)
    print(format_table(doc))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {args.plot}" if plot(doc, args.plot) else "no plot: matplotlib is not installed")
    return 0


def _bench_kernels(args: argparse.Namespace) -> int:
    from .kernels_bench import format_layouts, format_table, run_axpy_layouts, run_bench, write_json

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.axpy_layouts:
        import torch

        print(f"hybrid-train bench-kernels --axpy-layouts: {args.axpy_total} float32 torch parameters as "
              f"{', '.join(map(str, args.axpy_counts))} equal tensors, {torch.get_num_threads()} torch thread(s), "
              f"median of {args.repeat} interleaved rounds; limit = one add_ on one flat buffer", flush=True)
        layouts = run_axpy_layouts(args.axpy_total, args.axpy_counts, args.repeat)
        print(format_layouts(layouts))
        if args.json:
            write_json(args.json, [], [], args.repeat, layouts)
            print(f"wrote {len(layouts)} layout rows to {args.json}")
        return 0
    print(f"hybrid-train bench-kernels: sizes {' '.join(args.sizes)}, median of {args.repeat}, "
          f"backends {' '.join(args.backends)}; baseline = the reference (unfused per-tensor loop)", flush=True)
    rows, notes = run_bench(args.sizes, args.repeat, args.backends)
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        write_json(args.json, rows, notes, args.repeat)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


def _dynamics_eval(args: argparse.Namespace) -> int:
    from .dynamics_eval import DEFAULT_STEPS, TASK_BACKENDS, format_table, run_dynamics_eval

    tasks = list(TASK_BACKENDS) if args.task == "all" else [args.task]
    command = f"hybrid-train dynamics-eval --task {args.task} --seed {args.seed}" + (
        f" --steps {args.steps}" if args.steps else "")
    budget = ", ".join(f"{t} {args.steps or DEFAULT_STEPS[t]} steps ({TASK_BACKENDS[t]})" for t in tasks)
    print(f"hybrid-train dynamics-eval: record plain training ({budget}), seed {args.seed}; score RSSMDynamics "
          "(5 members) and TrendDynamics on each trajectory", flush=True)
    doc = run_dynamics_eval(tasks, args.steps, args.seed, progress=not args.quiet, command=command)
    print(format_table(doc))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `hybrid-train`."""
    parser = argparse.ArgumentParser(
        prog="hybrid-train",
        description="Train with fewer backward passes by predicting some training steps.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the reference MLP on the bundled digits, hybrid vs plain")
    demo.add_argument("--backend", default="numpy", choices=list(DEMO_BACKENDS))
    demo.add_argument("--steps", type=_positive_int, default=600)
    demo.add_argument("--seed", type=_non_negative_int, default=0)
    demo.add_argument("--batch-size", type=_positive_int, default=64)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--hidden", type=_positive_int, default=64)
    demo.add_argument("--jsonl", metavar="PATH", help="write the hybrid run's per-step records (JSON Lines)")
    demo.add_argument("--json", metavar="PATH", help="write the comparison table as JSON")
    demo.add_argument("--quiet", action="store_true", help="no progress lines")
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="the honest benchmark: native baseline, tuned baseline (+ LAWA), "
                                        "Schedule-Free (torch) and hybrid, one process; overhead probe and targets")
    bench.add_argument("--task", default="digits-mlp")
    bench.add_argument("--backend", default="numpy")
    bench.add_argument("--seeds", type=_positive_int, default=None, help="number of seeds (task default)")
    bench.add_argument("--steps", type=_positive_int, default=None, help="training steps per run (task default)")
    bench.add_argument("--dynamics", choices=["rssm", "trend"], default="trend",
                       help="the hybrid run's dynamics model (default: trend, the trainer's default)")
    bench.add_argument("--no-peers", action="store_true",
                       help="quick run: no Schedule-Free sweep and no LAWA curves (default: both)")
    bench.add_argument("--out", metavar="JSON")
    bench.add_argument("--plot", metavar="PNG")
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(func=_bench)
    conf = sub.add_parser("conformance", help="run the conformance suite (needs pytest) on built-in or your cases")
    conf.add_argument("cases", nargs="*", metavar="MODULE:FACTORY",
                      help="factories returning ConformanceCase objects; none = the built-in cases")
    conf.set_defaults(func=_conformance)
    kern = sub.add_parser("bench-kernels", help="time each kernel implementation against the unfused per-tensor loop")
    kern.add_argument("--sizes", nargs="+", default=["100k", "1m"], metavar="N",
                      help="parameter counts to time, e.g. 10k 1m (default: 100k 1m)")
    kern.add_argument("--repeat", type=_positive_int, default=5, help="timed calls per row; the median is shown")
    kern.add_argument("--backends", nargs="+", default=list(KERNEL_BACKENDS), choices=list(KERNEL_BACKENDS),
                      help="array libraries to time (missing ones are noted)")
    kern.add_argument("--json", metavar="PATH", help="write the rows and a machine description as JSON")
    kern.add_argument("--axpy-layouts", action="store_true",
                      help="instead of the table above: time in-place axpy on torch for --axpy-total parameters "
                           "split into --axpy-counts tensors (flat buffer, foreach, loop) against one flat add_")
    kern.add_argument("--axpy-total", default="10m", metavar="N", help="parameters of --axpy-layouts (default 10m)")
    kern.add_argument("--axpy-counts", nargs="+", type=_positive_int, default=[100, 1000, 10000], metavar="K",
                      help="tensor counts of --axpy-layouts (default: 100 1000 10000)")
    kern.add_argument("--threads", type=_positive_int, default=None,
                      help="torch intra-op threads for the run (default: torch's own choice)")
    kern.set_defaults(func=_bench_kernels)
    dyn = sub.add_parser("dynamics-eval", help="record real training trajectories and score the dynamics models "
                                               "(RSSM vs the trend baseline) on them")
    dyn.add_argument("--task", default="all", choices=["digits-mlp", "lm-stdlib", "all"])
    dyn.add_argument("--steps", type=_positive_int, default=None,
                     help="training steps recorded per task (default: digits-mlp 1500, lm-stdlib 2000)")
    dyn.add_argument("--seed", type=_non_negative_int, default=0)
    dyn.add_argument("--out", metavar="JSON", help="write every score and the machine description as JSON")
    dyn.add_argument("--quiet", action="store_true", help="no progress lines")
    dyn.set_defaults(func=_dynamics_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hybrid-train`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except HybridError as err:
        print(f"hybrid-train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hybrid-train: interrupted", file=sys.stderr)
        return 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
