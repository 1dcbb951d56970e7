"""Launch ranks of a ``torch.distributed`` run as child processes on 127.0.0.1, with a hard timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: Sequence[str], nproc: int = 2, timeout: float = 120.0, wait_for: Sequence[int] | None = None
           ) -> list[int | None]:
    """Run ``python args...`` as ``nproc`` ranks (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT);
    wait up to ``timeout`` s for the ranks in ``wait_for`` (all by default), then kill every child still
    running (a stopped one too). Returns the exit codes (None: killed here)."""
    env = dict(os.environ, WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(nproc)]
    deadline = time.monotonic() + timeout
    codes: list[int | None] = [None] * nproc
    try:
        for r in (range(nproc) if wait_for is None else wait_for):
            try:
                codes[r] = procs[r].wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for r, p in enumerate(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
            elif codes[r] is None:
                codes[r] = p.returncode  # ended by itself (or by its own signal) before we looked
    return codes
