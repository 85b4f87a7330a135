"""The ``mesh-node`` command line against a real node."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.client.local import wait_ready
from tests.node.conftest import NODE, ROOT, Cluster, node_env


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cli"))
    try:
        c.start("solo")
        yield c
    finally:
        c.close()


def test_submit_json_prints_task_id_result_and_node(solo: Cluster) -> None:
    out = solo.cli_json("solo", "submit", "echo", '[{"a": [1, 2.5, null]}]')
    assert out["result"] == {"a": [1, 2.5, None]}
    assert out["node"] == "solo"
    assert out["task_id"]
    assert solo.cli_json("solo", "submit", "sleep", '{"seconds": 0.01}')["result"] == 0.01
    plain = solo.cli("solo", "submit", "whoami")
    assert plain.returncode == 0
    assert json.loads(plain.stdout) == "solo"


def test_task_error_exits_non_zero_with_the_remote_message(solo: Cluster) -> None:
    out = solo.cli("solo", "submit", "fail", '["the disk is on fire"]')
    assert out.returncode != 0
    assert "the disk is on fire" in out.stderr
    assert "RuntimeError" in out.stderr


def test_bad_arguments_and_unknown_tasks(solo: Cluster) -> None:
    bad = solo.cli("solo", "submit", "echo", "[1, oops")
    assert bad.returncode != 0
    assert "not valid JSON" in bad.stderr
    scalar = solo.cli("solo", "submit", "echo", "5")
    assert scalar.returncode != 0
    assert "JSON array" in scalar.stderr
    unknown = solo.cli("solo", "submit", "teleport", timeout=30)
    assert unknown.returncode != 0
    assert "no peer can run teleport" in unknown.stderr


def test_wrong_key_is_refused(solo: Cluster) -> None:
    for args in (("status",), ("peers",), ("submit", "whoami")):
        out = solo.cli("solo", *args, key="an entirely different key")
        assert out.returncode != 0
        assert "authentication failed" in out.stderr


def test_status_peers_and_why_json(solo: Cluster) -> None:
    status = solo.cli_json("solo", "status")
    assert {"id", "peers", "running", "queued", "completed"} <= set(status)
    assert status["id"] == "solo"
    peers = solo.cli_json("solo", "peers")
    assert [p["id"] for p in peers] == ["solo"]
    assert peers[0]["state"] == "alive"
    assert {"id", "address", "state", "load", "capabilities"} <= set(peers[0])
    task = solo.cli_json("solo", "submit", "whoami")
    why = solo.cli_json("solo", "why", task["task_id"])
    assert why["winner"] == "solo"
    assert why["rounds"]
    missing = solo.cli("solo", "why", "never-submitted")
    assert missing.returncode != 0


def test_bare_mesh_node_starts_and_creates_the_key_file(tmp_path: Path) -> None:
    env = node_env(tmp_path)
    log = tmp_path / "bare.log"
    ready_file = tmp_path / "bare.ready"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                *NODE,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-mdns",
                "--preset",
                "test",
                "--name",
                "bare",
                "--without",
                "torch",
                "--ready-file",
                str(ready_file),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(ROOT),
        )
    try:
        ready = wait_ready(ready_file, proc, 60, log=log)
        assert (ready.id, ready.pid) == ("bare", proc.pid)
        address = ready.address
        assert f"listening on {address}" in log.read_text()
        assert "--join" in log.read_text()
        key_file = tmp_path / "config" / "mesh" / "key"
        assert key_file.exists()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        # The key file is found by the client commands too: no --key needed.
        status = subprocess.run(
            [*NODE, "peers", "--node", address, "--json"],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(ROOT),
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        (me,) = json.loads(status.stdout)
        assert "torch" not in me["capabilities"]["libraries"]
        assert "numpy" in me["capabilities"]["libraries"]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_ready_file_in_no_directory_is_a_one_line_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [*NODE, "start", "--host", "127.0.0.1", "--port", "0", "--no-mdns", "--key", "k",
         "--ready-file", str(tmp_path / "missing" / "ready.json")],
        capture_output=True,
        text=True,
        env=node_env(tmp_path),
        cwd=str(ROOT),
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"mesh-node: --ready-file: no directory for {tmp_path / 'missing' / 'ready.json'}"
    ]
