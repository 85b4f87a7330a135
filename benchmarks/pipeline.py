"""Benchmark: the image-recognition pipeline in one process and on the mesh (1 and 3 nodes).

::

    python benchmarks/pipeline.py                        # the default size (20,000 images)
    python benchmarks/pipeline.py --small                # seconds, to check that it runs
    python benchmarks/pipeline.py --rounds 3 --one-node  # one process against one node, x3
    python benchmarks/pipeline.py --single-threads 1     # one process with one torch thread

Each round runs ``tasks.vision.run_sequential`` (plain sequential code, in a fresh Python
process so that every round pays the same imports as the mesh's fresh nodes) and the demo's
pipeline (``tasks.pipeline``) on one local node, each with the same seed and sizes; odd
rounds run one process first, even rounds the mesh, so that a drift in what else the
machine runs hits both alike. A figure is the median over rounds, and the ratio is the
median of each round's ratio. The local nodes start fresh on 127.0.0.1 and share this
machine's cores (each node sizes its workers' threads by every slot on the host). Mesh
times cover the pipeline from its first submission to its last result, not the nodes'
start-up. Then, unless ``--one-node``, the pipeline runs once on three local nodes (one of
them without torch); accuracies, angle error and bytes moved are those of that run (else of
the last one-node run).

Each run prints its stage times and how many cores other processes kept busy meanwhile
(``/proc/stat`` less this benchmark's own processes, where Linux tells). One process runs
torch with a thread per core (unless ``--single-threads``), which other work on the machine
slows far more than the mesh's one thread per slot: a ratio measured while others were busy
says more about them than about the mesh.

The last line printed is one JSON object: ``images``, ``rounds``, ``single_threads`` (null:
the libraries' default), ``single_process_s``, ``mesh_1_node_s``, ``mesh_1_node_ratio``,
``ratios_1_node`` (per round), ``mesh_3_nodes_s`` (null with ``--one-node``),
``accuracy_svm``, ``accuracy_forest``, ``accuracy_cnn``, ``angle_mae_deg``,
``bytes_moved_ratio`` (null with ``--one-node``), ``labels`` (whether the three-node run
pinned stages to their data's holder; ``--no-labels`` leaves placement to the auctions) and
``other_cores`` (per round, the most
that others kept busy during either of its runs; null where unknown).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mesh import LocalMesh
from mesh.client import Client
from node.cores import THREAD_VARS
from tasks.pipeline import Run, placed, run_pipeline, traffic
from tasks.vision import PipelineSize

ROOT = Path(__file__).resolve().parents[1]

_SEQUENTIAL = """
import json, sys, time
t = time.perf_counter()
from tasks.vision import PipelineSize, run_sequential
size = PipelineSize(**json.loads(sys.argv[1]))
out = run_sequential(size)
out["wall_s"] = time.perf_counter() - t
print(json.dumps(out))
"""
"""One sequential run in a fresh interpreter; its time includes importing the pipeline."""

SINGLE_TIMEOUT_S = 3600.0

_BUSY_FIELDS = slice(0, 3)
"""user, nice, system in the ``cpu`` line of ``/proc/stat`` (irq and softirq left out:
they are charged to no process, this benchmark's included)."""
_STEAL_FIELD = 7
"""Time the hypervisor gave this machine's CPUs to other guests: others' load as well."""


class Others:
    """How many cores processes other than this one and its children kept busy, on average,
    between ``__enter__`` and ``__exit__`` (None where ``/proc/stat`` is missing). Children
    count once waited for, as every process this benchmark starts is before the block ends."""

    def __init__(self) -> None:
        self.cores: float | None = None
        self._start: tuple[float, float, float] | None = None

    def __enter__(self) -> Others:
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        if self._start is None or end is None:
            return
        (machine0, ours0, t0), (machine1, ours1, t1) = self._start, end
        self.cores = max(0.0, (machine1 - machine0) - (ours1 - ours0)) / max(t1 - t0, 1e-9)

    def __str__(self) -> str:
        return (
            "others busy: unknown" if self.cores is None else f"others busy {self.cores:.2f} cores"
        )

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        steal = fields[_STEAL_FIELD] if len(fields) > _STEAL_FIELD else 0
        machine = (sum(fields[_BUSY_FIELDS]) + steal) / tick
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        return machine, ours, time.monotonic()


@contextmanager
def local_mesh(count: int, without_torch: int) -> Iterator[Client]:
    """A client of ``count`` fresh nodes on 127.0.0.1 as the demo starts them (this machine's
    cores split between them), the last ``without_torch`` of them without torch."""
    slots = max(1, (os.cpu_count() or 1) // count)
    with LocalMesh(slots=slots, args=["--grace", "5"]) as mesh:
        for i in range(count):
            without = ["torch"] if i >= count - without_torch else []
            mesh.start(f"demo-{chr(ord('a') + i)}", without=without)
        mesh.wait_alive()
        yield mesh.client()


def run_single(size: PipelineSize, threads: int | None = None) -> dict[str, Any]:
    """``run_sequential`` in a fresh Python; its figures, ``stage_s`` and ``wall_s``.

    ``threads`` sets its BLAS and torch threads (None: the libraries' default, one per core).
    """
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    if threads is not None:
        env.update(dict.fromkeys(THREAD_VARS, str(threads)))
    fields = {f: getattr(size, f) for f in size.__dataclass_fields__}
    done = subprocess.run(
        [sys.executable, "-c", _SEQUENTIAL, json.dumps(fields)],
        capture_output=True,
        text=True,
        env=env,
        timeout=SINGLE_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the single-process run failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def mesh_stages(run: Run) -> dict[str, float]:
    """Stage -> seconds during which at least one of its tasks ran (``placed`` replays each
    node's slots): comparable with one process's stage times, waits excluded."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for step, start, _ in placed(run):
        spans[step.stage].append((start, step.end))
    out: dict[str, float] = {}
    for stage, intervals in spans.items():
        total, reach = 0.0, float("-inf")
        for start, end in sorted(intervals):
            total += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        out[stage] = total
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="one process / one node, alternately")
    p.add_argument("--one-node", action="store_true", help="skip the three-node run")
    p.add_argument(
        "--no-labels",
        action="store_true",
        help="three nodes without placement labels: the auctions alone keep stages by their data",
    )
    p.add_argument(
        "--single-threads",
        type=int,
        metavar="N",
        help="run the one process with N BLAS/torch threads (default: one per core)",
    )
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.single_threads is not None and args.single_threads < 1:
        p.error("--single-threads must be at least 1")
    size = PipelineSize.small(seed=args.seed) if args.small else PipelineSize(seed=args.seed)

    singles: list[float] = []
    ones: list[float] = []
    ratios: list[float] = []
    others: list[float | None] = []
    figures: dict[str, float] = {}
    for r in range(1, args.rounds + 1):
        order = ("single", "mesh") if r % 2 else ("mesh", "single")
        busy: list[float | None] = []
        for what in order:
            with Others() as other:
                if what == "single":
                    single = run_single(size, args.single_threads)
                else:
                    with local_mesh(1, without_torch=0) as client:
                        one = run_pipeline(client, size)
            busy.append(other.cores)
            if what == "single":
                singles.append(single["wall_s"])
                print(f"round {r} single process: {single['wall_s']:.1f} s  {other}", flush=True)
                print(f"  {_figures(single)}\n  {_stages(single['stage_s'])}", flush=True)
            else:
                ones.append(one.wall_s)
                figures = one.figures
                print(f"round {r} mesh, 1 node:   {one.wall_s:.1f} s  {other}", flush=True)
                print(f"  {_figures(one.figures)}\n  {_stages(mesh_stages(one))}", flush=True)
        ratios.append(ones[-1] / singles[-1])
        known = [b for b in busy if b is not None]
        others.append(round(max(known), 2) if known else None)
        print(f"round {r} ratio {ratios[-1]:.3f}", flush=True)

    three_s: float | None = None
    moved_ratio: float | None = None
    if not args.one_node:
        with Others() as other, local_mesh(3, without_torch=1) as client:
            three = run_pipeline(client, size, pin=not args.no_labels)
        moved, produced = traffic(three)
        three_s, figures = three.wall_s, three.figures
        moved_ratio = round(moved / max(produced, 1), 4)
        print(f"mesh, 3 nodes:  {three.wall_s:.1f} s  {other}", flush=True)
        print(f"  {_figures(three.figures)}\n  {_stages(mesh_stages(three))}", flush=True)
        print(f"bytes moved {moved} of {produced} produced", flush=True)

    print(
        json.dumps(
            {
                "images": size.train_images,
                "rounds": args.rounds,
                "single_threads": args.single_threads,
                "single_process_s": round(statistics.median(singles), 2),
                "mesh_1_node_s": round(statistics.median(ones), 2),
                "mesh_1_node_ratio": round(statistics.median(ratios), 3),
                "ratios_1_node": [round(x, 3) for x in ratios],
                "mesh_3_nodes_s": None if three_s is None else round(three_s, 2),
                "accuracy_svm": round(figures["accuracy_svm"], 4),
                "accuracy_forest": round(figures["accuracy_forest"], 4),
                "accuracy_cnn": round(figures["accuracy_cnn"], 4),
                "angle_mae_deg": round(figures["angle_mae_deg"], 3),
                "bytes_moved_ratio": moved_ratio,
                "labels": None if args.one_node else not args.no_labels,
                "other_cores": others,
            }
        )
    )


def _figures(f: Mapping[str, float]) -> str:
    return (
        f"svm {f['accuracy_svm']:.4f} forest {f['accuracy_forest']:.4f} "
        f"cnn {f['accuracy_cnn']:.4f} angle {f['angle_mae_deg']:.2f} deg"
    )


def _stages(stage_s: Mapping[str, float]) -> str:
    return "  ".join(f"{stage} {s:.1f}" for stage, s in stage_s.items())


if __name__ == "__main__":
    main()
