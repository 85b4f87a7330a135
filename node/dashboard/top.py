"""``mesh-node top``: the mesh in a terminal, from one node's feed.

Reads the same Server-Sent Events as the page (``GET /v1/mesh/feed``, signed with the
mesh key) and redraws in place with ``rich.live``: the nodes with their state and load,
the tasks running now, tasks finished per second over the last ``RATE_S`` seconds, and
failures. ``q`` or Ctrl-C ends it and gives the terminal back as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Final

import aiohttp
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mesh.errors import MeshError
from mesh.runtime.auth import sign_request
from mesh.runtime.http import node_id_at

RATE_S: Final = 10.0
REDRAW_PER_S: Final = 2
RETRY_S: Final = 2.0
SHOWN_RUNNING: Final = 12
_STATE_STYLE: Final = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "red"}


class MeshView:
    """What ``top`` shows, built from the feed's messages."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything: the feed starts over (a new connection's ``hello``)."""
        self.node = ""
        self.connected = False
        self.peers: list[dict[str, Any]] = []
        self.running: dict[str, tuple[str, str, float]] = {}
        """task id -> (task, node, started)"""
        self.ended: deque[float] = deque()
        self.failed = 0
        self.failures: deque[str] = deque(maxlen=5)
        self._offset = 0.0

    def take(self, kind: str, data: Any) -> None:
        if kind == "hello":
            self.reset()
            self.node, self.connected = str(data["node"]), True
            self._offset = float(data["now"]) - time.time()
        elif kind == "peers":
            self.peers = list(data)
        elif kind == "events":
            for ev in data:
                self._event(ev)

    def _event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("kind")
        if kind == "start":
            self.running[ev["task_id"]] = (str(ev["task"]), str(ev["node"]), float(ev["t"]))
        elif kind == "end":
            self.running.pop(ev["task_id"], None)
            self.ended.append(float(ev["t"]))
        elif kind == "done" and not ev.get("ok"):
            self.failed += 1
            where = f" on {ev['ran_on']}" if ev.get("ran_on") else ""
            self.failures.append(f"{ev['task_id']} ({ev['task']}){where}: {ev.get('error', '')}")
        elif kind == "member" and ev.get("state") in ("dead", "left", "purged"):
            gone = str(ev["peer"])
            for task_id in [t for t, (_, n, _) in self.running.items() if n == gone]:
                del self.running[task_id]

    def now(self) -> float:
        return time.time() + self._offset

    def rate(self) -> float:
        horizon = self.now() - RATE_S
        while self.ended and self.ended[0] < horizon:
            self.ended.popleft()
        return len(self.ended) / RATE_S

    def render(self) -> RenderableType:
        now = self.now()
        title = f"mesh seen from {self.node}" if self.connected else "connecting..."
        peers = Table(title=title, title_justify="left", expand=True)
        for column in ("node", "state", "running", "queued", "slots", "objects"):
            peers.add_column(column)
        for p in self.peers:
            load, stats = p.get("load", {}), p.get("stats", {})
            slots = stats.get("slots") or p.get("capabilities", {}).get("resources", {}).get("cpu")
            since = p.get("since")
            state = p["state"] + (f" {now - since:.0f}s" if since else "")
            peers.add_row(
                p["id"] + (" *" if p.get("self") else ""),
                Text(state, style=_STATE_STYLE.get(p["state"], "")),
                str(load.get("running", 0)),
                str(load.get("queued", 0)),
                str(slots or ""),
                str(stats.get("objects", "")),
            )
        summary = Text(
            f"running {len(self.running)}   {self.rate():.1f} tasks/s   failures {self.failed}"
            "   (q quits)"
        )
        running = Table(expand=True, show_edge=False)
        for column in ("task id", "task", "node", "for"):
            running.add_column(column)
        items = sorted(self.running.items(), key=lambda kv: kv[1][2])[:SHOWN_RUNNING]
        for task_id, (name, node, started) in items:
            running.add_row(task_id, name, node, f"{max(0.0, now - started):.1f}s")
        parts: list[RenderableType] = [peers, summary, running]
        if self.failures:
            parts.append(Text("\n".join(self.failures), style="red"))
        return Group(*parts)


async def _follow(http: aiohttp.ClientSession, key: bytes, base: str, view: MeshView) -> None:
    """Read the feed into ``view`` until it ends."""
    to = await node_id_at(http, key, base)
    path = "/v1/mesh/feed"
    headers = sign_request(key, "GET", path, b"", time.time(), to=to)
    async with http.get(base + path, headers=headers) as resp:
        if resp.status != 200:
            raise MeshError(f"{base}{path}: {resp.status} {(await resp.text())[:200]}")
        kind = ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                view.take(kind, json.loads(line[6:]))


@contextlib.contextmanager
def _keys(stop: asyncio.Event) -> Iterator[None]:
    """``q`` on a terminal's standard input sets ``stop`` (cbreak mode, restored after)."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else -1
    if fd < 0:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def read() -> None:
        if b"q" in os.read(fd, 64).lower():
            stop.set()

    tty.setcbreak(fd)
    loop.add_reader(fd, read)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def run_top(base: str, key: bytes, console: Console | None = None) -> int:
    """Show the mesh until ``q``, Ctrl-C or SIGTERM; the exit status."""
    view = MeshView()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def follow() -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                with contextlib.suppress(MeshError, aiohttp.ClientError, ValueError):
                    await _follow(http, key, base, view)
                view.connected = False
                await asyncio.sleep(RETRY_S)

    try:
        with (
            _keys(stop),
            Live(view.render(), console=console, auto_refresh=False, transient=False) as live,
        ):
            async with asyncio.TaskGroup() as tg:
                following = tg.create_task(follow())
                while not stop.is_set():
                    live.update(view.render(), refresh=True)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1 / REDRAW_PER_S):
                            await stop.wait()
                following.cancel()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
