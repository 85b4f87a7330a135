"""Mesh on a real LAN: hosts in network namespaces, real mDNS, real TCP, real faults.

Nodes find each other by mDNS only (no --join) except where a test blocks multicast.
Hosts h1..h4 run the mesh; h5 runs a node of another mesh (a different key). The tests
share one LAN and run in file order; each leaves the four nodes alive for the next.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from mesh.client.local import wait_ready
from tests.lan.harness import Host, Lan

PORT = 7700
KEY = secrets.token_hex(16)
OTHER_KEY = secrets.token_hex(16)
ROOT = Path(__file__).resolve().parents[2]
NODE = [sys.executable, "-m", "node"]
DEMO = ROOT / "examples" / "lan_demo.py"


def wait_for(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Mesh:
    """The nodes of one test LAN, driven through the real CLI."""

    def __init__(self, lan: Lan, logdir: Path) -> None:
        self.lan = lan
        self.logdir = logdir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Path] = {}
        self.ready_files: dict[int, Path] = {}

    def url(self, host: Host) -> str:
        return f"http://{host.address}:{PORT}"

    def start(
        self, i: int, key: str = KEY, *extra: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start node ``hI`` with ``extra`` options, ``env`` laid over the environment."""
        host = self.lan.host(i)
        path = self.logdir / f"h{i}-{time.monotonic_ns()}.log"
        ready = path.with_suffix(".ready")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
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
                    "--key",
                    key,
                    "--name",
                    f"h{i}",
                    "--ready-file",
                    str(ready),
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(ROOT),
            )
        self.procs[i] = proc
        self.logs[i] = path
        self.ready_files[i] = ready
        return proc

    def serving(self, i: int, timeout: float = 30) -> float:
        """When node i wrote its ready file (monotonic seconds)."""
        wait_ready(self.ready_files[i], self.procs[i], timeout, log=self.logs[i])
        return time.monotonic()

    def watch(
        self, at: int, spec: str, timeout: float, nodes: list[int]
    ) -> subprocess.Popen[bytes]:
        """Start a watcher in host ``at`` that exits when ``spec`` holds on ``nodes``."""
        urls = [self.url(self.lan.host(j)) for j in nodes]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return self.lan.spawn(
            self.lan.host(at),
            [sys.executable, "-m", "tests.lan.watch", KEY, spec, str(timeout), *urls],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(ROOT),
        )

    @staticmethod
    def watched(proc: subprocess.Popen[bytes], timeout: float = 120) -> float:
        out, err = proc.communicate(timeout=timeout)
        lines = out.decode().strip().splitlines()
        assert lines, f"watcher failed: {err.decode()[-2000:]}"
        result = json.loads(lines[-1])
        assert result["ok"], f"condition never held: {err.decode()[-1000:]}"
        return float(result["at"])

    def cli(self, i: int, *args: str, key: str = KEY, timeout: float = 60) -> Any:
        host = self.lan.host(i)
        out = self.lan.run(
            host, [*NODE, *args, "--node", self.url(host), "--key", key, "--json"], timeout
        )
        if out.returncode != 0:
            raise AssertionError(f"h{i} {' '.join(args)} failed: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def try_cli(self, i: int, *args: str, key: str = KEY) -> Any:
        try:
            return self.cli(i, *args, key=key, timeout=10)
        except (AssertionError, json.JSONDecodeError, subprocess.TimeoutExpired):
            return None

    def states(self, i: int) -> dict[str, str]:
        peers = self.try_cli(i, "peers") or []
        return {p["id"]: p["state"] for p in peers}

    def all_alive(self, nodes: list[int], among: list[int]) -> bool:
        want = {f"h{j}" for j in among}
        for i in nodes:
            st = self.states(i)
            if any(st.get(n) != "alive" for n in want):
                return False
        return True

    def client(self, i: int, script: str, timeout: float = 120) -> Any:
        """Run a Python client script inside host i; it prints one JSON line at the end."""
        host = self.lan.host(i)
        code = (
            "import json, sys\nfrom mesh.client import connect\n"
            f"c = connect({self.url(host)!r}, key={KEY!r})\n" + script
        )
        out = self.lan.run(host, [sys.executable, "-c", code], timeout)
        if out.returncode != 0:
            raise AssertionError(f"client on h{i} failed: {out.stderr.strip()[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with Lan(6) as lan:
        m = Mesh(lan, tmp_path_factory.mktemp("lan-logs"))
        yield m


def test_discovery_by_mdns(mesh: Mesh, figures: dict[str, Any]) -> None:
    for i in (1, 2, 3, 4):
        mesh.start(i)
    last_up = max(mesh.serving(i) for i in (1, 2, 3, 4))
    everyone = ",".join(f"h{i}=alive" for i in (1, 2, 3, 4))
    seen = Mesh.watched(mesh.watch(1, everyone, 30, [1, 2, 3, 4]))
    figures["discovery_s"] = round(seen - last_up, 2)


def test_other_mesh_is_invisible(mesh: Mesh) -> None:
    mesh.start(5, OTHER_KEY)
    wait_for(lambda: mesh.try_cli(5, "status", key=OTHER_KEY), 20, "the other mesh's node")
    time.sleep(3)  # give mDNS time to announce it; it must still never appear
    for i in (1, 2, 3, 4):
        assert "h5" not in mesh.states(i)
    other = mesh.cli(5, "peers", key=OTHER_KEY)
    assert {p["id"] for p in other} <= {"h5"}
    # The other mesh cannot submit here: its key does not authenticate.
    host5 = mesh.lan.host(5)
    out = mesh.lan.run(
        host5,
        [
            *NODE,
            "submit",
            "whoami",
            "--node",
            mesh.url(mesh.lan.host(1)),
            "--key",
            OTHER_KEY,
            "--json",
        ],
    )
    assert out.returncode != 0
    assert "authentication failed" in (out.stderr + out.stdout).lower()
    assert mesh.cli(1, "submit", "whoami")["result"] in {"h1", "h2", "h3", "h4"}


def test_rejected_frames_are_counted(mesh: Mesh) -> None:
    # h5 (other key) learns h1's address by mDNS only if it were the same mesh; join it by hand.
    host1 = mesh.lan.host(1)
    out = mesh.lan.run(mesh.lan.host(1), ["curl", "-s", f"http://{host1.address}:{PORT}/metrics"])
    if out.returncode != 0:
        out = mesh.lan.run(
            mesh.lan.host(1),
            [
                sys.executable,
                "-c",
                f"import urllib.request;print(urllib.request.urlopen('http://{host1.address}:{PORT}/metrics').read().decode())",
            ],
        )
    assert "mesh_rejected_frames" in out.stdout


def test_submit_from_every_host(mesh: Mesh, figures: dict[str, Any]) -> None:
    before = {i: mesh.cli(i, "status")["completed"] for i in (1, 2, 3, 4)}
    for i in (1, 2, 3, 4):
        res = mesh.cli(i, "submit", "whoami")
        assert res["result"] == res["node"]
        assert res["node"] in {"h1", "h2", "h3", "h4"}
    t0 = time.monotonic()
    got = mesh.client(
        1,
        "fs = [c.submit('sleep', 0.05) for _ in range(200)]\n"
        "r = c.gather(fs)\nprint(json.dumps({'n': len(r), 'ok': all(x == 0.05 for x in r)}))",
    )
    figures["sleep200_s"] = round(time.monotonic() - t0, 2)
    assert got == {"n": 200, "ok": True}
    after = {i: mesh.cli(i, "status")["completed"] for i in (1, 2, 3, 4)}
    ran_on = [i for i in after if after[i] > before[i]]
    assert len(ran_on) > 1, f"all tasks ran on one host: {before} -> {after}"


def test_kill_9_during_tasks(mesh: Mesh, figures: dict[str, Any]) -> None:
    host = mesh.lan.host(1)
    script = (
        "fs = [c.submit('sleep', 0.2) for _ in range(60)]\n"
        "r = c.gather(fs)\nprint(json.dumps({'n': len(r)}))"
    )
    code = (
        "import json, sys\nfrom mesh.client import connect\n"
        f"c = connect({mesh.url(host)!r}, key={KEY!r})\n" + script
    )
    client = mesh.lan.spawn(
        host, [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_for(lambda: mesh.cli(4, "status")["running"] > 0, 20, "h4 running tasks")
    watcher = mesh.watch(1, "h4=dead|gone", 30, [1, 2, 3])
    time.sleep(0.5)  # let the watcher connect before the kill
    killed = time.monotonic()
    mesh.procs[4].send_signal(signal.SIGKILL)
    figures["detect_s"] = round(Mesh.watched(watcher) - killed, 2)
    out, err = client.communicate(timeout=120)
    assert client.returncode == 0, err.decode()[-2000:]
    assert json.loads(out.decode().strip().splitlines()[-1]) == {"n": 60}
    purged = Mesh.watched(mesh.watch(1, "h4=gone", 120, [1, 2, 3]), timeout=150)
    figures["purge_s"] = round(purged - killed, 2)
    mesh.procs[4].wait(timeout=10)
    mesh.start(4)
    Mesh.watched(mesh.watch(1, "h1=alive,h2=alive,h3=alive,h4=alive", 30, [1, 2, 3, 4]))


def test_packet_loss(mesh: Mesh, figures: dict[str, Any]) -> None:
    for i in (1, 2, 3, 4):
        mesh.lan.lossy(mesh.lan.host(i), 10)
    try:
        t0 = time.monotonic()
        got = mesh.client(
            2,
            "fs = [c.submit('echo', i) for i in range(500)]\n"
            "r = c.gather(fs)\nprint(json.dumps({'ok': r == list(range(500))}))",
            timeout=180,
        )
        figures["tasks_per_s_10pct_loss"] = round(500 / (time.monotonic() - t0), 1)
        assert got == {"ok": True}
        for i in (1, 2, 3, 4):
            assert all(s == "alive" for n, s in mesh.states(i).items() if n != "h5")
    finally:
        for i in (1, 2, 3, 4):
            mesh.lan.clean(mesh.lan.host(i))


def test_partition_and_heal(mesh: Mesh, figures: dict[str, Any]) -> None:
    mesh.lan.partition(mesh.lan.host(3))
    try:
        time.sleep(10)
        assert mesh.cli(3, "submit", "whoami")["result"] == "h3"
        assert mesh.cli(1, "submit", "whoami")["result"] in {"h1", "h2", "h4"}
        watcher = mesh.watch(1, "h1=alive,h2=alive,h3=alive,h4=alive", 30, [1, 2, 3, 4])
    finally:
        mesh.lan.heal()
    healed = time.monotonic()
    figures["heal_s"] = round(Mesh.watched(watcher) - healed, 2)


def test_independent_mdns_client_sees_records(mesh: Mesh) -> None:
    host = mesh.lan.host(6)
    out = mesh.lan.run(
        host, [sys.executable, "-m", "tests.lan.mdns_query", "_mesh-node._tcp.local."], timeout=30
    )
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    ids = {r["txt"].get("id") for r in records}
    assert {"h1", "h2", "h3", "h4"} <= ids
    for r in records:
        assert {"id", "mesh", "v"} <= set(r["txt"])


def test_graceful_stop(mesh: Mesh, figures: dict[str, Any]) -> None:
    watcher = mesh.watch(1, "h2=left|dead|gone", 10, [1, 3, 4])
    time.sleep(0.5)
    stopped = time.monotonic()
    mesh.procs[2].send_signal(signal.SIGTERM)
    figures["leave_seen_s"] = round(Mesh.watched(watcher) - stopped, 2)
    assert mesh.procs[2].wait(timeout=30) == 0
    mesh.start(2)
    Mesh.watched(mesh.watch(1, "h1=alive,h2=alive,h3=alive,h4=alive", 30, [1, 2, 3, 4]))


def test_host_address_not_owned(mesh: Mesh) -> None:
    host = mesh.lan.host(6)
    out = mesh.lan.run(
        host,
        [*NODE, "start", "--host", "10.77.0.99", "--port", str(PORT), "--key", KEY],
        timeout=30,
    )
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1
    assert "10.77.0.99" in out.stderr


def test_blocked_multicast_joins_with_seed(mesh: Mesh) -> None:
    host = mesh.lan.host(6)
    mesh.lan.block_mdns(host)
    mesh.start(6, KEY, "--join", f"{mesh.lan.host(1).address}:{PORT}")
    wait_for(
        lambda: all(mesh.states(i).get("h6") == "alive" for i in (1, 3, 4)),
        20,
        "h6 seen by the others",
    )
    status = mesh.cli(6, "status")
    assert status.get("mdns_found") == 0


def test_image_pipeline_spreads_over_the_lan(mesh: Mesh, figures: dict[str, Any]) -> None:
    script = (
        "import importlib.util\n"
        "from tasks.vision import PipelineSize\n"
        f"spec = importlib.util.spec_from_file_location('lan_demo', {str(DEMO)!r})\n"
        "demo = importlib.util.module_from_spec(spec)\n"
        "sys.modules['lan_demo'] = demo  # dataclasses look their module up\n"
        "spec.loader.exec_module(demo)\n"
        "run = demo.run_pipeline(c, PipelineSize.small(), timeout=240)\n"
        "f = run.figures\n"
        "best = max(f['accuracy_svm'], f['accuracy_forest'], f['accuracy_cnn'])\n"
        "print(json.dumps({'best': best, 'wall_s': run.wall_s,\n"
        "                  'nodes': sorted({s.node for s in run.steps})}))\n"
    )
    got = mesh.client(1, script, timeout=300)
    figures["pipeline_small_s"] = round(got["wall_s"], 1)
    assert got["best"] >= 0.8
    assert len(set(got["nodes"]) - {"h1"}) >= 1, got["nodes"]
