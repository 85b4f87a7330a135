"""The capability probe: measured resources, operator overrides, libraries, tasks, `without`."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import psutil
import pytest

from node import capabilities
from node.capabilities import Gpu, LoadSampler, installed_versions, probe
from node.cores import CORES_LABEL, POOL_LABEL, local_pool


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = (Gpu(name="A", memory=24 << 30), Gpu(name="B", memory=12 << 30))
    monkeypatch.setattr(capabilities, "gpus", lambda: devices)


@pytest.fixture
def no_gpu_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> tuple[Gpu, ...]:
        raise AssertionError("the GPU probe must not run")

    monkeypatch.setattr(capabilities, "gpus", refuse)


def test_measured_fields(two_gpus: None) -> None:
    caps = probe(task_names=["echo", "noop", "echo"], labels={"room": "lab"})
    assert caps.resources["cpu"] == float(os.cpu_count() or 1)
    assert caps.resources["memory"] == float(psutil.virtual_memory().total)
    assert caps.resources["gpu"] == 2.0
    assert caps.resources["gpu_memory"] == float(12 << 30)
    assert caps.tasks == ("echo", "noop")
    assert caps.labels == {
        "room": "lab",
        POOL_LABEL: local_pool().name,
        CORES_LABEL: str(local_pool().cores),
    }
    assert caps.libraries["numpy"] == importlib.metadata.version("numpy")


def test_slots_and_operator_resources_override(two_gpus: None) -> None:
    caps = probe(slots=3, resources={"gpu": 1, "fpga": 2})
    assert caps.resources["cpu"] == 3.0
    assert caps.resources["gpu"] == 1.0
    assert caps.resources["fpga"] == 2.0


def test_wanted_libraries_are_reported_when_installed() -> None:
    caps = probe(libraries_wanted=["msgpack", "mesh-no-such-dist"])
    assert caps.libraries["msgpack"] == importlib.metadata.version("msgpack")
    assert "mesh-no-such-dist" not in caps.libraries
    assert installed_versions(["mesh-no-such-dist"]) == {}


def test_without_drops_libraries_and_the_gpu_probe(no_gpu_probe: None) -> None:
    caps = probe(libraries_wanted=["msgpack"], without=["torch", "MsgPack", "scikit_learn"])
    assert "gpu" not in caps.resources
    assert "gpu_memory" not in caps.resources
    assert "torch" not in caps.libraries
    assert "msgpack" not in caps.libraries
    assert "scikit-learn" not in caps.libraries
    assert "numpy" in caps.libraries


def test_no_gpu_without_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capabilities, "gpus", lambda: ())
    caps = probe()
    assert "gpu" not in caps.resources


def test_probe_never_imports_torch_in_the_caller() -> None:
    code = (
        "import sys\n"
        "from node.capabilities import gpus, probe\n"
        "caps = probe()\n"
        "assert isinstance(gpus(), tuple)\n"
        "assert 'torch' not in sys.modules\n"
        "assert caps.resources['cpu'] >= 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_load_sampler() -> None:
    sampler = LoadSampler()
    sample = sampler.sample()
    assert 0.0 <= sample.cpu_percent <= 100.0
    assert 0 < sample.memory_available <= psutil.virtual_memory().total
    assert 0.0 <= sample.memory_percent <= 100.0
