"""The `hybrid-train` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hybrid_core import ConfigError, HybridError

from ._cliargs import build_parser, check_args

__all__ = ["build_parser", "main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, load_backend, run_demo

    load_backend(args.backend)  # BackendError (exit code 1) before anything runs when it is not installed
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

    if args.plot:
        from .plot import require_matplotlib

        require_matplotlib()
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
    from hybrid_core.dynamics import RSSMDynamics

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
        plot(doc, args.plot)
        print(f"wrote {args.plot}")
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


def _fastgrnn_compress(args: argparse.Namespace) -> int:
    from .data import sequential_digits
    from .router import CompressConfig, RouterConfig, compress_router, format_stages, routing_logs, train_router

    x, y = sequential_digits() if args.data == "digits" else routing_logs(args.windows, seed=args.seed)
    config = RouterConfig(hidden_size=args.hidden, u_rank=args.u_rank, epochs=args.epochs, seed=args.seed,
                          nonlinearity=args.nonlinearity)
    compress = CompressConfig(w_density=args.w_density, u_density=args.u_density, iht_epochs=args.iht_epochs,
                              finetune_epochs=args.finetune_epochs)
    print(f"hybrid-train fastgrnn-compress: {args.data} ({x.shape[0]} windows of {x.shape[1]} x {x.shape[2]}), "
          f"FastGRNN H={args.hidden} rank(U)={args.u_rank} {args.nonlinearity} gates, seed {args.seed}; "
          f"densities W {args.w_density:g} U {args.u_density:g}", flush=True)
    trained = train_router(x, y, config, out_dir=args.out, progress=not args.quiet)
    result = compress_router(trained, x, y, compress, hybrid=config.hybrid, batch_size=config.batch_size,
                             lr_decay=config.lr_decay, seed=args.seed, out_dir=args.out, progress=not args.quiet)
    print()
    print(format_stages(result.stages))
    if args.out:
        print(f"wrote {args.out}/router.fgq ({result.stages[-1]['file_bytes']} bytes) and {args.out}/compression.json")
    if args.json:
        from dataclasses import asdict

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"router": asdict(config), "compress": asdict(compress), **result.to_dict()}, f, indent=1,
                      default=str)
        print(f"wrote {args.json}")
    return 0


def _bench_ddp(args: argparse.Namespace) -> int:
    from .bench.ddp import main as ddp_main

    if args.nproc < 2 or args.steps % args.chunk:
        args.parser.error("--nproc must be at least 2 and --chunk must divide --steps")
    argv = ["--nproc", str(args.nproc), "--seeds", str(args.seeds), "--steps", str(args.steps),
            "--chunk", str(args.chunk)] + (["--out", str(args.out)] if args.out else [])
    return ddp_main(argv)


def _plot(args: argparse.Namespace) -> int:
    from .plot import plot_run, require_matplotlib

    require_matplotlib()
    drawn = plot_run(args.run, args.output, args.validation, args.metric, args.yscale)
    print(f"wrote {args.output}: {drawn['losses']} losses of {drawn['steps']} steps, {drawn['spans']} phase spans"
          + (f", {drawn['validation_points']} validation points" if args.validation else ""))
    return 0


COMMANDS = {"demo": _demo, "bench": _bench, "conformance": _conformance, "bench-kernels": _bench_kernels,
            "bench-ddp": _bench_ddp, "dynamics-eval": _dynamics_eval, "fastgrnn-compress": _fastgrnn_compress,
            "plot": _plot}
"""The function of each subcommand."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hybrid-train`; returns the exit code.

    0 on success; 2 on a usage error (one line on stderr, before any work: see `_cliargs`) or a
    `ConfigError`; 1 on any other failure the library reports (`HybridError`) or an error of the
    file system, printed as one line with a hint; 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args)
    prog = args.parser.prog
    try:
        return int(COMMANDS[args.command](args))
    except HybridError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    except OSError as err:
        print(f"{prog}: error: {err} (hint: check the path and the free space)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def one_line(err: HybridError) -> str:
    """The error's message and recovery hint on one line."""
    what = "; ".join(err.problems) if isinstance(err, ConfigError) else err.message
    return " ".join(f"{what} (hint: {err.recovery})".split())


if __name__ == "__main__":
    raise SystemExit(main())
