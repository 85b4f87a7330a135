"""How frames move between nodes: the ``Transport`` protocol and an in-memory network.

A transport moves opaque frames (already encoded and authenticated by ``mesh.protocol.codec``)
between addresses. It does not decode them and does not know about cores. Two
implementations share one test suite: the in-memory network here (seeded latency, loss
and partitions, for tests and the simulator) and ``node.transport_ws`` (aiohttp websockets).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from mesh.errors import LocalProtocolError
from mesh.protocol.codec import Buffer, Chunks
from mesh.protocol.messages import Address


class Transport(Protocol):
    """A node's connection to the rest of the mesh."""

    @property
    def address(self) -> Address:
        """Where this node can be reached."""

    async def send(self, dst: Address, frame: Chunks) -> None:
        """Queue one frame (chunks written back to back) for ``dst``.

        Waits while the queue towards ``dst`` is full: the producer is pushed back, nothing
        is dropped silently. A frame for an unreachable peer is dropped and counted; the
        protocol above already tolerates loss.
        """

    def try_send(self, dst: Address, frame: Chunks) -> bool:
        """Queue one frame for ``dst`` if there is room now; False, with nothing queued,
        if the queue towards ``dst`` is full (``send`` then waits for room). Never waits,
        so a driver can hand a frame over without a task switch; raises as ``send`` does."""

    async def recv(self) -> Buffer:
        """The next frame received from any peer."""

    def try_recv(self) -> Buffer | None:
        """The next frame already received, or None; never waits."""

    async def close(self) -> None:
        """Close every connection; pending ``recv`` calls raise ``ConnectionError``."""


class InMemoryNetwork:
    """A seeded model of a network: latency, loss and partitions between addresses.

    ``decide`` is the single place where a frame's fate is drawn; the asynchronous
    ``InMemoryTransport`` (real asyncio time) and the simulator (virtual time) both use
    it, so they see the same network. ``latency`` is a uniform range in seconds, ``loss``
    the probability that any one frame is dropped.
    """

    def __init__(
        self,
        rng: random.Random,
        latency: tuple[float, float] = (0.0, 0.0),
        loss: float = 0.0,
    ) -> None:
        lo, hi = latency
        if not 0 <= lo <= hi:
            raise LocalProtocolError(f"bad latency range {latency!r}")
        if not 0 <= loss <= 1:
            raise LocalProtocolError(f"bad loss {loss!r}")
        self.rng = rng
        self.latency = (lo, hi)
        self.loss = loss
        self.dropped = 0
        """Frames dropped by loss or partition."""
        self._groups: dict[Address, int] | None = None
        self._transports: dict[Address, InMemoryTransport] = {}

    def partition(self, groups: Iterable[Iterable[Address]]) -> None:
        """Split the network: frames pass only within a group. Addresses named in no group
        form one more group together."""
        table: dict[Address, int] = {}
        for i, group in enumerate(groups):
            for address in group:
                table[address] = i
        self._groups = table

    def heal(self) -> None:
        """Remove every partition."""
        self._groups = None

    def reachable(self, src: Address, dst: Address) -> bool:
        groups = self._groups
        return groups is None or groups.get(src, -1) == groups.get(dst, -1)

    def decide(self, src: Address, dst: Address) -> float | None:
        """The delay of one frame from ``src`` to ``dst``, or None if it is dropped."""
        if self._groups is not None and not self.reachable(src, dst):
            self.dropped += 1
            return None
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            self.dropped += 1
            return None
        lo, hi = self.latency
        return lo if lo == hi else lo + (hi - lo) * rng.random()

    def transport(self, address: Address, *, queue_frames: int = 64) -> InMemoryTransport:
        """An asynchronous transport listening at ``address`` on this network."""
        if address in self._transports:
            raise LocalProtocolError(f"{address} is already in use on this network")
        t = InMemoryTransport(self, address, queue_frames=queue_frames)
        self._transports[address] = t
        return t

    def _unregister(self, t: InMemoryTransport) -> None:
        if self._transports.get(t.address) is t:
            del self._transports[t.address]


class InMemoryTransport:
    """A ``Transport`` over an ``InMemoryNetwork``, in real asyncio time.

    Frames to one destination are delivered in order after the drawn latency. At most
    ``queue_frames`` frames to one destination may be in flight or unread by it: ``send``
    waits for room, so a slow reader pushes back on its senders. Frames lost, partitioned
    away, or addressed to nobody are dropped and counted in ``dropped``.
    Made by ``InMemoryNetwork.transport``; needs a running event loop.
    """

    def __init__(self, network: InMemoryNetwork, address: Address, *, queue_frames: int) -> None:
        if queue_frames < 1:
            raise LocalProtocolError("queue_frames must be at least 1")
        self._network = network
        self._address = address
        self._queue_frames = queue_frames
        self._credits: dict[Address, int] = {}
        self._space: dict[Address, asyncio.Event] = {}
        self._last_arrival: dict[Address, float] = {}
        self._inbox: deque[tuple[bytes, Callable[[], None]]] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self.dropped = 0
        self.sent = 0
        self.received = 0

    @property
    def address(self) -> Address:
        return self._address

    async def send(self, dst: Address, frame: Chunks) -> None:
        while not self.try_send(dst, frame):
            space = self._space.get(dst)
            if space is None:
                space = self._space[dst] = asyncio.Event()
            space.clear()
            await space.wait()

    def try_send(self, dst: Address, frame: Chunks) -> bool:
        if self._closed:
            raise ConnectionError(f"transport {self._address} is closed")
        credits = self._credits.get(dst, self._queue_frames)
        if credits <= 0:
            return False
        network = self._network
        peer = network._transports.get(dst)
        delay = network.decide(self._address, dst)
        if peer is None or delay is None:
            self.dropped += 1
            return True
        self._credits[dst] = credits - 1
        loop = asyncio.get_running_loop()
        # Later frames never overtake earlier ones to the same peer, as on a stream; the
        # loop's timer heap does not order equal times, so each frame is a little later.
        at = max(loop.time() + delay, self._last_arrival.get(dst, -1.0) + 1e-6)
        self._last_arrival[dst] = at
        self.sent += 1
        loop.call_at(at, peer._arrive, b"".join(frame), lambda: self._release(dst))
        return True

    def _release(self, dst: Address) -> None:
        self._credits[dst] = self._credits.get(dst, self._queue_frames) + 1
        space = self._space.get(dst)
        if space is not None:
            space.set()

    def _arrive(self, data: bytes, release: Callable[[], None]) -> None:
        if self._closed:
            release()
            return
        self._inbox.append((data, release))
        self._ready.set()

    async def recv(self) -> Buffer:
        while (frame := self.try_recv()) is None:
            if self._closed:
                raise ConnectionError(f"transport {self._address} is closed")
            self._ready.clear()
            await self._ready.wait()
        return frame

    def try_recv(self) -> Buffer | None:
        if not self._inbox:
            return None
        data, release = self._inbox.popleft()
        release()
        self.received += 1
        return data

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._network._unregister(self)
        while self._inbox:
            _, release = self._inbox.popleft()
            release()
        self._ready.set()
        for space in self._space.values():
            space.set()  # a sender waiting for room raises ConnectionError now
