"""The peer transport: one persistent aiohttp websocket per pair of nodes.

``WsTransport`` implements ``mesh.runtime.transport.Transport``. It moves frames that the codec
already encoded, over websocket messages whose format and checks live in ``mesh.protocol.framing``
(hellos, batches of small frames, pieces of big ones, byes): this module only drives those
objects over aiohttp. It never decodes a frame beyond the hello and ``Codec.authenticate``
(size, magic, MAC), which every received frame passes before ``recv`` can return it, so a
connection that sends anything unauthenticated or out of place is closed at once and
counted in ``rejected``. It knows nothing of cores, messages or timers above it.

The server side is a route (``WS_PATH``) on the daemon's one ``web.Application``; the client
side dials a peer on the first frame for it, reuses the connection, and also sends over a
connection the peer opened, so a pair normally has one connection. When both dial at once,
both keep the same one (``Link.outranks``), tell each other so (``BYE``) and close the
other once both have stopped sending on it: nothing in flight is lost.

Hellos carry each side's protocol (frame) version, package version and an X25519 key
share; with sealing on (``NodeConfig.wire_sealed``, the default) every later message of
the connection is sealed under keys derived from both shares and the mesh key
(``mesh.protocol.sealing``), so what crosses the network is private, and a connection
that sends anything unsealed is closed (reason ``unsealed``). The frames inside a sealed
message skip their MAC check (``Codec.check``): only holders of the mesh key can seal.
A peer of another protocol version, or one that does not seal while this node does, is
refused at its hello: the listener answers with its own hello before closing, so both
sides know why; each side logs one line per such peer (and version), counts it
(``rejected``, ``refused``), and the dialer sends nothing more to that address for
``peer_refused_retry_s``.

Small frames take priority over big ones (``Outbox``). Queues are bounded both ways:
``send`` waits for room (and gives up after ``ws_send_timeout_s``, dropping and counting
the frame), readers stop reading while ``recv``'s queue is full, which pushes back through
TCP, and big frames being reassembled share ``ws_reassembly_bytes``.

The buffers of a frame given to ``send`` are sent without a copy where possible; the
caller must not modify them until the frame has left (arrays in a message are normally not
touched after encoding anyway).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeAlias

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http import WebSocketWriter

from mesh import __version__
from mesh.config import NodeConfig
from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.protocol.codec import Buffer, Chunks, Codec
from mesh.protocol.framing import (
    KIND_SEALED,
    Blocked,
    Budget,
    Hello,
    Link,
    Outbox,
    Received,
    Refused,
    hello_message,
    max_message_bytes,
    read_hello,
)
from mesh.protocol.messages import Address, NodeId
from mesh.protocol.sealing import PEER_CONTEXT, Exchange, Opener, Sealer
from mesh.runtime.background import Background, Ready, until_cancelled

log = logging.getLogger(__name__)

WS_PATH: Final = "/mesh/ws"
"""The route peers dial: ``ws://host:port/mesh/ws``."""

_MAX_KNOWN_IDS: Final = 4096
"""Addresses whose node id is remembered from hellos; the oldest are forgotten first."""

_MAX_REFUSED: Final = 256
"""Refused peers remembered (for the one log line and ``refused``); the oldest go first."""

_SEALED: Final = bytes((KIND_SEALED,))

WebSocket: TypeAlias = "web.WebSocketResponse | aiohttp.ClientWebSocketResponse"

# What a failed write or dial raises: the connection is gone, not a bug.
_IO_ERRORS: Final = (ConnectionError, OSError, aiohttp.ClientError)


class _UnmaskedWebSocket(aiohttp.ClientWebSocketResponse):
    """A client websocket that sends its frames unmasked (``ws_response_class``).

    RFC 6455 masks client frames so that browsers cannot poison proxy caches; between two
    mesh nodes there is no browser and no proxy, and masking costs two extra copies and an
    XOR pass over every byte on each side (a third of the CPU of a bulk transfer). aiohttp
    reads unmasked frames fine; if its writer ever changes shape, frames stay masked.
    """

    def __init__(self, reader: Any, writer: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(writer, WebSocketWriter):
            writer.use_mask = False
        super().__init__(reader, writer, *args, **kwargs)


class _Conn:
    """One websocket to a peer after the hellos, its framing state and its sealer."""

    __slots__ = ("done", "link", "sealer", "ws")

    def __init__(self, ws: WebSocket, link: Link, sealer: Sealer | None) -> None:
        self.ws = ws
        self.link = link
        self.sealer = sealer
        self.done = asyncio.Event()

    def usable(self) -> bool:
        return not self.ws.closed and not self.link.bye_sent

    async def send(self, message: bytes) -> None:
        # Sealed and handed to the socket with no await between: aiohttp writes an
        # uncompressed frame at once, so messages leave in the order of their nonces.
        sealer = self.sealer
        if sealer is not None:
            message = _SEALED + sealer.seal(message)
        await self.ws.send_bytes(message)


class _Peer:
    """Send state towards one peer address: its outbox and its connection."""

    __slots__ = ("address", "conn", "conn_changed", "outbox", "space", "work")

    def __init__(self, address: Address, config: NodeConfig) -> None:
        self.address = address
        self.outbox = Outbox(config)
        self.conn: _Conn | None = None
        self.work = asyncio.Event()
        self.space = asyncio.Event()
        self.conn_changed = asyncio.Event()

    def live_conn(self) -> _Conn | None:
        conn = self.conn
        return conn if conn is not None and conn.usable() else None


class _Inbox:
    """Received frames waiting for ``recv``, bounded in frames and bytes."""

    def __init__(self, *, max_frames: int, max_bytes: int) -> None:
        self._items: deque[tuple[Buffer, int]] = deque()
        self._bytes = 0
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self.closed = False

    def _full(self, size: int) -> bool:
        if not self._items:
            return False
        return len(self._items) >= self._max_frames or self._bytes + size > self._max_bytes

    def put_nowait(self, frame: Buffer, size: int) -> bool:
        """Add ``frame`` if there is room (a closed inbox drops it); False if full."""
        if self.closed:
            return True
        if self._full(size):
            return False
        self._items.append((frame, size))
        self._bytes += size
        self._ready.set()
        return True

    async def put(self, frame: Buffer, size: int) -> None:
        while not self.put_nowait(frame, size):
            self._space.clear()
            await self._space.wait()

    def get_nowait(self) -> Buffer | None:
        if not self._items:
            return None
        frame, size = self._items.popleft()
        self._bytes -= size
        self._space.set()
        return frame

    async def get(self) -> Buffer:
        while (frame := self.get_nowait()) is None:
            if self.closed:
                raise ConnectionError("transport is closed")
            self._ready.clear()
            await self._ready.wait()
        return frame

    def close(self) -> None:
        self.closed = True
        self._items.clear()
        self._bytes = 0
        self._ready.set()
        self._space.set()


def _nbytes(frame: Iterable[Buffer]) -> int:
    return sum(memoryview(c).nbytes for c in frame)


class WsTransport:
    """A node's websocket links to its peers (see the module docstring).

    Use: ``add_routes(app)`` before the daemon's app starts, then ``await start(address)``
    once the listen address is known (the port may come from binding port 0), then
    ``send``/``recv``, and ``close()`` at the end. ``codec`` signs and checks the hellos;
    ``wall_clock`` (``time.time``) stamps them. ``authenticate`` checks every received
    frame and raises ``RemoteProtocolError`` to refuse it; it defaults to
    ``codec.authenticate`` (``codec.check`` on sealed links). It may be called from a
    worker thread (for big frames), so it must not touch state shared with the event loop.
    ``resolve`` names the node the hello of a dial is for (the daemon's view of membership
    and of this transport); it defaults to ``node_at``. ``on_gone`` hears of an address at
    which a dial found nothing listening (connection refused). ``package`` is the
    ``mesh-node`` version the hellos announce.
    """

    def __init__(
        self,
        *,
        codec: Codec,
        config: NodeConfig,
        wall_clock: Callable[[], float],
        authenticate: Callable[[Buffer], None] | None = None,
        resolve: Callable[[Address], NodeId | None] | None = None,
        on_gone: Callable[[Address], None] = lambda address: None,
        package: str = __version__,
    ) -> None:
        if config.ws_reassembly_bytes < 1 or config.ws_chunk_bytes < 1:
            raise LocalProtocolError("transport buffer sizes must be positive")
        self._codec = codec
        self._package = package
        self._sealed = config.wire_sealed
        self._refused_until: dict[Address, float] = {}
        self._authenticate = codec.authenticate if authenticate is None else authenticate
        # What a sealed link checks: the AEAD has authenticated every message already.
        self._check = codec.check if authenticate is None else authenticate
        self._resolve = self.node_at if resolve is None else resolve
        self._on_gone = on_gone
        self._ids: dict[Address, NodeId] = {}
        self._cfg = config
        self._wall_clock = wall_clock
        self._address: Address | None = None
        self._peers: dict[Address, _Peer] = {}
        self._open: set[_Conn] = set()
        self._inbox = _Inbox(
            max_frames=config.ws_recv_queue_frames, max_bytes=config.ws_recv_queue_bytes
        )
        self._room = asyncio.Event()
        self._budget = Budget(config.ws_reassembly_bytes, self._room.set)
        self._session: aiohttp.ClientSession | None = None
        self._background = Background("ws-transport")
        self._closing = False
        self._serial = 0
        self._max_msg = max_message_bytes(config)

        self.rejected: Counter[str] = Counter()
        """Connections closed for what they sent, by ``RemoteProtocolError.reason``."""
        self.dropped = 0
        """Frames accepted by ``send`` that never left: peer unreachable, connection lost
        mid-write, queue full past ``ws_send_timeout_s``, or transport closed."""
        self.frames_sent = 0
        self.frames_received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.connects = 0
        """Connections established (both directions) since start."""
        self.refused: dict[tuple[str, str], dict[str, Any]] = {}
        """Peers refused at their hello, by (node, reason): address, node, reason
        (``version`` or ``unsealed``), their protocol and package versions, how many
        connections were refused and the line that was logged (``refusals``). A node
        whose hello passes later (upgraded) leaves it."""

    # -- public API ----------------------------------------------------------------------

    @property
    def address(self) -> Address:
        if self._address is None:
            raise LocalProtocolError("the transport has no address before start()")
        return self._address

    @property
    def connections(self) -> int:
        """Websockets open right now."""
        return len(self._open)

    def node_at(self, address: Address) -> NodeId | None:
        """The node id a hello proved at ``address`` (dialled there, or the peer's listen
        address), or None if no peer there has said hello yet."""
        return self._ids.get(address)

    def _learn(self, address: Address, node: NodeId) -> None:
        ids = self._ids
        if ids.get(address) == node:
            return
        ids.pop(address, None)
        if len(ids) >= _MAX_KNOWN_IDS:
            del ids[next(iter(ids))]
        ids[address] = node

    def counters(self) -> dict[str, int]:
        """Every counter as a flat mapping, ``rejected.<reason>`` included (for metrics)."""
        out = {
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "dropped": self.dropped,
            "connects": self.connects,
            "connections": self.connections,
        }
        for reason, n in self.rejected.items():
            out[f"rejected.{reason}"] = n
        return out

    def refusals(self) -> list[dict[str, Any]]:
        """The peers refused at their hello, oldest first (for ``/v1/status``)."""
        return [dict(r) for r in self.refused.values()]

    def _refuse(self, exc: Refused, peer: str) -> None:
        """Count a refused hello; say it once per peer, reason and versions."""
        self.rejected[exc.reason] += 1
        key = (str(exc.node), exc.reason)
        known = self.refused.get(key)
        versions = (exc.protocol, exc.package)
        if known is not None and (known["protocol"], known["package"]) == versions:
            known["connections"] += 1
            known["address"] = exc.address
            return
        if len(self.refused) >= _MAX_REFUSED:
            del self.refused[next(iter(self.refused))]
        self.refused[key] = {
            "node": str(exc.node),
            "address": exc.address,
            "reason": exc.reason,
            "protocol": exc.protocol,
            "package": exc.package,
            "connections": 1,
            "message": str(exc),
        }
        log.warning("refused %s: %s", peer, exc)

    def _accepted(self, hello: Hello) -> None:
        """A hello passed: a refusal of that node (before it was upgraded) is over."""
        self._learn(hello.address, hello.node)
        for reason in ("version", "unsealed"):
            self.refused.pop((str(hello.node), reason), None)

    def add_routes(self, app: web.Application) -> None:
        """Serve the peer websocket on ``app`` (before the app is started)."""
        app.router.add_get(WS_PATH, self._handle)

    async def start(self, address: Address) -> None:
        """Begin serving and sending as ``address``, this node's ``host:port``."""
        if self._address is not None:
            raise LocalProtocolError("the transport was already started")
        self._address = address
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, force_close=True, socket_factory=self._peer_socket
            ),
            ws_response_class=_UnmaskedWebSocket,
        )
        self._background.name = f"ws-transport {address}"
        await self._background.start(self._serve)

    async def _serve(self, ready: Ready) -> None:
        # Every reader and writer runs beside this. However the transport ends (close(), a
        # failure, the event loop cancelling it), recv() must not wait for ever.
        try:
            ready()
            await until_cancelled()
        finally:
            self._inbox.close()

    def _size(self, frame: Chunks) -> int:
        if self._closing or not self._background.running:
            raise ConnectionError("transport is not running")
        size = _nbytes(frame)
        if size == 0:
            raise LocalProtocolError("cannot send an empty frame")
        if size > self._cfg.max_frame_bytes:
            raise LocalProtocolError(
                f"frame of {size} bytes is over the {self._cfg.max_frame_bytes} limit"
            )
        return size

    def try_send(self, dst: Address, frame: Chunks) -> bool:
        """Queue ``frame`` for ``dst`` if that peer's queue has room; never waits."""
        size = self._size(frame)
        if dst == self._address:
            if not self._inbox.put_nowait(b"".join(frame), size):
                return False
            self.frames_sent += 1
            self.frames_received += 1
            return True
        peer = self._peer(dst)
        if peer.outbox.full(size):
            return False
        peer.outbox.put(frame, size)
        peer.work.set()
        return True

    async def send(self, dst: Address, frame: Chunks) -> None:
        """Queue ``frame`` for ``dst``; waits while that peer's queue is full."""
        if self.try_send(dst, frame):
            return
        size = self._size(frame)
        if dst == self._address:
            await self._inbox.put(b"".join(frame), size)
            self.frames_sent += 1
            self.frames_received += 1
            return
        peer = self._peer(dst)
        try:
            async with asyncio.timeout(self._cfg.ws_send_timeout_s):
                while not self._closing and peer.outbox.full(size):
                    peer.space.clear()
                    await peer.space.wait()
        except TimeoutError:
            self.dropped += 1
            log.warning("send queue to %s stayed full: frame dropped", dst)
            return
        if self._closing:
            raise ConnectionError("transport is closed")
        peer.outbox.put(frame, size)
        peer.work.set()

    async def recv(self) -> Buffer:
        """The next authenticated frame from any peer."""
        return await self._inbox.get()

    def try_recv(self) -> Buffer | None:
        """The next authenticated frame already received, or None."""
        return self._inbox.get_nowait()

    async def close(self) -> None:
        """Close every connection and end every task; pending ``recv`` raise ConnectionError.

        Safe to call more than once, and from a task that is cancelled meanwhile: the
        tasks are stopped whatever happens to the closing handshakes.
        """
        try:
            if not self._closing:
                self._closing = True
                self._inbox.close()
                for peer in self._peers.values():
                    self.dropped += peer.outbox.clear()
                    peer.space.set()
                try:
                    async with asyncio.timeout(self._cfg.ws_close_timeout_s):
                        async with asyncio.TaskGroup() as tg:
                            for conn in list(self._open):
                                tg.create_task(self._close_ws(conn, WSCloseCode.GOING_AWAY))
                except TimeoutError:
                    log.info("closing handshakes did not finish in time; connections dropped")
        finally:
            try:
                await self._background.stop()
            finally:
                if self._session is not None and not self._session.closed:
                    await self._session.close()

    async def __aenter__(self) -> WsTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- sending -------------------------------------------------------------------------

    def _peer(self, address: Address) -> _Peer:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = _Peer(address, self._cfg)
            self._background.spawn(self._write_loop(peer), f"ws-writer {address}")
        return peer

    async def _write_loop(self, peer: _Peer) -> None:
        outbox = peer.outbox
        while True:
            if not outbox.pending():
                peer.work.clear()
                await peer.work.wait()
                continue
            conn = peer.live_conn() or await self._connect(peer)
            if conn is None:
                n = outbox.clear()
                self.dropped += n
                peer.space.set()
                if self._refused_now(peer.address):
                    log.debug("peer %s refused: %d frames dropped", peer.address, n)
                else:
                    log.warning("peer %s unreachable: %d frames dropped", peer.address, n)
                continue
            out = outbox.next_message(conn.link.serial)
            peer.space.set()
            if await self._write(conn, out.message):
                self.frames_sent += out.frames
                self.bytes_sent += out.nbytes
            else:
                self.dropped += outbox.failed(out)

    async def _write(self, conn: _Conn, message: bytes) -> bool:
        try:
            await conn.send(message)
        except _IO_ERRORS as exc:
            log.info("write to %s failed: %s", conn.link.peer, exc)
            await self._close_ws(conn, WSCloseCode.ABNORMAL_CLOSURE)
            return False
        return True

    async def _connect(self, peer: _Peer) -> _Conn | None:
        """A usable connection to ``peer``: dialled, or opened by the peer meanwhile."""
        delay = self._cfg.ws_redial_backoff_s
        for attempt in range(self._cfg.ws_dial_attempts):
            conn = peer.live_conn()
            if conn is not None or self._refused_now(peer.address):
                return conn
            try:
                async with asyncio.timeout(self._cfg.ws_connect_timeout_s):
                    conn = await self._dial(peer.address)
            except Refused as exc:
                self._refuse(exc, f"peer {peer.address}")
                self._refused_until[peer.address] = (
                    asyncio.get_running_loop().time() + self._cfg.peer_refused_retry_s
                )
                return peer.live_conn()
            except RemoteProtocolError as exc:
                self.rejected[exc.reason] += 1
                log.warning("peer %s failed its hello: %s", peer.address, exc)
            except (TimeoutError, *_IO_ERRORS) as exc:
                log.debug("dial %s (attempt %d) failed: %r", peer.address, attempt + 1, exc)
                if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
                    self._on_gone(peer.address)
            else:
                await self._attach(peer, conn)
                if (live := peer.live_conn()) is not None:
                    return live
            if attempt + 1 < self._cfg.ws_dial_attempts:
                # A peer that dialled us meanwhile ends the wait early.
                peer.conn_changed.clear()
                try:
                    async with asyncio.timeout(delay):
                        await peer.conn_changed.wait()
                except TimeoutError:
                    pass
                delay *= 2
        return peer.live_conn()

    def _refused_now(self, address: Address) -> bool:
        until = self._refused_until.get(address)
        if until is None:
            return False
        if asyncio.get_running_loop().time() < until:
            return True
        del self._refused_until[address]
        return False

    async def _dial(self, address: Address) -> _Conn:
        if self._session is None:
            raise LocalProtocolError("the transport is not started")
        ws = await self._session.ws_connect(
            f"http://{address}{WS_PATH}",
            max_msg_size=self._max_msg,
            heartbeat=self._cfg.ws_heartbeat_s,
            compress=0,
            timeout=aiohttp.ClientWSTimeout(ws_close=self._cfg.ws_close_timeout_s),
        )
        expected = self._resolve(address)
        exchange = Exchange() if self._sealed else None
        try:
            await ws.send_bytes(self._hello(expected, exchange))
            hello = self._read_hello(await ws.receive())
        except BaseException:
            await ws.close()
            raise
        self._learn(address, hello.node)
        self._accepted(hello)
        keys = self._keys(exchange, hello, initiator=True)
        return self._conn(
            ws, hello, keys, peer=address, outbound=True, addressed=expected is not None
        )

    def _hello(self, to: NodeId | None, exchange: Exchange | None) -> bytes:
        return hello_message(
            self._codec,
            self.address,
            self._wall_clock(),
            to=to,
            package=self._package,
            share=b"" if exchange is None else exchange.public,
        )

    def _read_hello(self, msg: aiohttp.WSMessage) -> Hello:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            raise ConnectionResetError("peer closed before its hello")
        if msg.type is not WSMsgType.BINARY:
            raise self._bad_message(msg)
        return read_hello(
            self._codec, msg.data, self._wall_clock(), package=self._package, sealed=self._sealed
        )

    def _keys(
        self, exchange: Exchange | None, hello: Hello, *, initiator: bool
    ) -> tuple[Sealer, Opener] | None:
        if exchange is None:
            return None
        return exchange.keys(
            self._codec.mesh_key, hello.share, initiator=initiator, context=PEER_CONTEXT
        )

    def _conn(
        self,
        ws: WebSocket,
        hello: Hello,
        keys: tuple[Sealer, Opener] | None,
        *,
        peer: Address,
        outbound: bool,
        addressed: bool,
    ) -> _Conn:
        self._serial += 1
        link = Link(
            hello,
            peer=peer,
            local=self.address,
            outbound=outbound,
            addressed=addressed,
            serial=self._serial,
            authenticate=self._authenticate if keys is None else self._check,
            budget=self._budget,
            max_frame_bytes=self._cfg.max_frame_bytes,
            opener=None if keys is None else keys[1],
        )
        return _Conn(ws, link, None if keys is None else keys[0])

    @staticmethod
    def _bad_message(msg: aiohttp.WSMessage) -> RemoteProtocolError:
        if msg.type is WSMsgType.TEXT:
            return RemoteProtocolError("text message on the peer websocket", reason="text")
        exc = msg.data
        if isinstance(exc, aiohttp.WebSocketError) and exc.code == WSCloseCode.MESSAGE_TOO_BIG:
            return RemoteProtocolError("websocket message over the size limit", reason="oversized")
        return RemoteProtocolError(f"websocket protocol error: {exc}", reason="ws-protocol")

    # -- connections ---------------------------------------------------------------------

    def _peer_socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        family, kind, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=kind, proto=proto)
        self._bound_unacked(sock)
        return sock

    def _bound_unacked(self, sock: socket.socket | None) -> None:
        """Abort ``sock`` when its data goes unacknowledged ``ws_unacked_timeout_s``
        (a TCP socket on Linux; elsewhere the websocket heartbeat is the only bound)."""
        if sock is None or not hasattr(socket, "TCP_USER_TIMEOUT"):
            return
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            ms = round(self._cfg.ws_unacked_timeout_s * 1000)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, ms)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """The server side of the peer websocket; lives as long as the connection."""
        if self._closing or not self._background.running:
            raise web.HTTPServiceUnavailable(text="mesh transport not running")
        ws = web.WebSocketResponse(
            max_msg_size=self._max_msg,
            heartbeat=self._cfg.ws_heartbeat_s,
            compress=False,
            timeout=self._cfg.ws_close_timeout_s,
        )
        if request.transport is not None:
            self._bound_unacked(request.transport.get_extra_info("socket"))
        await ws.prepare(request)
        exchange = Exchange() if self._sealed else None
        try:
            async with asyncio.timeout(self._cfg.ws_connect_timeout_s):
                try:
                    hello = self._read_hello(await ws.receive())
                except Refused as exc:
                    # Answer first, so the dialer can say why too; then close.
                    self._refuse(exc, f"connection from {request.remote}")
                    await ws.send_bytes(self._hello(exc.node, exchange))
                    await ws.close(code=WSCloseCode.POLICY_VIOLATION)
                    return ws
                await ws.send_bytes(self._hello(hello.node, exchange))
                keys = self._keys(exchange, hello, initiator=False)
        except RemoteProtocolError as exc:
            self.rejected[exc.reason] += 1
            log.warning("connection from %s rejected: %s", request.remote, exc)
            await ws.close(code=WSCloseCode.POLICY_VIOLATION)
            return ws
        except TimeoutError:
            self.rejected["no-hello"] += 1
            await ws.close(code=WSCloseCode.POLICY_VIOLATION)
            return ws
        except _IO_ERRORS:
            await ws.close()
            return ws
        self._accepted(hello)
        conn = self._conn(
            ws, hello, keys, peer=hello.address, outbound=False, addressed=hello.addressed
        )
        try:
            await self._attach(self._peer(hello.address), conn)
            await conn.done.wait()
        except asyncio.CancelledError:
            # The server is shutting down under us: end the connection, then obey.
            await self._close_ws(conn, WSCloseCode.GOING_AWAY)
            raise
        return ws

    async def _attach(self, peer: _Peer, conn: _Conn) -> None:
        """Start reading ``conn`` and settle which connection to ``peer`` carries frames."""
        reading = self._read_loop(conn)
        if self._closing or not self._background.spawn(reading, f"ws-reader {conn.link.peer}"):
            await self._close_ws(conn, WSCloseCode.GOING_AWAY)
            conn.done.set()
            return
        self._open.add(conn)
        self.connects += 1
        current = peer.live_conn()
        if current is None:
            peer.conn = conn
        elif current.link.hello.boot != conn.link.hello.boot:
            # The peer restarted: the old connection leads to a process that is gone.
            peer.conn = conn
            await self._close_ws(current, WSCloseCode.GOING_AWAY)
        else:
            winner, loser = (current, conn) if current.link.outranks(conn.link) else (conn, current)
            peer.conn = winner
            await self._retire(loser)
        peer.conn_changed.set()
        if peer.outbox.pending():
            peer.work.set()

    async def _retire(self, conn: _Conn) -> None:
        """Stop sending on ``conn``; close it once the peer has stopped too."""
        bye = conn.link.retire()
        if bye is not None:
            try:
                await conn.send(bye)
            except _IO_ERRORS:
                await self._close_ws(conn, WSCloseCode.ABNORMAL_CLOSURE)
                return
        if conn.link.finished:
            await self._close_ws(conn, WSCloseCode.OK)

    async def _close_ws(self, conn: _Conn, code: int) -> None:
        try:
            await conn.ws.close(code=code)
        except _IO_ERRORS as exc:
            log.debug("closing connection to %s: %s", conn.link.peer, exc)

    def _detach(self, conn: _Conn) -> None:
        self._open.discard(conn)
        conn.link.close()
        conn.done.set()
        peer = self._peers.get(conn.link.peer)
        if peer is not None and peer.conn is conn:
            peer.conn = None
            peer.conn_changed.set()
            if peer.outbox.pending():
                peer.work.set()

    # -- receiving -----------------------------------------------------------------------

    async def _read_loop(self, conn: _Conn) -> None:
        try:
            while True:
                msg = await conn.ws.receive()
                if msg.type is WSMsgType.BINARY:
                    await self._on_message(conn, msg.data)
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                else:
                    raise self._bad_message(msg)
        except RemoteProtocolError as exc:
            self.rejected[exc.reason] += 1
            log.warning("connection from %s closed: %s", conn.link.peer, exc)
            await self._close_ws(conn, WSCloseCode.POLICY_VIOLATION)
        finally:
            self._detach(conn)

    async def _on_message(self, conn: _Conn, message: bytes) -> None:
        for event in conn.link.receive(message):
            if isinstance(event, Received):
                if not event.authenticated:
                    # The MAC over a big frame takes tens of ms; computed in a thread
                    # (hashlib lets go of the GIL) it no longer stalls control traffic and
                    # heartbeats. This connection waits for it, so its frames stay in order.
                    for frame in event.frames:
                        await asyncio.to_thread(self._authenticate, frame)
                for frame in event.frames:
                    size = frame.nbytes
                    self.frames_received += 1
                    self.bytes_received += size
                    await self._inbox.put(frame, size)
            elif isinstance(event, Blocked):
                self._room.clear()
                await self._room.wait()
            else:  # the peer's bye
                peer = self._peers.get(conn.link.peer)
                if peer is None or peer.conn is not conn:
                    await self._retire(conn)
