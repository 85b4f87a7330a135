"""The peer wire between two nodes, as websocket messages: no sockets, no event loop, no clock.

Sans-I/O in the manner of wsproto: ``Link`` is one connection's state, fed the websocket
messages that arrive on it (``receive``, which yields events) and asked for the ones to send
back; ``Outbox`` holds the frames waiting for one peer and cuts them into messages. Time is
passed in. ``node/transport_ws.py`` drives these objects over aiohttp; nothing here imports
aiohttp or asyncio, so the tests feed them bytes directly.

Each websocket message starts with one kind byte (the numbers are on the wire: append only):

``HELLO``  the codec frame of a ``PeerHello``: the first message each way on a connection.
           The dialer's names the node it expects (blank if it knows only the address,
           as for a seed); the answer names the dialer. Each side learns the other's node
           id from the hello's sender, its protocol (frame) version and package version,
           and its key share. A hello of another protocol version is still read far
           enough to name its sender (``Refused``), so that both sides can say once why
           they will not talk.
``BATCH``  small frames coalesced: a head (kind, count), ``count`` u32 sizes, padding to
           16 bytes, then each frame padded to 16 bytes, so a frame starts 16-aligned.
``CHUNK``  a piece of a big frame: a head (kind, u64 total size, 16 bytes) then the piece;
           the pieces of one frame follow each other on a connection, small frames may come
           between them.
``BYE``    the sender will send nothing more on this connection.
``SEALED`` one of the messages above, sealed (``mesh.protocol.sealing``): on a connection
           whose hellos both carried a key share, every message after the hellos is one,
           sealed under that direction's key and its next counter nonce. Anything else
           there (an unsealed message, one altered, replayed or out of order) is refused
           (reasons ``unsealed`` and ``sealed``).

What a peer may send is checked here: a message out of place (a second hello, anything
after a bye, an unknown kind), truncated or inconsistent sizes, a frame over
``max_frame_bytes`` and a frame that fails ``authenticate`` raise ``RemoteProtocolError``,
and the connection is to be closed. Frames of a batch before the one at fault have been
yielded by then. Chunks carry no offset: a piece duplicated, lost or out of order yields a
frame whose MAC fails, or overruns its announced size.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import numpy as np

from mesh.config import NodeConfig
from mesh.errors import RemoteProtocolError
from mesh.protocol.codec import UNADDRESSED, Buffer, Chunks, Codec
from mesh.protocol.messages import Address, NodeId, PeerHello
from mesh.protocol.sealing import PUBLIC_BYTES, Opener

KIND_HELLO: Final = 0x01
KIND_BATCH: Final = 0x02
KIND_CHUNK: Final = 0x03
KIND_BYE: Final = 0x04
KIND_SEALED: Final = 0x05

BATCH_HEAD: Final = struct.Struct("<B3xI")  # kind, frame count; then u32 sizes, padded to 16
CHUNK_HEAD: Final = struct.Struct("<B7xQ")  # kind, frame size; the piece starts 16-aligned
ALIGN: Final = 16
BYE: Final = bytes((KIND_BYE,))
_MAX_ADDRESS_LEN: Final = 300

_SLACK: Final = 64
"""Room for a message's head beyond its piece or batch."""


def max_message_bytes(config: NodeConfig) -> int:
    """The largest websocket message a peer sends: one piece or one batch and its head."""
    return max(config.ws_chunk_bytes, config.ws_small_frame_bytes) + _SLACK


# -- hellos -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """What a peer's hello proved: its listen address, process (boot) and node id, its
    package version and its key share (empty from a node that does not seal)."""

    address: Address
    boot: int
    node: NodeId
    addressed: bool
    """The hello named this node (a dialer that knew whom it dialled)."""
    package: str
    share: bytes


class Refused(RemoteProtocolError):
    """A well-formed hello from a node this one will not talk to: another protocol
    version (reason ``version``), or no key share while this node seals (``unsealed``).
    Names the peer so that the refusal can be said once, clearly, on both sides."""

    def __init__(
        self, message: str, *, reason: str, node: NodeId, address: str, protocol: int, package: str
    ) -> None:
        super().__init__(message, reason=reason)
        self.node = node
        self.address = address
        self.protocol = protocol
        self.package = package


def hello_message(
    codec: Codec, address: Address, now: float, *, to: NodeId | None, package: str, share: bytes
) -> bytes:
    """The hello of the node listening at ``address``, for ``to`` (None when only the
    peer's address is known)."""
    msg = PeerHello(address=address, package=package, share=share)
    chunks, _ = codec.encode(msg, now, to=UNADDRESSED if to is None else to)
    return b"".join([bytes((KIND_HELLO,)), *chunks])


def read_hello(codec: Codec, message: Buffer, now: float, *, package: str, sealed: bool) -> Hello:
    """The peer's hello from the first message on a connection; ``RemoteProtocolError`` if
    it is none, fails the codec (key, receiver, replay) or names no usable listen address,
    ``Refused`` if it comes from a node of another protocol (frame) version, or from one
    that does not seal while this one does (``sealed``), or the other way round: a
    connection is sealed both ways or not at all. ``package`` is this node's."""
    data = memoryview(message)
    if data.nbytes < 3 or data[0] != KIND_HELLO:
        raise RemoteProtocolError("first message is not a hello", reason="no-hello")
    if data[2] != codec.version:
        other = codec.foreign_hello(data[1:], now)
        which = "the peer" if other.version < codec.version else "this node"
        raise Refused(
            f"peer {other.sender} at {other.address[:_MAX_ADDRESS_LEN]} speaks protocol "
            f"{other.version} (mesh-node {other.package or 'unknown'}), this node protocol "
            f"{codec.version} (mesh-node {package}): incompatible, upgrade {which}",
            reason="version",
            node=other.sender,
            address=other.address[:_MAX_ADDRESS_LEN],
            protocol=other.version,
            package=other.package,
        )
    frame = codec.decode(data[1:], now)
    hello = frame.msg
    if not isinstance(hello, PeerHello):
        raise RemoteProtocolError("first frame is not a hello", reason="no-hello")
    host, sep, port = hello.address.rpartition(":")
    if not (sep and host and port.isdigit() and len(hello.address) <= _MAX_ADDRESS_LEN):
        raise RemoteProtocolError(f"bad listen address {hello.address!r}", reason="bad-field")
    if len(hello.package) > 64:
        raise RemoteProtocolError("package version over 64 characters", reason="bad-field")
    if hello.share and len(hello.share) != PUBLIC_BYTES:
        raise RemoteProtocolError("key share of a bad size", reason="bad-handshake")
    if sealed != bool(hello.share):
        raise Refused(
            f"peer {frame.sender} at {hello.address} (mesh-node {hello.package}) "
            + (
                "does not seal its connections; this node refuses unsealed peers"
                if sealed
                else "seals its connections and this node does not (wire_sealed is off)"
            ),
            reason="unsealed",
            node=frame.sender,
            address=hello.address,
            protocol=codec.version,
            package=hello.package,
        )
    return Hello(
        address=Address(hello.address),
        boot=frame.boot,
        node=frame.sender,
        addressed=frame.to != UNADDRESSED,
        package=hello.package,
        share=hello.share,
    )


# -- receiving ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    """Whole frames from the peer, in the order it sent them."""

    frames: list[memoryview]
    authenticated: bool
    """False for a frame reassembled from pieces (then the only one): its MAC takes tens of
    milliseconds over a big frame, so the caller checks it (``authenticate``, in a thread if
    it likes) before using it. Every other frame has passed ``authenticate``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Blocked:
    """A big frame waits for reassembly room: go on iterating once the ``Budget`` has
    given some back (its ``on_free``)."""

    nbytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye:
    """The peer will send nothing more on this link."""


Event: TypeAlias = Received | Blocked | Bye

_BYE_EVENT: Final = Bye()


class Budget:
    """Bytes of big frames being reassembled, over every link of a node, bounded by ``limit``.

    One frame is always admitted when nothing else is being reassembled, so any frame up to
    ``max_frame_bytes`` gets through whatever the limit. ``on_free`` is called whenever room
    is given back.
    """

    __slots__ = ("limit", "on_free", "used")

    def __init__(self, limit: int, on_free: Callable[[], None]) -> None:
        self.limit = limit
        self.on_free = on_free
        self.used = 0

    def take(self, nbytes: int) -> bool:
        if self.used and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes
        self.on_free()


class Link:
    """One connection to a peer after the hellos: the framing state of both directions.

    ``hello`` is the peer's; ``peer`` the address this side sends to it under (the one it
    dialled, or the peer's listen address on a link the peer opened); ``initiator`` the
    listen address of the side that dialled; ``addressed`` whether the dialer's hello named
    the node it expected; ``serial`` orders the links of one node.
    Received frames pass ``authenticate`` (the codec's check of size, magic and MAC). On a
    sealed link (``opener`` given) every message is opened first, and ``authenticate`` may
    leave the MAC out (``Codec.check``): the AEAD has proved more than the MAC would.
    """

    __slots__ = (
        "_authenticate",
        "_budget",
        "_filled",
        "_max_frame_bytes",
        "_opener",
        "_partial",
        "addressed",
        "bye_received",
        "bye_sent",
        "hello",
        "initiator",
        "peer",
        "serial",
    )

    def __init__(
        self,
        hello: Hello,
        *,
        peer: Address,
        local: Address,
        outbound: bool,
        addressed: bool,
        serial: int,
        authenticate: Callable[[Buffer], None],
        budget: Budget,
        max_frame_bytes: int,
        opener: Opener | None = None,
    ) -> None:
        self.hello = hello
        self._opener = opener
        self.peer = peer
        self.initiator = local if outbound else hello.address
        self.addressed = addressed
        self.serial = serial
        self.bye_sent = False
        self.bye_received = False
        self._authenticate = authenticate
        self._budget = budget
        self._max_frame_bytes = max_frame_bytes
        self._partial: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self._filled = 0

    # -- connection state -----------------------------------------------------------------

    def outranks(self, other: Link) -> bool:
        """Whether this link, rather than ``other`` to the same peer, carries the frames.

        Both ends apply the same rule, so they agree: a link whose dialer named its
        receiver wins (only a seed's first dial does not, and a replayed hello must not
        take over a real link); then the one opened by the lower listen address; between
        two opened by the same side, the newer one.
        """
        return self._rank() < other._rank()

    def _rank(self) -> tuple[bool, str, int]:
        return (not self.addressed, self.initiator, -self.serial)

    def retire(self) -> bytes | None:
        """Stop sending here: the ``BYE`` message to send, or None if it was sent already."""
        if self.bye_sent:
            return None
        self.bye_sent = True
        return BYE

    @property
    def finished(self) -> bool:
        """Both ends have said bye: nothing more will travel either way; close it."""
        return self.bye_sent and self.bye_received

    def close(self) -> None:
        """The connection is gone: give back the room of a frame left half reassembled."""
        if self._partial is not None:
            self._budget.give(self._partial.nbytes)
            self._partial = None
            self._filled = 0

    # -- receiving ------------------------------------------------------------------------

    def receive(self, message: Buffer) -> Iterator[Event]:
        """The events one websocket message from the peer carries, in order.

        Raises ``RemoteProtocolError`` (after the events before the fault) if the message
        is not what a peer may send here.
        """
        data = memoryview(message)
        if data.nbytes == 0:
            raise RemoteProtocolError("empty message", reason="malformed")
        if self.bye_received:
            raise RemoteProtocolError("message after the peer's bye", reason="malformed")
        kind = data[0]
        if self._opener is not None:
            if kind != KIND_SEALED:
                raise RemoteProtocolError(
                    "unsealed message on a sealed connection", reason="unsealed"
                )
            data = memoryview(self._opener.open(data[1:]))
            if data.nbytes == 0:
                raise RemoteProtocolError("empty message", reason="malformed")
            kind = data[0]
        if kind == KIND_BATCH:
            frames = _unbatch(data)
            authenticate = self._authenticate
            for i, frame in enumerate(frames):
                try:
                    authenticate(frame)
                except RemoteProtocolError:
                    if i:
                        yield Received(frames=frames[:i], authenticated=True)
                    raise
            yield Received(frames=frames, authenticated=True)
        elif kind == KIND_CHUNK:
            yield from self._piece(data)
        elif kind == KIND_BYE:
            self.bye_received = True
            yield _BYE_EVENT
        elif kind == KIND_HELLO:
            raise RemoteProtocolError("second hello on a connection", reason="malformed")
        elif kind == KIND_SEALED:
            raise RemoteProtocolError(
                "sealed message on a connection without keys", reason="malformed"
            )
        else:
            raise RemoteProtocolError(f"unknown message kind {kind}", reason="malformed")

    def _piece(self, data: memoryview) -> Iterator[Event]:
        if data.nbytes <= CHUNK_HEAD.size:
            raise RemoteProtocolError("truncated chunk", reason="truncated")
        _, total = CHUNK_HEAD.unpack_from(data, 0)
        piece = data[CHUNK_HEAD.size :]
        if total > self._max_frame_bytes:
            raise RemoteProtocolError(f"frame of {total} bytes announced", reason="oversized")
        partial = self._partial
        if partial is None:
            if piece.nbytes > total:
                raise RemoteProtocolError("chunk longer than its frame", reason="malformed")
            if piece.nbytes == total:  # a one-piece frame needs no reassembly
                self._authenticate(piece)
                yield Received(frames=[piece], authenticated=True)
                return
            while not self._budget.take(total):
                yield Blocked(nbytes=total)
            # 64-aligned, like the frame's array buffers are relative to its start.
            raw = np.empty(total + 64, dtype=np.uint8)
            skip = -raw.ctypes.data % 64
            partial = self._partial = raw[skip : skip + total]
            self._filled = 0
        elif total != partial.nbytes:
            raise RemoteProtocolError("chunk of another frame", reason="malformed")
        start = self._filled
        stop = start + piece.nbytes
        if stop > total:
            raise RemoteProtocolError("chunks longer than their frame", reason="malformed")
        partial[start:stop] = np.frombuffer(piece, dtype=np.uint8)
        self._filled = stop
        if stop == total:
            self._partial = None
            self._filled = 0
            self._budget.give(total)
            if self._opener is None:  # the MAC over a big frame is left to the caller
                yield Received(frames=[partial.data], authenticated=False)
            else:
                self._authenticate(partial.data)
                yield Received(frames=[partial.data], authenticated=True)


def _unbatch(data: memoryview) -> list[memoryview]:
    """The frames of a batch message, all checked to fit before any is returned.

    Every frame starts 16-aligned in the message (whose bytes are 16-aligned in memory), so
    arrays the codec decodes from it are aligned for every dtype.
    """
    end = data.nbytes
    if end < BATCH_HEAD.size:
        raise RemoteProtocolError("truncated batch", reason="truncated")
    _, count = BATCH_HEAD.unpack_from(data, 0)
    table_end = BATCH_HEAD.size + 4 * count
    if count == 0 or table_end > end:
        raise RemoteProtocolError("truncated batch", reason="truncated")
    sizes = struct.unpack_from(f"<{count}I", data, BATCH_HEAD.size)
    pos = table_end + (-table_end % ALIGN)
    frames: list[memoryview] = []
    for size in sizes:
        if size == 0 or pos + size > end:
            raise RemoteProtocolError("truncated batch", reason="truncated")
        frames.append(data[pos : pos + size])
        pos += size + (-size % ALIGN)
    if pos != end:
        raise RemoteProtocolError("batch longer than its frames", reason="malformed")
    return frames


# -- sending ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Outgoing:
    """One websocket message to write, and what writing it achieves."""

    message: bytes
    frames: int
    """Frames it completes: those of a batch, or one with the last piece of a big frame."""
    nbytes: int
    """Their size."""
    piece: bool
    """A piece of a big frame (else a batch of small ones)."""


class _Cursor:
    """Walks a big frame's buffers, handing out pieces of bounded size."""

    __slots__ = ("index", "link", "offset", "parts", "total")

    def __init__(self, parts: list[memoryview], total: int, link: int) -> None:
        self.parts = parts
        self.total = total
        self.link = link
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


class Outbox:
    """Frames waiting to go to one peer, in two bounded lanes, and how they are cut up.

    Frames up to ``ws_small_frame_bytes`` (control traffic) go first, coalesced into
    batches; bigger ones follow in ``ws_chunk_bytes`` pieces, one frame at a time, so a
    control message never waits behind an array. Frames of one lane leave in the order
    they came. The control lane holds ``ws_send_queue_frames`` frames, the bulk lane
    ``ws_send_queue_bytes`` (and always one frame, whatever its size).

    The buffers of a big frame are cut without a copy: the caller must not modify them
    until the frame has left.
    """

    __slots__ = ("_cfg", "bulk", "bulk_bytes", "control", "cursor")

    def __init__(self, config: NodeConfig) -> None:
        self._cfg = config
        self.control: deque[tuple[Chunks, int]] = deque()
        self.bulk: deque[tuple[list[memoryview], int]] = deque()
        self.bulk_bytes = 0
        self.cursor: _Cursor | None = None

    def full(self, size: int) -> bool:
        """Whether a frame of ``size`` bytes must wait for room."""
        if size <= self._cfg.ws_small_frame_bytes:
            return len(self.control) >= self._cfg.ws_send_queue_frames
        busy = self.bulk or self.cursor
        return bool(busy) and self.bulk_bytes + size > self._cfg.ws_send_queue_bytes

    def put(self, frame: Chunks, size: int) -> None:
        """Queue ``frame`` (``size`` bytes, never empty), whether ``full`` or not."""
        if size <= self._cfg.ws_small_frame_bytes:
            self.control.append((frame, size))
        else:
            self.bulk.append(([memoryview(c).cast("B") for c in frame], size))
            self.bulk_bytes += size

    def pending(self) -> bool:
        return bool(self.control or self.bulk or self.cursor)

    def queued(self) -> int:
        """Frames not yet sent, the one under way included."""
        return len(self.control) + len(self.bulk) + (1 if self.cursor else 0)

    def clear(self) -> int:
        """Drop every frame not yet sent; returns how many."""
        n = self.queued()
        self.control.clear()
        self.bulk.clear()
        self.bulk_bytes = 0
        self.cursor = None
        return n

    def next_message(self, link: int) -> Outgoing:
        """The next message to write on the link of serial ``link`` (while ``pending``):
        a batch of small frames, else the next piece of a big frame. A big frame begun on
        another link starts again from its first piece, since the peer reassembles the
        pieces of each link apart."""
        if self.control:
            return self._batch()
        cursor = self.cursor
        if cursor is None:
            bufs, size = self.bulk.popleft()
            self.bulk_bytes -= size
            cursor = self.cursor = _Cursor(bufs, size, link)
        elif cursor.link != link:
            cursor.link = link
            cursor.index = cursor.offset = 0
        head = CHUNK_HEAD.pack(KIND_CHUNK, cursor.total)
        message = b"".join([head, *cursor.next_piece(self._cfg.ws_chunk_bytes)])
        if cursor.finished():
            self.cursor = None
            return Outgoing(message=message, frames=1, nbytes=cursor.total, piece=True)
        return Outgoing(message=message, frames=0, nbytes=0, piece=True)

    def _batch(self) -> Outgoing:
        control = self.control
        room = self._cfg.ws_small_frame_bytes
        sizes: list[int] = []
        body: list[Buffer] = []
        while control and (not sizes or control[0][1] + ALIGN + 4 <= room):
            chunks, size = control.popleft()
            sizes.append(size)
            body.extend(chunks)
            if pad := -size % ALIGN:
                body.append(bytes(pad))
            room -= size + ALIGN + 4
        count = len(sizes)
        head = BATCH_HEAD.pack(KIND_BATCH, count) + struct.pack(f"<{count}I", *sizes)
        head += bytes(-len(head) % ALIGN)
        return Outgoing(
            message=b"".join([head, *body]), frames=count, nbytes=sum(sizes), piece=False
        )

    def failed(self, out: Outgoing) -> int:
        """``out`` could not be written (its link is lost): the frames it carried are
        dropped, a big frame's other pieces with it. Returns how many."""
        if out.piece:
            self.cursor = None
            return 1
        return out.frames
