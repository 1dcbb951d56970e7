"""One rank of the `TorchCollective` contract test (tests/test_ddp.py): ``python _dist_child.py OUT``.

Runs the collectives the trainer uses over a real gloo group of 2 processes and writes what each returned
to OUT/coll{rank}.json.
"""

from __future__ import annotations

import json
import pathlib
import sys
from datetime import timedelta

import array_api_compat
import numpy as np
import torch

from hybrid_core import BackendError
from hybrid_core._collective import agree, discover, gather_flags
from hybrid_core.adapters.torch import TorchCollective


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=20))
    found = discover(array_api_compat.array_namespace(torch.zeros(1)))
    coll = TorchCollective(timeout=20)
    rank = coll.rank
    res: dict = {"found": type(found).__name__, "world": coll.world_size, "rank": rank}
    before = coll.calls
    res["rows"] = coll.all_gather(np.array([rank + 0.1, -rank, 1e-300 * (rank + 1)]), "test rows").tolist()
    res["calls_small"] = coll.calls - before
    sizes = (10, 3000)  # one payload past the first block: a second all-gather of the longest length
    data = bytes((rank * 7 + i) % 256 for i in range(sizes[rank]))
    got = coll.gather_bytes(data, "test bytes")
    res["bytes_ok"] = [g == bytes((r * 7 + i) % 256 for i in range(sizes[r])) for r, g in enumerate(got)]
    res["agreed"] = agree(coll, [1.0 + rank, 0.5], (7, 1, 3), "test agree")
    res["flags"] = gather_flags(coll, rank == 0, "test flags")
    try:  # rows of different lengths: an error on every rank, not a gloo abort
        coll.all_gather(np.zeros(5 if rank == 0 else 200), "uneven rows")
        res["uneven"] = None
    except BackendError as exc:
        res["uneven"] = exc.message
    res["after"] = coll.all_gather(np.array([float(rank)]), "after").tolist()  # the group still works
    (out / f"coll{rank}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
