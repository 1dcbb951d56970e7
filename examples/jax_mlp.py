"""A JAX MLP on the bundled digits, trained by HybridTrainer through the JAX adapter with optax.adam.

Run: python examples/jax_mlp.py [--steps 600] [--seed 0] [--lr 3e-3] [--hidden 64] [--batch-size 64]

`JaxModel` wraps a loss over a parameter pytree (jitted), `OptaxOptimizer` an optax
transformation. ``optax.inject_hyperparams`` puts the learning rate in the optax
state, so the trainer can read and set it. A plain optax loop on the same batches
from the same weights is the comparison.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_core import HybridConfig, HybridTrainer
from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer
from hybrid_core.apps.data import split_digits


def cross_entropy(params: dict[str, jax.Array], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Softmax cross-entropy of a one-hidden-layer ReLU MLP: ``loss_fn(params, batch) -> scalar``."""
    x, y = batch
    logits = jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def init_params(hidden: int, seed: int) -> dict[str, jax.Array]:
    """He-initialised weights, zero biases (float32)."""
    rng = np.random.default_rng(seed)
    return {"w1": jnp.asarray(rng.normal(0, np.sqrt(2 / 64), (64, hidden)), dtype=jnp.float32),
            "b1": jnp.zeros(hidden, dtype=jnp.float32),
            "w2": jnp.asarray(rng.normal(0, np.sqrt(2 / hidden), (hidden, 10)), dtype=jnp.float32),
            "b2": jnp.zeros(10, dtype=jnp.float32)}


def plain_run(params: dict[str, jax.Array], batches: list[tuple[jax.Array, jax.Array]], lr: float
              ) -> tuple[dict[str, jax.Array], float]:
    """An ordinary jitted optax.adam loop over ``batches``; the final parameters and its wall-clock seconds."""
    tx = optax.adam(lr)

    @jax.jit
    def step(params: dict[str, jax.Array], state: optax.OptState, batch: tuple[jax.Array, jax.Array]) -> tuple:
        grads = jax.grad(cross_entropy)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    start = time.perf_counter()
    for batch in batches:
        params, state = step(params, state, batch)
    jax.block_until_ready(params)
    return params, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Train hybrid and plain, then print the hybrid run's metrics and the validation losses."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights and batches")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units (default 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    args = parser.parse_args(argv)
    if min(args.steps, args.hidden, args.batch_size) < 1 or args.lr <= 0:
        parser.error("--steps, --hidden and --batch-size must be >= 1 and --lr > 0")

    split = split_digits(seed=args.seed)
    x_train = jnp.asarray(split.x_train, dtype=jnp.float32)
    y_train = jnp.asarray(split.y_train)
    val = (jnp.asarray(split.x_val, dtype=jnp.float32), jnp.asarray(split.y_val))
    rng = np.random.default_rng(args.seed)
    batches = []
    for _ in range(args.steps):
        idx = rng.choice(len(split.y_train), size=args.batch_size, replace=False)
        batches.append((x_train[idx], y_train[idx]))
    initial = init_params(args.hidden, args.seed)

    model = JaxModel(cross_entropy, initial)
    optimizer = OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=args.lr))
    config = HybridConfig(warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10)
    trainer = HybridTrainer(model, optimizer, config)
    summary = trainer.fit(batches, progress=False)
    plain, plain_seconds = plain_run(initial, batches, args.lr)

    print("steps per phase:", summary["steps_per_phase"])
    print(f"backward passes: {summary['backward_passes']} of {summary['steps']} steps "
          f"({summary['backward_passes_skipped']} skipped) in {summary['wall_seconds']:.2f} s")
    print("events:", summary["events"])
    print(f"final validation loss: hybrid {float(model.loss(val)):.4f} vs plain "
          f"{float(cross_entropy(plain, val)):.4f} (plain optax loop: {plain_seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
