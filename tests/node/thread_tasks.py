"""A task that reports the BLAS and torch threads its worker runs with (loaded by the nodes
and executors of ``test_threads.py`` with ``--tasks tests.node.thread_tasks``)."""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

from tasks import task


@task("threads.seen")
def seen(use_torch: bool = False, hold_s: float = 0.0) -> dict[str, int]:
    """``env``: OMP_NUM_THREADS; ``blas``: the fewest threads of any loaded BLAS or OpenMP
    pool (threadpoolctl), 0 without any; ``torch``: torch's intra-op threads when asked
    (importing it); ``pid``: the worker's. Returns after ``hold_s`` seconds."""
    import numpy  # noqa: F401 - loads OpenBLAS, which the worker must limit too

    threadpoolctl: Any = importlib.import_module("threadpoolctl")
    seen = {"env": int(os.environ.get("OMP_NUM_THREADS", "0")), "pid": os.getpid()}
    if use_torch:
        import torch

        seen["torch"] = int(torch.get_num_threads())
    pools = [int(p["num_threads"]) for p in threadpoolctl.threadpool_info()]
    seen["blas"] = min(pools, default=0)
    time.sleep(hold_s)
    return seen
