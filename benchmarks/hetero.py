"""Placement on machines of different speed: Mesh, Dask and Ray on the same CPU quotas.

One machine stands for several of different speed: each node (its daemon and every worker
process it starts) runs in its own cgroup-v1 CPU group under ``/sys/fs/cgroup/cpu``, held to
``share`` of one core (``cpu.cfs_quota_us = share * cpu.cfs_period_us``, period 100 ms).
Each process is started through ``sh -c 'echo $$ > GROUP/cgroup.procs; exec ...'``, so it is
in its group from its first instruction and everything it forks later inherits the group.
A mix of speeds ``4:4:1`` becomes shares 0.8, 0.8 and 0.2 of a core: the fastest node gets
0.8, and the shares are scaled down if they would add up to more than 90% of the cores.

The same mix, in turn, for each system (every node one slot, on 127.0.0.1):

- Mesh: one ``mesh-node`` per group (``local`` preset, no mDNS, ``--slots 1``, task module
  ``hetero``); the client connects to the fastest node (the first of the fastest in the
  mix; it runs tasks too, as every node does) and submits from outside the quotas;
- Dask: ``dask scheduler`` outside the quotas, one ``dask worker --nthreads 1 --nworkers 1``
  (nanny and worker) per group, the client outside;
- Ray: ``ray start --head --num-cpus 0`` outside the quotas (GCS, head raylet, the driver),
  one ``ray start --num-cpus 1`` per group (its raylet, agents and workers in the group).
  Ray gives a new raylet 30 s to register (fixed in ``ray/_private/node.py``), which a
  0.1-core group does not meet, so each Ray node starts in its group on a full core and is
  held to its share once it has joined, before any task; Mesh and Dask start under their
  quotas.

Once started, a system is left until no group is held at its quota for two seconds (start-up
done); the use of each quota just before each burst is printed, since a system's idle work
runs inside the quota too (a Dask nanny and worker use about 0.05 core).

The workload is a burst of ``hetero.spin`` tasks, each 60 ms of CPU time (the spin of
``benchmarks.peers``: thread CPU time, so a throttled task does the same work and takes
longer on the wall clock), all submitted at once; each returns the CPU group it ran in. The
count gives an ideal of 2.4 s: 72 tasks for 4:4:1, 60 for 1:2:4:8. The first burst runs on
freshly started nodes (nothing run yet, so no runtime history), the second on the same
nodes right after. Ideal = total CPU work / total quota; the figure is makespan / ideal
(1.0 is perfect; splitting 4:4:1 evenly, 24 tasks each, gives 3.0 at best).

Before the systems, a calibration spin in each group shows the quota at work (a 0.2-core
group stretches 0.2 s of CPU to about 1 s); after each system starts, every process in
every group is listed from its ``/proc/PID/cgroup``, and a task that reports a group that is
not one of the mix's fails the run.

    python benchmarks/hetero.py [--systems mesh,dask,ray] [--mixes 4:4:1,1:2:4:8]
    python benchmarks/hetero.py --quick          # Mesh alone, mix 2:1, a smoke run

The last line is one JSON object ``{"mixes": [{"speeds": [4, 4, 1], "mesh": [first,
second], "dask": [...], "ray": [...], ...}]}``: makespan / ideal of each burst to 3
decimals (``null`` where a system failed), beside the quotas, task count, ideal, makespans,
the split of tasks per node and the calibration. Without root or without the cgroup-v1 CPU
controller it prints why, then ``{"skipped": "...", "mixes": []}``, and exits 0.

Needs root. Creates ``/sys/fs/cgroup/cpu/mesh-bench-<pid>-<i>`` and removes them when done,
also on failure (``finally`` and ``atexit``): any process still in a group is ended, any that
will not end is moved back to the root group, then the group is removed. Every process it
starts is ended by its pid; every wait has a deadline; it talks to 127.0.0.1 only.

The nodes load this module as the task module ``hetero`` and Ray's and Dask's workers unpickle
its spin, which calls ``peers.spin``: every process it starts has the repository and
``benchmarks/`` on ``PYTHONPATH``. At import time it needs what ``benchmarks/peers.py`` needs
(numpy and the task registry) and nothing more.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import peers  # a sibling, as hostile.py imports node_loopback: the nodes find it on PYTHONPATH

from mesh import LocalMesh
from tasks import task

ROOT: Final = peers.ROOT
CPU_ROOT: Final = Path("/sys/fs/cgroup/cpu")
PERIOD_US: Final = 100_000
"""The CFS period: the default, short enough that a 60 ms task spans few periods."""

TASK_S: Final = 0.06
IDEAL_S: Final = 2.4
"""Ideal makespan a burst is sized for (72 tasks on 4:4:1, 60 on 1:2:4:8)."""
QUICK_IDEAL_S: Final = 1.0
FASTEST_SHARE: Final = 0.8
CORES_USED: Final = 0.9
"""Largest fraction of the machine's cores the shares may add up to: the rest is for the
client, the Dask scheduler and the Ray head, which run outside the quotas."""
DEFAULT_MIXES: Final = ((4, 4, 1), (1, 2, 4, 8))
QUICK_MIX: Final = (2, 1)
SYSTEMS: Final = ("mesh", "dask", "ray")

CALIBRATE_S: Final = 0.2
START_S: Final = 240.0
"""Deadline for one system to start in its groups: Ray starts a raylet and two agents per
group, which on a 0.1-core group takes tens of seconds."""
SETTLE_S: Final = 60.0
SETTLED: Final = 0.75
"""A group has settled when its processes use less than this fraction of its quota."""
MODULE: Final = "hetero"
OBJECT_STORE_BYTES: Final = 100 * 2**20
"""Each Ray node's object store: the tasks move a few bytes, and eight stores of Ray's
default size (30% of memory each) would not fit in shared memory."""

_WRAP: Final = 'echo $$ > "$0" && exec "$@"'


# ---------------------------------------------------------------------------------------
# The task


def cpu_group(pid: int | str = "self") -> str:
    """The cgroup-v1 CPU group of a process, as in ``/proc/PID/cgroup`` ("" if none)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    return ""


@task("hetero.spin", est_runtime_s=TASK_S)
def spin_where(seconds: float) -> str:
    """Burn ``seconds`` of this thread's CPU time; the CPU group this ran in."""
    peers.spin(seconds)
    return cpu_group()


# ---------------------------------------------------------------------------------------
# Mixes


@dataclass(frozen=True, slots=True, kw_only=True)
class Mix:
    speeds: tuple[int, ...]
    shares: tuple[float, ...]
    """Cores each node may use, in the order of ``speeds``."""
    tasks: int

    @property
    def ideal_s(self) -> float:
        return self.tasks * TASK_S / sum(self.shares)

    @property
    def fastest(self) -> int:
        """The node the Mesh client connects to: the first of the fastest."""
        return self.speeds.index(max(self.speeds))

    @property
    def label(self) -> str:
        return ":".join(map(str, self.speeds))


def plan(speeds: Sequence[int], cores: int, ideal_s: float = IDEAL_S) -> Mix:
    """Shares proportional to ``speeds``, the fastest at 0.8 of a core unless that would
    take more than 90% of ``cores``; as many tasks as give an ideal of ``ideal_s``."""
    if len(speeds) < 2 or any(s < 1 for s in speeds):
        raise ValueError(f"a mix is two or more positive speeds, not {list(speeds)}")
    scale = min(FASTEST_SHARE / max(speeds), CORES_USED * cores / sum(speeds))
    shares = tuple(round(s * scale, 4) for s in speeds)
    if min(shares) * PERIOD_US < 1000:
        raise ValueError(f"mix {list(speeds)}: a share under 1% of a core cannot be set")
    return Mix(speeds=tuple(speeds), shares=shares, tasks=round(ideal_s * sum(shares) / TASK_S))


def parse_mixes(text: str) -> list[tuple[int, ...]]:
    try:
        return [tuple(int(x) for x in m.split(":")) for m in text.split(",") if m.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"mixes look like 4:4:1,1:2:4:8, not {text!r}") from None


def split(groups: Sequence[str], names: Sequence[str]) -> list[int]:
    """Tasks per group, in the order of ``names``; a task elsewhere is an error."""
    stray = sorted({g for g in groups if g not in names})
    if stray:
        raise RuntimeError(f"tasks ran outside the quota groups: in {stray}")
    return [sum(g == n for g in groups) for n in names]


# ---------------------------------------------------------------------------------------
# CPU groups


def unsupported() -> str | None:
    """Why CPU groups cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    if not (CPU_ROOT / "cpu.cfs_quota_us").exists():
        return f"no cgroup-v1 CPU controller at {CPU_ROOT} (cgroup v2 only?)"
    return None


def _pids(procs_file: Path) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(x) for x in procs_file.read_text().split()]
    return []


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def describe(pid: int) -> str:
    """A short name for a process: ``node start``, ``dask worker``, ``raylet``..."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return "?"
    argv = [a for a in raw.split("\0") if a]
    if argv and Path(argv[0]).name.startswith("python"):
        argv = argv[1:]
        while argv[:1] not in ([], ["-m"], ["-c"]) and argv[0].startswith("-"):
            argv = argv[1:]  # interpreter flags: -u, -B, ...
        if argv[:1] == ["-m"]:
            argv = argv[1:]
        elif argv[:1] == ["-c"]:
            m = re.search(r"from (\S+) import", " ".join(argv[1:2]))
            return m.group(1) if m else "python -c"
    if not argv:
        return "?"
    words = [Path(argv[0]).name]
    if len(argv) > 1 and argv[1].isidentifier():
        words.append(argv[1])  # a subcommand: node start, dask worker, ray start
    return " ".join(words)


class CpuGroups:
    """One cgroup-v1 CPU group per share, ``mesh-bench-<pid>-<i>``; ``close()`` ends what is
    left in them and removes them (also at exit, should the caller not get to it)."""

    def __init__(self, shares: Sequence[float]) -> None:
        self.shares = tuple(shares)
        self.paths = [CPU_ROOT / f"mesh-bench-{os.getpid()}-{i}" for i in range(len(shares))]
        self.names = ["/" + p.name for p in self.paths]
        """Each group as ``/proc/PID/cgroup`` names it."""
        self._made: list[Path] = []
        atexit.register(self.close)
        try:
            for path, share in zip(self.paths, self.shares, strict=True):
                path.mkdir()
                self._made.append(path)
                (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                self.set_share(len(self._made) - 1, share)
        except BaseException:
            self.close()
            raise

    def set_share(self, i: int, share: float) -> None:
        """Hold group ``i`` to ``share`` of a core."""
        (self.paths[i] / "cpu.cfs_quota_us").write_text(str(round(share * PERIOD_US)))

    def check_shares(self) -> None:
        """Raise unless every group is held to its own share."""
        for i, share in enumerate(self.shares):
            quota = int((self.paths[i] / "cpu.cfs_quota_us").read_text())
            if quota != round(share * PERIOD_US):
                raise RuntimeError(f"group {i} has quota {quota} us, not {share} core")

    def wrap(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run so that it is in group ``i`` from its first instruction."""
        return ["/bin/sh", "-c", _WRAP, str(self.paths[i] / "cgroup.procs"), *argv]

    def pids(self, i: int) -> list[int]:
        return _pids(self.paths[i] / "cgroup.procs")

    def check(self, i: int, pid: int) -> None:
        """Raise unless process ``pid`` is in group ``i``."""
        where = cpu_group(pid)
        if where != self.names[i]:
            raise RuntimeError(f"process {pid} ({describe(pid)}) is in {where!r}, not group {i}")

    def cpu_s(self, i: int) -> float:
        return sum(cpu_seconds(p) for p in self.pids(i))

    def listing(self) -> list[str]:
        """Each group's processes, each checked against ``/proc/PID/cgroup``."""
        rows = []
        for i, share in enumerate(self.shares):
            pids = self.pids(i)
            for pid in pids:
                self.check(i, pid)
            names = ", ".join(f"{describe(p)} ({p})" for p in pids)
            rows.append(f"group {i} ({share:.2f} core): {names or 'empty'}")
        return rows

    def end_all(self, grace_s: float = 10.0) -> None:
        """End every process still in a group: all of them were started by this benchmark."""
        import psutil

        procs = []
        for i in range(len(self._made)):
            for pid in self.pids(i):
                with contextlib.suppress(psutil.Error):
                    procs.append(psutil.Process(pid))
        end_psutil(procs, grace_s)

    def close(self) -> None:
        atexit.unregister(self.close)
        if not self._made:
            return
        with contextlib.suppress(Exception):
            self.end_all()
        for path in reversed(self._made):
            for pid in _pids(path / "cgroup.procs"):
                with contextlib.suppress(OSError):
                    (CPU_ROOT / "cgroup.procs").write_text(str(pid))
            deadline = time.monotonic() + 10
            while True:
                try:
                    path.rmdir()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        print(f"could not remove {path}", file=sys.stderr, flush=True)
                        break
                    time.sleep(0.1)
        self._made.clear()


def end_psutil(procs: Sequence[Any], grace_s: float) -> None:
    """SIGTERM then, after ``grace_s``, SIGKILL these ``psutil.Process`` objects (psutil
    checks each is still the process it was, so a reused pid is not hit)."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def end_processes(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = 20.0) -> None:
    """SIGTERM each process still running, then SIGKILL any not gone after ``grace_s``."""
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def end_trees(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = 20.0) -> None:
    """End these processes (SIGTERM, then SIGKILL), then whatever they had started that
    outlived them."""
    import psutil

    below = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            below += psutil.Process(proc.pid).children(recursive=True)
    end_processes(procs, grace_s)
    end_psutil([p for p in below if p.is_running()], 5.0)


def calibrate(groups: CpuGroups, tmp: Path) -> list[float]:
    """How many times longer than its CPU time a spin takes on the wall clock in each group,
    all groups at once; each spinning process checks that it is in its group."""
    code = (
        "import sys, time\n"
        "import hetero\n"
        "t = time.perf_counter()\n"
        "hetero.peers.spin(float(sys.argv[1]))\n"
        "print(time.perf_counter() - t, hetero.cpu_group())\n"
    )
    env = _env(tmp)
    procs = [
        subprocess.Popen(
            groups.wrap(i, [sys.executable, "-c", code, str(CALIBRATE_S)]),
            stdout=subprocess.PIPE,
            env=env,
            cwd=str(ROOT),
        )
        for i in range(len(groups.shares))
    ]
    try:
        outs = [p.communicate(timeout=60)[0].decode().split() for p in procs]
    finally:
        end_processes(procs, 5.0)
    if any(p.returncode for p in procs):
        raise RuntimeError("a calibration spin failed")
    for i, (_, where) in enumerate(outs):
        if where != groups.names[i]:
            raise RuntimeError(f"the calibration spin for group {i} ran in {where!r}")
    return [float(took) / CALIBRATE_S for took, _ in outs]


def settle(groups: CpuGroups, deadline_s: float = SETTLE_S) -> tuple[list[float], bool]:
    """Wait until no group is held at its quota any more (start-up work done) for two
    seconds running; each group's use in the last second as a fraction of its quota, and
    whether that happened before the deadline.

    Idle is not zero: a Dask nanny and worker use about 0.05 core between tasks, most of a
    0.1-core group. Start-up work runs at the quota, so the test is "below 75% of it".
    """
    deadline = time.monotonic() + deadline_s
    n = len(groups.shares)
    before = [groups.cpu_s(i) for i in range(n)]
    calm = 0
    while True:
        time.sleep(1.0)
        now = [groups.cpu_s(i) for i in range(n)]
        use = [max(0.0, b - a) / s for a, b, s in zip(before, now, groups.shares, strict=True)]
        calm = calm + 1 if all(u < SETTLED for u in use) else 0
        if calm >= 2:
            return use, True
        if time.monotonic() > deadline:
            return use, False
        before = now


# ---------------------------------------------------------------------------------------
# The systems


class System(Protocol):
    name: str
    roots: dict[int, int]
    """The pid of the process started in each group (daemon, worker or ``ray start``)."""

    def burst(self, n: int, timeout: float) -> list[str]:
        """Run ``n`` spins at once; the CPU group of each, in order."""
        ...

    def close(self) -> None: ...


def _env(tmp: Path) -> dict[str, str]:
    """This environment with one BLAS thread (``peers.THREAD_ENV``), the repository and
    ``benchmarks/`` importable, and a configuration directory of the run's own."""
    env = {**os.environ, **peers.THREAD_ENV, "XDG_CONFIG_HOME": str(tmp / "config")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])
    env.pop("MESH_KEY", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_log(proc: subprocess.Popen[bytes], log: Path, text: str, what: str) -> None:
    deadline = time.monotonic() + START_S
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {START_S:.0f} s")
        time.sleep(0.1)


class MeshNodes:
    """A ``mesh-node`` per group (``LocalMesh``, each started through the group's wrapper)
    and a client, outside the quotas, on the fastest node."""

    name = "mesh"

    def __init__(self, groups: CpuGroups, mix: Mix, tmp: Path) -> None:
        self.mesh = LocalMesh(preset="local", slots=1, env=_env(tmp), timeout=START_S)
        self.roots: dict[int, int] = {}
        self._names = groups.names
        order = [mix.fastest, *(i for i in range(len(mix.shares)) if i != mix.fastest)]
        try:
            for i in order:
                node = self.mesh.start(
                    f"node{i}",
                    "--tasks",
                    MODULE,
                    labels={"group": str(i)},
                    prefix=groups.wrap(i, []),
                )
                self.roots[i] = node.pid
            self.mesh.wait_alive()
            self.client = self.mesh.client(f"node{mix.fastest}")
        except BaseException:
            self.mesh.close()
            raise

    def burst(self, n: int, timeout: float) -> list[str]:
        futures = self.client.map("hetero.spin", [TASK_S] * n)
        where: list[str] = self.client.gather(futures, timeout=timeout)
        # The node each result says it ran on must be the node of the group it names.
        nodes = {f"node{i}": name for i, name in enumerate(self._names)}
        for f, g in zip(futures, where, strict=True):
            if nodes.get(f.node) != g:
                raise RuntimeError(f"task {f.task_id}: Mesh says node {f.node!r}, ran in {g}")
        return where

    def close(self) -> None:
        """End the nodes, then any worker of theirs that outlived its node (as ``end_trees``)."""
        import psutil

        below = []
        for node in self.mesh.running():
            with contextlib.suppress(psutil.Error):
                below += psutil.Process(node.pid).children(recursive=True)
        self.mesh.close()
        end_psutil([p for p in below if p.is_running()], 5.0)


class DaskCluster:
    """``dask scheduler`` outside the quotas, a ``dask worker`` per group."""

    name = "dask"

    def __init__(self, groups: CpuGroups, mix: Mix, tmp: Path) -> None:
        self._dist: Any = importlib.import_module("distributed")
        self._client: Any = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.roots: dict[int, int] = {}
        dask = str(Path(sys.executable).with_name("dask"))
        env = _env(tmp)
        sched_file = tmp / "scheduler.json"
        try:
            log = tmp / "dask-scheduler.log"
            argv = [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
            argv += ["--scheduler-file", str(sched_file)]
            with open(log, "wb") as out:
                self.procs.append(
                    subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
                )
            _wait_log(self.procs[0], log, "Scheduler at:", "dask scheduler")
            for i in range(len(mix.shares)):
                with open(tmp / f"dask-worker{i}.log", "wb") as out:
                    argv = [dask, "worker", "--scheduler-file", str(sched_file)]
                    argv += ["--nthreads", "1", "--nworkers", "1", "--name", f"worker{i}"]
                    argv += ["--host", "127.0.0.1", "--no-dashboard", "--death-timeout", "60"]
                    argv += ["--local-directory", str(tmp / f"dask-worker{i}")]
                    proc = subprocess.Popen(
                        groups.wrap(i, argv), stdout=out, stderr=subprocess.STDOUT, env=env
                    )
                self.procs.append(proc)
                self.roots[i] = proc.pid
            self._client = self._dist.Client(scheduler_file=str(sched_file), timeout=START_S)
            self._client.wait_for_workers(len(mix.shares), timeout=START_S)
        except BaseException:
            self.close()
            raise

    def burst(self, n: int, timeout: float) -> list[str]:
        futures = self._client.map(spin_where, [TASK_S] * n, pure=False)
        self._dist.wait(futures, timeout=timeout)
        where: list[str] = self._client.gather(futures)
        return where

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        # Workers first, so that they do not wait out their death timeout on the scheduler.
        end_trees(self.procs[1:])
        end_trees(self.procs[:1])


class RayCluster:
    """``ray start --head --num-cpus 0`` outside the quotas (with the driver, this process),
    a ``ray start --num-cpus 1`` per group. Nodes start one after the other (two raylets
    starting together on one machine took the same plasma socket name, and one died), each
    on a full core until it has joined (see below)."""

    name = "ray"

    def __init__(self, groups: CpuGroups, mix: Mix, tmp: Path) -> None:
        import ray

        self._ray: Any = ray
        self._connected = False
        self.procs: list[subprocess.Popen[bytes]] = []
        self.roots: dict[int, int] = {}
        ray_cli = str(Path(sys.executable).with_name("ray"))
        env = {**_env(tmp), "RAY_USAGE_STATS_ENABLED": "0"}
        port = _free_port()
        common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        common += ["--object-store-memory", str(OBJECT_STORE_BYTES)]
        try:
            head = [ray_cli, "start", "--head", *common, "--port", str(port), "--num-cpus", "0"]
            head += ["--include-dashboard", "false", "--dashboard-host", "127.0.0.1"]
            head += ["--dashboard-port", str(_free_port()), "--temp-dir", str(tmp / "ray")]
            self._start(head, tmp / "ray-head.log", env, "the ray head")
            for i in range(len(mix.shares)):
                argv = [ray_cli, "start", *common, "--address", f"127.0.0.1:{port}"]
                argv += ["--num-cpus", "1", "--include-log-monitor", "false"]
                for opt in (
                    "--dashboard-agent-listen-port",
                    "--dashboard-agent-grpc-port",
                    "--runtime-env-agent-port",
                    "--metrics-export-port",
                ):
                    argv += [opt, str(_free_port())]
                # ray start gives its raylet 30 s to register (fixed in ray/_private/node.py);
                # in a 0.1-core group start-up takes longer, so a node starts on a full core
                # and is held to its share as soon as it has joined, before any task.
                groups.set_share(i, 1.0)
                try:
                    self._start(
                        groups.wrap(i, argv), tmp / f"ray-node{i}.log", env, f"ray node {i}"
                    )
                finally:
                    groups.set_share(i, groups.shares[i])
                self.roots[i] = self.procs[-1].pid
            keep = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                ray.init(
                    address=f"127.0.0.1:{port}",
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    configure_logging=True,
                )
            finally:
                # The driver's core installs handlers of its own: on SIGTERM it aborts the
                # process, which would leave every process and group of this run behind.
                for sig, handler in keep.items():
                    if handler is not None:
                        signal.signal(sig, handler)
            self._connected = True
            self._wait_ready(len(mix.shares))
            self._remote = ray.remote(num_cpus=1)(spin_where)
        except BaseException:
            self.close()
            raise

    def _start(self, argv: list[str], log: Path, env: dict[str, str], what: str) -> None:
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        _wait_log(proc, log, "Ray runtime started", what)

    def _wait_ready(self, n: int) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            alive = [x for x in self._ray.nodes() if x["Alive"]]
            if len(alive) == n + 1 and self._ray.cluster_resources().get("CPU") == n:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the ray nodes did not all join within {START_S:.0f} s")

    def burst(self, n: int, timeout: float) -> list[str]:
        refs = [self._remote.remote(TASK_S) for _ in range(n)]
        where: list[str] = self._ray.get(refs, timeout=timeout)
        return where

    def close(self) -> None:
        if self._connected:
            with contextlib.suppress(Exception):
                self._ray.shutdown()
            self._connected = False
        end_trees(self.procs[1:])
        end_trees(self.procs[:1])


STARTERS: Final[dict[str, Callable[[CpuGroups, Mix, Path], System]]] = {
    "mesh": MeshNodes,
    "dask": DaskCluster,
    "ray": RayCluster,
}


# ---------------------------------------------------------------------------------------
# Running


@dataclass(slots=True)
class Outcome:
    ratios: list[float | None] = field(default_factory=lambda: [None, None])
    makespans: list[float | None] = field(default_factory=lambda: [None, None])
    splits: list[list[int] | None] = field(default_factory=lambda: [None, None])
    started_s: float | None = None
    error: str = ""


def run_system(name: str, mix: Mix, groups: CpuGroups, tmp: Path) -> Outcome:
    out = Outcome()
    timeout = max(60.0, 20 * mix.ideal_s)
    t0 = time.perf_counter()
    system = STARTERS[name](groups, mix, tmp)
    try:
        for i, pid in system.roots.items():
            groups.check(i, pid)
        use, settled = settle(groups)
        out.started_s = time.perf_counter() - t0
        print(f"  {name:<5} started and settled in {out.started_s:.1f} s", flush=True)
        for row in groups.listing():
            print(f"    {row}", flush=True)
        for b in range(2):
            if b:
                use, settled = settle(groups)
            groups.check_shares()
            busy = ", ".join(f"{u:.0%}" for u in use)
            note = "" if settled else f" (still busy after {SETTLE_S:.0f} s)"
            print(f"  {name:<5} use of each quota before burst {b + 1}: {busy}{note}", flush=True)
            t = time.perf_counter()
            where = system.burst(mix.tasks, timeout)
            took = time.perf_counter() - t
            out.makespans[b] = round(took, 3)
            out.ratios[b] = round(took / mix.ideal_s, 3)
            out.splits[b] = split(where, groups.names)
            print(
                f"  {name:<5} burst {b + 1}: {took:6.2f} s = {took / mix.ideal_s:5.2f} x ideal,"
                f" split {'/'.join(map(str, out.splits[b] or []))}",
                flush=True,
            )
    finally:
        system.close()
        groups.end_all()
    return out


def run_mix(mix: Mix, systems: Sequence[str], tmp: Path) -> dict[str, Any]:
    shares = "/".join(f"{s:.2f}" for s in mix.shares)
    print(
        f"mix {mix.label}: quotas {shares} core, {mix.tasks} tasks x {TASK_S * 1000:.0f} ms,"
        f" ideal {mix.ideal_s:.2f} s",
        flush=True,
    )
    row: dict[str, Any] = {
        "speeds": list(mix.speeds),
        "quotas": list(mix.shares),
        "tasks": mix.tasks,
        "ideal_s": round(mix.ideal_s, 3),
    }
    errors: dict[str, str] = {}
    groups = CpuGroups(mix.shares)
    try:
        stretch = calibrate(groups, tmp)
        row["calibration"] = [round(x, 2) for x in stretch]
        print(
            f"  calibration: {CALIBRATE_S} s of CPU took "
            + ", ".join(
                f"x{x:.2f} (expect x{max(1.0, 1 / s):.2f})"
                for x, s in zip(stretch, mix.shares, strict=True)
            )
            + " of that on the wall clock",
            flush=True,
        )
        for x, s in zip(stretch, mix.shares, strict=True):
            if x < 0.8 * max(1.0, 1 / s):
                print(f"  warning: a {s:.2f}-core group ran too fast: quota not enforced?")
        splits: dict[str, Any] = {}
        makespans: dict[str, Any] = {}
        for name in systems:
            where = tmp / f"{mix.label.replace(':', '-')}-{name}"
            where.mkdir()
            try:
                out = run_system(name, mix, groups, where)
            except Exception as exc:
                # One system failing must not cost the others their run; it shows.
                lines = [x for x in str(exc).splitlines() if x.strip()] or [""]
                out = Outcome(error=f"{type(exc).__name__}: {lines[0]}")
                if len(lines) > 1:
                    out.error += f" ... {lines[-1]}"
                errors[name] = out.error
                print(f"  {name:<5} FAILED: {type(exc).__name__}: {exc}", flush=True)
            row[name] = out.ratios
            splits[name] = out.splits
            makespans[name] = out.makespans
        row["split"] = splits
        row["makespan_s"] = makespans
    finally:
        groups.close()
    if errors:
        row["errors"] = errors
    return row


def table(mixes: Sequence[dict[str, Any]], systems: Sequence[str]) -> str:
    lines = [
        "| mix | ideal (s) | system | burst 1 (x ideal) | burst 2 (x ideal) | split 1 | split 2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in mixes:
        for s in systems:
            ratios = m.get(s) or [None, None]
            parts = (m.get("split") or {}).get(s) or [None, None]
            cells = ["-" if r is None else f"{r:.2f}" for r in ratios]
            cells += ["-" if p is None else "/".join(map(str, p)) for p in parts]
            label = ":".join(map(str, m["speeds"]))
            lines.append(f"| {label} | {m['ideal_s']:.2f} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def terminated_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit here, so that ``finally`` blocks end what was started."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--systems", default=None, help="comma-separated subset of mesh,dask,ray")
    ap.add_argument("--mixes", type=parse_mixes, default=None, help="e.g. 4:4:1,1:2:4:8")
    ap.add_argument("--quick", action="store_true", help="Mesh alone, one small mix")
    ns = ap.parse_args()
    systems = [
        s.strip()
        for s in (ns.systems or ("mesh" if ns.quick else ",".join(SYSTEMS))).split(",")
        if s.strip()
    ]
    if not systems or any(s not in SYSTEMS for s in systems):
        raise SystemExit(f"--systems names some of {', '.join(SYSTEMS)}")
    speeds = ns.mixes or ([QUICK_MIX] if ns.quick else list(DEFAULT_MIXES))
    cores = len(os.sched_getaffinity(0))
    try:
        mixes = [plan(s, cores, QUICK_IDEAL_S if ns.quick else IDEAL_S) for s in speeds]
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    why = unsupported()
    if why:
        print(f"skipped: {why}", flush=True)
        print(json.dumps({"skipped": why, "mixes": []}), flush=True)
        return
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    print(f"machine: {peers.machine()}", flush=True)
    print(f"versions: {peers.versions(systems)}", flush=True)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with terminated_as_exit(), tempfile.TemporaryDirectory(prefix="mesh-hetero-") as tmp:
        for mix in mixes:
            rows.append(run_mix(mix, systems, Path(tmp)))
    print(f"\n{len(mixes)} mix(es) in {time.perf_counter() - t0:.0f} s\n")
    print(table(rows, systems))
    print(json.dumps({"mixes": rows}), flush=True)
    if any("errors" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
