"""Child process for the sharding tests: JAX with 2 host CPU devices (XLA_FLAGS is set by the parent).

Prints one JSON document: the phase logs of single-device and sharded runs, how often kernel selection
saw a sharding, a save/load resume on sharded arrays, the kernels on sharded arrays against one device,
and what mixing placements raises.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import hybrid_core.kernels as kernels
from hybrid_core import HybridConfig, HybridError, HybridTrainer
from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer
from hybrid_core.apps.data import split_digits

DEVICES = jax.devices()
MESH = Mesh(np.array(DEVICES), ("data",))
REPLICATED, BY_ROWS = NamedSharding(MESH, P()), NamedSharding(MESH, P("data"))
SPLIT = split_digits(seed=0)
SEEN = {"sharding": 0, "device": 0}


def _counting_select(select):
    def counted(op, xp, device, dtype=None, **kwargs):
        SEEN["sharding" if hasattr(device, "device_set") and not hasattr(device, "platform") else "device"] += 1
        return select(op, xp, device, dtype, **kwargs)

    return counted


kernels.select = _counting_select(kernels.select)


def _loss(p, batch):
    x, y = batch
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def _setup(sharded, read_every):
    rng = np.random.default_rng(0)
    host = {"w1": rng.normal(0, 0.125, (64, 24)), "b1": np.zeros(24), "w2": rng.normal(0, 0.2, (24, 10)),
            "b2": np.zeros(10)}
    put = (lambda a, s: jax.device_put(jnp.asarray(a, jnp.float32), s)) if sharded else \
        (lambda a, s: jax.device_put(jnp.asarray(a, jnp.float32), DEVICES[0]))
    model = JaxModel(_loss, {k: put(v, REPLICATED) for k, v in host.items()})
    optimizer = OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=3e-3))
    config = HybridConfig(lr_recommend=False, read_every=read_every, warmup_steps=40, min_full_steps=20,
                          max_predict_steps=30, horizon_arms=(0, 10, 30), check_interval=5, correct_steps=5,
                          confidence_threshold=0.3)

    def batch(i):
        idx = np.random.default_rng(1000 + i).choice(SPLIT.y_train.shape[0], size=32, replace=False)
        x, y = SPLIT.x_train[idx].astype(np.float32), SPLIT.y_train[idx]
        if sharded:
            return jax.device_put(x, BY_ROWS), jax.device_put(y, BY_ROWS)
        return jax.device_put(x, DEVICES[0]), jax.device_put(y, DEVICES[0])

    return model, optimizer, config, batch


def _run(sharded, read_every, steps, path):
    SEEN.update(sharding=0, device=0)
    model, optimizer, config, batch = _setup(sharded, read_every)
    trainer = HybridTrainer(model, optimizer, config)
    trainer.fit(batch, steps // 2, progress=False)
    trainer.save(path)
    trainer.fit(batch, steps - steps // 2, progress=False)
    log = [[r.step, r.phase, r.backward] for r in trainer.metrics.records]
    model2, optimizer2, _, _ = _setup(sharded, read_every)
    resumed = HybridTrainer.load(path, model2, optimizer2)
    resumed.fit(batch, steps - steps // 2, progress=False)
    return {"log": log, "selections": dict(SEEN), "params_sharding": [str(p.sharding) for p in model.parameters()],
            "resumed_same": all(np.array_equal(a, b) for a, b in zip(model.parameters(), model2.parameters())),
            "resumed_sharding": [str(p.sharding) for p in model2.parameters()]}


def _kernels():
    """Each op and forced implementation on sharded arrays, against the same op on one device."""
    rng = np.random.default_rng(1)
    host = [rng.normal(size=(8, 6)).astype(np.float32), rng.normal(size=(6,)).astype(np.float32)]
    gru_host = [rng.normal(size=s).astype(np.float32) for s in ((2, 4, 9), (2, 3, 9), (2, 9), (2, 9), (2, 3),
                                                              (2, 5, 4))]
    out = {}
    for choice in ("reference", "jit", "pallas"):
        results = {}
        for where, put in (("one", lambda a: jax.device_put(a, DEVICES[0])),
                           ("sharded", lambda a: jax.device_put(a, BY_ROWS if a.shape[0] % 2 == 0 else REPLICATED))):
            params, grads = [put(a) for a in host], [put(a * 0.5) for a in host]
            loss = jnp.sum(params[0])
            with_choice = _forced(choice)
            results[where] = [_flat([with_choice(kernels.fused_stats, loss, grads, params)]),
                              _flat(with_choice(kernels.fused_axpy, params, grads, 0.25)),
                              _flat([with_choice(kernels.gru_ensemble_rollout, *[put(a) for a in gru_host])])]
        out[choice] = results
    return out


def _flat(arrays):
    return np.concatenate([np.ravel(np.asarray(a, dtype=np.float64)) for a in arrays]).tolist()


def _forced(choice):
    import os

    def call(function, *args):
        os.environ[kernels.ENV_VAR] = choice
        try:
            return function(*args)
        finally:
            del os.environ[kernels.ENV_VAR]

    return call


def _mixed():
    """Arrays committed to different device sets: every op and implementation raises a HybridError."""
    sharded = jax.device_put(jnp.ones((4, 4), jnp.float32), BY_ROWS)
    single = jax.device_put(jnp.ones((4, 4), jnp.float32), DEVICES[1])
    found = []
    for choice in ("reference", "jit", "pallas"):
        for call in (lambda: kernels.fused_axpy([sharded], [single], 1.0),
                     lambda: kernels.fused_stats(jnp.sum(single), [sharded], [sharded])):
            try:
                _forced(choice)(call)
                found.append("no error")
            except HybridError as exc:
                found.append(f"{type(exc).__name__}: {exc.message} | {exc.recovery}")
            except Exception as exc:  # reported to the parent, which fails on it
                found.append(f"raw {type(exc).__name__}: {exc}")
    return found


def main():
    steps = int(sys.argv[1])
    path = sys.argv[2]
    runs = {f"{'sharded' if sharded else 'one'}-{every}": _run(sharded, every, steps, f"{path}-{sharded}-{every}")
            for every in (1, 8) for sharded in (False, True)}
    json.dump({"devices": len(DEVICES), "runs": runs, "kernels": _kernels(),
               "mixed": _mixed()}, sys.stdout)


if __name__ == "__main__":
    main()
