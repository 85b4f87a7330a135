"""Mesh against Ray and Dask: the same workloads, on one machine, in one run.

Each round starts one system, warms it, measures it and stops it, and the systems take turns
(Mesh, Ray, Dask, Mesh, ...) so that drift of the machine hits all of them alike:

- Mesh: one submitting node and two working nodes (one slot each) on 127.0.0.1, ``local``
  preset, no mDNS; the client talks to the submitting node, which runs no task itself;
- Ray: ``ray.init(num_cpus=2)``;
- Dask: ``LocalCluster`` with two single-threaded worker processes.

Workloads, each the same plain function on every system:

- ``tasks_per_s``: 5000 no-op tasks submitted at once, until every result is back;
- ``latency_ms_p50`` / ``_p99``: 500 no-op round trips one after the other;
- ``transfer_mib_per_s``: a 64 MiB float64 array as the argument of a sum task (median of 3);
- ``fanout_s``: 200 tasks of 20 ms of CPU each, wall time (2 s is ideal on two cores);
- ``pipeline_s``: the vision pipeline (``tasks.vision`` stages, ``PipelineSize.small()``) end
  to end: shards, preprocessing, CNN training, features, three heads, evaluation.

A figure is the median over rounds. The script prints every round, a markdown table with the
ratios Mesh/Ray and Mesh/Dask, and as its last line one JSON object
``{"mesh": {...}, "ray": {...}, "dask": {...}}``. ``--quick`` runs Mesh alone at tiny sizes
(a smoke run for CI); ``--chart`` draws the ratios into a PNG; ``--profile DIR`` runs Mesh
alone under py-spy, one recording per workload and process, and prints where the time goes.

    python benchmarks/peers.py [--rounds 3] [--chart benchmarks/ratios.png]
    python benchmarks/peers.py --quick
    python benchmarks/peers.py --profile /tmp/mesh-profile
    python benchmarks/peers.py --from-json saved-output.txt --chart benchmarks/ratios.png

The nodes load this module as a task module (``--tasks benchmarks.peers``) for the
``bench.*`` tasks, so at import time it needs numpy and the task registry only: Ray, Dask,
the Mesh client, psutil and matplotlib are imported inside the functions that use them.
Every process it starts is ended by its pid, also on failure; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from mesh import LocalMesh
from tasks import task
from tasks.vision import PipelineSize

ROOT: Final = Path(__file__).resolve().parents[1]

FIGURES: Final = (
    "tasks_per_s",
    "latency_ms_p50",
    "latency_ms_p99",
    "transfer_mib_per_s",
    "fanout_s",
    "pipeline_s",
)
HIGHER_IS_BETTER: Final = frozenset({"tasks_per_s", "transfer_mib_per_s"})
SYSTEMS: Final = ("mesh", "ray", "dask")

WORKER_LABEL: Final = {"role": "worker"}
"""Carried by the two working nodes; vision tasks ask for it so the submitting node (which
has the vision tasks installed too) runs none of them, as Ray's and Dask's drivers run none."""

BENCH_MODULE: Final = "benchmarks.peers"
WAIT_S: Final = 300.0
"""Deadline of any one workload's results: far above every system's time, yet a hung run
still ends in minutes rather than never."""


# ---------------------------------------------------------------------------------------
# The workloads' functions: plain on Ray and Dask, registered by name for Mesh


@task("bench.noop", est_runtime_s=0.0)
def noop(i: int = 0) -> None:
    """Nothing: the system's own cost per task (the argument keeps Dask's map keys apart)."""


@task("bench.spin", est_runtime_s=0.02)
def spin(seconds: float) -> float:
    """Burn ``seconds`` of this thread's CPU time, so that a preempted task still does the
    same work instead of finishing early on the wall clock."""
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        for i in range(200):
            x ^= i
    return seconds


@task("bench.array_sum", est_runtime_s=0.01)
def array_sum(a: npt.NDArray[np.float64]) -> float:
    """The sum of an array, as a float."""
    return float(np.sum(a, dtype=np.float64))


@task("bench.warm", est_runtime_s=1.0)
def warm(seconds: float) -> float:
    """Run every pipeline stage once on a few images, then hold the slot for ``seconds`` so
    the next warm task lands on the other worker: the first torch step and the first
    scikit-learn fit in a process cost seconds that no later run pays."""
    from tasks import vision as v

    train = [v.preprocess(v.make_shard(0, size=32))]
    weights = v.train_cnn(train, epochs=1, batch_size=16)["weights"]
    feats = [v.extract_features(weights, train[0])]
    v.predict(weights, train[0])
    v.train_svm(feats, feats)
    v.train_forest(feats, feats, trees=2)
    v.train_regressor(feats, feats)
    return spin(seconds)


# ---------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    noop_tasks: int = 5000
    latency_calls: int = 500
    array_mib: int = 64
    transfer_repeats: int = 3
    fanout_tasks: int = 200
    fanout_task_s: float = 0.02
    pipeline: PipelineSize = field(default_factory=PipelineSize.small)


FULL: Final = Sizes()
QUICK: Final = Sizes(
    noop_tasks=300,
    latency_calls=50,
    array_mib=8,
    transfer_repeats=1,
    fanout_tasks=20,
    pipeline=PipelineSize(
        train_shards=2, test_shards=1, shard_size=64, test_shard_size=32, epochs=1, batch_size=16
    ),
)


# ---------------------------------------------------------------------------------------
# One interface over three systems


class Runner(Protocol):
    name: str

    def submit(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Start ``fn(*args, **kwargs)`` (Mesh: task ``name``); handles may sit in lists."""
        ...

    def submit_many(self, name: str, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        """One task per item, each taking the item as its single argument, sent at once."""
        ...

    def gather(self, handles: Sequence[Any], timeout: float) -> list[Any]:
        """The values, in order, fetched to this process."""
        ...

    def close(self) -> None: ...


def measure(r: Runner, sizes: Sizes) -> dict[str, float]:
    """Every figure for one started, warmed system."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    r.gather(r.submit_many("bench.noop", noop, range(sizes.noop_tasks)), WAIT_S)
    out["tasks_per_s"] = sizes.noop_tasks / (time.perf_counter() - t0)

    lat = []
    for i in range(sizes.latency_calls):
        t = time.perf_counter()
        r.gather([r.submit("bench.noop", noop, i)], WAIT_S)
        lat.append((time.perf_counter() - t) * 1000)
    out["latency_ms_p50"] = float(np.percentile(lat, 50))
    out["latency_ms_p99"] = float(np.percentile(lat, 99))

    arr = np.random.default_rng(7).random(sizes.array_mib * 2**20 // 8)
    expected = float(arr.sum())
    took = []
    for _ in range(sizes.transfer_repeats):
        t = time.perf_counter()
        [got] = r.gather([r.submit("bench.array_sum", array_sum, arr)], WAIT_S)
        took.append(time.perf_counter() - t)
        if abs(got - expected) > 1e-9 * abs(expected):
            raise RuntimeError(f"{r.name}: array_sum gave {got}, expected {expected}")
    out["transfer_mib_per_s"] = sizes.array_mib / statistics.median(took)
    del arr

    t0 = time.perf_counter()
    spun = r.gather(
        r.submit_many("bench.spin", spin, [sizes.fanout_task_s] * sizes.fanout_tasks), WAIT_S
    )
    out["fanout_s"] = time.perf_counter() - t0
    if len(spun) != sizes.fanout_tasks:
        raise RuntimeError(f"{r.name}: fan-out returned {len(spun)} results")

    t0 = time.perf_counter()
    scores = run_pipeline(r, sizes.pipeline)
    out["pipeline_s"] = time.perf_counter() - t0
    if not 0.0 <= scores["accuracy_svm"] <= 1.0:
        raise RuntimeError(f"{r.name}: pipeline gave accuracy {scores['accuracy_svm']}")
    return out


def warm_up(r: Runner) -> None:
    """Start every worker and run each pipeline stage once in it, outside the clock."""
    r.gather(r.submit_many("bench.noop", noop, range(200)), WAIT_S)
    r.gather([r.submit("bench.warm", warm, 0.5) for _ in range(2)], WAIT_S)
    r.gather(r.submit_many("bench.spin", spin, [0.002] * 20), WAIT_S)


def run_pipeline(r: Runner, size: PipelineSize) -> dict[str, float]:
    """The stages of ``tasks.vision.run_sequential``, as tasks: independent ones at once."""
    from tasks import vision as v

    common = {"seed": size.seed, "max_angle": size.max_angle}
    raw = [
        r.submit("vision.make_shard", v.make_shard, i, size=size.shard_size, **common)
        for i in range(size.train_shards)
    ]
    raw_test = [
        r.submit(
            "vision.make_shard", v.make_shard, i, size=size.test_shard_size, split="test", **common
        )
        for i in range(size.test_shards)
    ]
    train = [r.submit("vision.preprocess", v.preprocess, s) for s in raw]
    test = [r.submit("vision.preprocess", v.preprocess, s) for s in raw_test]
    cnn = r.submit(
        "vision.train_cnn",
        v.train_cnn,
        train,
        seed=size.seed,
        epochs=size.epochs,
        batch_size=size.batch_size,
    )
    [trained] = r.gather([cnn], WAIT_S)
    weights = trained["weights"]
    train_f = [r.submit("vision.extract_features", v.extract_features, weights, s) for s in train]
    test_f = [r.submit("vision.extract_features", v.extract_features, weights, s) for s in test]
    cnn_pred = [r.submit("vision.predict", v.predict, weights, s) for s in test]
    heads = [
        r.submit(f"vision.train_{kind}", fn, train_f, test_f, seed=size.seed)
        for kind, fn in (
            ("svm", v.train_svm),
            ("forest", v.train_forest),
            ("regressor", v.train_regressor),
        )
    ]
    preds = r.gather(cnn_pred, WAIT_S)
    evaluated = r.submit(
        "vision.evaluate",
        v.evaluate,
        test,
        classes=np.concatenate([p["classes"] for p in preds]),
        angles=np.concatenate([p["angles"] for p in preds]),
    )
    svm, forest, regressor, cnn_scores = r.gather([*heads, evaluated], WAIT_S)
    return {
        "accuracy_svm": float(svm["info"]["accuracy"]),
        "accuracy_forest": float(forest["info"]["accuracy"]),
        "accuracy_cnn": float(cnn_scores["accuracy"]),
        "angle_mae_regressor_deg": float(regressor["info"]["angle_mae_deg"]),
    }


# ---------------------------------------------------------------------------------------
# Mesh


THREAD_ENV: Final = {"OMP_NUM_THREADS": "1"}
"""The nodes share this machine's cores by themselves (one thread per worker on two cores).
This pins one thread per worker on any machine, as Ray and Dask give theirs: the systems
compare at equal threads, not at whatever the core count allows."""


class MeshRunner:
    """Three ``mesh-node`` processes (``LocalMesh``: one slot each, ``local`` preset, no
    mDNS, label ``name=NAME``) and a sync client connected to the submitting one."""

    name = "mesh"

    def __init__(self) -> None:
        self.mesh = LocalMesh(preset="local", slots=1, env=THREAD_ENV)
        try:
            self.mesh.start("submit", labels={"role": "submit"})
            for name in ("work1", "work2"):
                self.mesh.start(name, "--tasks", BENCH_MODULE, labels=WORKER_LABEL)
            self.mesh.wait_alive()
            self.client = self.mesh.client("submit")
        except BaseException:
            self.mesh.close()
            raise

    def _fill(self, value: Any) -> Any:
        from mesh.client import TaskFuture

        if isinstance(value, TaskFuture):
            return value.result(WAIT_S)
        if isinstance(value, list):
            return [self._fill(v) for v in value]
        return value

    def submit(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        # The client waits for futures given as top-level arguments itself; those in lists
        # it cannot see, so they are resolved here (to references: the data stays put).
        args_ = tuple(self._fill(a) if isinstance(a, list) else a for a in args)
        kwargs_ = {k: self._fill(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        if name.startswith("bench."):
            # Installed on the working nodes only: no label needed, and none to match.
            return self.client.submit(name, *args_, **kwargs_)
        return self.client.submit_with(name, args_, kwargs_, labels=WORKER_LABEL)

    def submit_many(self, name: str, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        return list(self.client.map(name, items))

    def gather(self, handles: Sequence[Any], timeout: float) -> list[Any]:
        values = self.client.gather(list(handles), timeout=timeout)
        return [self.client.result(v, timeout) for v in values]

    def close(self) -> None:
        self.mesh.close()


# ---------------------------------------------------------------------------------------
# Ray


@dataclass(frozen=True, slots=True)
class _Slot:
    """Stands in an argument template for the n-th top-level argument, which Ray resolves."""

    n: int


def _refill(template: Any, values: Sequence[Any]) -> Any:
    if isinstance(template, _Slot):
        return values[template.n]
    if isinstance(template, list):
        return [_refill(t, values) for t in template]
    if isinstance(template, dict):
        return {k: _refill(t, values) for k, t in template.items()}
    return template


def _ray_apply(fn: Callable[..., Any], template: Any, *values: Any) -> Any:
    """Ray resolves object refs passed at the top level only; this puts them back in lists."""
    args, kwargs = _refill(template, values)
    return fn(*args, **kwargs)


class RayRunner:
    name = "ray"

    def __init__(self) -> None:
        import ray

        self._ray = ray
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
        self._remotes: dict[Callable[..., Any], Any] = {}
        self._apply = ray.remote(_ray_apply)

    def _remote(self, fn: Callable[..., Any]) -> Any:
        remote = self._remotes.get(fn)
        if remote is None:
            remote = self._remotes[fn] = self._ray.remote(fn)
        return remote

    def _template(self, value: Any, refs: list[Any]) -> Any:
        if isinstance(value, self._ray.ObjectRef):
            refs.append(value)
            return _Slot(len(refs) - 1)
        if isinstance(value, list):
            return [self._template(v, refs) for v in value]
        return value

    def submit(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        nested = any(isinstance(a, list) for a in (*args, *kwargs.values()))
        if not nested:
            return self._remote(fn).remote(*args, **kwargs)
        refs: list[Any] = []
        template = self._template([list(args), kwargs], refs)
        return self._apply.remote(fn, [template[0], dict(template[1])], *refs)

    def submit_many(self, name: str, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        remote = self._remote(fn)
        return [remote.remote(x) for x in items]

    def gather(self, handles: Sequence[Any], timeout: float) -> list[Any]:
        values: list[Any] = self._ray.get(list(handles), timeout=timeout)
        return values

    def close(self) -> None:
        self._ray.shutdown()


# ---------------------------------------------------------------------------------------
# Dask


class DaskRunner:
    name = "dask"

    def __init__(self) -> None:
        # Imported untyped: distributed's partial annotations trip mypy --strict.
        self._dist: Any = importlib.import_module("distributed")
        self._cluster = self._dist.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        try:
            self._client = self._dist.Client(self._cluster)
        except BaseException:
            self._cluster.close()
            raise

    def submit(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return self._client.submit(fn, *args, pure=False, **kwargs)

    def submit_many(self, name: str, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        futures: list[Any] = self._client.map(fn, list(items), pure=False)
        return futures

    def gather(self, handles: Sequence[Any], timeout: float) -> list[Any]:
        self._dist.wait(list(handles), timeout=timeout)
        values: list[Any] = self._client.gather(list(handles))
        return values

    def close(self) -> None:
        try:
            self._client.close()
        finally:
            self._cluster.close()


# ---------------------------------------------------------------------------------------
# Rounds, table, chart


def start(system: str) -> Runner:
    if system == "mesh":
        return MeshRunner()
    if system == "ray":
        return RayRunner()
    return DaskRunner()


def one_round(system: str, sizes: Sizes) -> dict[str, float]:
    t0 = time.perf_counter()
    runner = start(system)
    try:
        started = time.perf_counter() - t0
        warm_up(runner)
        figures = measure(runner, sizes)
    finally:
        runner.close()
    print(
        f"  {system:<5} started in {started:5.1f} s  "
        + "  ".join(f"{k}={v:.4g}" for k, v in figures.items()),
        flush=True,
    )
    return figures


def medians(rounds: list[dict[str, float]]) -> dict[str, float | None]:
    return {
        k: (round(statistics.median(r[k] for r in rounds), 3) if rounds else None) for k in FIGURES
    }


def advantage(figure: str, mesh: float, other: float) -> float:
    """How many times better Mesh is (above 1: Mesh ahead), whichever way the figure points."""
    return mesh / other if figure in HIGHER_IS_BETTER else other / mesh


def labels(sizes: Sizes) -> dict[str, str]:
    return {
        "tasks_per_s": f"no-op tasks per second ({sizes.noop_tasks} at once)",
        "latency_ms_p50": "latency p50 (ms)",
        "latency_ms_p99": "latency p99 (ms)",
        "transfer_mib_per_s": f"{sizes.array_mib} MiB argument (MiB/s)",
        "fanout_s": (
            f"fan-out {sizes.fanout_tasks} x {sizes.fanout_task_s * 1000:.0f} ms, wall (s)"
        ),
        "pipeline_s": "vision pipeline, small, end to end (s)",
    }


def table(result: dict[str, dict[str, float | None]], sizes: Sizes) -> str:
    systems = [s for s in SYSTEMS if s in result]
    others = [s for s in systems if s != "mesh"]
    head = ["figure", *(s.capitalize() for s in systems)]
    head += [f"Mesh/{s.capitalize()}" for s in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in FIGURES:
        row = [labels(sizes)[k]]
        for s in systems:
            v = result[s][k]
            row.append("-" if v is None else f"{v:.4g}")
        mesh = result["mesh"][k]
        for s in others:
            o = result[s][k]
            if mesh is None or o is None or o == 0:
                row.append("-")
            else:
                ahead = "ahead" if advantage(k, mesh, o) >= 1 else "behind"
                row.append(f"{mesh / o:.2f} ({ahead})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def chart(result: dict[str, dict[str, float | None]], sizes: Sizes, path: Path) -> None:
    """Bars of Mesh's advantage over each other system, per figure (above 1: Mesh ahead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    others = [s for s in SYSTEMS if s in result and s != "mesh"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(others))
    for j, s in enumerate(others):
        xs, ys = [], []
        for i, k in enumerate(FIGURES):
            m, o = result["mesh"][k], result[s][k]
            if m and o:
                xs.append(i + (j - (len(others) - 1) / 2) * width)
                ys.append(advantage(k, m, o))
        bars = ax.bar(xs, ys, width, label=f"vs {s.capitalize()}")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xticks(range(len(FIGURES)), [labels(sizes)[k] for k in FIGURES], rotation=20, ha="right")
    ax.set_ylabel("Mesh advantage (x, log scale; > 1: Mesh ahead)")
    ax.set_title("Mesh against Ray and Dask, same machine, same run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    import platform

    import psutil

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def versions(systems: Sequence[str]) -> str:
    import importlib.metadata as md

    names = {"mesh": "mesh-node", "ray": "ray", "dask": "distributed"}
    parts = []
    for s in systems:
        try:
            parts.append(f"{names[s]} {md.version(names[s])}")
        except md.PackageNotFoundError:
            parts.append(f"{names[s]} (not installed)")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------
# Profiling Mesh


@contextlib.contextmanager
def recording(pids: dict[str, int], outdir: Path, workload: str) -> Iterator[None]:
    """py-spy (CPU samples, idle excluded) on each process and its workers for one block."""
    spies = []
    for who, pid in pids.items():
        out = outdir / f"{workload}-{who}.txt"
        cmd = ["py-spy", "record", "--nonblocking", "-p", str(pid), "-r", "200", "-f", "raw"]
        cmd += ["-o", str(out)]
        if who != "client":
            cmd.append("--subprocesses")
        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # py-spy attaches asynchronously
    try:
        yield
    finally:
        for spy in spies:
            if spy.poll() is None:
                os.kill(spy.pid, signal.SIGINT)
        for spy in spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(spy.pid, signal.SIGKILL)
                spy.wait(timeout=10)


_FRAME: Final = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for anchor in ("/mesh/", "/node/", "/tasks/", "/benchmarks/", "site-packages/", "/lib/"):
        if anchor in path:
            path = path.split(anchor, 1)[1] if anchor != "/lib/" else path.rsplit("/lib/", 1)[1]
            path = (anchor.strip("/") + "/" + path) if anchor in ("/mesh/", "/node/") else path
            break
    return f"{path}:{m.group('fn')}"


def summarise(path: Path, top: int) -> list[str]:
    """Top functions of one py-spy raw file by self and by inclusive share of samples."""
    if not path.exists():
        return [f"  (no samples in {path.name})"]
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        # The first frame is the process (and thread) py-spy sampled, not code.
        code = frames[1:] or frames
        total += n
        own[code[-1]] += n
        for f in set(code):
            incl[f] += n
    if not total:
        return [f"  (no samples in {path.name})"]
    rows = [f"  {path.stem}: {total} samples"]
    rows += [f"    self {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    mine = [(f, n) for f, n in incl.most_common() if f.startswith(("mesh/", "node/"))]
    rows += [f"    incl {100 * n / total:5.1f}%  {f}" for f, n in mine[:top]]
    return rows


def profile(sizes: Sizes, outdir: Path, top: int) -> None:
    """Mesh alone, each workload under py-spy; prints the top functions per process."""
    outdir.mkdir(parents=True, exist_ok=True)
    r = MeshRunner()
    try:
        warm_up(r)
        pids = {name: node.pid for name, node in r.mesh.nodes.items()}
        pids["client"] = os.getpid()
        arr = np.random.default_rng(7).random(sizes.array_mib * 2**20 // 8)
        workloads: dict[str, Callable[[], object]] = {
            "throughput": lambda: r.gather(
                r.submit_many("bench.noop", noop, range(sizes.noop_tasks)), WAIT_S
            ),
            "latency": lambda: [
                r.gather([r.submit("bench.noop", noop, i)], WAIT_S)
                for i in range(sizes.latency_calls)
            ],
            "transfer": lambda: [
                r.gather([r.submit("bench.array_sum", array_sum, arr)], WAIT_S)
                for _ in range(sizes.transfer_repeats)
            ],
            "fanout": lambda: r.gather(
                r.submit_many("bench.spin", spin, [sizes.fanout_task_s] * sizes.fanout_tasks),
                WAIT_S,
            ),
            "pipeline": lambda: run_pipeline(r, sizes.pipeline),
        }
        for name, work in workloads.items():
            with recording(pids, outdir, name):
                t0 = time.perf_counter()
                work()
                took = time.perf_counter() - t0
            print(f"{name}: {took:.3f} s under py-spy", flush=True)
            for who in pids:
                print("\n".join(summarise(outdir / f"{name}-{who}.txt", top)), flush=True)
    finally:
        r.close()


# ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Mesh alone, tiny sizes, one round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per system (default 3)")
    ap.add_argument(
        "--systems", default=None, help="comma-separated subset of mesh,ray,dask (default: all)"
    )
    ap.add_argument("--chart", type=Path, help="write the ratio chart to this PNG")
    ap.add_argument("--profile", type=Path, help="profile Mesh under py-spy into this directory")
    ap.add_argument("--top", type=int, default=12, help="functions listed per profile")
    ap.add_argument(
        "--from-json", type=Path, help="redraw table and chart from a saved run's output"
    )
    ns = ap.parse_args()
    sizes = QUICK if ns.quick else FULL
    if ns.from_json:
        lines = ns.from_json.read_text().splitlines()
        saved = json.loads([x for x in lines if x.startswith('{"mesh"')][-1])
        print(table(saved, sizes))
        if ns.chart:
            chart(saved, sizes, ns.chart)
        return
    if ns.profile:
        profile(sizes, ns.profile, ns.top)
        return
    default = "mesh" if ns.quick else ",".join(SYSTEMS)
    systems = [s.strip() for s in (ns.systems or default).split(",") if s.strip()]
    if "mesh" not in systems or any(s not in SYSTEMS for s in systems):
        raise SystemExit(f"--systems must include mesh and name only {', '.join(SYSTEMS)}")
    rounds = 1 if ns.quick and ns.rounds == 3 else ns.rounds
    if rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    # Ray's and Dask's workers import this module's functions and tasks.vision by name.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    # Dask warns that a 64 MiB argument makes a large graph: that is the workload.
    warnings.filterwarnings("ignore", message=".*large (object|graph)")
    print(f"machine: {machine()}", flush=True)
    print(f"versions: {versions(systems)}", flush=True)
    per: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
    failed: list[str] = []
    t_start = time.perf_counter()
    for i in range(rounds):
        print(f"round {i + 1}/{rounds}", flush=True)
        for s in systems:
            try:
                per[s].append(one_round(s, sizes))
            except Exception as exc:
                # One system failing a round must not cost the others the run; it shows.
                failed.append(f"{s} round {i + 1}: {type(exc).__name__}: {exc}")
                print(f"  {s:<5} FAILED: {type(exc).__name__}: {exc}", flush=True)
    result = {s: medians(per[s]) for s in systems}
    print(f"\n{rounds} round(s) in {time.perf_counter() - t_start:.0f} s; medians:\n")
    print(table(result, sizes))
    if ns.chart and len(systems) > 1:
        chart(result, sizes, ns.chart)
        print(f"\nchart: {ns.chart}")
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    print(json.dumps(result), flush=True)
    if any(not per[s] for s in systems):
        sys.exit(1)


if __name__ == "__main__":
    main()
