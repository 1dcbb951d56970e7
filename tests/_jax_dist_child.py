"""Child process of the distributed JAX tests: one data-parallel run with prediction on, then the same
run resumed from the checkpoint it saved midway.

    python _jax_dist_child.py OUT STEPS CKPT [--devices 1|all] [--process I --processes N --port P] [--die-at S]
                              [--load FILE]

Single process: the mesh is ``jax.devices()`` (set XLA_FLAGS=--xla_force_host_platform_device_count=2 before
starting it) or only the first device (``--devices 1``). Several processes: ``jax.distributed.initialize`` on
127.0.0.1 with gloo CPU collectives; the mesh spans every process's device, each process puts its own half
of every global batch (``jax.make_array_from_process_local_data``). Parameters are replicated
(``NamedSharding(mesh, P())``), batches split by rows (``P("data")``). Writes OUT (JSON) when done.
``--die-at S``: process 1 exits abruptly (os._exit) at step S (``--hang``: stops itself with SIGSTOP); the
others report the error they get.
``--load FILE``: only resume FILE (written by a run of any number of processes) and run to STEPS.
"""

import argparse
import hashlib
import json
import os
import signal
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("steps", type=int)
parser.add_argument("ckpt")
parser.add_argument("--devices", default="all")
parser.add_argument("--process", type=int, default=0)
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--die-at", type=int, default=-1)
parser.add_argument("--hang", action="store_true", help="at --die-at, process 1 stops (SIGSTOP) instead of exiting")
parser.add_argument("--timeout", type=float, default=60.0)
parser.add_argument("--no-resume", action="store_true", help="skip the resumed run")
parser.add_argument("--load", default=None, help="resume this checkpoint (of any world size) and run to STEPS")
args = parser.parse_args()

import jax  # noqa: E402

if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               coordinator_bind_address=f"127.0.0.1:{args.port}", num_processes=args.processes,
                               process_id=args.process, heartbeat_timeout_seconds=10)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hybrid_core import HybridConfig, HybridError, HybridTrainer  # noqa: E402
from hybrid_core.adapters._jax_dist import JaxCollective  # noqa: E402
from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer  # noqa: E402
from hybrid_core.apps.data import split_digits  # noqa: E402

DEVICES = jax.devices() if args.devices == "all" else jax.devices()[:1]
MESH = Mesh(np.array(DEVICES), ("data",))
REPLICATED, BY_ROWS = NamedSharding(MESH, P()), NamedSharding(MESH, P("data"))
SPLIT = split_digits(seed=0)
BATCH = 32
DTYPE = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _loss(p, batch):
    x, y = batch
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def _batch(i):
    idx = np.random.default_rng(1000 + i).choice(SPLIT.y_train.shape[0], size=BATCH, replace=False)
    x, y = SPLIT.x_train[idx].astype(DTYPE), SPLIT.y_train[idx].astype(np.int32)
    if args.processes > 1:  # each process holds only its own rows of the global batch
        rows = slice(args.process * BATCH // args.processes, (args.process + 1) * BATCH // args.processes)
        return (jax.make_array_from_process_local_data(BY_ROWS, x[rows]),
                jax.make_array_from_process_local_data(BY_ROWS, y[rows]))
    return jax.device_put(x, BY_ROWS), jax.device_put(y, BY_ROWS)


def _trainer(collective):
    rng = np.random.default_rng(0)
    host = {"w1": rng.normal(0, 0.125, (64, 24)), "b1": np.zeros(24), "w2": rng.normal(0, 0.2, (24, 10)),
            "b2": np.zeros(10)}
    model = JaxModel(_loss, {k: jax.device_put(np.asarray(v, DTYPE), REPLICATED) for k, v in host.items()})
    optimizer = OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=3e-3))
    # A low confidence threshold and short phases: prediction, checks, rollbacks and corrections all happen.
    config = HybridConfig(lr_recommend=False, read_every=4, warmup_steps=40, min_full_steps=20,
                          max_predict_steps=30, horizon_arms=(0, 10, 30), check_interval=5, correct_steps=5,
                          confidence_threshold=0.3)
    return model, optimizer, config, collective


def _digest(array):
    """sha256 of every copy this process holds (one per addressable device), and of the value."""
    copies = [hashlib.sha256(np.asarray(s.data).tobytes()).hexdigest() for s in array.addressable_shards]
    return copies


def _params(model):
    return {"digests": [_digest(p) for p in model.parameters()],
            "sharding": [str(p.sharding) for p in model.parameters()],
            "replicated": [bool(p.is_fully_replicated) for p in model.parameters()],
            "values": [np.asarray(p.addressable_data(0), dtype=np.float64).ravel().tolist()[:8]
                       for p in model.parameters()]}


def main():
    collective = JaxCollective(timeout=args.timeout) if args.processes > 1 else None
    model, optimizer, config, _ = _trainer(collective)
    trainer = HybridTrainer(model, optimizer, config, collective=collective)
    half = args.steps // 2
    out = {"process": args.process, "devices": len(DEVICES), "dtype": np.dtype(DTYPE).name,
           "world_size": trainer.collective.world_size, "collective": repr(trainer.collective)}
    start = time.perf_counter()
    if args.load:
        model, optimizer, _, _ = _trainer(collective)
        trainer = HybridTrainer.load(args.load, model, optimizer, collective=collective)
        out["loaded_at"] = trainer.steps_done
        trainer.fit(_batch, max_steps=args.steps, progress=False)
        trainer.flush()
        out["log"] = [[r.step, r.phase, r.backward] for r in trainer.metrics.records]
        out["params"] = _params(model)
        _write(out)
        return
    try:
        if args.die_at >= 0:
            for i in range(args.steps):
                if args.process == 1 and i == args.die_at:
                    _write({**out, "died_at": time.time()})
                    if args.hang:  # alive but silent: no heartbeats, no answers (the parent kills it)
                        os.kill(os.getpid(), signal.SIGSTOP)
                    os._exit(7)
                trainer.step(_batch(i))
            trainer.flush()
        else:
            trainer.fit(_batch, max_steps=half, progress=False)
            trainer.save(args.ckpt)
            trainer.fit(_batch, max_steps=args.steps, progress=False)
            trainer.flush()
    except HybridError as exc:
        out["error"] = {"type": type(exc).__name__, "message": exc.message, "recovery": exc.recovery, "at": time.time(),
                        "seconds_after_start": time.perf_counter() - start, "step": trainer.steps_done}
        _write(out)
        return
    out["seconds"] = time.perf_counter() - start
    out["log"] = [[r.step, r.phase, r.backward] for r in trainer.metrics.records]
    out["losses"] = [r.loss for r in trainer.metrics.records]
    out["events"] = trainer.metrics.summary()["events"]
    out["params"] = _params(model)
    out["collective_calls"] = getattr(trainer.collective, "calls", None)
    if args.no_resume:
        _write(out)
        return
    model2, optimizer2, _, _ = _trainer(collective)
    resumed = HybridTrainer.load(args.ckpt, model2, optimizer2, collective=collective)
    resumed.fit(_batch, max_steps=args.steps, progress=False)
    resumed.flush()
    out["resumed_log"] = [[r.step, r.phase, r.backward] for r in resumed.metrics.records]
    out["resumed_params"] = _params(model2)
    _write(out)


def _write(out):
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
