"""Tasks for the lineage and retry tests: a chain of arrays, a non-deterministic one, and
tasks that fail a given number of times (counted in a file) before they succeed."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tasks import task


@task("lineage.grow")
def grow(a: npt.NDArray[np.float64], k: float) -> npt.NDArray[np.float64]:
    """``a + k``: one more level of a chain of objects."""
    return np.asarray(a, dtype=np.float64) + k


@task("lineage.noisy", deterministic=False)
def noisy(n_bytes: int) -> npt.NDArray[np.float64]:
    """Random floats: another run gives another array."""
    return np.random.default_rng().random(n_bytes // 8)


def _count(path: str) -> int:
    """Runs so far of a task counting in ``path`` (this one included)."""
    p = Path(path)
    n = int(p.read_text()) + 1 if p.exists() else 1
    p.write_text(str(n))
    return n


@task("lineage.flaky")
def flaky(path: str, failures: int) -> int:
    """Raise ``RuntimeError`` on the first ``failures`` runs, then return the run's number."""
    n = _count(path)
    if n <= failures:
        raise RuntimeError(f"run {n} fails on purpose")
    return n


@task("lineage.flaky_picky", retry_exceptions=("ValueError",))
def flaky_picky(path: str, error: str) -> int:
    """Raise ``error`` (a builtin exception's name) on the first run, then return 2."""
    n = _count(path)
    if n == 1:
        raise getattr(builtins, error)("first run")
    return n


@task("lineage.crash_once")
def crash_once(path: str) -> int:
    """End the worker process on the first run (as a segfault would), then return 2."""
    n = _count(path)
    if n == 1:
        os._exit(3)
    return n
