"""Three real nodes on loopback: throughput, latency, array transfer, idle cost.

Starts three ``mesh-node`` processes with ``LocalMesh`` (``local`` preset, no mDNS, joined by
``--join``, as many slots as cores) and measures through the public client:

- ``noop_tasks_per_s``: 5000 ``noop`` submitted at once, until every result is back;
- ``latency_ms_p50`` / ``_p99``: 500 ``noop`` one after the other;
- ``transfer_64mib_mib_per_s``: a 64 MiB array argument to ``array_sum`` (submit to result);
- ``idle_rss_mb`` / ``idle_cpu_percent``: one idle node over 30 s, torch never imported:
  its daemon and whatever worker processes it still has, once its idle workers have exited
  (after 5 s here, ``--worker-idle 5``; 60 s by default).

The last line printed is one JSON object with those keys. ``--quick`` shrinks every figure
for a smoke run. Processes are ended by pid, also on failure.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import psutil

from mesh import LocalMesh
from mesh.client import Client

WORKER_IDLE_S = 5.0


def three_nodes() -> LocalMesh:
    """Three nodes as the loopback benchmarks run them: ``local`` preset, as many slots as
    cores, idle workers exit after ``WORKER_IDLE_S``."""
    return LocalMesh(3, preset="local", args=("--worker-idle", str(WORKER_IDLE_S)))


def tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def idle_figures(pid: int, seconds: float) -> tuple[float, float]:
    deadline = time.monotonic() + WORKER_IDLE_S + 30
    while len(tree(pid)) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)  # the idle workers exit on their own
    procs = tree(pid)
    cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
    time.sleep(seconds)
    procs = [p for p in procs if p.is_running()]
    cpu1 = sum(sum(p.cpu_times()[:2]) for p in procs)
    rss = sum(p.memory_info().rss for p in procs) / 2**20
    return rss, 100.0 * (cpu1 - cpu0) / seconds


def measure(c: Client, quick: bool) -> dict[str, float]:
    n_tasks = 1000 if quick else 5000
    n_seq = 100 if quick else 500
    c.gather([c.submit("noop") for _ in range(300)], timeout=120)  # warm the workers
    t0 = time.perf_counter()
    c.gather([c.submit("noop") for _ in range(n_tasks)], timeout=600)
    throughput = n_tasks / (time.perf_counter() - t0)
    lat = []
    for _ in range(n_seq):
        t = time.perf_counter()
        c.submit("noop").result(timeout=60)
        lat.append((time.perf_counter() - t) * 1000)
    arr = np.random.default_rng(1).random(64 * 2**20 // 8)
    expected = float(arr.sum())
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        got = c.submit("array_sum", arr).result(timeout=120)
        best = min(best, time.perf_counter() - t)
        if abs(got - expected) > 1e-6 * abs(expected):
            raise SystemExit(f"array_sum returned {got}, expected {expected}")
    return {
        "noop_tasks_per_s": round(throughput, 1),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 3),
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 3),
        "transfer_64mib_mib_per_s": round(64 / best, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts and a 5 s idle window")
    ns = ap.parse_args()
    result: dict[str, Any] = {}
    with three_nodes() as mesh:
        with mesh.client() as c:  # node-1's: the idle node measured below
            result.update(measure(c, ns.quick))
        rss, cpu = idle_figures(mesh.nodes["node-1"].pid, 5.0 if ns.quick else 30.0)
        result["idle_rss_mb"] = round(rss, 1)
        result["idle_cpu_percent"] = round(cpu, 2)
    for k, v in result.items():
        print(f"{k:<28} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
