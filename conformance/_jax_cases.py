"""Built-in cases for JAX as its users write it: an Equinox module, a Flax NNX module, and an optax chain
with a learning-rate schedule (``clip_by_global_norm`` then ``adamw(schedule)``), each skipped with the
reason when its library is missing."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from hybrid_core.conformance._case import ConformanceCase

__all__ = ["jax_library_cases"]


def _reason(*modules: str) -> str | None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module} is not installed ({exc})"
    return None


def _batches(seed: int) -> Iterator[Any]:
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, 12))
    while True:
        y = rng.integers(0, 4, size=32)
        yield jnp.asarray((centers[y] + 0.7 * rng.normal(size=(32, 12))).astype(np.float32)), jnp.asarray(y)


def _xent(logits: Any, y: Any) -> Any:
    import jax
    import jax.numpy as jnp

    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def _eqx_loss(module: Any, batch: Any) -> Any:
    import jax

    return _xent(jax.vmap(module)(batch[0]), batch[1])


def _nnx_loss(module: Any, batch: Any) -> Any:
    return _xent(module(batch[0]), batch[1])


def _pytree_loss(params: Any, batch: Any) -> Any:
    import jax.numpy as jnp

    hidden = jnp.tanh(batch[0] @ params["0_w"] + params["0_b"])
    return _xent(hidden @ params["1_w"] + params["1_b"], batch[1])


def _adam(model: Any) -> Any:
    import optax

    from hybrid_core.adapters.jax import OptaxOptimizer

    return OptaxOptimizer(model, optax.adam(1e-2))  # the learning rate and b1 found inside it


def _equinox_case() -> ConformanceCase:
    def make_model(seed: int) -> Any:
        import equinox as eqx
        import jax

        from hybrid_core.adapters.jax import EquinoxModel

        mlp = eqx.nn.MLP(12, 4, 16, 1, activation=jax.nn.tanh, key=jax.random.PRNGKey(seed))
        return EquinoxModel(_eqx_loss, mlp)

    return ConformanceCase("equinox-module", make_model, _adam, _batches,
                           skip_reason=_reason("jax", "optax", "equinox"))


def _nnx_case() -> ConformanceCase:
    def make_model(seed: int) -> Any:
        from flax import nnx

        from hybrid_core.adapters.jax import NNXModel

        class Net(nnx.Module):
            def __init__(self, rngs: Any) -> None:
                self.a_in = nnx.Linear(12, 16, rngs=rngs)
                self.b_norm = nnx.BatchNorm(16, rngs=rngs)  # statistics held aside, not trained
                self.c_out = nnx.Linear(16, 4, rngs=rngs)

            def __call__(self, x: Any) -> Any:
                return self.c_out(self.b_norm(nnx.tanh(self.a_in(x))))

        return NNXModel(_nnx_loss, Net(nnx.Rngs(seed)))

    return ConformanceCase("nnx-module", make_model, _adam, _batches, skip_reason=_reason("jax", "optax", "flax.nnx"))


def _optax_chain_case() -> ConformanceCase:
    def make_model(seed: int) -> Any:
        import jax.numpy as jnp

        from hybrid_core.adapters.jax import JaxModel

        rng = np.random.default_rng(seed)
        return JaxModel(_pytree_loss, {"0_w": jnp.asarray(rng.normal(0, 0.3, (12, 16)), jnp.float32),
                                       "0_b": jnp.zeros(16, jnp.float32),
                                       "1_w": jnp.asarray(rng.normal(0, 0.3, (16, 4)), jnp.float32),
                                       "1_b": jnp.zeros(4, jnp.float32)})

    def make_optimizer(model: Any) -> Any:
        import optax

        from hybrid_core.adapters.jax import OptaxOptimizer

        schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-2, 10, 200, 1e-3)
        return OptaxOptimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule)))

    return ConformanceCase("optax-chain-schedule", make_model, make_optimizer, _batches,
                           skip_reason=_reason("jax", "optax"))


def jax_library_cases() -> list[ConformanceCase]:
    """Equinox, Flax NNX, and an optax chain with a schedule (see the module docstring)."""
    return [_equinox_case(), _nnx_case(), _optax_chain_case()]
