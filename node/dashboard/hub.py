"""The mesh-wide feed that a node's open dashboards (and ``mesh-node top``) read.

Every node keeps its own ``EventLog``; none keeps the mesh's. A node with a page open runs a
``Hub``: one poller per live member (itself included) long-polls that member's events
(``GET /v1/events``, signed with the mesh key; its own log directly), and the hub merges
them into one recent history and passes each batch on to every subscriber. It also sends
the members as this node sees them (state and since when, load, capabilities, and each
one's own figures: objects held, bytes fetched from each holder, version) whenever they
change, looked at once a second and after every batch. So any node shows the whole mesh and
none is special; a node nobody watches runs no hub at all (``subscribe`` starts it for the
first subscriber and stops it when the last one leaves).

Subscribers read Server-Sent Events: ``hello`` (this node, its clock), ``peers``, ``events``.
Each subscriber has a bounded buffer (``Subscriber.limit`` bytes); a subscriber that lets
it fill, a client that does not read, is dropped, never buffered without bound, and the
others go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import aiohttp

from mesh.errors import MeshError
from mesh.runtime.background import Background, Ready
from mesh.runtime.http import request_json
from node.dashboard.events import Event

log = logging.getLogger(__name__)

WAIT_S: Final = 20.0
"""How long one long poll of a member's events waits for something to happen."""
TICK_S: Final = 1.0
"""How often the members are looked at for changes (load, state) while someone watches."""
HISTORY: Final = 8192
"""Recent events of the whole mesh a new subscriber starts with."""
CHUNK: Final = 512
"""Events per message when a subscriber is sent the history."""
BUFFER_BYTES: Final = 1 << 20
"""What one subscriber may have waiting to be sent before it is dropped."""
RETRY_S: Final = (0.5, 5.0)
"""First and longest pause before polling a member that did not answer again."""
POLLABLE: Final = frozenset({"alive", "suspect"})

Batch = dict[str, Any]
"""One answer of ``GET /v1/events``: ``node``, ``epoch``, ``seq``, ``events``, ``stats``."""
Fetch = Callable[[int, str], Awaitable[Batch]]
"""A member's events after a seq, given the epoch they were numbered in."""


def sse(kind: str, data: Any) -> bytes:
    """One Server-Sent Event."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


PING: Final = b": ping\n\n"
"""An SSE comment: keeps idle connections (and proxies) from timing out."""


class Subscriber:
    """One reader of the feed: a bounded buffer of messages waiting to be written."""

    def __init__(self, limit: int = BUFFER_BYTES) -> None:
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()
        self.dropped = False
        """The buffer overflowed (or the hub stopped): the connection must end."""

    def push(self, data: bytes) -> bool:
        """Queue ``data``; False (and ``dropped``) if that would pass the limit."""
        if self.dropped:
            return False
        if self._bytes + len(data) > self.limit:
            self.drop()
            return False
        self._chunks.append(data)
        self._bytes += len(data)
        self._ready.set()
        return True

    def drop(self) -> None:
        self.dropped = True
        self._chunks.clear()
        self._bytes = 0
        self._ready.set()

    async def take(self, seconds: float) -> bytes:
        """Everything queued, waiting up to ``seconds``; ``PING`` if nothing came,
        ``b""`` once dropped."""
        if not self._chunks and not self.dropped:
            try:
                async with asyncio.timeout(seconds):
                    await self._ready.wait()
            except TimeoutError:
                return PING
        self._ready.clear()
        if self.dropped:
            return b""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._bytes = 0
        return data


class Hub:
    """The merged feed of the mesh for this node's subscribers (module docstring)."""

    def __init__(
        self,
        *,
        node_id: Callable[[], str],
        local: Fetch,
        peers: Callable[[], list[dict[str, Any]]],
        since: Callable[[], dict[str, float]],
        key: bytes,
        clock: Callable[[], float],
    ) -> None:
        self._node_id = node_id
        self._local = local
        self._peers = peers
        self._since = since
        self._key = key
        self._clock = clock
        self._subs: set[Subscriber] = set()
        self._lock = asyncio.Lock()
        self._bg: Background | None = None
        self._history: deque[Event] = deque(maxlen=HISTORY)
        self._stats: dict[str, dict[str, Any]] = {}
        self._peers_msg = b""
        self._changed = asyncio.Event()
        self.dropped = 0
        """Subscribers dropped for not reading."""

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscriber]:
        """A new subscriber, sent the hello, the members and the recent history first."""
        sub = Subscriber()
        async with self._lock:
            if self._bg is None:
                self._history.clear()
                self._stats.clear()
                self._peers_msg = self._peers_message()
                bg = Background("mesh-dashboard-hub")
                await bg.start(self._main)
                self._bg = bg
            sub.push(sse("hello", {"node": self._node_id(), "now": self._clock()}))
            sub.push(self._peers_msg)
            history = list(self._history)
            for i in range(0, len(history), CHUNK):
                sub.push(sse("events", history[i : i + CHUNK]))
            self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)
            async with self._lock:
                if not self._subs and self._bg is not None:
                    bg, self._bg = self._bg, None
                    await bg.stop()

    async def close(self) -> None:
        """Drop every subscriber and stop polling (the node is shutting down)."""
        for sub in list(self._subs):
            sub.drop()
        async with self._lock:
            bg, self._bg = self._bg, None
            if bg is not None:
                await bg.stop()

    def _broadcast(self, data: bytes) -> None:
        for sub in list(self._subs):
            if not sub.push(data) and sub in self._subs:
                self._subs.discard(sub)
                self.dropped += 1
                log.info("dropped a dashboard feed that did not read (%d bytes waiting)", sub.limit)

    # -- polling -----------------------------------------------------------------------------

    async def _main(self, ready: Ready) -> None:
        timeout = aiohttp.ClientTimeout(total=WAIT_S + 10.0, sock_connect=5.0)
        async with aiohttp.ClientSession(timeout=timeout) as http, asyncio.TaskGroup() as tg:
            me = self._node_id()
            pollers = {me: tg.create_task(self._poll(me, self._local))}
            ready()
            while True:
                live = {
                    p["id"]: p["address"]
                    for p in self._peers()
                    if p["state"] in POLLABLE and p["id"] != me
                }
                for node in [n for n in pollers if n != me and n not in live]:
                    pollers.pop(node).cancel()
                    self._stats.pop(node, None)
                for node, address in live.items():
                    if node not in pollers:
                        fetch = self._remote(http, node, f"http://{address}")
                        pollers[node] = tg.create_task(self._poll(node, fetch))
                msg = self._peers_message()
                if msg != self._peers_msg:
                    self._peers_msg = msg
                    self._broadcast(msg)
                self._changed.clear()
                try:
                    async with asyncio.timeout(TICK_S):
                        await self._changed.wait()
                except TimeoutError:
                    pass

    def _remote(self, http: aiohttp.ClientSession, node: str, base: str) -> Fetch:
        async def fetch(after: int, epoch: str) -> Batch:
            path = f"/v1/events?after={after}&epoch={epoch}&wait={WAIT_S:g}"
            batch: Batch = await request_json(http, self._key, base, "GET", path, to=node)
            return batch

        return fetch

    async def _poll(self, node: str, fetch: Fetch) -> None:
        after, epoch, pause = 0, "", RETRY_S[0]
        while True:
            try:
                batch = await fetch(after, epoch)
                events, stats = batch["events"], batch["stats"]
                epoch, after = str(batch["epoch"]), int(batch["seq"])
            except (MeshError, aiohttp.ClientError, TimeoutError, KeyError, TypeError, ValueError):
                log.debug("no events from %s; asking again in %g s", node, pause, exc_info=True)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_S[1])
                continue
            pause = RETRY_S[0]
            if stats != self._stats.get(node):
                self._stats[node] = stats
                self._changed.set()
            if events:
                self._history.extend(events)
                self._broadcast(sse("events", events))
                if any(e.get("kind") == "member" for e in events):
                    self._changed.set()

    def _peers_message(self) -> bytes:
        since = self._since()
        peers = [
            {**p, "since": since.get(p["id"]), "stats": self._stats.get(p["id"], {})}
            for p in self._peers()
        ]
        return sse("peers", peers)
