"""Data-parallel JAX with HybridTrainer: replicated parameters, batches split over devices and processes.

Run (one process, 2 host CPU devices; XLA_FLAGS must be set before JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python examples/jax_multidevice.py

or two processes on this machine (``jax.distributed`` on 127.0.0.1 with gloo CPU collectives; the script
starts both and prints rank 0's report):

    python examples/jax_multidevice.py --processes 2

Options: [--steps 400] [--seed 0] [--lr 3e-3] [--batch-size 64]. The parameters live on a ``Mesh`` over
every device (``NamedSharding(mesh, P())``: each device holds a copy), each batch is split by rows
(``P("data")``); with several processes each one makes only its own rows
(``jax.make_array_from_process_local_data``). The jitted loss and gradient are then global values, so
every process sees the same numbers; `HybridTrainer` finds the process group (``jax.process_count() > 1``)
and agrees every read across processes (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    """Parse the options; launch the processes (``--processes N``) or train in this one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights and batches")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--batch-size", type=int, default=64, help="global examples per batch (default 64)")
    parser.add_argument("--processes", type=int, default=1, help="processes to start on 127.0.0.1 (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the processes are stopped")
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.processes) < 1 or args.lr <= 0:
        parser.error("--steps, --batch-size and --processes must be >= 1 and --lr > 0")
    if args.batch_size % args.processes:
        parser.error("--batch-size must be a multiple of --processes")
    if args.processes > 1 and args.process_id is None:
        return launch(args, argv if argv is not None else sys.argv[1:])
    return train(args)


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Start ``args.processes`` copies of this script on 127.0.0.1 (one CPU device each), print rank 0's output,
    stop them all if one fails or the timeout passes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device per process
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--process-id", str(i), "--port", str(port)],
                              env=env, stdout=subprocess.PIPE if i else None, stderr=subprocess.STDOUT if i else None)
             for i in range(args.processes)]
    deadline = time.monotonic() + args.timeout
    codes: list[int | None] = [None] * len(procs)
    try:
        while None in codes and time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        for i in failed:
            if i and procs[i].stdout is not None:
                sys.stderr.write(procs[i].stdout.read().decode(errors="replace")[-3000:])
        print(f"processes {failed} failed or were stopped (return codes {[p.returncode for p in procs]})",
              file=sys.stderr)
        return 1
    return 0


def train(args: argparse.Namespace) -> int:
    """Train in this process (rank ``args.process_id`` of ``args.processes``) and print the report on rank 0."""
    import jax

    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                                   coordinator_bind_address=f"127.0.0.1:{args.port}", num_processes=args.processes,
                                   process_id=args.process_id)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from hybrid_core import HybridConfig, HybridTrainer
    from hybrid_core.adapters.jax import JaxModel, OptaxOptimizer
    from hybrid_core.apps.data import split_digits

    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, by_rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    if args.batch_size % len(jax.devices()):
        raise SystemExit(f"--batch-size must be a multiple of the {len(jax.devices())} devices")
    split = split_digits(seed=args.seed)
    rank, world = jax.process_index(), jax.process_count()
    mine = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)

    def loss_fn(params: dict, batch: tuple) -> jax.Array:
        x, y = batch
        logits = jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    def batch(step: int) -> tuple:
        """The global batch of ``step`` (the same rows on every process); this process puts in its own part."""
        idx = np.random.default_rng([args.seed, step]).choice(len(split.y_train), args.batch_size, replace=False)
        x, y = split.x_train[idx].astype(np.float32), split.y_train[idx].astype(np.int32)
        return (jax.make_array_from_process_local_data(by_rows, x[mine]),
                jax.make_array_from_process_local_data(by_rows, y[mine]))

    rng = np.random.default_rng(args.seed)
    host = {"w1": rng.normal(0, np.sqrt(2 / 64), (64, 64)), "b1": np.zeros(64),
            "w2": rng.normal(0, np.sqrt(2 / 64), (64, 10)), "b2": np.zeros(10)}
    model = JaxModel(loss_fn, {k: jax.device_put(v.astype(np.float32), replicated) for k, v in host.items()})
    optimizer = OptaxOptimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=args.lr))
    config = HybridConfig(warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10)
    trainer = HybridTrainer(model, optimizer, config)  # the process group is found from JAX
    summary = trainer.fit(batch, max_steps=args.steps, progress=False)

    val = tuple(jax.device_put(a, replicated) for a in (split.x_val.astype(np.float32),
                                                        split.y_val.astype(np.int32)))
    val_loss = float(model.loss(val).addressable_data(0))
    # Every device's copy of the weights, hashed, gathered from every process: one distinct hash if all agree.
    mine_hash = hashlib.sha256(b"".join(np.asarray(s.data).tobytes() for p in model.parameters()
                                        for s in p.addressable_shards[:1])).digest()
    copies = {hashlib.sha256(b"".join(np.asarray(p.addressable_shards[d].data).tobytes()
                                      for p in model.parameters())).digest()
              for d in range(len(jax.local_devices()))}
    everywhere = set(trainer.collective.gather_bytes(mine_hash, "example: weight hashes")) | copies
    if rank == 0:
        print(f"devices: {len(jax.devices())} over {world} process(es); collective: {trainer.collective!r}")
        print("steps per phase:", summary["steps_per_phase"])
        print(f"backward passes: {summary['backward_passes']} of {summary['steps']} steps "
              f"({summary['backward_passes_skipped']} skipped)")
        print(f"parameters replicated: {all(p.is_fully_replicated for p in model.parameters())}; "
              f"identical on all {len(jax.devices())} devices: {len(everywhere) == 1}")
        print(f"validation loss: {val_loss:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
