"""The peer wire without sockets: ``Outbox`` cuts frames into messages, ``Link`` reads them.

Two nodes are paired by passing each message an ``Outbox`` makes to the other side's
``Link``; hostile peers are bytes written by hand. No event loop, no clock: time is a
number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest

from mesh.config import NodeConfig
from mesh.errors import RemoteProtocolError
from mesh.protocol.codec import MAGIC, VERSION, Codec
from mesh.protocol.framing import (
    BYE,
    KIND_BATCH,
    KIND_CHUNK,
    KIND_HELLO,
    Blocked,
    Budget,
    Bye,
    Event,
    Hello,
    Link,
    Outbox,
    Outgoing,
    Received,
    hello_message,
    max_message_bytes,
    read_hello,
)
from mesh.protocol.messages import Address, Load, NodeId, PeerHello

KEY = b"mesh-test-key-0123456789abcdef"
OTHER_KEY = b"another-mesh-key-0123456789abc"
NOW = 1_700_000_000.0
PKG = "0.0.test"
A, B = Address("10.0.0.1:7000"), Address("10.0.0.2:7000")
CONFIG = NodeConfig(
    max_frame_bytes=8 * 1024 * 1024,
    ws_small_frame_bytes=4096,
    ws_chunk_bytes=64 * 1024,
    ws_send_queue_frames=8,
    ws_send_queue_bytes=1024 * 1024,
    ws_reassembly_bytes=1024 * 1024,
)
PAD = bytes(8)  # the codec's smallest body
LOAD = Load(running=1, queued=0, backlog_s=0.0)


def sign(body: bytes, key: bytes = KEY) -> bytes:
    """An authenticated frame around ``body``: all that ``Codec.authenticate`` checks."""
    prefix = bytes((MAGIC, VERSION))
    return prefix + hmac.new(key, prefix + PAD + body, hashlib.sha256).digest() + PAD + body


def codec(name: str, key: bytes = KEY) -> Codec:
    return Codec(key, NodeId(name), max_frame_bytes=CONFIG.max_frame_bytes)


class Budgeted:
    """A reassembly budget that counts how often room came back."""

    def __init__(self, limit: int = CONFIG.ws_reassembly_bytes) -> None:
        self.freed = 0
        self.budget = Budget(limit, self.free)

    def free(self) -> None:
        self.freed += 1


def link(
    *,
    serial: int = 1,
    budget: Budget | None = None,
    key: bytes = KEY,
    hello: Hello | None = None,
    outbound: bool = True,
    addressed: bool = True,
) -> Link:
    """B's end of a link to A (B dialled unless ``outbound`` is False)."""
    return Link(
        hello or Hello(address=A, boot=1, node=NodeId("a"), addressed=True, package=PKG, share=b""),
        peer=A,
        local=B,
        outbound=outbound,
        addressed=addressed,
        serial=serial,
        authenticate=codec("b", key).authenticate,
        budget=budget or Budgeted().budget,
        max_frame_bytes=CONFIG.max_frame_bytes,
    )


def drain(outbox: Outbox, serial: int = 1) -> list[Outgoing]:
    out = []
    while outbox.pending():
        out.append(outbox.next_message(serial))
    return out


def frames_of(events: Iterator[Event] | list[Event], *, check: bool = True) -> list[bytes]:
    """The frames among ``events``; reassembled ones are authenticated here, as a driver
    does (in a thread)."""
    got = []
    for event in events:
        assert isinstance(event, Received), event
        for frame in event.frames:
            if check and not event.authenticated:
                codec("b").authenticate(frame)
            got.append(bytes(frame))
    return got


def deliver(outgoing: list[Outgoing], rx: Link) -> list[bytes]:
    return [f for out in outgoing for f in frames_of(rx.receive(out.message))]


def refused(rx: Link, *messages: bytes) -> tuple[RemoteProtocolError, list[Event]]:
    """Feed ``messages`` until one is refused; the error and the events before it."""
    events: list[Event] = []
    try:
        for message in messages:
            for event in rx.receive(message):
                events.append(event)
    except RemoteProtocolError as exc:
        return exc, events
    pytest.fail("every message was accepted")


def batch(*frames: bytes) -> bytes:
    """A batch written by hand from the wire format."""
    head = struct.pack(f"<B3xI{len(frames)}I", KIND_BATCH, len(frames), *map(len, frames))
    out = head + bytes(-len(head) % 16)
    for f in frames:
        out += f + bytes(-len(f) % 16)
    return out


def chunk(total: int, piece: bytes) -> bytes:
    return struct.pack("<B7xQ", KIND_CHUNK, total) + piece


# -- hellos ---------------------------------------------------------------------------------


def test_hellos_name_the_listen_address_process_and_receiver() -> None:
    a, b = codec("a"), codec("b")
    dial = hello_message(a, A, NOW, to=None, package=PKG, share=b"")
    assert dial[0] == KIND_HELLO
    assert read_hello(b, dial, NOW, package=PKG, sealed=False) == Hello(
        address=A, boot=a.boot, node=NodeId("a"), addressed=False, package=PKG, share=b""
    )
    answer = hello_message(b, B, NOW, to=NodeId("a"), package=PKG, share=b"")
    assert read_hello(a, answer, NOW, package=PKG, sealed=False).addressed


def test_bad_hellos_are_refused_with_their_reason() -> None:
    a, b = codec("a"), codec("b")
    v1 = msgpack.packb(["a", 1, 1, NOW, int(PeerHello.TAG), [A]], use_bin_type=True)
    v1_body = struct.pack("<II", len(v1), 0) + v1
    v1_frame = bytes((MAGIC, 1)) + hmac.new(KEY, v1_body, hashlib.sha256).digest() + v1_body
    cases = {
        "no-hello": [
            b"",
            batch(sign(b"x")),
            bytes((KIND_HELLO,)) + a.encode_bytes(LOAD, NOW, to=NodeId("b")),
        ],
        "bad-mac": [hello_message(codec("a", OTHER_KEY), A, NOW, to=None, package=PKG, share=b"")],
        "wrong-receiver": [hello_message(a, A, NOW, to=NodeId("c"), package=PKG, share=b"")],
        "bad-field": [
            hello_message(a, Address("no-port"), NOW, to=None, package=PKG, share=b""),
            hello_message(a, Address("h:" + "9" * 400), NOW, to=None, package=PKG, share=b""),
        ],
        "version": [bytes((KIND_HELLO,)) + v1_frame],
        "stale": [hello_message(a, A, NOW - 3600, to=None, package=PKG, share=b"")],
    }
    for reason, messages in cases.items():
        for message in messages:
            with pytest.raises(RemoteProtocolError) as raised:
                read_hello(b, message, NOW, package=PKG, sealed=False)
            assert raised.value.reason == reason, (reason, message[:20])
    # The same hello twice is a replay.
    fresh = hello_message(a, A, NOW, to=None, package=PKG, share=b"")
    read_hello(b, fresh, NOW, package=PKG, sealed=False)
    with pytest.raises(RemoteProtocolError) as raised:
        read_hello(b, fresh, NOW, package=PKG, sealed=False)
    assert raised.value.reason == "replay"


def test_a_second_hello_on_a_link_is_refused() -> None:
    err, _ = refused(
        link(), hello_message(codec("a"), A, NOW, to=NodeId("b"), package=PKG, share=b"")
    )
    assert (err.reason, str(err)) == ("malformed", "second hello on a connection")


# -- round trips ------------------------------------------------------------------------------


def test_small_frames_travel_in_batches_and_arrive_aligned_in_order() -> None:
    outbox, rx = Outbox(CONFIG), link()
    frames = [sign(bytes([i]) * (i * 37 % 500)) for i in range(100)]
    for f in frames:
        outbox.put([f[:10], memoryview(f)[10:]], len(f))
    out = drain(outbox)
    # Several batches (a batch fits in ws_small_frame_bytes), each counted whole.
    assert 1 < len(out) < len(frames)
    assert all(not o.piece and len(o.message) <= max_message_bytes(CONFIG) for o in out)
    assert sum(o.frames for o in out) == len(frames)
    assert sum(o.nbytes for o in out) == sum(map(len, frames))
    got: list[bytes] = []
    for o in out:
        start = np.frombuffer(o.message, dtype=np.uint8).ctypes.data
        for event in rx.receive(o.message):
            assert isinstance(event, Received)
            assert event.authenticated
            for view in event.frames:
                # Each frame starts 16-aligned within its message.
                assert (np.frombuffer(view, dtype=np.uint8).ctypes.data - start) % 16 == 0
                got.append(bytes(view))
    assert got == frames


def test_a_batch_is_the_wire_format_byte_for_byte() -> None:
    outbox = Outbox(CONFIG)
    frames = [sign(b"one"), sign(b"three" * 3), sign(bytes(40))]
    for f in frames:
        outbox.put([f], len(f))
    [out] = drain(outbox)
    assert out.message == batch(*frames)


def test_big_frames_travel_in_pieces_and_arrive_whole_and_64_aligned() -> None:
    outbox, budgeted = Outbox(CONFIG), Budgeted()
    rx = link(budget=budgeted.budget)
    big = sign(np.random.default_rng(1).bytes(300_000))
    outbox.put([big[:1000], bytearray(big[1000:5000]), memoryview(big)[5000:]], len(big))
    small = sign(b"control")
    out = [outbox.next_message(1)]
    outbox.put([small], len(small))  # queued behind the first piece, overtakes the rest
    out += drain(outbox)
    assert [o.piece for o in out] == [True, False, True, True, True, True]
    assert [o.frames for o in out] == [0, 1, 0, 0, 0, 1]
    assert out[-1].nbytes == len(big)
    assert out[0].message[:16] == struct.pack("<B7xQ", KIND_CHUNK, len(big))
    assert all(len(o.message) <= max_message_bytes(CONFIG) for o in out)
    events = [e for o in out for e in rx.receive(o.message)]
    assert [type(e) for e in events] == [Received, Received]
    control, whole = events
    assert isinstance(control, Received)
    assert isinstance(whole, Received)
    assert [bytes(f) for f in control.frames] == [small]
    assert not whole.authenticated  # left to the caller: a MAC over a big frame is slow
    [frame] = whole.frames
    assert bytes(frame) == big
    assert np.frombuffer(frame, dtype=np.uint8).ctypes.data % 64 == 0
    assert budgeted.budget.used == 0
    assert budgeted.freed == 1


def test_a_frame_that_fits_one_piece_is_checked_at_once() -> None:
    rx = link()
    f = sign(bytes(10_000))
    [event] = rx.receive(chunk(len(f), f))
    assert isinstance(event, Received)
    assert event.authenticated
    err, _ = refused(rx, chunk(len(f), sign(bytes(10_000), OTHER_KEY)))
    assert err.reason == "bad-mac"


def test_a_big_frame_begun_on_a_lost_link_starts_again_on_the_next() -> None:
    outbox = Outbox(CONFIG)
    big = sign(bytes(range(256)) * 1000)
    outbox.put([big], len(big))
    old, new = link(serial=1), link(serial=2)
    first = outbox.next_message(1)
    assert list(old.receive(first.message)) == []  # half a frame, left on the old link
    got = deliver(drain(outbox, serial=2), new)
    assert got == [big]


def test_a_failed_write_drops_what_the_message_carried() -> None:
    outbox = Outbox(CONFIG)
    big, small = sign(bytes(200_000)), sign(b"s")
    outbox.put([big], len(big))
    outbox.put([small], len(small))
    outbox.put([small], len(small))
    batch_out = outbox.next_message(1)
    assert outbox.failed(batch_out) == 2
    piece = outbox.next_message(1)
    assert outbox.queued() == 1
    assert outbox.failed(piece) == 1  # the rest of the big frame goes with it
    assert not outbox.pending()


def test_lanes_are_bounded_in_frames_and_bytes() -> None:
    outbox = Outbox(CONFIG)
    small = sign(b"s")
    for _ in range(CONFIG.ws_send_queue_frames):
        assert not outbox.full(len(small))
        outbox.put([small], len(small))
    assert outbox.full(len(small))
    # The bulk lane always takes one frame, whatever its size, then counts bytes.
    huge = 2 * CONFIG.ws_send_queue_bytes
    assert not outbox.full(huge)
    outbox.put([bytes(huge)], huge)
    assert outbox.full(CONFIG.ws_small_frame_bytes + 1)
    assert outbox.queued() == CONFIG.ws_send_queue_frames + 1
    assert outbox.clear() == CONFIG.ws_send_queue_frames + 1
    assert not outbox.pending()
    assert not outbox.full(huge)


# -- hostile input ----------------------------------------------------------------------------


def test_malformed_messages_are_refused_with_their_reason() -> None:
    f = sign(b"fine")
    head = struct.pack("<B3xI", KIND_BATCH, 2) + struct.pack("<2I", len(f), 1000)
    cases: list[tuple[str, bytes]] = [
        ("malformed", b""),
        ("malformed", bytes((0x7F,)) + bytes(20)),
        ("truncated", bytes((KIND_BATCH,))),
        ("truncated", struct.pack("<B3xI", KIND_BATCH, 0)),
        ("truncated", struct.pack("<B3xI", KIND_BATCH, 1000) + bytes(64)),
        ("truncated", head + bytes(-len(head) % 16) + f + bytes(-len(f) % 16) + bytes(100)),
        ("truncated", struct.pack("<B3xI", KIND_BATCH, 1) + struct.pack("<I", 0) + bytes(8)),
        ("malformed", batch(f) + bytes(16)),
        ("truncated", struct.pack("<B7xQ", KIND_CHUNK, 100)),
        ("truncated", bytes((KIND_CHUNK,)) + bytes(10)),
        ("oversized", chunk(CONFIG.max_frame_bytes + 1, bytes(100))),
        ("malformed", chunk(10, bytes(11))),
        ("bad-mac", batch(sign(b"forged", OTHER_KEY))),
        ("truncated", batch(b"\x4d\x02 short")),
    ]
    for reason, message in cases:
        err, events = refused(link(), message)
        assert (err.reason, events) == (reason, []), message[:24]


def test_frames_of_a_batch_before_a_forged_one_are_delivered() -> None:
    good, forged = sign(b"fine"), sign(b"forged", OTHER_KEY)
    err, events = refused(link(), batch(good, sign(b"also fine"), forged, good))
    assert err.reason == "bad-mac"
    assert frames_of(events) == [good, sign(b"also fine")]


def test_nothing_may_follow_a_bye() -> None:
    rx = link()
    assert list(rx.receive(BYE)) == [Bye()]
    assert rx.bye_received
    for late in (batch(sign(b"late")), chunk(5, b"12345"), BYE):
        err, events = refused(rx, late)
        assert (err.reason, events) == ("malformed", [])


def test_pieces_that_overrun_their_frame_or_change_frame_are_refused() -> None:
    total = 3 * 1000
    err, _ = refused(link(), chunk(total, bytes(1000)), chunk(total, bytes(2001)))
    assert (err.reason, str(err)) == ("malformed", "chunks longer than their frame")
    err, _ = refused(link(), chunk(total, bytes(1000)), chunk(total + 1, bytes(1000)))
    assert (err.reason, str(err)) == ("malformed", "chunk of another frame")


def test_duplicate_or_reordered_pieces_make_a_frame_that_fails_authentication() -> None:
    big = sign(np.random.default_rng(3).bytes(3 * 4096 - 48))
    total = len(big)
    p = [big[i : i + 4096] for i in range(0, total, 4096)]
    assert len(p) == 3
    orders = {
        "duplicate": [p[0], p[0], p[2]],
        "first two swapped": [p[1], p[0], p[2]],
        "last two swapped": [p[0], p[2], p[1]],
    }
    for what, pieces in orders.items():
        budgeted = Budgeted()
        rx = link(budget=budgeted.budget)
        events = [e for piece in pieces for e in rx.receive(chunk(total, piece))]
        [frame] = frames_of(events, check=False)
        assert frame != big, what
        with pytest.raises(RemoteProtocolError):
            codec("b").authenticate(frame)
        assert budgeted.budget.used == 0


# -- limits -----------------------------------------------------------------------------------


def test_reassembly_waits_for_room_shared_by_every_link() -> None:
    budgeted = Budgeted(limit=150_000)
    one, two = link(budget=budgeted.budget), link(serial=2, budget=budgeted.budget)
    a, b = sign(bytes(100_000)), sign(bytes(90_000))
    # One frame is admitted whatever its size; a second would overrun the budget.
    assert list(one.receive(chunk(len(a), a[:50_000]))) == []
    assert budgeted.budget.used == len(a)
    waiting = two.receive(chunk(len(b), b[:50_000]))
    assert next(waiting) == Blocked(nbytes=len(b))
    assert next(waiting) == Blocked(nbytes=len(b))  # still no room
    assert frames_of(one.receive(chunk(len(a), a[50_000:]))) == [a]
    assert budgeted.freed == 1
    assert list(waiting) == []  # resumed: admitted, half received
    assert budgeted.budget.used == len(b)
    # A link that goes away gives its half frame's room back.
    two.close()
    assert budgeted.budget.used == 0
    assert budgeted.freed == 2


def test_a_budget_smaller_than_a_frame_still_admits_it_alone() -> None:
    budgeted = Budgeted(limit=10)
    rx = link(budget=budgeted.budget)
    big = sign(bytes(100_000))
    assert frames_of(rx.receive(chunk(len(big), big[:60_000]))) == []
    assert frames_of(rx.receive(chunk(len(big), big[60_000:]))) == [big]


# -- which link carries the frames ------------------------------------------------------------


def test_both_ends_keep_the_same_link() -> None:
    hello_a = Hello(address=A, boot=1, node=NodeId("a"), addressed=True, package=PKG, share=b"")
    # B's view: one link B dialled, one A dialled (A's listen address is lower).
    mine = link(hello=hello_a, serial=1, outbound=True)
    theirs = link(hello=hello_a, serial=2, outbound=False)
    assert theirs.outranks(mine)
    assert not mine.outranks(theirs)
    # A dialler that named its receiver beats one that did not (a seed's first dial).
    blank = link(hello=hello_a, serial=3, outbound=False, addressed=False)
    assert mine.outranks(blank)
    # Between two links opened by the same side, the newer one.
    newer = link(hello=hello_a, serial=4, outbound=True)
    assert newer.outranks(mine)


def test_a_link_retires_with_one_bye_and_finishes_when_both_have() -> None:
    rx = link()
    assert rx.retire() == BYE
    assert rx.retire() is None
    assert not rx.finished
    list(rx.receive(BYE))
    assert rx.finished


def test_config_bounds_the_message_size() -> None:
    wide = dataclasses.replace(CONFIG, ws_small_frame_bytes=1 << 20)
    assert max_message_bytes(wide) == (1 << 20) + 64
    assert max_message_bytes(CONFIG) == CONFIG.ws_chunk_bytes + 64
