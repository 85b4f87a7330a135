"""Built-in tasks, installed on every node: probes for tests, benchmarks and operators.

They need numpy at most, so every node can run them. ``crash`` ends its worker process on
purpose, to show that a dying worker fails only its own task.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from mesh.protocol.messages import NodeId
from tasks import context, task


@task(est_runtime_s=0.0)
def noop() -> None:
    """Do nothing: measures the mesh's own overhead per task."""


@task(est_runtime_s=0.0)
def echo(x: Any) -> Any:
    """Return the argument unchanged: a round trip of any wire value."""
    return x


@task
def sleep(seconds: float) -> float:
    """Hold a slot for ``seconds`` and return them."""
    if seconds < 0:
        raise ValueError(f"cannot sleep for {seconds} seconds")
    time.sleep(seconds)
    return seconds


@task(est_runtime_s=0.0)
def whoami() -> NodeId:
    """The id of the node that ran this task."""
    return context().node_id


@task(est_runtime_s=0.0)
def fail(message: str = "failed on purpose") -> None:
    """Raise ``RuntimeError(message)``: the error path, end to end."""
    raise RuntimeError(message)


@task
def array_sum(a: npt.ArrayLike) -> float:
    """The sum of an array's elements, as a float."""
    return float(np.sum(a, dtype=np.float64))


@task
def make_array(n_bytes: int) -> npt.NDArray[np.float64]:
    """A float64 array of ``n_bytes`` (rounded down to whole elements): 0.0, 1.0, 2.0, ..."""
    if n_bytes < 0:
        raise ValueError(f"cannot make an array of {n_bytes} bytes")
    return np.arange(n_bytes // 8, dtype=np.float64)


@task(est_runtime_s=0.0)
def crash(code: int = 1) -> None:
    """End the worker process at once with exit status ``code``, as a segfault would."""
    os._exit(code)
