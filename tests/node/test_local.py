"""``LocalMesh``: real nodes on 127.0.0.1 that see each other, run work, die and are replaced,
and leave no process and no file behind; a node that cannot start says why."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from mesh import LocalMesh, MeshError
from tests.node.conftest import wait_for


def _tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def test_two_nodes_see_each_other_run_work_lose_one_and_gain_one(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    with LocalMesh(2, preset="test", slots=1, env=env) as mesh:
        directory = mesh.directory
        first, second = mesh.nodes["node-1"], mesh.nodes["node-2"]
        assert first.ready is not None
        assert first.ready.pid == first.pid
        assert first.ready.id == "node-1"
        assert re.fullmatch(r"127\.0\.0\.1:\d+", first.address)
        assert {r.ready.mesh for r in (first, second) if r.ready} == {first.ready.mesh}

        client = mesh.client()
        views = {p["id"]: p for p in client.peers()}
        assert {n: p["state"] for n, p in views.items()} == {"node-1": "alive", "node-2": "alive"}
        assert views["node-2"]["capabilities"]["labels"]["name"] == "node-2"
        assert views["node-2"]["capabilities"]["resources"]["cpu"] == 1
        on_2 = client.submit_with("whoami", (), labels={"name": "node-2"})
        assert on_2.result(timeout=30) == "node-2"

        procs = [p for node in (first, second) for p in _tree(node.pid)]
        second.kill()
        assert not second.running()
        wait_for(
            lambda: {p["id"]: p["state"] for p in client.peers()}.get("node-2") != "alive",
            30,
            "node-1 to see node-2 go",
        )
        third = mesh.start("node-3", without=["torch"])
        assert mesh.running() == [first, third]
        mesh.wait_alive()
        assert client.submit_with("whoami", (), labels={"name": "node-3"}).result(30) == "node-3"
        procs += _tree(third.pid)
    assert not directory.exists()
    _, alive = psutil.wait_procs(procs, timeout=20)
    assert alive == []


def test_a_node_that_exits_fails_start_with_the_end_of_its_log(tmp_path: Path) -> None:
    mesh = LocalMesh(1, preset="test", slots=0, workdir=tmp_path)
    with pytest.raises(MeshError) as failed, mesh:
        pass
    message = str(failed.value)
    assert "node node-1" in message
    assert "exited with status 1 before it was ready" in message
    assert "--slots must be at least 1, not 0" in message
    assert str(tmp_path / "node-1.log") in message
    assert mesh.running() == []
    assert tmp_path.exists()  # a directory the caller gave is the caller's


def test_a_node_that_never_serves_is_ended_at_the_deadline(tmp_path: Path) -> None:
    # The wrapper sleeps instead of running the node: no ready file ever appears.
    sleeper = ["/bin/sh", "-c", "exec sleep 60"]
    with LocalMesh(preset="test", timeout=1.0) as mesh:
        directory = mesh.directory
        started = time.monotonic()
        with pytest.raises(MeshError, match=r"node late: .* was not ready within 1 s"):
            mesh.start("late", prefix=sleeper)
        assert time.monotonic() - started < 15
        late = mesh.nodes["late"]
        assert late.proc.returncode == -signal.SIGTERM
    assert not directory.exists()
