"""Real ``mesh-node`` processes on this machine, the way Dask has ``LocalCluster``.

::

    from mesh import LocalMesh

    with LocalMesh(3) as mesh:              # three nodes on 127.0.0.1, all alive everywhere
        client = mesh.client()              # a sync client of the first node
        print(client.submit("whoami").result())
        mesh.nodes["node-2"].kill()         # SIGKILL one
        mesh.start("node-4", without=["torch"])

Each node is ``python -m node start`` on 127.0.0.1 with a free port, without mDNS (it joins
the first running node with ``--join``), with the mesh's key and ``--ready-file``: the node
writes one JSON object there (``ReadyRecord``: id, address, pid, ...) once it serves, and that
file, not the banner it prints for people, is how ``start`` learns that it is up and where.
Every node carries the label ``name=NAME``, so a task can be pinned to one. A node's output
goes to ``NAME.log`` in the mesh's directory; a node that exits or stays silent past the
deadline fails ``start`` with the end of that log.

``close()`` (or leaving the ``with`` block) closes the clients it handed out, ends every
process it started by its pid (SIGTERM, then SIGKILL after ``stop_grace_s``) and removes the
temporary directory it made. What this module may not do: import ``node`` (it runs it as a
program, so the two packages stay apart), or start anything that listens beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

from mesh.errors import MeshError

if TYPE_CHECKING:
    from mesh.client import Client

HOST: Final = "127.0.0.1"
LOG_TAIL_CHARS: Final = 3000
"""How much of a failed node's log its error carries."""
READY_POLL_S: Final = 0.02
"""How often a wait for a ready file looks again (cheap: one stat)."""
VIEW_POLL_S: Final = 0.1
"""How often ``wait_alive`` asks every node for its peers again."""
_SOURCE_ROOT: Final = str(Path(__file__).resolve().parents[2])
"""Where ``mesh`` (and beside it ``node``) was imported from: the nodes import the same."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadyRecord:
    """What a node writes to its ``--ready-file`` once it serves: one JSON object."""

    id: str
    address: str
    """``HOST:PORT`` of its single port (peers, the HTTP API and client sessions)."""
    pid: int
    host_id: str
    """This machine's shared-memory identity: clients and peers with the same one map the
    node's objects instead of copying them."""
    mesh: str
    """The key's fingerprint (as in mDNS): tells meshes apart, reveals nothing."""
    slots: int

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the record to ``path`` atomically (a temporary file renamed over it), so a
        reader sees either no file or the whole object."""
        target = Path(path)
        temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(asdict(self)) + "\n")
        os.replace(temp, target)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ReadyRecord | None:
        """The record at ``path``, or None while there is none."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return None
        try:
            return cls(**data)
        except TypeError as exc:
            raise MeshError(f"{path} is not a node's ready record: {exc}") from None


def wait_ready(
    path: Path, proc: subprocess.Popen[bytes], timeout: float, *, log: Path | None = None
) -> ReadyRecord:
    """The record ``proc`` writes to ``path`` once it serves; ``MeshError`` with the end of
    ``log`` if it exits first or writes none within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (record := ReadyRecord.read(path)) is None:
        if proc.poll() is not None:
            why = f"exited with status {proc.returncode} before it was ready"
        elif time.monotonic() > deadline:
            why = f"was not ready within {timeout:g} s"
        else:
            time.sleep(READY_POLL_S)
            continue
        tail = log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log and log.exists() else ""
        where = f"; the end of {log}:\n{tail}" if log is not None else ""
        raise MeshError(f"node (pid {proc.pid}) {why}{where}")
    return record


@dataclass(eq=False)
class LocalNode:
    """One ``mesh-node`` process of a ``LocalMesh``."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready_file: Path
    ready: ReadyRecord | None = None
    """Set once the node serves (``wait_ready``)."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` once ready, else ""."""
        return self.ready.address if self.ready is not None else ""

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """Everything the node printed so far (stdout and stderr)."""
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> ReadyRecord:
        """Until the node serves; ``MeshError`` with the end of its log if it does not."""
        if self.ready is None:
            try:
                self.ready = wait_ready(self.ready_file, self.proc, timeout, log=self.log)
            except MeshError as exc:
                self.stop(grace_s=5.0)
                raise MeshError(f"node {self.name}: {exc}") from None
        return self.ready

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the node's process if it still runs."""
        if self.running():
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the node (its peers see it die) and reap it."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, grace_s: float = 20.0) -> int:
        """SIGTERM (the node leaves the mesh), then SIGKILL after ``grace_s``; the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait(timeout=10)


@dataclass(eq=False)
class LocalMesh:
    """``n`` nodes started on entering the ``with`` block (each ``start()`` adds one more);
    the options here apply to every node, ``start()``'s add to them for one.

    ``preset`` names the timings (``local`` suits nodes sharing one machine); ``key`` is
    made fresh unless given; ``slots`` (None: the node's CPU count), ``labels``, ``without``
    (libraries a node leaves out) and ``args`` (more ``mesh-node start`` options) go to every
    node; ``env`` is laid over this process's environment for the nodes (thread caps such as
    ``OMP_NUM_THREADS``, ``XDG_CONFIG_HOME``). ``workdir`` holds the logs and ready files
    (default: a temporary directory, removed by ``close()``); ``timeout`` bounds each wait
    for the nodes; ``stop_grace_s`` is how long ``close()`` gives them after SIGTERM.
    """

    n: int = 0
    preset: str = "local"
    key: str = field(default_factory=lambda: secrets.token_hex(16))
    slots: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    without: Sequence[str] = ()
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    timeout: float = 60.0
    stop_grace_s: float = 20.0
    directory: Path = field(init=False)
    """Where the nodes' logs and ready files are: ``workdir``, or a temporary directory."""
    nodes: dict[str, LocalNode] = field(default_factory=dict, init=False)
    """The latest node of each name, by name."""
    _started: list[LocalNode] = field(default_factory=list, init=False, repr=False)
    _clients: list[Client] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.directory = self.workdir or Path(tempfile.mkdtemp(prefix="mesh-local-"))

    def __enter__(self) -> Self:
        try:
            for _ in range(self.n):
                self.start()
            self.wait_alive()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def running(self) -> list[LocalNode]:
        """The nodes whose processes still run, in the order they started."""
        return [n for n in self.nodes.values() if n.running()]

    def start(
        self,
        name: str | None = None,
        *args: str,
        slots: int | None = None,
        labels: Mapping[str, str] | None = None,
        without: Sequence[str] = (),
        join: bool = True,
        mdns: bool = False,
        prefix: Sequence[str] = (),
        wait: bool = True,
    ) -> LocalNode:
        """Start one more node (default name ``node-N``) and, unless ``wait`` is false, wait
        until it serves; it does not wait for the others to see it (``wait_alive``).

        ``args`` are more ``mesh-node start`` options; ``slots``, ``labels`` and ``without``
        add to or override the mesh's. ``join``: join the first running node (else it is on
        its own, or finds peers by mDNS). ``mdns``: announce and browse on 127.0.0.1 instead
        of ``--no-mdns``. ``prefix`` goes before the command: a wrapper that ``exec``s it
        (into a cgroup, say), so that the node keeps the wrapper's pid.
        """
        name = name or f"node-{len(self._started) + 1}"
        stem, k = name, 1
        while (self.directory / f"{stem}.log").exists():
            k += 1
            stem = f"{name}-{k}"
        log, ready = self.directory / f"{stem}.log", self.directory / f"{stem}.ready"
        seeds = [n.address for n in self.running() if n.address][:1] if join else []
        argv = [*prefix, sys.executable, "-m", "node", "start", "--host", HOST, "--port", "0"]
        argv += ["--mdns-interface", HOST] if mdns else ["--no-mdns"]
        argv += ["--preset", self.preset, "--name", name, "--key", self.key]
        argv += ["--ready-file", str(ready)]
        count = slots if slots is not None else self.slots
        argv += ["--slots", str(count)] if count is not None else []
        for k_v in {"name": name, **self.labels, **(labels or {})}.items():
            argv += ["--label", "=".join(k_v)]
        for lib in dict.fromkeys([*self.without, *without]):
            argv += ["--without", lib]
        argv += [*self.args, *args]
        for seed in seeds:
            argv += ["--join", seed]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                cwd=self.directory,
            )
        node = LocalNode(name=name, proc=proc, log=log, ready_file=ready)
        self._started.append(node)
        self.nodes[name] = node
        if wait:
            node.wait_ready(self.timeout)
        return node

    def _environment(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        path = [_SOURCE_ROOT, *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        return env

    def wait_alive(self, timeout: float | None = None) -> None:
        """Until every running node lists every running node alive (each one's own view);
        ``MeshError`` naming what was missing at the deadline."""
        from mesh.client import connect

        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        nodes = self.running()
        for node in nodes:
            node.wait_ready(max(0.0, deadline - time.monotonic()))
        names = [n.name for n in nodes]
        with ExitStack() as stack:
            clients = {
                n.name: stack.enter_context(connect(n.url, self.key, timeout=limit)) for n in nodes
            }
            while True:
                missing = {
                    who: set(names) - {p["id"] for p in c.peers() if p["state"] == "alive"}
                    for who, c in clients.items()
                }
                if not any(missing.values()):
                    return
                if time.monotonic() > deadline:
                    lacks = "; ".join(
                        f"{who} does not see {', '.join(sorted(m))} alive"
                        for who, m in missing.items()
                        if m
                    )
                    raise MeshError(
                        f"the local nodes did not all see each other within {limit:g} s: {lacks}"
                    )
                time.sleep(VIEW_POLL_S)

    def client(self, name: str | None = None) -> Client:
        """A sync client of node ``name`` (default: the first running one); ``close()``
        closes it too."""
        from mesh.client import connect

        node = self.nodes[name] if name is not None else next(iter(self.running()), None)
        if node is None:
            raise MeshError("no local node is running")
        client = connect(node.url, self.key, timeout=self.timeout)
        self._clients.append(client)
        return client

    def close(self) -> None:
        """Close the clients handed out, end every node (SIGTERM, then SIGKILL after
        ``stop_grace_s``) and remove the temporary directory."""
        for client in self._clients:
            with contextlib.suppress(MeshError):
                client.close()
        self._clients.clear()
        alive = [n for n in self._started if n.running()]
        for node in alive:
            node.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for node in alive:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.kill()
        if self.workdir is None:
            shutil.rmtree(self.directory, ignore_errors=True)


__all__ = ["LocalMesh", "LocalNode", "ReadyRecord", "wait_ready"]
