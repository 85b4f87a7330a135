"""Benchmark: the image pipeline survives a machine that dies mid-run.

::

    python benchmarks/recovery.py                 # PipelineSize.small() and the default size
    python benchmarks/recovery.py --sizes small   # one size only
    python benchmarks/recovery.py --seed 3        # another stage and victim
    python benchmarks/recovery.py --store         # a 256 MB store asked to hold 1 GB

For each size, the pipeline (``tasks.pipeline``, without placement labels: a label naming a
dead node could never be met) runs twice on four fresh local nodes, one of them without
torch, submitted through the first: once undisturbed, then once with one of the other three
ended by SIGKILL as soon as the first task of a randomly chosen stage has finished. The
dead node's running tasks are placed again, and the results it held are made again from
their lineage (``node.lineage``) where a later task needs them.

Goals: the disturbed run completes, its accuracies within 0.01 of the undisturbed run's,
in at most 1.5x its wall time. The last line printed is one JSON object: ``runs``, one per
size, each with ``size``, ``stage`` (when the victim died), ``victim``, ``undisturbed_s``,
``disturbed_s``, ``wall_ratio``, ``accuracy_delta`` (the largest difference of the three
accuracies; ``accuracy_deltas`` each, disturbed less undisturbed), ``tasks_rerun`` (runs
again by the submitting node: tasks placed again after their node died or declined,
retries and rebuilds), ``objects_rebuilt`` and ``bytes_recomputed``.

``--store`` measures data that outlives memory instead: one node whose store keeps 256 MB
in memory (``--store-memory``) is asked to hold 1 GiB of results, sixteen 64 MiB arrays
made by ``make_array``, then every one is fetched back and checked. The spill directory is
a fresh one under the system's temporary directory. Its JSON line: ``objects``,
``object_mib``, ``memory_target_mib``, ``all_fetched``, ``spilled_mib`` (on disk once all
were made), ``spill_mib_per_s`` (those MiB over the wall time of making and storing all
of them), ``readback_mib_per_s`` (MiB read back from disk over the wall time of fetching
every object), ``rss_max_mib`` (the node's daemon and workers, sampled every 50 ms) and
``shm_max_mib`` (the node's shared-memory files, likewise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import tempfile
import threading
import time
from typing import Any, Final

import numpy as np
import psutil

from mesh import LocalMesh
from tasks.pipeline import Pipeline, Run
from tasks.vision import PipelineSize

STAGES: Final = ("make_shard", "preprocess", "train_cnn", "extract_features", "predict")
"""Stages with several tasks: the victim dies while the rest of the stage is under way."""
ACCURACIES: Final = ("accuracy_svm", "accuracy_forest", "accuracy_cnn")
NODES: Final = ("rec-a", "rec-b", "rec-c", "rec-d")


def run_once(size: PipelineSize, kill: tuple[str, str] | None) -> tuple[Run, dict[str, Any]]:
    """One run on fresh nodes; ``kill`` = (stage, node): SIGKILL ``node`` once the first
    task of ``stage`` has finished. The run and the submitting node's status after it."""
    slots = max(1, (os.cpu_count() or 1) // 2)
    with LocalMesh(slots=slots, args=["--grace", "5"]) as mesh:
        for i, name in enumerate(NODES):
            mesh.start(name, without=["torch"] if i == len(NODES) - 1 else [])
        mesh.wait_alive()
        client = mesh.client(NODES[0])
        killed = threading.Event()

        def on_done(stage: str) -> None:
            if kill is not None and stage == kill[0] and not killed.is_set():
                killed.set()
                mesh.nodes[kill[1]].kill()

        run = Pipeline(client, size, pin=False, on_done=on_done).run()
        if kill is not None and not killed.is_set():
            raise RuntimeError(f"stage {kill[0]} never finished a task: nothing was killed")
        return run, client.status()


def measure(name: str, size: PipelineSize, rng: random.Random) -> dict[str, Any]:
    stage, victim = rng.choice(STAGES), rng.choice(NODES[1:])
    calm, _ = run_once(size, None)
    print(f"{name}: undisturbed {calm.wall_s:.1f} s", flush=True)
    hit, status = run_once(size, (stage, victim))
    print(f"{name}: {victim} killed in {stage}: {hit.wall_s:.1f} s", flush=True)
    deltas = {k.removeprefix("accuracy_"): hit.figures[k] - calm.figures[k] for k in ACCURACIES}
    return {
        "size": name,
        "stage": stage,
        "victim": victim,
        "undisturbed_s": round(calm.wall_s, 2),
        "disturbed_s": round(hit.wall_s, 2),
        "wall_ratio": round(hit.wall_s / calm.wall_s, 3),
        "accuracy_delta": round(max(abs(d) for d in deltas.values()), 4),
        "accuracy_deltas": {k: round(d, 4) for k, d in deltas.items()},
        "tasks_rerun": status["replaced"] + status["retries"] + status["rebuilt_objects"],
        "objects_rebuilt": status["rebuilt_objects"],
        "bytes_recomputed": status["rebuilt_bytes"],
    }


STORE_MIB: Final = 256
OBJECT_MIB: Final = 64
OBJECTS: Final = 16


def _sample(pid: int, stop: threading.Event, peak: dict[str, float]) -> None:
    """Peak RSS of ``pid`` and its children, and of its shared-memory files, until ``stop``."""
    prefix = f"mesh-obj-{pid}-"
    while not stop.wait(0.05):
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            rss = sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            continue
        shm = 0
        for entry in os.scandir("/dev/shm"):
            if entry.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    shm += entry.stat().st_size
        peak["rss"] = max(peak["rss"], rss / 2**20)
        peak["shm"] = max(peak["shm"], shm / 2**20)


def store_scenario() -> dict[str, Any]:
    """A store of ``STORE_MIB`` asked to hold ``OBJECTS`` x ``OBJECT_MIB``: every object
    fetchable, memory bounded; spill and read-back rates."""
    n = OBJECT_MIB * 2**20
    with tempfile.TemporaryDirectory(prefix="mesh-spill-bench-") as spill:
        args = ["--store-memory", f"{STORE_MIB}M", "--spill-dir", spill]
        with LocalMesh(slots=1, args=args) as mesh:
            node = mesh.start("store-a")
            mesh.wait_alive()
            client = mesh.client("store-a")
            peak = {"rss": 0.0, "shm": 0.0}
            stop = threading.Event()
            sampler = threading.Thread(target=_sample, args=(node.pid, stop, peak), daemon=True)
            sampler.start()
            try:
                t0 = time.perf_counter()
                refs = [client.submit("make_array", n).result(timeout=300) for _ in range(OBJECTS)]
                made_s = time.perf_counter() - t0
                status = client.status()
                spilled = status["spilled_bytes"] / 2**20
                t0 = time.perf_counter()
                fetched = 0
                expected = np.arange(n // 8, dtype=np.float64)
                for ref in refs:
                    value = client.result(ref, timeout=300)
                    fetched += int(np.array_equal(value, expected))
                    del value
                read_s = time.perf_counter() - t0
                readback = client.status()
                for ref in refs:
                    client.release(ref)
            finally:
                stop.set()
                sampler.join(timeout=5)
    print(f"store: {OBJECTS} x {OBJECT_MIB} MiB made in {made_s:.1f} s, fetched in {read_s:.1f} s")
    return {
        "objects": OBJECTS,
        "object_mib": OBJECTS * OBJECT_MIB,
        "memory_target_mib": STORE_MIB,
        "all_fetched": fetched == OBJECTS,
        "fetched": fetched,
        "spilled_mib": round(spilled, 1),
        "spill_mib_per_s": round(spilled / made_s, 1),
        "readback_mib_per_s": round(spilled / read_s, 1),
        "readback_objects_spilled_after": readback["spilled_objects"],
        "rss_max_mib": round(peak["rss"], 1),
        "shm_max_mib": round(peak["shm"], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="small,default", help="comma-separated: small, default")
    p.add_argument("--seed", type=int, default=0, help="chooses each size's stage and victim")
    p.add_argument("--store", action="store_true", help="the spilling store scenario alone")
    args = p.parse_args()
    if args.store:
        print(json.dumps(store_scenario()))
        return
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or any(s not in ("small", "default") for s in sizes):
        p.error("--sizes takes small, default or both")
    rng = random.Random(args.seed)
    runs = [
        measure(s, PipelineSize.small() if s == "small" else PipelineSize(), rng) for s in sizes
    ]
    print(json.dumps({"runs": runs}))


if __name__ == "__main__":
    main()
