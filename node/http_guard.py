"""Connection limits for the node's one HTTP port, below aiohttp.

aiohttp bounds neither how many connections one address holds nor how long a new
connection may take to send its first request head, so a few hundred idle or trickling
sockets (slowloris) would pin the node's file descriptors for ever. ``ConnectionGuard``
wraps the protocol factory of the aiohttp server (``GuardedSite`` does it for a socket):

- a connection beyond ``max_per_address`` open ones from its address, or beyond
  ``max_half_open`` connections still without a complete request head, is closed at once;
- a connection whose first request head (up to the blank line) is not complete within
  ``header_timeout_s`` is closed. Later requests on a kept-alive connection are bounded by
  aiohttp's keep-alive timeout, which closes a connection idle or stuck in a head.

Every refusal is counted in ``rejected`` by reason. The guard never looks past the first
head and never touches a byte it passes on; websockets (peer links, client sessions) send
their head at once and then live as long as they like.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Callable
from typing import Final

from aiohttp import web

log = logging.getLogger(__name__)

_END_OF_HEAD: Final = b"\r\n\r\n"

TOO_MANY_CONNECTIONS: Final = "http-too-many-connections"
TOO_MANY_HALF_OPEN: Final = "http-too-many-half-open"
HEADER_TIMEOUT: Final = "http-header-timeout"

ProtocolFactory = Callable[[], asyncio.Protocol]


class ConnectionGuard:
    """Counts the connections of one server and closes the ones past its limits."""

    def __init__(
        self,
        *,
        max_per_address: int,
        max_half_open: int,
        header_timeout_s: float,
        rejected: Counter[str],
    ) -> None:
        if max_per_address < 1 or max_half_open < 1 or not header_timeout_s > 0:
            raise ValueError("connection limits must be positive")
        self.max_per_address = max_per_address
        self.max_half_open = max_half_open
        self.header_timeout_s = header_timeout_s
        self.rejected = rejected
        """Refusals by reason, shared with the API's other counters."""
        self.per_address: Counter[str] = Counter()
        """Open connections by peer address."""
        self.half_open = 0
        """Open connections that have not sent a complete request head yet."""

    @property
    def connections(self) -> int:
        """Open connections, all addresses."""
        return sum(self.per_address.values())

    def wrap(self, factory: ProtocolFactory) -> ProtocolFactory:
        """A protocol factory for ``loop.create_server`` that guards ``factory``'s."""
        return lambda: _Guarded(self, factory)

    def _admit(self, address: str) -> bool:
        if self.per_address[address] >= self.max_per_address:
            self.rejected[TOO_MANY_CONNECTIONS] += 1
            return False
        if self.half_open >= self.max_half_open:
            self.rejected[TOO_MANY_HALF_OPEN] += 1
            return False
        self.per_address[address] += 1
        self.half_open += 1
        return True

    def _headed(self) -> None:
        self.half_open -= 1

    def _closed(self, address: str, *, headed: bool) -> None:
        if not headed:
            self.half_open -= 1
        left = self.per_address[address] - 1
        if left > 0:
            self.per_address[address] = left
        else:
            del self.per_address[address]


class _Guarded(asyncio.Protocol):
    """One connection: passes everything to aiohttp's protocol, watching the first head."""

    __slots__ = (
        "_address",
        "_factory",
        "_guard",
        "_in_head",
        "_inner",
        "_tail",
        "_timer",
        "_transport",
    )

    def __init__(self, guard: ConnectionGuard, factory: ProtocolFactory) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._address = ""
        self._timer: asyncio.TimerHandle | None = None
        self._in_head = False
        """Admitted, and the first request head is not complete yet."""
        self._tail = b""
        """The last bytes of the head so far, to find its end across reads."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "")
        if not self._guard._admit(address):
            transport.close()
            return
        self._address = address
        self._transport = transport
        self._in_head = True
        self._timer = asyncio.get_running_loop().call_later(
            self._guard.header_timeout_s, self._expire
        )
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def _expire(self) -> None:
        self._timer = None
        self._guard.rejected[HEADER_TIMEOUT] += 1
        log.debug("closing a connection from %s: no request head in time", self._address)
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._in_head:
            seen = self._tail + data
            if _END_OF_HEAD in seen:
                self._in_head = False
                self._tail = b""
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._guard._headed()
            else:
                self._tail = seen[-(len(_END_OF_HEAD) - 1) :]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._inner is None else self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        inner, self._inner = self._inner, None
        if inner is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._guard._closed(self._address, headed=not self._in_head)
        self._in_head = False
        self._transport = None
        inner.connection_lost(exc)


class GuardedSite(web.SockSite):
    """``web.SockSite`` whose connections pass through a ``ConnectionGuard``."""

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, *, guard: ConnectionGuard
    ) -> None:
        super().__init__(runner, sock)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.wrap(server), sock=self._sock, backlog=self._backlog
        )
