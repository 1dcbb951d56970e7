"""Overhead of the Equinox and Flax NNX integrations against each framework's own jitted optax loop.

    python docs/bench/jax_integrations.py --seeds 5 --steps 300 --rounds 3 --out docs/bench/jax-integrations.json

Per seed and model (an MLP 64-256-256-10 on digits-shaped data, batch 128, ``optax.chain(clip_by_global_norm(1.0),
adamw(warmup_cosine))``), three runs of ``--steps`` steps, in a rotating order (interleaved, one process):

- ``plain``: what the framework's user writes. Equinox: ``eqx.filter_jit`` around ``eqx.filter_value_and_grad``,
  ``tx.update`` and ``eqx.apply_updates`` (the Equinox documentation's loop). NNX: ``nnx.split`` once, then a
  ``jax.jit``-ed step over (params, rest, opt_state) that ``nnx.merge``-s inside (NNX's fast functional loop).
  Neither reads the loss during the run (one ``block_until_ready`` at the end).
- ``full``: `HybridTrainer` with prediction off (``horizon_arms=(0,)``, ``idle_after=0``): every step is a real
  step with the trainer's bookkeeping, so the ratio to ``plain`` is the integration's per-step overhead.
- ``hybrid``: `HybridTrainer` with the default config (it may predict, or idle when predicting cannot pay).

An untimed run of each kind compiles first; then ``--rounds`` rounds each time all three (who goes first rotating),
and a seed's figure per kind is the median over its rounds. Ratios (run / plain) are taken per seed; reported:
median [min–max] over seeds of the per-step wall-clock and of the ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hybrid_core import HybridConfig, HybridTrainer
from hybrid_core.adapters.jax import EquinoxModel, NNXModel, OptaxOptimizer

SIZES = (64, 256, 256, 10)
BATCH = 128
FULL_ONLY = HybridConfig(horizon_arms=(0,), idle_after=0, max_full_steps=10**6)


def _data(seed: int, steps: int) -> list[tuple[jax.Array, jax.Array]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(SIZES[-1], SIZES[0]))
    out = []
    for _ in range(steps):
        y = rng.integers(0, SIZES[-1], size=BATCH)
        out.append((jnp.asarray(centres[y] + rng.normal(size=(BATCH, SIZES[0])), jnp.float32), jnp.asarray(y)))
    return out


@functools.cache
def _tx() -> Any:
    """One transformation per process: every run (plain or not) shares its compiled code, as a user's would."""
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, 2000, 3e-4)))


def _xent(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def eqx_loss(module: Any, batch: Any) -> jax.Array:
    return _xent(jax.vmap(module)(batch[0]), batch[1])


def nnx_loss(module: Any, batch: Any) -> jax.Array:
    return _xent(module(batch[0]), batch[1])


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l0 = nnx.Linear(SIZES[0], SIZES[1], rngs=rngs)
        self.l1 = nnx.Linear(SIZES[1], SIZES[2], rngs=rngs)
        self.l2 = nnx.Linear(SIZES[2], SIZES[3], rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(jnp.tanh(self.l1(jnp.tanh(self.l0(x)))))


def _eqx_module(seed: int) -> Any:
    return eqx.nn.MLP(SIZES[0], SIZES[-1], SIZES[1], 2, activation=jnp.tanh, key=jax.random.PRNGKey(seed))


@eqx.filter_jit
def _eqx_step(model: Any, opt_state: Any, batch: Any) -> Any:
    loss, grads = eqx.filter_value_and_grad(eqx_loss)(model, batch)
    updates, opt_state = _tx().update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state, loss


@functools.partial(jax.jit, static_argnums=0)
def _nnx_step(graphdef: Any, params: Any, rest: Any, opt_state: Any, batch: Any) -> Any:
    loss, grads = jax.value_and_grad(lambda p: nnx_loss(nnx.merge(graphdef, p, rest), batch))(params)
    updates, opt_state = _tx().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _plain_eqx(seed: int, data: list[Any]) -> float:
    model = _eqx_module(seed)
    opt_state = _tx().init(eqx.filter(model, eqx.is_inexact_array))
    start = time.perf_counter()
    for batch in data:
        model, opt_state, loss = _eqx_step(model, opt_state, batch)
    jax.block_until_ready((model, loss))
    return time.perf_counter() - start


def _plain_nnx(seed: int, data: list[Any]) -> float:
    graphdef, params, rest = nnx.split(Net(nnx.Rngs(seed)), nnx.Param, ...)
    opt_state = _tx().init(params)
    start = time.perf_counter()
    for batch in data:
        params, opt_state, loss = _nnx_step(graphdef, params, rest, opt_state, batch)
    jax.block_until_ready((params, loss))
    return time.perf_counter() - start


def _trainer(kind: str, seed: int, data: list[Any], config: HybridConfig) -> tuple[float, dict[str, Any]]:
    model = EquinoxModel(eqx_loss, _eqx_module(seed)) if kind == "equinox" else NNXModel(nnx_loss, Net(nnx.Rngs(seed)))
    trainer = HybridTrainer(model, OptaxOptimizer(model, _tx()), config)
    start = time.perf_counter()
    summary = trainer.fit(lambda i: data[i], max_steps=len(data), progress=False)
    jax.block_until_ready(model.parameters())
    return time.perf_counter() - start, summary


def run(seeds: int, steps: int, rounds: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for seed in range(seeds):
        data = _data(seed, steps)
        for kind in ("equinox", "nnx"):
            plain = _plain_eqx if kind == "equinox" else _plain_nnx
            runs = {"plain": lambda s=seed, d=data, p=plain: (p(s, d), None),
                    "full": lambda s=seed, d=data, k=kind: _trainer(k, s, d, FULL_ONLY),
                    "hybrid": lambda s=seed, d=data, k=kind: _trainer(k, s, d, HybridConfig())}
            for name in runs:
                runs[name]()  # untimed: compiles (the trainer's code paths too)
            times: dict[str, list[float]] = {name: [] for name in runs}
            for r in range(rounds):  # each round runs all three, who goes first rotating
                shift = (seed + r) % 3
                for name in list(runs)[shift:] + list(runs)[:shift]:
                    seconds, summary = runs[name]()
                    times[name].append(seconds)
                    if summary is not None and name == "hybrid":
                        predicted = summary["steps_per_phase"]["predict"]
            rows.append({"seed": seed, "model": kind, "steps": steps, "rounds": rounds, "ms_per_step": {
                k: 1e3 * statistics.median(v) / steps for k, v in times.items()}, "hybrid_predicted_steps": predicted})
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "summary": _summary(rows), "jax": jax.__version__, "equinox": eqx.__version__,
            "flax": __import__("flax").__version__, "optax": optax.__version__}


def _spread(values: list[float]) -> list[float]:
    return [statistics.median(values), min(values), max(values)]


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for kind in ("equinox", "nnx"):
        mine = [r["ms_per_step"] for r in rows if r["model"] == kind]
        out[kind] = {"plain_ms": _spread([m["plain"] for m in mine]), "full_ms": _spread([m["full"] for m in mine]),
                     "hybrid_ms": _spread([m["hybrid"] for m in mine]),
                     "full_over_plain": _spread([m["full"] / m["plain"] for m in mine]),
                     "hybrid_over_plain": _spread([m["hybrid"] / m["plain"] for m in mine])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each kind per seed (median taken)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    doc = run(args.seeds, args.steps, args.rounds)
    print(json.dumps(doc["summary"], indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
