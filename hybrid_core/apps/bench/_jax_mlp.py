"""The ``jax-mlp`` task: the digits MLP of ``digits-mlp`` written as a JAX loss over a pytree, trained with optax.

The model is a `JaxModel` over the leaves [W₀, b₀, W₁, b₁] (same sizes, activation, loss and
initial weights as ``digits-mlp``'s `MLP`), the optimizer an `OptaxOptimizer` around
``optax.inject_hyperparams(optax.adam)`` (plain Adam whose learning rate and b1 live in its state,
so the adapter predicts with m̂ like the library's own `Adam`).

The native run (`build_jax_native`, the baseline) is what a JAX user writes: one ``jax.jit``-ed
``train_step(params, opt_state, batch)`` fusing ``jax.value_and_grad``, ``optax.adam(lr).update``
and ``optax.apply_updates``, over the same parameter list and initial weights.

JIT compilation is kept out of the timed steps: the loss is one module-level function and each
learning rate's transformation is built once per process, so every compiled function is shared
between runs, and the first build at a learning rate compiles them on a throw-away model.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = ["build_jax_mlp", "build_jax_native"]

BATCH = 64
WARMUP_STEPS = 40
"""Steps of the untimed throw-away hybrid run that compiles the predicted-step code paths."""


def _loss(params: Any, batch: Any) -> Any:
    import jax
    import jax.numpy as jnp

    w0, b0, w1, b1 = params
    x, y = batch
    logits = jnp.tanh(x @ w0 + b0) @ w1 + b1
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


@functools.cache
def _transformation(lr: float) -> Any:
    import optax

    return optax.inject_hyperparams(optax.adam)(learning_rate=lr)


def _initial(seed: int) -> list[Any]:
    import jax.numpy as jnp

    from hybrid_core.models import MLP

    return [jnp.asarray(p) for p in MLP([64, 64, 10], seed=seed).parameters()]


_compiled: set[float] = set()


def _compile(lr: float, batch: Any, val: Any) -> None:
    """Run every jitted path once at this learning rate (real steps, predicted steps, losses), untimed."""
    from hybrid_core import HybridConfig, HybridTrainer
    from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer

    if lr in _compiled:
        return
    model = JaxModel(_loss, _initial(0))
    optimizer = OptaxOptimizer(model, _transformation(lr))
    model.loss(val).block_until_ready()
    optimizer.step(model.loss_and_grad(batch(0))[1])
    optimizer.extrapolate()
    short = HybridConfig(warmup_steps=5, min_full_steps=5, max_predict_steps=10, check_interval=3,
                         horizon_arms=(0, 5, 10))
    model = JaxModel(_loss, _initial(0))
    trainer = HybridTrainer(model, OptaxOptimizer(model, _transformation(lr)), short)
    for step in range(WARMUP_STEPS):
        trainer.step(batch(step))
    _compiled.add(lr)


def _data(seed: int, split: Any) -> tuple[Any, Any]:
    """(batch(step), validation batch) as JAX arrays; each batch is ready before the timer starts."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(split.x_train, dtype=jnp.float32)
    y = jnp.asarray(split.y_train)
    val = (jnp.asarray(split.x_val, dtype=jnp.float32), jnp.asarray(split.y_val))
    n = split.y_train.shape[0]

    def batch(step: int) -> Any:
        rng = np.random.default_rng(seed * 1_000_003 + step)
        idx = jnp.asarray(rng.choice(n, size=BATCH, replace=False))
        return jax.block_until_ready((jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0)))

    return batch, val


@functools.cache
def _native_step(lr: float) -> tuple[Any, Any, Any]:
    """(optax.adam(lr), the jitted train_step, the jitted loss): built once per learning rate and process."""
    import jax
    import optax

    tx = optax.adam(lr)

    @jax.jit
    def train_step(params: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, Any]:
        loss, grads = jax.value_and_grad(_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, train_step, jax.jit(_loss)


def build_jax_native(seed: int, lr: float, split: Any) -> tuple[Any, Any, Any, Any, str, Any, Any]:
    """(step(batch), batch(step), validate(), sync(), loop, parameters(), validate_at(params)) of the native JAX
    loop, compiled before any timed step. ``parameters`` returns the current (immutable) parameter list;
    ``validate_at`` is the jitted validation loss at any parameter list of the same shapes."""
    import jax

    batch, val = _data(seed, split)
    tx, train_step, loss = _native_step(lr)
    state = {"params": _initial(seed)}
    state["opt"] = tx.init(state["params"])
    jax.block_until_ready(train_step(state["params"], state["opt"], batch(0)))  # compile (pure: discarded)
    loss(state["params"], val).block_until_ready()

    def step(b: Any) -> None:
        state["params"], state["opt"], _ = train_step(state["params"], state["opt"], b)

    def validate() -> float:
        return float(jax.device_get(loss(state["params"], val)))

    def sync() -> None:
        jax.block_until_ready(state["params"])

    def validate_at(params: Any) -> float:
        return float(jax.device_get(loss(list(params), val)))

    return (step, batch, validate, sync,
            "jax: one jax.jit-ed train_step(params, opt_state, batch) fusing jax.value_and_grad, "
            "optax.adam(lr).update and optax.apply_updates, over the parameter list [W0, b0, W1, b1]",
            lambda: state["params"], validate_at)


def build_jax_mlp(seed: int, lr: float, split: Any) -> tuple[Any, Any, Any, Any, Any]:
    """(model, optimizer, batch(step), validate(), sync()) for one run on the CPU.

    ``sync`` waits for the parameters: JAX dispatches asynchronously, so without it a timed step
    would measure only the dispatch and the work would land in the (untimed) evaluation.
    """
    import jax

    from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer

    batch, val = _data(seed, split)
    _compile(lr, batch, val)
    model = JaxModel(_loss, _initial(seed))
    optimizer = OptaxOptimizer(model, _transformation(lr))

    def validate() -> float:
        return float(jax.device_get(model.loss(val)))

    def sync() -> None:
        jax.block_until_ready(model.parameters())

    return model, optimizer, batch, validate, sync
