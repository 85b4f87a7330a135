"""Real ``mesh-node`` processes on 127.0.0.1 for the node tests.

Nodes run with ``--no-mdns``, ``--join`` to the first node, a shared random key and the
``test`` preset (or ``local`` where timing slack matters more than detection speed).
Every wait has a deadline; every process started here is ended by its pid when the test
(or module) using it finishes, also on failure. ``XDG_CONFIG_HOME`` points into the test's
temporary directory, so no test touches the user's key file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE = [sys.executable, "-m", "node"]
_LISTENING = re.compile(r"listening on (\S+:\d+)")

T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout: float, what: str, step: float = 0.05) -> T:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = cond()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        time.sleep(step)


def node_env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env["XDG_CONFIG_HOME"] = str(tmp / "config")
    env.pop("MESH_KEY", None)
    return env


@dataclass
class Node:
    """One running ``mesh-node`` process."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    address: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    """Nodes of one mesh; ``close()`` ends every process it started, by pid."""

    tmp: Path
    preset: str = "test"
    key: str = field(default_factory=lambda: secrets.token_hex(16))
    nodes: dict[str, Node] = field(default_factory=dict)

    def start(
        self,
        name: str,
        *extra: str,
        join: bool = True,
        slots: int = 2,
        wait: bool = True,
        mdns: bool = False,
    ) -> Node:
        seeds: list[str] = []
        if join:
            for other in self.nodes.values():
                if other.proc.poll() is None:
                    seeds = ["--join", other.address]
                    break
        log = self.tmp / f"{name}-{time.monotonic_ns()}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    *NODE,
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    *(["--mdns-interface", "127.0.0.1"] if mdns else ["--no-mdns"]),
                    "--preset",
                    self.preset,
                    "--name",
                    name,
                    "--key",
                    self.key,
                    "--slots",
                    str(slots),
                    "--label",
                    f"name={name}",
                    "--grace",
                    "20",
                    *seeds,
                    *extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=node_env(self.tmp),
                cwd=str(ROOT),
            )
        node = Node(name=name, proc=proc, log=log)
        self.nodes[name] = node
        if wait:

            def listening() -> str | None:
                if proc.poll() is not None:
                    raise AssertionError(f"node {name} exited: {node.output()[-3000:]}")
                m = _LISTENING.search(node.output())
                return m.group(1) if m else None

            found = wait_for(listening, 60, f"node {name} to listen")
            node.address = found or ""
        return node

    def cli(
        self, node: Node | str, *args: str, key: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        target = self.nodes[node] if isinstance(node, str) else node
        return subprocess.run(
            [*NODE, *args, "--node", target.url, "--key", key or self.key],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=node_env(self.tmp),
            cwd=str(ROOT),
        )

    def cli_json(self, node: Node | str, *args: str, timeout: float = 60) -> Any:
        out = self.cli(node, *args, "--json", timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def states(self, node: Node | str) -> dict[str, str]:
        """id -> state as ``node`` sees the mesh (empty if it does not answer)."""
        out = self.cli(node, "peers", "--json", timeout=20)
        if out.returncode != 0:
            return {}
        return {p["id"]: p["state"] for p in json.loads(out.stdout)}

    def all_alive(self, names: list[str]) -> bool:
        for n in names:
            st = self.states(n)
            if any(st.get(m) != "alive" for m in names):
                return False
        return True

    def signal(self, name: str, sig: int) -> None:
        proc = self.nodes[name].proc
        if proc.poll() is None:
            os.kill(proc.pid, sig)

    def close(self) -> None:
        for node in self.nodes.values():
            if node.proc.poll() is None:
                os.kill(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for node in self.nodes.values():
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """An empty mesh for one test; its nodes are ended afterwards."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three nodes ``a``, ``b``, ``c`` (two slots each) shared by a module's tests.

    They use the ``local`` preset: the ``test`` preset's 40 ms probe timeout suspects a
    node that a 256 MiB copy on this 2-core machine starves for a moment, and a suspected
    node is no candidate for work. Tests of death and purge start their own nodes."""
    c = Cluster(tmp_path_factory.mktemp("trio"), preset="local")
    try:
        for name in ("a", "b", "c"):
            c.start(name)
        wait_for(lambda: c.all_alive(["a", "b", "c"]), 30, "a, b and c alive everywhere")
        yield c
    finally:
        c.close()
