"""Joining with a code and ``mesh-node doctor`` on a real LAN (hosts in network namespaces).

h1..h3 run the mesh with a key given on the command line; h4 joins with a one-time code and
no key file; h5 tries a wrong code. Then ``doctor`` runs where a fault was injected and must
name it: multicast dropped with nftables (h6, joined with --join), the node's port blocked
(h3), a host with another key (h7), a node of an old protocol version (h5, announced by
``tests.lan.old_node``), two nodes with one id (h5 as "h2"); and on a healthy host (h4, with
only the key file its code brought) it says all is well. The tests share one LAN and run in
file order.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from mesh.protocol.codec import key_fingerprint
from mesh.runtime.auth import key_bytes
from tests.lan.harness import Lan
from tests.lan.test_lan import KEY, NODE, OTHER_KEY, PORT, ROOT, Mesh, wait_for

DOCTOR_TIMEOUT_S = 90


class JoinMesh(Mesh):
    """``Mesh`` plus hosts with a key file of their own (``XDG_CONFIG_HOME`` per host)."""

    def config_home(self, i: int) -> Path:
        return self.logdir / f"config-h{i}"

    def env(self, i: int) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "XDG_CONFIG_HOME": str(self.config_home(i)),
        }

    def key_file(self, i: int) -> Path:
        return self.config_home(i) / "mesh" / "key"

    def start_with_code(self, i: int, code: str) -> subprocess.Popen[bytes]:
        host = self.lan.host(i)
        path = self.logdir / f"h{i}-code-{time.monotonic_ns()}.log"
        ready = path.with_suffix(".ready")
        with open(path, "wb") as log:
            proc = self.lan.spawn(
                host,
                [
                    *NODE,
                    "start",
                    "--host",
                    host.address,
                    "--port",
                    str(PORT),
                    "--name",
                    f"h{i}",
                    "--ready-file",
                    str(ready),
                    "--code",
                    code,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(i),
                cwd=str(ROOT),
            )
        self.procs[i], self.logs[i], self.ready_files[i] = proc, path, ready
        return proc

    def run_node_cli(
        self, i: int, *args: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        host = self.lan.host(i)
        self.lan._check_no_default_route(host)
        return subprocess.run(
            ["ip", "netns", "exec", host.ns, *NODE, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(i),
            cwd=str(ROOT),
        )

    def invite(self, at: int = 1, *more: str) -> Any:
        return self.cli(at, "invite", *more)

    def doctor(self, i: int, key: str | None = KEY) -> tuple[int, list[dict[str, Any]]]:
        args = ["doctor", "--node", self.url(self.lan.host(i)), "--json"]
        if key is not None:
            args += ["--key", key]
        out = self.run_node_cli(i, *args, timeout=DOCTOR_TIMEOUT_S)
        assert out.stdout.strip(), out.stderr
        return out.returncode, json.loads(out.stdout)

    def metric(self, i: int, reason: str) -> float:
        url = f"{self.url(self.lan.host(i))}/metrics"
        out = self.lan.run(
            self.lan.host(i),
            [
                sys.executable,
                "-c",
                f"import urllib.request;print(urllib.request.urlopen({url!r}).read().decode())",
            ],
        )
        for line in out.stdout.splitlines():
            if line.startswith("mesh_rejected_frames_total") and f'reason="{reason}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def problems(findings: list[dict[str, Any]]) -> dict[str, str]:
    return {f["name"]: f["message"] for f in findings if f["severity"] == "problem"}


def doctor_problem(mesh: JoinMesh, at: int, name: str) -> str:
    """What ``mesh-node doctor`` on host ``at`` says of problem ``name``; it must find it,
    and exit 1."""
    status, findings = mesh.doctor(at)
    found = problems(findings)
    assert status == 1, findings
    assert name in found, findings
    return found[name]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JoinMesh]:
    with Lan(7) as lan:
        yield JoinMesh(lan, tmp_path_factory.mktemp("join-logs"))


def test_a_fourth_host_joins_with_a_code(mesh: JoinMesh, figures: dict[str, Any]) -> None:
    for i in (1, 2, 3):
        mesh.start(i)
    for i in (1, 2, 3):
        mesh.serving(i)
    Mesh.watched(mesh.watch(1, "h1=alive,h2=alive,h3=alive", 30, [1, 2, 3]))
    code = mesh.invite(1)["code"]
    assert not mesh.key_file(4).exists()
    started = time.monotonic()
    mesh.start_with_code(4, code)
    mesh.serving(4)
    figures["join_code_s"] = round(time.monotonic() - started, 2)
    seen = Mesh.watched(mesh.watch(1, "h1=alive,h2=alive,h3=alive,h4=alive", 30, [1, 2, 3, 4]))
    figures["join_code_seen_s"] = round(seen - started, 2)
    path = mesh.key_file(4)
    assert path.read_text().strip() == KEY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    listing = mesh.invite(1, "--list")
    assert [i["state"] for i in listing] == ["used"]
    # The new host works like any other: a task it submits runs somewhere in the mesh.
    assert mesh.cli(4, "submit", "whoami")["result"] in {"h1", "h2", "h3", "h4"}


def test_a_wrong_code_fails_and_the_code_is_dead(mesh: JoinMesh) -> None:
    code = mesh.invite(1)["code"]
    number = code.split("-")[0]
    before = mesh.metric(1, "join-used-code")
    wrong = f"{number}-abandon-abandon-abandon"
    join = ["--host", mesh.lan.host(5).address, "--port", str(PORT), "--name", "h5"]
    out = mesh.run_node_cli(5, "start", *join, "--code", wrong)
    assert out.returncode != 0
    assert "wrong code" in out.stderr
    assert not mesh.key_file(5).exists()
    out = mesh.run_node_cli(5, "start", *join, "--code", code)
    assert out.returncode != 0
    assert "used" in out.stderr
    assert not mesh.key_file(5).exists()
    assert mesh.metric(1, "join-used-code") == before + 1
    states = {i["nameplate"]: i["state"] for i in mesh.invite(1, "--list")}
    assert states[number] == "used"
    # A code can be revoked before it is used; it is dead from then on.
    other = mesh.invite(1)["code"]
    mesh.invite(1, "--revoke", other.split("-")[0])
    out = mesh.run_node_cli(5, "start", *join, "--code", other)
    assert out.returncode != 0
    assert "revoked" in out.stderr or "used" in out.stderr


def test_doctor_on_a_healthy_host(mesh: JoinMesh) -> None:
    # h4 has only the key file the code brought.
    status, findings = mesh.doctor(4, key=None)
    assert problems(findings) == {}, findings
    assert status == 0
    assert [f["name"] for f in findings] == ["all-well"]


def test_doctor_names_a_key_file_others_can_read(mesh: JoinMesh) -> None:
    path = mesh.key_file(4)
    path.chmod(0o644)
    try:
        status, findings = mesh.doctor(4, key=None)
    finally:
        path.chmod(0o600)
    assert status == 1, findings
    assert set(problems(findings)) == {"key-file-permissions"}, findings
    assert str(path) in problems(findings)["key-file-permissions"]


def test_doctor_names_dropped_multicast(mesh: JoinMesh) -> None:
    host6 = mesh.lan.host(6)
    mesh.lan.block_mdns(host6)
    mesh.start(6, KEY, "--join", f"{mesh.lan.host(1).address}:{PORT}")
    mesh.serving(6)
    wait_for(lambda: mesh.states(1).get("h6") == "alive", 30, "h6 alive at h1")
    status, findings = mesh.doctor(6)
    found = problems(findings)
    assert status == 1, findings
    assert {"multicast-not-received", "multicast-not-sent"} <= set(found), findings
    assert "eth0" in found["multicast-not-received"]
    assert "eth0" in found["multicast-not-sent"]


def test_doctor_names_a_blocked_port(mesh: JoinMesh) -> None:
    host3 = mesh.lan.host(3)
    mesh.lan.drop(host3, "noport", "input", "iifname", "eth0", "tcp", "dport", str(PORT))
    try:
        status, findings = mesh.doctor(3)
    finally:
        mesh.lan.undrop(host3, "noport")
    found = problems(findings)
    assert status == 1, findings
    assert set(found) == {"port-blocked"}, findings
    assert f"{host3.address}:{PORT}" in found["port-blocked"]


def test_doctor_names_nodes_of_another_mesh(mesh: JoinMesh) -> None:
    mesh.start(7, OTHER_KEY)
    mesh.serving(7)
    status, findings = mesh.doctor(7, key=OTHER_KEY)
    found = problems(findings)
    assert status == 1, findings
    assert "other-mesh" in found, findings
    assert "nodes with a different key" in found["other-mesh"]
    assert key_fingerprint(key_bytes(KEY)) in found["other-mesh"]


def test_doctor_names_an_old_protocol_version(mesh: JoinMesh) -> None:
    host5 = mesh.lan.host(5)
    fingerprint = key_fingerprint(key_bytes(KEY))
    old = mesh.lan.spawn(
        host5,
        [
            sys.executable,
            "-m",
            "tests.lan.old_node",
            host5.address,
            str(PORT),
            "old5",
            fingerprint,
            "0",
            "0.0.9",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=mesh.env(5),
        cwd=str(ROOT),
    )
    try:
        assert old.stdout is not None
        assert old.stdout.readline().strip() == b"announced"
        message = doctor_problem(mesh, 1, "incompatible-version")
        assert "old5" in message
        assert "v0" in message
    finally:
        old.send_signal(signal.SIGTERM)
        old.wait(timeout=30)


FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.mark.skipif(not FAKETIME.exists(), reason="needs libfaketime (apt-get install faketime)")
def test_doctor_names_a_clock_far_off(mesh: JoinMesh) -> None:
    # The namespaces share one clock: h5's node sees it five minutes ahead (its wall clock
    # only; timers run on the real monotonic clock).
    ahead = {"LD_PRELOAD": str(FAKETIME), "FAKETIME": "+300", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    node = mesh.start(5, KEY, "--name", "h5", env=ahead)
    mesh.serving(5)
    pids = [node.pid, *(p.pid for p in psutil.Process(node.pid).children(recursive=True))]
    try:
        message = doctor_problem(mesh, 1, "clock-off")
        assert "h5" in message
        assert "ahead of" in message
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=30)
        for pid in pids:  # what libfaketime leaves in /dev/shm for each process it ran in
            for name in (f"faketime_shm_{pid}", f"sem.faketime_sem_{pid}"):
                Path("/dev/shm", name).unlink(missing_ok=True)


def test_doctor_names_two_nodes_with_one_id(mesh: JoinMesh) -> None:
    # A copied start script: h5 runs as "h2" too, announced by mDNS like the real one. The
    # ready file is written once the node is announced.
    mesh.start(5, KEY, "--name", "h2")
    mesh.serving(5)
    try:
        message = doctor_problem(mesh, 2, "duplicate-id")
        assert f"{mesh.lan.host(5).address}:{PORT}" in message
        assert f"{mesh.lan.host(2).address}:{PORT}" in message
    finally:
        mesh.procs[5].send_signal(signal.SIGTERM)
        mesh.procs[5].wait(timeout=30)
