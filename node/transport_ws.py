"""The peer transport: one persistent aiohttp websocket per pair of nodes.

``WsTransport`` implements ``mesh.transport.Transport``. It moves frames that the codec
already encoded; it never decodes one beyond ``Codec.authenticate`` (size, magic, MAC), which
every received frame passes before ``recv`` can return it, so a connection that sends
anything unauthenticated is closed at once and counted in ``rejected``. It knows nothing of
cores, messages or timers above it.

The server side is a route (``WS_PATH``) on the daemon's one ``web.Application``; the client
side dials a peer on the first frame for it, reuses the connection, and also sends over a
connection the peer opened, so a pair normally has one connection. When both dial at once,
both keep the connection opened by the lower listen address, tell each other so (``BYE``)
and close the other one once both have stopped sending on it: nothing in flight is lost.
A connection whose dialer named its receiver in the hello wins over one whose dialer did
not, so that a seed's hello replayed to another node cannot take over the real connection
to its sender.

Each websocket message starts with one kind byte:

``HELLO``  the codec frame of a ``PeerHello``: the first message each way on a connection.
           The dialer's names the node it expects (blank if it knows only the address,
           as for a seed); the answer names the dialer. Each side learns the other's node
           id from the hello's sender, which ``node_at`` serves so frames can name their
           receiver. A peer of another frame version is refused on its hello, which is
           logged once for that connection and closes it.
``BATCH``  small frames coalesced: ``(u32 length, frame)`` repeated.
``CHUNK``  a piece of a big frame: ``u64 total`` then the piece; the pieces of one frame
           follow each other on a connection, small frames may come between them.
``BYE``    the sender will send nothing more on this connection.

Frames up to ``NodeConfig.ws_small_frame_bytes`` (control traffic) take priority over big
frames, which travel in ``ws_chunk_bytes`` pieces, so a control message never waits behind
an array. Frames of one size class arrive in the order they were sent; a small frame may
overtake a big one. Queues are bounded both ways: ``send`` waits for room (and gives up
after ``ws_send_timeout_s``, dropping and counting the frame), readers stop reading while
``recv``'s queue is full, which pushes back through TCP.

The buffers of a frame given to ``send`` are sent without a copy where possible; the
caller must not modify them until the frame has left (arrays in a message are normally not
touched after encoding anyway).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeAlias

import aiohttp
import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp._websocket.writer import WebSocketWriter

from mesh.codec import UNADDRESSED, Buffer, Chunks, Codec
from mesh.config import NodeConfig
from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.messages import Address, NodeId, PeerHello

log = logging.getLogger(__name__)

WS_PATH: Final = "/mesh/ws"
"""The route peers dial: ``ws://host:port/mesh/ws``."""

KIND_HELLO: Final = 0x01
KIND_BATCH: Final = 0x02
KIND_CHUNK: Final = 0x03
KIND_BYE: Final = 0x04

_BATCH_HEAD = struct.Struct("<B3xI")  # kind, frame count; then u32 sizes, padded to 16
_CHUNK_HEAD = struct.Struct("<B7xQ")  # kind, frame size; the piece starts 16-aligned
_ALIGN: Final = 16
_BYE = bytes((KIND_BYE,))
_MAX_ADDRESS_LEN: Final = 300
_MAX_KNOWN_IDS: Final = 4096
"""Addresses whose node id is remembered from hellos; the oldest are forgotten first."""

WebSocket: TypeAlias = "web.WebSocketResponse | aiohttp.ClientWebSocketResponse"

# What a failed write or dial raises: the connection is gone, not a bug.
_IO_ERRORS: Final = (ConnectionError, OSError, aiohttp.ClientError)


class _Conn:
    """One websocket to a peer, after the hello exchange."""

    __slots__ = (
        "addressed",
        "bye_received",
        "bye_sent",
        "done",
        "outbound",
        "partial",
        "partial_filled",
        "peer",
        "peer_boot",
        "peer_listen",
        "serial",
        "ws",
    )

    def __init__(
        self,
        ws: WebSocket,
        *,
        peer: Address,
        peer_listen: Address,
        peer_boot: int,
        outbound: bool,
        serial: int,
        addressed: bool,
    ) -> None:
        self.ws = ws
        self.addressed = addressed  # the dialer's hello named the node it expected
        self.peer = peer  # the name this side sends to the peer under
        self.peer_listen = peer_listen  # the name the peer gave itself in its hello
        self.peer_boot = peer_boot
        self.outbound = outbound
        self.serial = serial
        self.bye_sent = False
        self.bye_received = False
        self.partial: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self.partial_filled = 0
        self.done = asyncio.Event()

    def usable(self) -> bool:
        return not self.ws.closed and not self.bye_sent


class _Cursor:
    """Walks a big frame's buffers, handing out pieces of bounded size."""

    __slots__ = ("index", "offset", "parts", "total")

    def __init__(self, parts: list[memoryview], total: int) -> None:
        self.parts = parts
        self.total = total
        self.index = 0
        self.offset = 0

    def next_piece(self, limit: int) -> list[memoryview]:
        out: list[memoryview] = []
        room = limit
        while room and self.index < len(self.parts):
            part = self.parts[self.index]
            take = min(part.nbytes - self.offset, room)
            out.append(part[self.offset : self.offset + take])
            room -= take
            self.offset += take
            if self.offset == part.nbytes:
                self.index += 1
                self.offset = 0
        return out

    def finished(self) -> bool:
        return self.index >= len(self.parts)


class _Peer:
    """Send state towards one peer address: two bounded lanes and its connection."""

    __slots__ = (
        "address",
        "bulk",
        "bulk_bytes",
        "conn",
        "conn_changed",
        "control",
        "cursor",
        "space",
        "work",
    )

    def __init__(self, address: Address) -> None:
        self.address = address
        self.control: deque[tuple[Chunks, int]] = deque()
        self.bulk: deque[tuple[list[memoryview], int]] = deque()
        self.bulk_bytes = 0
        self.cursor: _Cursor | None = None
        self.conn: _Conn | None = None
        self.work = asyncio.Event()
        self.space = asyncio.Event()
        self.conn_changed = asyncio.Event()

    def pending(self) -> bool:
        return bool(self.control or self.bulk or self.cursor)

    def queued(self) -> int:
        return len(self.control) + len(self.bulk) + (1 if self.cursor else 0)

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


def _unmask(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Send this client websocket's frames unmasked.

    RFC 6455 masks client frames so that browsers cannot poison proxy caches; between two
    mesh nodes there is no browser and no proxy, and masking costs two extra copies and an
    XOR pass over every byte on each side (a third of the CPU of a bulk transfer). aiohttp
    reads unmasked frames fine; if its writer ever changes shape, frames stay masked.
    """
    writer = getattr(ws, "_writer", None)
    if isinstance(writer, WebSocketWriter) and isinstance(writer.use_mask, bool):
        writer.use_mask = False


def _nbytes(frame: Iterable[Buffer]) -> int:
    return sum(memoryview(c).nbytes for c in frame)


class WsTransport:
    """A node's websocket links to its peers (see the module docstring).

    Use: ``add_routes(app)`` before the daemon's app starts, then ``await start(address)``
    once the listen address is known (the port may come from binding port 0), then
    ``send``/``recv``, and ``close()`` at the end. ``codec`` signs and checks the hellos;
    ``wall_clock`` (``time.time``) stamps them. ``authenticate`` checks every received
    frame and raises ``RemoteProtocolError`` to refuse it; it defaults to
    ``codec.authenticate``. It may be called from a worker thread (for big frames), so it
    must not touch state shared with the event loop. ``resolve`` names the node the hello
    of a dial is for (the daemon's view of membership and of this transport); it defaults
    to ``node_at``.
    """

    def __init__(
        self,
        *,
        codec: Codec,
        config: NodeConfig,
        wall_clock: Callable[[], float],
        authenticate: Callable[[Buffer], None] | None = None,
        resolve: Callable[[Address], NodeId | None] | None = None,
    ) -> None:
        if config.ws_reassembly_bytes < 1 or config.ws_chunk_bytes < 1:
            raise LocalProtocolError("transport buffer sizes must be positive")
        self._codec = codec
        self._authenticate = codec.authenticate if authenticate is None else authenticate
        self._resolve = self.node_at if resolve is None else resolve
        self._ids: dict[Address, NodeId] = {}
        self._cfg = config
        self._wall_clock = wall_clock
        self._address: Address | None = None
        self._peers: dict[Address, _Peer] = {}
        self._open: set[_Conn] = set()
        self._inbox = _Inbox(
            max_frames=config.ws_recv_queue_frames, max_bytes=config.ws_recv_queue_bytes
        )
        self._reassembly_used = 0
        self._reassembly_freed = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._closing = False
        self._serial = 0
        # A websocket message is at most one piece or one batch plus its header.
        self._max_msg = max(config.ws_chunk_bytes, config.ws_small_frame_bytes) + 64

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

    def add_routes(self, app: web.Application) -> None:
        """Serve the peer websocket on ``app`` (before the app is started)."""
        app.router.add_get(WS_PATH, self._handle)

    async def start(self, address: Address) -> None:
        """Begin serving and sending as ``address``, this node's ``host:port``."""
        if self._runner is not None:
            raise LocalProtocolError("the transport was already started")
        self._address = address
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True)
        )
        started = asyncio.Event()
        # The runner owns the TaskGroup of every reader and writer; close() awaits it, and
        # a failure in it is logged at once rather than waiting for close().
        self._runner = asyncio.create_task(self._run(started), name=f"ws-transport {address}")
        self._runner.add_done_callback(self._runner_done)
        await started.wait()

    def _size(self, frame: Chunks) -> int:
        if self._closing or self._tg is None:
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
        small = size <= self._cfg.ws_small_frame_bytes
        if self._lane_full(peer, small, size):
            return False
        self._queue(peer, frame, size, small)
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
        small = size <= self._cfg.ws_small_frame_bytes
        try:
            async with asyncio.timeout(self._cfg.ws_send_timeout_s):
                while not self._closing and self._lane_full(peer, small, size):
                    peer.space.clear()
                    await peer.space.wait()
        except TimeoutError:
            self.dropped += 1
            log.warning("send queue to %s stayed full: frame dropped", dst)
            return
        if self._closing:
            raise ConnectionError("transport is closed")
        self._queue(peer, frame, size, small)

    @staticmethod
    def _queue(peer: _Peer, frame: Chunks, size: int, small: bool) -> None:
        if small:
            peer.control.append((frame, size))
        else:
            peer.bulk.append(([memoryview(c).cast("B") for c in frame], size))
            peer.bulk_bytes += size
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
        tasks are told to stop whatever happens to the closing handshakes.
        """
        if not self._closing:
            self._closing = True
            self._inbox.close()
            for peer in self._peers.values():
                self.dropped += peer.queued()
                peer.control.clear()
                peer.bulk.clear()
                peer.bulk_bytes = 0
                peer.cursor = None
                peer.space.set()
            try:
                async with asyncio.timeout(self._cfg.ws_close_timeout_s):
                    async with asyncio.TaskGroup() as tg:
                        for conn in list(self._open):
                            tg.create_task(self._close_ws(conn, WSCloseCode.GOING_AWAY))
            except TimeoutError:
                log.info("closing handshakes did not finish in time; connections dropped")
            finally:
                self._stop.set()
        self._stop.set()
        try:
            if self._runner is not None and not self._runner.done():
                # Shielded: a cancelled close() still lets the runner finish stopping.
                await asyncio.shield(self._runner)
        finally:
            if self._session is not None and not self._session.closed:
                await self._session.close()

    async def __aenter__(self) -> WsTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- task ownership ------------------------------------------------------------------

    async def _run(self, started: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                started.set()
                await self._stop.wait()
                for task in list(self._tasks):
                    task.cancel()
        finally:
            # Also reached when the event loop cancels the runner without close(): nothing
            # may be spawned into the finished group, and recv() must not wait forever.
            self._tg = None
            self._inbox.close()

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("websocket transport failed", exc_info=task.exception())

    def _spawn(self, coro: Any, name: str) -> bool:
        """Run ``coro`` in the transport's TaskGroup; False if the group has ended."""
        if self._tg is None or self._stop.is_set():
            coro.close()
            return False
        try:
            task = self._tg.create_task(coro, name=name)
        except RuntimeError:  # the group is shutting down after a cancellation
            coro.close()
            return False
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    # -- sending -------------------------------------------------------------------------

    def _peer(self, address: Address) -> _Peer:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = _Peer(address)
            self._spawn(self._write_loop(peer), f"ws-writer {address}")
        return peer

    def _lane_full(self, peer: _Peer, small: bool, size: int) -> bool:
        if small:
            return len(peer.control) >= self._cfg.ws_send_queue_frames
        busy = peer.bulk or peer.cursor
        return bool(busy) and peer.bulk_bytes + size > self._cfg.ws_send_queue_bytes

    async def _write_loop(self, peer: _Peer) -> None:
        while True:
            if not peer.pending():
                peer.work.clear()
                await peer.work.wait()
                continue
            conn = peer.live_conn() or await self._connect(peer)
            if conn is None:
                n = peer.queued()
                self._drop_queued(peer)
                log.warning("peer %s unreachable: %d frames dropped", peer.address, n)
                continue
            await self._send_next(peer, conn)

    def _drop_queued(self, peer: _Peer) -> None:
        self.dropped += peer.queued()
        peer.control.clear()
        peer.bulk.clear()
        peer.bulk_bytes = 0
        peer.cursor = None
        peer.space.set()

    async def _send_next(self, peer: _Peer, conn: _Conn) -> None:
        """Write one websocket message to ``conn``: a batch of small frames, else a piece."""
        if peer.control:
            room = self._cfg.ws_small_frame_bytes
            sizes: list[int] = []
            body: list[Buffer] = []
            while peer.control and (not sizes or peer.control[0][1] + _ALIGN + 4 <= room):
                chunks, size = peer.control.popleft()
                sizes.append(size)
                body.extend(chunks)
                if pad := -size % _ALIGN:
                    body.append(bytes(pad))
                room -= size + _ALIGN + 4
            peer.space.set()
            frames = len(sizes)
            nbytes = sum(sizes)
            head = _BATCH_HEAD.pack(KIND_BATCH, frames) + struct.pack(f"<{frames}I", *sizes)
            head += bytes(-len(head) % _ALIGN)
            if await self._write(conn, b"".join([head, *body])):
                self.frames_sent += frames
                self.bytes_sent += nbytes
            else:
                self.dropped += frames
            return
        cursor = peer.cursor
        if cursor is None:
            bufs, size = peer.bulk.popleft()
            peer.bulk_bytes -= size
            peer.space.set()
            cursor = peer.cursor = _Cursor(bufs, size)
        head = _CHUNK_HEAD.pack(KIND_CHUNK, cursor.total)
        piece = cursor.next_piece(self._cfg.ws_chunk_bytes)
        if not await self._write(conn, b"".join([head, *piece])):
            peer.cursor = None
            self.dropped += 1
            return
        if cursor.finished():
            peer.cursor = None
            self.frames_sent += 1
            self.bytes_sent += cursor.total

    async def _write(self, conn: _Conn, message: bytes) -> bool:
        try:
            await conn.ws.send_bytes(message)
        except _IO_ERRORS as exc:
            log.info("write to %s failed: %s", conn.peer, exc)
            await self._close_ws(conn, WSCloseCode.ABNORMAL_CLOSURE)
            return False
        return True

    async def _connect(self, peer: _Peer) -> _Conn | None:
        """A usable connection to ``peer``: dialled, or opened by the peer meanwhile."""
        delay = self._cfg.ws_redial_backoff_s
        for attempt in range(self._cfg.ws_dial_attempts):
            conn = peer.live_conn()
            if conn is not None:
                return conn
            try:
                async with asyncio.timeout(self._cfg.ws_connect_timeout_s):
                    conn = await self._dial(peer.address)
            except RemoteProtocolError as exc:
                self.rejected[exc.reason] += 1
                log.warning("peer %s failed its hello: %s", peer.address, exc)
            except (TimeoutError, *_IO_ERRORS) as exc:
                log.debug("dial %s (attempt %d) failed: %r", peer.address, attempt + 1, exc)
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
        _unmask(ws)
        expected = self._resolve(address)
        try:
            await ws.send_bytes(self._hello(expected))
            listen, boot, node, _ = self._check_hello(await ws.receive())
        except BaseException:
            await ws.close()
            raise
        self._learn(address, node)
        self._learn(listen, node)
        self._serial += 1
        return _Conn(
            ws,
            peer=address,
            peer_listen=listen,
            peer_boot=boot,
            outbound=True,
            serial=self._serial,
            addressed=expected is not None,
        )

    def _hello(self, to: NodeId | None) -> bytes:
        chunks, _ = self._codec.encode(
            PeerHello(address=self.address),
            self._wall_clock(),
            to=UNADDRESSED if to is None else to,
        )
        return b"".join([bytes((KIND_HELLO,)), *chunks])

    def _check_hello(self, msg: aiohttp.WSMessage) -> tuple[Address, int, NodeId, bool]:
        """The peer's listen address, boot and node id from its hello, and whether the
        hello named this node; RemoteProtocolError if bad (another frame version, a hello
        for another node, ...)."""
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            raise ConnectionResetError("peer closed before its hello")
        if msg.type is not WSMsgType.BINARY:
            raise self._bad_message(msg)
        data = memoryview(msg.data)
        if data.nbytes < 1 or data[0] != KIND_HELLO:
            raise RemoteProtocolError("first message is not a hello", reason="no-hello")
        frame = self._codec.decode(data[1:], self._wall_clock())
        hello = frame.msg
        if not isinstance(hello, PeerHello):
            raise RemoteProtocolError("first frame is not a hello", reason="no-hello")
        host, sep, port = hello.address.rpartition(":")
        if not (sep and host and port.isdigit() and len(hello.address) <= _MAX_ADDRESS_LEN):
            raise RemoteProtocolError(f"bad listen address {hello.address!r}", reason="bad-field")
        return Address(hello.address), frame.boot, frame.sender, frame.to != UNADDRESSED

    @staticmethod
    def _bad_message(msg: aiohttp.WSMessage) -> RemoteProtocolError:
        if msg.type is WSMsgType.TEXT:
            return RemoteProtocolError("text message on the peer websocket", reason="text")
        exc = msg.data
        if isinstance(exc, aiohttp.WebSocketError) and exc.code == WSCloseCode.MESSAGE_TOO_BIG:
            return RemoteProtocolError("websocket message over the size limit", reason="oversized")
        return RemoteProtocolError(f"websocket protocol error: {exc}", reason="ws-protocol")

    # -- connections ---------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """The server side of the peer websocket; lives as long as the connection."""
        if self._tg is None or self._closing:
            raise web.HTTPServiceUnavailable(text="mesh transport not running")
        ws = web.WebSocketResponse(
            max_msg_size=self._max_msg,
            heartbeat=self._cfg.ws_heartbeat_s,
            compress=False,
            timeout=self._cfg.ws_close_timeout_s,
        )
        await ws.prepare(request)
        try:
            async with asyncio.timeout(self._cfg.ws_connect_timeout_s):
                listen, boot, node, addressed = self._check_hello(await ws.receive())
                await ws.send_bytes(self._hello(node))
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
        self._learn(listen, node)
        self._serial += 1
        conn = _Conn(
            ws,
            peer=listen,
            peer_listen=listen,
            peer_boot=boot,
            outbound=False,
            serial=self._serial,
            addressed=addressed,
        )
        try:
            await self._attach(self._peer(listen), conn)
            await conn.done.wait()
        except asyncio.CancelledError:
            # The server is shutting down under us: end the connection, then obey.
            await self._close_ws(conn, WSCloseCode.GOING_AWAY)
            raise
        return ws

    def _initiator(self, conn: _Conn) -> str:
        return self.address if conn.outbound else conn.peer_listen

    async def _attach(self, peer: _Peer, conn: _Conn) -> None:
        """Start reading ``conn`` and settle which connection to ``peer`` carries frames."""
        if self._closing or not self._spawn(self._read_loop(conn), f"ws-reader {conn.peer}"):
            await self._close_ws(conn, WSCloseCode.GOING_AWAY)
            conn.done.set()
            return
        self._open.add(conn)
        self.connects += 1
        current = peer.live_conn()
        if current is None:
            peer.conn = conn
        elif current.peer_boot != conn.peer_boot:
            # The peer restarted: the old connection leads to a process that is gone.
            peer.conn = conn
            await self._close_ws(current, WSCloseCode.GOING_AWAY)
        else:
            # Both sides apply the same rule: a connection whose dialer named its receiver
            # wins (only a seed's first dial does not, and a replayed one must not win);
            # then the one opened by the lower listen address; between two opened by the
            # same side, the newer one.
            def rank(c: _Conn) -> tuple[bool, str, int]:
                return (not c.addressed, self._initiator(c), -c.serial)

            winner, loser = sorted((current, conn), key=rank)
            peer.conn = winner
            await self._retire(loser)
        peer.conn_changed.set()
        if peer.pending():
            peer.work.set()

    async def _retire(self, conn: _Conn) -> None:
        """Stop sending on ``conn``; close it once the peer has stopped too."""
        if not conn.bye_sent:
            conn.bye_sent = True
            try:
                await conn.ws.send_bytes(_BYE)
            except _IO_ERRORS:
                await self._close_ws(conn, WSCloseCode.ABNORMAL_CLOSURE)
                return
        if conn.bye_received:
            await self._close_ws(conn, WSCloseCode.OK)

    async def _close_ws(self, conn: _Conn, code: int) -> None:
        try:
            await conn.ws.close(code=code)
        except _IO_ERRORS as exc:
            log.debug("closing connection to %s: %s", conn.peer, exc)

    def _detach(self, conn: _Conn) -> None:
        self._open.discard(conn)
        self._release(conn)
        conn.done.set()
        peer = self._peers.get(conn.peer)
        if peer is not None and peer.conn is conn:
            peer.conn = None
            peer.conn_changed.set()
            if peer.pending():
                peer.work.set()

    # -- receiving -----------------------------------------------------------------------

    async def _read_loop(self, conn: _Conn) -> None:
        try:
            while True:
                msg = await conn.ws.receive()
                if msg.type is WSMsgType.BINARY:
                    await self._on_message(conn, memoryview(msg.data))
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                else:
                    raise self._bad_message(msg)
        except RemoteProtocolError as exc:
            self.rejected[exc.reason] += 1
            log.warning("connection from %s closed: %s", conn.peer, exc)
            await self._close_ws(conn, WSCloseCode.POLICY_VIOLATION)
        finally:
            self._detach(conn)

    async def _on_message(self, conn: _Conn, data: memoryview) -> None:
        if data.nbytes == 0:
            raise RemoteProtocolError("empty message", reason="malformed")
        kind = data[0]
        if kind == KIND_BATCH:
            await self._on_batch(data)
        elif kind == KIND_CHUNK:
            await self._on_chunk(conn, data)
        elif kind == KIND_BYE:
            conn.bye_received = True
            peer = self._peers.get(conn.peer)
            if peer is None or peer.conn is not conn:
                await self._retire(conn)
        elif kind == KIND_HELLO:
            raise RemoteProtocolError("second hello on a connection", reason="malformed")
        else:
            raise RemoteProtocolError(f"unknown message kind {kind}", reason="malformed")

    async def _on_batch(self, data: memoryview) -> None:
        # Every frame starts 16-aligned in the message (whose bytes are 16-aligned in
        # memory), so arrays the codec decodes from it are aligned for every dtype.
        end = data.nbytes
        if end < _BATCH_HEAD.size:
            raise RemoteProtocolError("truncated batch", reason="truncated")
        _, count = _BATCH_HEAD.unpack_from(data, 0)
        table_end = _BATCH_HEAD.size + 4 * count
        if count == 0 or table_end > end:
            raise RemoteProtocolError("truncated batch", reason="truncated")
        sizes = struct.unpack_from(f"<{count}I", data, _BATCH_HEAD.size)
        pos = table_end + (-table_end % _ALIGN)
        frames: list[memoryview] = []
        for size in sizes:
            if size == 0 or pos + size > end:
                raise RemoteProtocolError("truncated batch", reason="truncated")
            frames.append(data[pos : pos + size])
            pos += size + (-size % _ALIGN)
        if pos != end:
            raise RemoteProtocolError("batch longer than its frames", reason="malformed")
        for frame in frames:
            await self._deliver(frame)

    async def _on_chunk(self, conn: _Conn, data: memoryview) -> None:
        if data.nbytes <= _CHUNK_HEAD.size:
            raise RemoteProtocolError("truncated chunk", reason="truncated")
        _, total = _CHUNK_HEAD.unpack_from(data, 0)
        piece = data[_CHUNK_HEAD.size :]
        if total > self._cfg.max_frame_bytes:
            raise RemoteProtocolError(f"frame of {total} bytes announced", reason="oversized")
        if conn.partial is None:
            if piece.nbytes > total:
                raise RemoteProtocolError("chunk longer than its frame", reason="malformed")
            if piece.nbytes == total:
                await self._deliver(piece)  # a one-piece frame needs no reassembly
                return
            await self._reserve(total)
            # 64-aligned, like the frame's array buffers are relative to its start.
            raw = np.empty(total + 64, dtype=np.uint8)
            skip = -raw.ctypes.data % 64
            conn.partial = raw[skip : skip + total]
            conn.partial_filled = 0
        elif total != conn.partial.nbytes:
            raise RemoteProtocolError("chunk of another frame", reason="malformed")
        start = conn.partial_filled
        stop = start + piece.nbytes
        if stop > total:
            raise RemoteProtocolError("chunks longer than their frame", reason="malformed")
        conn.partial[start:stop] = np.frombuffer(piece, dtype=np.uint8)
        conn.partial_filled = stop
        if stop == total:
            frame = conn.partial.data
            self._release(conn)
            # The MAC over a big frame takes tens of ms; computed in a thread (hashlib lets
            # go of the GIL) it no longer stalls control traffic and heartbeats. This
            # connection waits for it, so its frames stay in order.
            await asyncio.to_thread(self._authenticate, frame)
            await self._deliver(frame, authenticated=True)

    async def _reserve(self, nbytes: int) -> None:
        # One frame is always admitted when nothing else is being reassembled, so any frame
        # up to max_frame_bytes gets through whatever the budget.
        while self._reassembly_used and (
            self._reassembly_used + nbytes > self._cfg.ws_reassembly_bytes
        ):
            self._reassembly_freed.clear()
            await self._reassembly_freed.wait()
        self._reassembly_used += nbytes

    def _release(self, conn: _Conn) -> None:
        if conn.partial is not None:
            self._reassembly_used -= conn.partial.nbytes
            conn.partial = None
            conn.partial_filled = 0
            self._reassembly_freed.set()

    async def _deliver(self, frame: memoryview, *, authenticated: bool = False) -> None:
        if not authenticated:
            self._authenticate(frame)
        size = frame.nbytes
        self.frames_received += 1
        self.bytes_received += size
        await self._inbox.put(frame, size)
