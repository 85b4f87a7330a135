"""The cores this node may use, and how its workers share them with the other nodes on its host.

Every node on one host and every slot of each node draw on the same cores. Each node
measures the cores it may really use (its CPU affinity, and the CPU quota of its cgroup and
the cgroups above it, v1 or v2) and names the pool they come from, and how many cores it
has, in reserved labels of its capabilities (``POOL_LABEL``, ``CORES_LABEL``), which
membership gossips with the rest of its record. A node then counts the slots of the live
nodes whose label matches its own (``HostSlots``) and gives each worker
``max(1, cores // slots)`` BLAS and torch threads (``threads_per_worker``); the executor
passes the count on to its workers, and lends a task that starts alone on its node the share
of the node's idle slots (``node.executor``).

The pool name is a digest of the running kernel (its boot id: everything under one kernel
runs on the same CPUs, whatever container or network namespace it is in), the CPUs this
process may run on, and the cgroup whose quota limits it, if any. Nodes pinned to other
cores or held by another quota are in other pools and do not count each other; nodes under
one kernel with no quota and the same affinity, started from any shell or service, do.

An operator who sets ``--label mesh.cpu-pool=NAME`` puts nodes in one pool by hand (where
the measurement cannot see that they share cores).

This module reads a handful of small files when it measures (once per process, in
``local_pool``) and nothing afterwards; it may not import torch or numpy.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mesh.protocol.core import MemberState, MemberView, PeerView
from mesh.protocol.messages import NodeId
from mesh.protocol.resources import CPU_CORES_LABEL, CPU_POOL_LABEL

log = logging.getLogger(__name__)

POOL_LABEL: Final = CPU_POOL_LABEL
"""Capabilities label naming the pool of cores a node draws on (see the module docstring)."""
CORES_LABEL: Final = CPU_CORES_LABEL
"""Capabilities label with the pool's cores (``CpuPool.cores``): an initiator moves a task's
inputs between two nodes of one pool only while the pool has a core to spare."""

THREAD_VARS: Final = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""What BLAS libraries and torch read, when they load, for the size of their thread pools."""

_LIVE: Final = frozenset({MemberState.ALIVE, MemberState.SUSPECT})
"""A suspected node may well still be running its tasks: its slots still count."""

_BOOT_ID: Final = "proc/sys/kernel/random/boot_id"


@dataclass(frozen=True, slots=True, kw_only=True)
class CpuPool:
    """The cores this process may use and the name of the pool they belong to."""

    name: str
    """Equal for processes that draw on the same cores (``POOL_LABEL``'s value)."""
    cores: int
    """Whole cores this process may keep busy: its affinity, bounded by a quota; at least 1."""
    cpus: int
    """CPUs in this process's affinity mask."""
    quota: float | None
    """The tightest CPU quota over this process's cgroup and its ancestors, in cores; None
    when no quota applies."""


def slot_speed(slots: int, pool: CpuPool) -> float:
    """How many times longer than on a whole core a task takes here with every slot busy:
    ``slots`` workers share the CPUs of ``pool`` and, under a quota, its share of them.
    A node held to 0.2 of a core starts its bids at five times a task's estimate; the
    contract core corrects the factor from every run it measures."""
    share = float(pool.cpus) if pool.quota is None else min(float(pool.cpus), pool.quota)
    return min(max(1.0, slots / max(share, 1e-3)), 1e3)


def threads_per_worker(cores: int, slots: int) -> int:
    """Threads for each worker when ``slots`` workers in all share ``cores`` cores."""
    return max(1, cores // max(1, slots))


def measure(root: Path = Path("/"), affinity: Iterable[int] | None = None) -> CpuPool:
    """This process's pool of cores, read from ``root`` (``/``; a fake tree in tests).

    ``affinity`` defaults to ``os.sched_getaffinity`` where there is one, else every CPU.
    """
    if affinity is None:
        if hasattr(os, "sched_getaffinity"):
            affinity = os.sched_getaffinity(0)
        else:  # pragma: no cover - macOS, Windows
            affinity = range(os.cpu_count() or 1)
    cpus = sorted(set(affinity)) or [0]
    quota, group = cgroup_quota(root)
    cores = len(cpus)
    if quota is not None:
        # Floor, not round: 1.5 cores of quota keep two busy threads throttled a third of
        # the time, which costs more than the half core left unused.
        cores = max(1, min(cores, math.floor(quota)))
    name = hashlib.sha256(f"{_kernel(root)}|{cpus}|{group}".encode()).hexdigest()[:16]
    return CpuPool(name=name, cores=cores, cpus=len(cpus), quota=quota)


@functools.cache
def local_pool() -> CpuPool:
    """``measure()``, once per process: the probe and the executor see the same pool."""
    pool = measure()
    log.debug("cores: %s", pool)
    return pool


class HostSlots:
    """The slots of this node and of every live node in its pool, as membership knows them.

    Kept up to date from membership's events at the cost of the events, not of the mesh
    (membership reports every load change of every peer). A node without the label shares
    with nobody; a peer claiming absurd slots only makes the count large, and
    ``threads_per_worker`` never goes below one thread.
    """

    def __init__(self, peers: PeerView, me: NodeId) -> None:
        self._peers = peers
        self._me = me
        self._pool: str | None = None
        self._own = 0
        self._others: dict[NodeId, int] = {}
        self._scanned = False

    def observe(self, nodes: Iterable[NodeId]) -> int:
        """The slots on this host after membership reported changes of ``nodes``."""
        own = self._peers.member(self._me)
        if own is None:
            return self._own + sum(self._others.values())
        pool = own.capabilities.labels.get(POOL_LABEL)
        self._own = _slots(own)
        if not self._scanned or pool != self._pool:
            self._pool, self._scanned = pool, True
            self._others = {
                m.node: _slots(m)
                for m in self._peers.members()
                if m.node != self._me and _shares(m, pool)
            }
        else:
            for node in nodes:
                if node == self._me:
                    continue
                view = self._peers.member(node)
                if view is not None and _shares(view, pool):
                    self._others[node] = _slots(view)
                else:
                    self._others.pop(node, None)
        return self._own + sum(self._others.values())


def _shares(view: MemberView, pool: str | None) -> bool:
    return bool(pool) and view.state in _LIVE and view.capabilities.labels.get(POOL_LABEL) == pool


def _slots(view: MemberView) -> int:
    amount = view.capabilities.resources.get("cpu", 0.0)
    return int(amount) if math.isfinite(amount) and amount > 0 else 0


def _kernel(root: Path) -> str:
    """The running kernel's boot id; the host name where there is none."""
    try:
        boot = (root / _BOOT_ID).read_text().strip()
    except OSError:
        boot = ""
    return boot or f"host:{socket.gethostname()}"


# ---------------------------------------------------------------------------------------
# cgroups


def cgroup_quota(root: Path = Path("/")) -> tuple[float | None, str]:
    """(the tightest CPU quota in cores over this process's cgroups and their ancestors,
    an identity of the cgroup that sets it), or (None, "") when nothing limits the process.

    Reads ``/proc/self/cgroup`` for the process's groups (v2 ``0::/path``, v1 the ``cpu``
    controller's line) and ``/proc/self/mountinfo`` for where each hierarchy is mounted, then
    ``cpu.max`` (v2) or ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (v1) in each group
    from the process's own up to the mount's root. Unreadable files count as no quota.
    """
    try:
        groups = (root / "proc/self/cgroup").read_text()
        mounts = (root / "proc/self/mountinfo").read_text()
    except OSError:
        return None, ""
    best: tuple[float | None, str] = (None, "")
    for version, mount_root, mount_point in _cgroup_mounts(mounts):
        path = _group_path(groups, version)
        if path is None:
            continue
        for directory in _ancestors(root, mount_root, mount_point, path):
            quota = _read_quota(directory, version)
            if quota is not None and (best[0] is None or quota < best[0]):
                best = (quota, _identity(directory))
    return best


def _cgroup_mounts(mountinfo: str) -> list[tuple[int, str, str]]:
    """(version, root inside the hierarchy, mount point) of the cgroup2 mount and the v1
    mount that has the ``cpu`` controller."""
    found: list[tuple[int, str, str]] = []
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(after) < 3:
            continue
        fstype, options = after[0], after[2].split(",")
        if fstype == "cgroup2":
            found.append((2, _unescape(fields[3]), _unescape(fields[4])))
        elif fstype == "cgroup" and "cpu" in options:
            found.append((1, _unescape(fields[3]), _unescape(fields[4])))
    return found


def _group_path(groups: str, version: int) -> str | None:
    """This process's group in the v2 hierarchy, or in the v1 hierarchy of ``cpu``."""
    for line in groups.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if version == 2 and hierarchy == "0" and controllers == "":
            return path
        if version == 1 and "cpu" in controllers.split(","):
            return path
    return None


def _ancestors(root: Path, mount_root: str, mount_point: str, path: str) -> list[Path]:
    """The group's directory and those above it, up to the mount point."""
    mount_root = mount_root.rstrip("/") or "/"
    if mount_root != "/":
        if path != mount_root and not path.startswith(mount_root + "/"):
            return []  # a group outside what is mounted here (another cgroup namespace)
        path = path[len(mount_root) :] or "/"
    base = root / mount_point.lstrip("/")
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read_quota(directory: Path, version: int) -> float | None:
    try:
        if version == 2:
            quota_text, _, period_text = (directory / "cpu.max").read_text().strip().partition(" ")
            if quota_text == "max":
                return None
            quota, period = int(quota_text), int(period_text or "100000")
        else:
            quota = int((directory / "cpu.cfs_quota_us").read_text().strip())
            period = int((directory / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None  # -1: no quota
    return quota / period


def _identity(directory: Path) -> str:
    """The group's directory as the kernel knows it: paths repeat across cgroup namespaces
    (every container sees itself at ``/``), inodes do not."""
    try:
        st = os.stat(directory)
    except OSError:
        return str(directory)
    return f"{st.st_dev}:{st.st_ino}"


def _unescape(field: str) -> str:
    """Mount paths in mountinfo escape space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field
