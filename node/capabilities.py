"""What this machine offers the mesh: slots, memory, GPUs, libraries, installed tasks.

``probe`` builds the ``Capabilities`` a node gossips. GPUs are counted by torch, but torch is
never imported in the daemon (it costs a second and hundreds of MB): a short subprocess asks
it and the answer is remembered for the life of the process. ``without`` keeps a library off
the record (and, for torch, skips the GPU probe), so an operator can keep a machine off ML
work even though the library is installed; the executor's workers refuse to import it too.

The labels carry the pool of cores this node draws on and its size
(``node.cores.POOL_LABEL``, ``CORES_LABEL``), so that nodes sharing a host share its cores
rather than each claiming all of them; an operator's label of either name wins over the
measured one.

``LoadSampler`` measures what the host is doing (CPU and memory use) for load reports.

This module may not import torch, and must stay fast: the daemon calls ``probe`` at start.
"""

from __future__ import annotations

import functools
import glob
import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import psutil

from mesh.protocol.messages import Capabilities
from node.cores import CORES_LABEL, POOL_LABEL, local_pool

log = logging.getLogger(__name__)

STANDARD_LIBRARIES: Final = (
    "numpy",
    "torch",
    "torchvision",
    "scikit-learn",
    "scipy",
    "pandas",
    "pillow",
    "opencv-python",
    "jax",
)
"""Distributions every node reports when installed, whatever its tasks ask for."""

GPU_PROBE_TIMEOUT_S: Final = 60.0
"""Importing torch with CUDA initialisation can take tens of seconds on a cold disk."""

_GPU_PROBE: Final = """
import json, torch
devices = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append({"name": p.name, "memory": int(p.total_memory)})
print(json.dumps(devices))
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Gpu:
    """One device as torch sees it."""

    name: str
    memory: int


def _normalise(dist: str) -> str:
    return dist.lower().replace("_", "-")


def _gpu_possible() -> bool:
    """False when no device can exist, which spares the seconds of importing torch."""
    try:
        if importlib.metadata.version("torch").endswith("+cpu"):
            return False  # a CPU-only build sees no device whatever the machine has
    except importlib.metadata.PackageNotFoundError:
        return False
    if sys.platform.startswith("linux"):
        # CUDA needs the NVIDIA driver's device nodes, ROCm the kfd node.
        return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")
    return True


@functools.cache
def gpus(executable: str = sys.executable) -> tuple[Gpu, ...]:
    """The CUDA devices torch can use, probed once per process in a subprocess.

    No torch (or a torch that fails to load) means no GPUs.
    """
    if importlib.util.find_spec("torch") is None or not _gpu_possible():
        return ()
    try:
        done = subprocess.run(
            [executable, "-c", _GPU_PROBE],
            capture_output=True,
            text=True,
            timeout=GPU_PROBE_TIMEOUT_S,
            check=True,
        )
        found = json.loads(done.stdout.strip().splitlines()[-1])
        return tuple(Gpu(name=str(d["name"]), memory=int(d["memory"])) for d in found)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError) as exc:
        log.warning("GPU probe failed, reporting no GPUs: %s", exc)
        return ()


def installed_versions(dists: Iterable[str]) -> dict[str, str]:
    """Version of each named distribution that is installed; absent ones are left out."""
    found: dict[str, str] = {}
    for dist in dists:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def probe(
    *,
    slots: int | None = None,
    resources: Mapping[str, float] | None = None,
    labels: Mapping[str, str] | None = None,
    task_names: Iterable[str] = (),
    libraries_wanted: Iterable[str] = (),
    without: Sequence[str] = (),
) -> Capabilities:
    """This node's capabilities.

    ``resources`` come from the operator and override what is measured (``cpu``, ``gpu``,
    ``memory``, ``gpu_memory``) or add custom ones. ``slots`` defaults to the CPU count;
    ``libraries_wanted`` are the distributions the installed tasks require, reported along
    with ``STANDARD_LIBRARIES`` when installed. ``gpu_memory`` is the smallest device's
    memory, what any task placed on any device here can count on.
    """
    dropped = {_normalise(d) for d in without}
    cpus = slots if slots is not None else (os.cpu_count() or 1)
    measured: dict[str, float] = {
        "cpu": float(cpus),
        "memory": float(psutil.virtual_memory().total),
    }
    if "torch" not in dropped:
        devices = gpus()
        if devices:
            measured["gpu"] = float(len(devices))
            measured["gpu_memory"] = float(min(d.memory for d in devices))
    for key, amount in (resources or {}).items():
        measured[key] = float(amount)
    wanted = [*STANDARD_LIBRARIES, *libraries_wanted]
    libraries = {
        dist: version
        for dist, version in installed_versions(dict.fromkeys(wanted)).items()
        if _normalise(dist) not in dropped
    }
    return Capabilities(
        resources=measured,
        libraries=libraries,
        tasks=tuple(sorted(set(task_names))),
        labels={
            POOL_LABEL: local_pool().name,
            CORES_LABEL: str(local_pool().cores),
            **(labels or {}),
        },
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class HostLoad:
    """What the host is doing, beyond the tasks the executor counts."""

    cpu_percent: float
    """Whole-machine CPU use since the previous sample, 0-100."""
    memory_available: int
    """Bytes that can be allocated without swapping."""
    memory_percent: float


class LoadSampler:
    """Samples host load; each ``sample`` covers the time since the previous one."""

    def __init__(self) -> None:
        # psutil measures CPU use between calls: the first call only sets the baseline.
        psutil.cpu_percent(interval=None)

    def sample(self) -> HostLoad:
        mem = psutil.virtual_memory()
        return HostLoad(
            cpu_percent=float(psutil.cpu_percent(interval=None)),
            memory_available=int(mem.available),
            memory_percent=float(mem.percent),
        )
