"""Real ``mesh-node`` processes on 127.0.0.1 for the node tests, through ``LocalMesh``.

Nodes run with ``--no-mdns``, ``--join`` to the first node, a shared random key and the
``test`` preset (or ``local`` where timing slack matters more than detection speed).
Every wait has a deadline; every process started here is ended by its pid when the test
(or module) using it finishes, also on failure. ``XDG_CONFIG_HOME`` points into the test's
temporary directory, so no test touches the user's key file.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mesh.client.local import LocalMesh
from mesh.client.local import LocalNode as Node
from node.daemon import Daemon, NodeOptions

ROOT = Path(__file__).resolve().parents[2]
NODE = [sys.executable, "-m", "node"]

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


class Cluster(LocalMesh):
    """A ``LocalMesh`` with the node tests' defaults (two slots, ``--grace 20``, logs in
    ``tmp``) and the CLI against its nodes; ``close()`` ends every process it started."""

    def __init__(self, tmp: Path, preset: str = "test", key: str | None = None) -> None:
        super().__init__(
            preset=preset,
            key=key or secrets.token_hex(16),
            slots=2,
            args=("--grace", "20"),
            env={"XDG_CONFIG_HOME": str(tmp / "config"), "PYTHONUNBUFFERED": "1"},
            workdir=tmp,
            stop_grace_s=15,
        )

    def cli(
        self, node: Node | str, *args: str, key: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        target = self.nodes[node] if isinstance(node, str) else node
        return subprocess.run(
            [*NODE, *args, "--node", target.url, "--key", key or self.key],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=node_env(self.directory),
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
        self.nodes[name].signal(sig)


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
        c.wait_alive(30)
        yield c
    finally:
        c.close()


@asynccontextmanager
async def serving(options: NodeOptions) -> AsyncIterator[Daemon]:
    """A node run in this process with ``options``, from when its workers are up until the
    block ends (then stopped, and its run awaited)."""
    daemon = Daemon(options, out=lambda _: None)
    stop = asyncio.Event()
    running = asyncio.ensure_future(daemon.run(stop))
    try:
        async with asyncio.timeout(30):
            while not (hasattr(daemon, "executor") and daemon.executor.worker_pids()):
                if running.done():
                    running.result()
                await asyncio.sleep(0.02)
        yield daemon
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await running
