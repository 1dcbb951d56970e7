"""Child process of the JaxCollective tests: process I of 2 (``jax.distributed`` on 127.0.0.1, gloo).

    python _jax_coll_child.py OUT I PORT

Runs the collective's contract on real processes and writes what each check found to OUT (JSON).
"""

import json
import os
import sys
import time

import jax

out_path, rank, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                           coordinator_bind_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank,
                           heartbeat_timeout_seconds=10)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hybrid_core import BackendError  # noqa: E402
from hybrid_core._backend import to_host_floats, to_numpy  # noqa: E402
from hybrid_core._collective import agree, discover  # noqa: E402
from hybrid_core.adapters._jax_dist import JaxCollective  # noqa: E402

# Values float32 cannot hold, and the awkward ones: each rank sends its own.
SPECIAL = [1 / 3, -0.0, 5e-324, 1.7976931348623157e308, float("inf"), float("nan"), 1 + 2 ** -52, 1e-300]


def _row(r):
    with np.errstate(over="ignore"):
        return np.array(SPECIAL, dtype=np.float64) * (r + 1)


def _error(call):
    try:
        call()
    except BackendError as exc:
        return f"BackendError: {exc.message}"
    except Exception as exc:
        return f"raw {type(exc).__name__}: {exc}"
    return "no error"


def main():
    found = {}
    coll = discover(jnp)
    found["discovered"] = repr(coll)
    found["rank"], found["world_size"] = coll.rank, coll.world_size
    rows = coll.all_gather(_row(rank), "exact bits")
    found["bits_exact"] = all(np.array_equal(rows[r].view(np.uint64), _row(r).view(np.uint64)) for r in range(2))
    found["rows_shape"] = list(rows.shape)
    mine = bytes(range(256)) * 4 + b"end" if rank == 1 else b""
    got = coll.gather_bytes(mine, "bytes")
    found["bytes_ok"] = got == [b"", bytes(range(256)) * 4 + b"end"]
    found["agreed"] = agree(coll, [float(rank), 0.1 * (rank + 1)], [7.0, 1.0], "mean")
    # A rank at another step: every rank is told, naming the rank that is elsewhere.
    found["desync"] = _error(lambda: agree(coll, [1.0], [7.0 + rank, 1.0], "desync check"))
    # Reads of arrays laid out over both processes' devices.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.device_put(np.arange(6.0, dtype=np.float32), NamedSharding(mesh, P()))
    split = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.full(3, rank, np.float32))
    found["replicated_read"] = to_host_floats([replicated])
    found["replicated_numpy"] = to_numpy(replicated).tolist()
    found["split_read"] = _error(lambda: to_host_floats([split]))
    # What one agreed read costs: a process_allgather of a 64-entry row (the smallest `agree` sends).
    times = []
    for _ in range(200):
        start = time.perf_counter()
        coll.all_gather(np.zeros(64), "timing")
        times.append(time.perf_counter() - start)
    found["gather_seconds"] = sorted(times)[len(times) // 2]
    found["bad_timeout"] = [_error(lambda t=t: JaxCollective(timeout=t)) for t in (0, -1.0, float("inf"), True)]
    # A rank that does not answer within the timeout: rank 0 gives up after 1 s, rank 1 comes 4 s late.
    slow = JaxCollective(timeout=1.0)
    if rank == 1:
        time.sleep(4.0)
    start = time.perf_counter()
    found["late"] = _error(lambda: slow.all_gather(np.ones(3), "late gather"))
    found["late_seconds"] = time.perf_counter() - start
    found["after_timeout"] = _error(lambda: slow.all_gather(np.ones(3), "next gather"))
    # A rank that dies: rank 1 leaves abruptly, rank 0's next collective fails at once, naming it.
    if rank == 1:
        _write(found)
        os._exit(0)
    time.sleep(6.0)  # rank 1 reaches "next gather" at ~4 s, gives up at ~5 s and exits: nobody meets this one
    start = time.perf_counter()
    found["dead_peer"] = _error(lambda: coll.all_gather(np.ones(3), "after the peer died"))
    found["dead_peer_seconds"] = time.perf_counter() - start
    _write(found)


def _write(found):
    with open(out_path, "w") as f:
        json.dump(found, f)


if __name__ == "__main__":
    main()
