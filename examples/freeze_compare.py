"""Layer freezing against the default trainer on the lm tasks: time to the plain-Adam baseline's final loss.

Per seed, in one process, four runs advance together, 10 steps each in turn with the order reversed every
block (as `hybrid-train bench` does): the native torch loop at the task's rate (its final validation loss
is the target), the hybrid trainer with the task's default config (``layer_freeze="off"``), the same with
``layer_freeze="autofreeze"`` (the model's default groups: one per top-level child of the module), and,
with ``--per-layer``, autofreeze over finer groups (embedding, each transformer layer, norm + head).
Validation runs every 10 steps, untimed, on the hybrid trainer's read-out weights. Prints one line per
seed and the median [min–max] of the time-to-target of each run and of the ratio off / freeze.

    python examples/freeze_compare.py --task lm-finetune --seeds 0 1 2 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from hybrid_core import HybridConfig, HybridTrainer
from hybrid_core.apps.bench._report import time_to_target
from hybrid_core.apps.bench._runner import RUN_BLOCK_STEPS, RunResult, _native, _Run, warm_process
from hybrid_core.apps.bench._tasks import TaskSetup, get_task

LAYER_GROUPS = [["position", "embed.weight"], ["blocks.layers.0"], ["blocks.layers.1"], ["norm", "head"]]
"""The finer groups of the lm tasks' TinyTransformer, by name prefix."""


def _per_layer_setup(task_name: str, seed: int, lr: float) -> TaskSetup:
    import torch

    from hybrid_core.adapters.torch import TorchModel, TorchOptimizer
    from hybrid_core.apps.bench._finetune import finetune_module_and_data
    from hybrid_core.apps.bench._lm import loss_fn, module_and_data

    module, batch, val = (finetune_module_and_data if task_name == "lm-finetune" else module_and_data)(seed)
    names = [n for n, _ in module.named_parameters()]
    groups = [[n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)] for prefixes in LAYER_GROUPS]
    model = TorchModel(module, loss_fn, groups=groups)
    optimizer = TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=lr))
    return TaskSetup(model, optimizer, batch, lambda: float(model.loss(val)), None, "per-layer groups")


def _hybrid(kind: str, setup: TaskSetup, seed: int, lr: float, steps: int, eval_every: int,
            config: HybridConfig, out: dict[str, Any]) -> _Run:
    trainer = HybridTrainer(setup.model, setup.optimizer, config)

    def step(i: int, b: Any) -> tuple[str, bool]:
        r = trainer.step(b)
        return r.phase.value, r.backward

    def validate() -> float:
        with trainer.evaluation_parameters():
            return setup.validate()

    def on_end() -> None:
        summary = trainer.summary()
        out[kind] = {"freeze": summary["freeze"], "lr_multiplier": summary["lr"]["multiplier"],
                     "events": {k: v for k, v in summary["events"].items() if "freeze" in k}}

    return _Run(RunResult(seed, kind, lr, loop=setup.loop), setup.batch, step, validate, setup.sync, steps,
                eval_every, trainer.flush, on_end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="lm-finetune", choices=["lm-finetune", "lm-stdlib"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--per-layer", action="store_true", help="also run autofreeze over per-layer groups")
    parser.add_argument("--json", default=None, help="write every curve and summary here")
    args = parser.parse_args()
    task = get_task(args.task)
    steps = task.steps if args.steps is None else args.steps
    configs = {"off": task.config, "freeze": task.config.replace(layer_freeze="autofreeze")}
    warm_process(task, "torch", task.config, None, False)
    rows, doc = [], []
    for n, seed in enumerate(args.seeds):
        info: dict[str, Any] = {}
        runs = {"baseline": _native(task.native_setup("torch", seed, task.lr), "baseline", seed, task.lr, steps,
                                    task.eval_every)}
        for kind, config in configs.items():
            runs[kind] = _hybrid(kind, task.setup("torch", seed, task.lr), seed, task.lr, steps, task.eval_every,
                                 config, info)
        if args.per_layer:
            runs["freeze_layers"] = _hybrid("freeze_layers", _per_layer_setup(args.task, seed, task.lr), seed,
                                            task.lr, steps, task.eval_every, configs["freeze"], info)
        order = list(runs.values())
        order = order[::-1] if n % 2 else order
        for block in range(-(-steps // RUN_BLOCK_STEPS)):
            for run in order if block % 2 == 0 else order[::-1]:
                run.advance(RUN_BLOCK_STEPS)
        target = runs["baseline"].result.final_val
        ttt = {k: time_to_target(r.result, target) for k, r in runs.items()}
        row = {"seed": seed, "target": target, "ttt_s": {k: None if v is None else v[0] for k, v in ttt.items()},
               "final_val": {k: r.result.final_val for k, r in runs.items()},
               "wall_s": {k: r.result.curve[-1][0] for k, r in runs.items()}, "hybrid": info}
        rows.append(row)
        doc.append({**row, "curves": {k: r.result.curve for k, r in runs.items()}})
        print(json.dumps(row), flush=True)
    kinds = [k for k in rows[0]["ttt_s"] if k != "baseline"]
    print(f"\n{args.task}: time to the baseline's final validation loss (s), median [min–max] over seeds "
          f"{args.seeds}; None = never reached")
    for kind in ["baseline", *kinds]:
        print(f"  {kind:14s} {_stat([r['ttt_s'][kind] for r in rows])}   "
              f"final val {_stat([r['final_val'][kind] for r in rows], 4)}")
    for kind in [k for k in kinds if k != "off"]:
        ratios = [None if r["ttt_s"][kind] is None or r["ttt_s"]["off"] is None else
                  r["ttt_s"]["off"] / r["ttt_s"][kind] for r in rows]
        print(f"  speed-up off/{kind}: {_stat(ratios, 3)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f)


def _stat(values: list[float | None], digits: int = 2) -> str:
    got = [v for v in values if v is not None]
    missing = len(values) - len(got)
    if not got:
        return f"none reached ({missing} seeds)"
    text = f"{statistics.median(got):.{digits}f} [{min(got):.{digits}f}–{max(got):.{digits}f}]"
    return text + (f" ({missing} seed(s) never)" if missing else "")


if __name__ == "__main__":
    main()
