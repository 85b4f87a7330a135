"""The websocket peer transport between real aiohttp servers on 127.0.0.1.

Each test builds two or three transports on their own ports, moves frames between them and
checks what arrives, in what order, and what the counters say. Waits are for conditions,
with a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import aiohttp
import msgpack
import numpy as np
import pytest
from aiohttp import WSMsgType, web

from mesh.config import NodeConfig
from mesh.protocol.codec import FRAME_PREFIX, MAGIC, UNADDRESSED, VERSION, Buffer, Codec
from mesh.protocol.framing import (
    KIND_BATCH,
    KIND_BYE,
    KIND_CHUNK,
    KIND_HELLO,
    KIND_SEALED,
    read_hello,
)
from mesh.protocol.messages import Address, Load, NodeId, PeerHello
from mesh.protocol.sealing import PEER_CONTEXT, Exchange
from node.transport_ws import WS_PATH, WsTransport
from tests.transport_suite import CHECKS, Check
from tests.unit.test_framing import batch

KEY = b"mesh-test-key-0123456789abcdef"
OTHER_KEY = b"another-mesh-key-0123456789abc"

CONFIG = NodeConfig(
    max_frame_bytes=48 * 1024 * 1024,
    ws_chunk_bytes=256 * 1024,
    ws_connect_timeout_s=2.0,
    ws_dial_attempts=2,
    ws_redial_backoff_s=0.05,
    ws_send_timeout_s=10.0,
    ws_heartbeat_s=10.0,
    ws_close_timeout_s=1.0,
)

PLAIN = dataclasses.replace(CONFIG, wire_sealed=False)
"""For hand-made peers that send raw frames: the framing checks are the same either way."""

DEADLINE_S = 20.0


PAD = bytes(8)  # the codec's smallest body; authenticate() refuses shorter frames


def sign(body: bytes, key: bytes = KEY, version: int = VERSION) -> bytes:
    """An authenticated frame around an arbitrary body: all the transport checks. The
    prefix is under the MAC since version 2; version 1 covered the body alone."""
    prefix = bytes((MAGIC, version))
    covered = PAD + body if version == 1 else prefix + PAD + body
    return prefix + hmac.new(key, covered, hashlib.sha256).digest() + PAD + body


def body_of(frame: Buffer) -> bytes:
    return bytes(memoryview(frame)[FRAME_PREFIX + len(PAD) :])


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Wait until ``check()`` holds; fail after a generous deadline."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            # Polled: the conditions are counters of several objects, not one event.
            while not check():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def recv(t: WsTransport) -> Buffer:
    async with asyncio.timeout(DEADLINE_S):
        return await t.recv()


class Node:
    """A transport served by its own aiohttp app on 127.0.0.1."""

    def __init__(self, transport: WsTransport, runner: web.AppRunner, codec: Codec) -> None:
        self.t = transport
        self.runner = runner
        self.codec = codec

    @property
    def address(self) -> Address:
        return self.t.address

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


MakeNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make_node() -> AsyncIterator[MakeNode]:
    async with AsyncExitStack() as stack:

        async def make(
            name: str = "n",
            *,
            key: bytes = KEY,
            config: NodeConfig = CONFIG,
            authenticate: Callable[[Buffer], None] | None = None,
            resolve: Callable[[Address], NodeId | None] | None = None,
            protocol: int = VERSION,
            package: str = "1.0.0",
        ) -> Node:
            codec = Codec(
                key, NodeId(name), max_frame_bytes=config.max_frame_bytes, version=protocol
            )
            transport = WsTransport(
                codec=codec,
                config=config,
                wall_clock=time.time,
                authenticate=authenticate,
                resolve=resolve,
                package=package,
            )
            app = web.Application()
            transport.add_routes(app)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            await transport.start(Address(f"127.0.0.1:{port}"))
            stack.push_async_callback(transport.close)
            return Node(transport, runner, codec)

        yield make


def load_frame(codec: Codec, n: int, to: Node) -> list[Buffer]:
    chunks, _ = codec.encode(
        Load(running=n, queued=0, backlog_s=0.0), time.time(), to=to.codec.sender
    )
    return chunks


def load_of(codec: Codec, frame: Buffer) -> int:
    msg = codec.decode(frame, time.time(), authenticated=True).msg
    assert isinstance(msg, Load)
    return msg.running


# -- the checks every Transport passes ---------------------------------------------------


def accept_anything(frame: Buffer) -> None:
    """The shared checks send bare bytes, not codec frames; hellos stay authenticated."""


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
async def test_transport_suite(check: Check, make_node: MakeNode) -> None:
    a = await make_node("a", authenticate=accept_anything)
    b = await make_node("b", authenticate=accept_anything)
    await check(a.t, b.t)


# -- round trips and ordering ------------------------------------------------------------


async def test_round_trip_both_ways_on_one_connection(make_node: MakeNode) -> None:
    a, b = await make_node("a"), await make_node("b")
    await a.t.send(b.address, load_frame(a.codec, 1, b))
    assert load_of(b.codec, await recv(b.t)) == 1
    await b.t.send(a.address, load_frame(b.codec, 2, a))
    assert load_of(a.codec, await recv(a.t)) == 2
    # b answered over the connection a opened: one connection for the pair.
    assert (a.t.connects, b.t.connects) == (1, 1)
    assert (a.t.connections, b.t.connections) == (1, 1)
    assert a.t.frames_sent == 1
    assert b.t.frames_received == 1
    assert a.t.bytes_sent == b.t.bytes_received > 0


async def test_frames_from_one_peer_keep_their_order(make_node: MakeNode) -> None:
    a, b = await make_node("a"), await make_node("b")
    n = 2000
    for i in range(n):
        await a.t.send(b.address, [sign(struct.pack("<Q", i) + bytes(i % 300))])
    got = [struct.unpack_from("<Q", body_of(await recv(b.t)))[0] for _ in range(n)]
    assert got == list(range(n))
    assert a.t.dropped == 0
    assert not b.t.rejected


async def test_three_nodes_all_pairs(make_node: MakeNode) -> None:
    nodes = [await make_node(name) for name in "abc"]
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                await src.t.send(dst.address, [sign(f"{src.address}>{dst.address}".encode())])
    for dst in nodes:
        got = {body_of(await recv(dst.t)).decode() for _ in range(2)}
        assert got == {f"{src.address}>{dst.address}" for src in nodes if src is not dst}
    await eventually(lambda: all(n.t.connections == 2 for n in nodes), "one connection a pair")


async def test_send_to_itself_is_delivered_locally(make_node: MakeNode) -> None:
    a = await make_node("a")
    await a.t.send(a.address, [b"\x01\x02", b"\x03"])
    assert bytes(await recv(a.t)) == b"\x01\x02\x03"
    assert a.t.connections == 0


async def test_frame_chunks_are_sent_back_to_back(make_node: MakeNode) -> None:
    a, b = await make_node("a"), await make_node("b")
    frame = sign(os.urandom(1000))
    await a.t.send(b.address, [frame[:1], memoryview(frame)[1:500], bytearray(frame[500:])])
    assert bytes(await recv(b.t)) == frame


# -- big frames ------------------------------------------------------------------------


async def test_big_frame_arrives_whole_and_aligned(make_node: MakeNode) -> None:
    a, b = await make_node("a"), await make_node("b")
    arr = np.random.default_rng(1).standard_normal(3 * 1024 * 1024 + 7)
    chunks = load_frame(a.codec, 0, b)
    # A real encoded frame followed by a big array frame built from several buffers.
    await a.t.send(b.address, chunks)
    body = b"head" + bytes(60) + arr.tobytes()
    frame = sign(body)
    await a.t.send(b.address, [frame[:100], memoryview(frame)[100:]])
    first = await recv(b.t)
    assert load_of(b.codec, first) == 0
    got = await recv(b.t)
    assert memoryview(got).nbytes == len(frame)
    assert bytes(got) == frame
    view = np.frombuffer(memoryview(got), dtype=np.uint8)
    assert view.ctypes.data % 64 == 0


async def test_small_frame_overtakes_a_big_one(make_node: MakeNode) -> None:
    a, b = await make_node("a"), await make_node("b")
    await a.t.send(b.address, [sign(b"warm-up")])
    await recv(b.t)
    big = sign(os.urandom(32 * 1024 * 1024))
    await a.t.send(b.address, [big])
    # Once b holds part of the big frame, a control frame must not wait for the rest.
    await eventually(lambda: b.t._budget.used > 0, "the big frame to be under way")
    await a.t.send(b.address, [sign(b"control")])
    assert body_of(await recv(b.t)) == b"control"
    assert bytes(await recv(b.t)) == big


async def test_many_big_and_small_frames_interleaved_stay_intact(make_node: MakeNode) -> None:
    a, b = await make_node("a"), await make_node("b")
    rng = np.random.default_rng(2)
    bigs = [sign(rng.bytes(int(rng.integers(300_000, 2_000_000)))) for _ in range(6)]
    smalls = [sign(struct.pack("<Q", i)) for i in range(300)]

    async def produce() -> None:
        for i, small in enumerate(smalls):
            await a.t.send(b.address, [small])
            if i % 50 == 0:
                await a.t.send(b.address, [bigs[i // 50]])

    async with asyncio.TaskGroup() as tg:
        tg.create_task(produce())
        got = [bytes(await recv(b.t)) for _ in range(len(smalls) + len(bigs))]
    assert [f for f in got if len(f) < 1000] == smalls
    assert [f for f in got if len(f) >= 1000] == bigs


# -- back pressure and unreachable peers -------------------------------------------------


async def test_send_waits_while_the_peer_does_not_read(make_node: MakeNode) -> None:
    config = dataclasses.replace(
        CONFIG, ws_send_queue_frames=4, ws_recv_queue_frames=2, ws_recv_queue_bytes=1 << 20
    )
    a, b = await make_node("a", config=config), await make_node("b", config=config)
    n = 1500  # 60 KiB each: far more than the socket buffers hold
    frames = [sign(struct.pack("<Q", i) + bytes(60_000)) for i in range(n)]
    sent = 0

    async def produce() -> None:
        nonlocal sent
        for frame in frames:
            await a.t.send(b.address, [frame])
            sent += 1

    async with asyncio.TaskGroup() as tg:
        producer = tg.create_task(produce())

        # b reads nothing: a's queue towards b fills and the producer is held back.
        def queue_full() -> bool:
            peer = a.t._peers.get(b.address)
            return peer is not None and len(peer.outbox.control) == 4 and b.t.frames_received >= 2

        await eventually(queue_full, "the send queue to fill")
        assert not producer.done()
        assert sent < n
        got = [struct.unpack_from("<Q", body_of(await recv(b.t)))[0] for _ in range(n)]
    assert got == list(range(n))
    assert a.t.dropped == 0


async def test_unreachable_peer_drops_frames_without_hanging(make_node: MakeNode) -> None:
    a, b = await make_node("a"), await make_node("b")
    with_listener = await make_node("gone")
    gone = with_listener.address
    await with_listener.runner.cleanup()  # nothing listens on that port any more
    async with asyncio.timeout(DEADLINE_S):
        for i in range(10):
            await a.t.send(gone, [sign(bytes([i]))])
    await eventually(lambda: a.t.dropped == 10, "frames for the unreachable peer to drop")
    # The other peer is not held up by it.
    await a.t.send(b.address, [sign(b"still here")])
    assert body_of(await recv(b.t)) == b"still here"


async def test_send_gives_up_on_a_full_queue_to_a_silent_peer(make_node: MakeNode) -> None:
    # A listener that accepts TCP and never answers: dials hang until their timeout.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        config = dataclasses.replace(
            CONFIG,
            ws_send_queue_frames=2,
            ws_send_timeout_s=0.2,
            ws_connect_timeout_s=30.0,
            ws_dial_attempts=1,
        )
        a = await make_node("a", config=config)
        dst = Address(f"127.0.0.1:{port}")
        async with asyncio.timeout(DEADLINE_S):
            for i in range(5):
                await a.t.send(dst, [sign(bytes([i]))])
        # Two frames wait in the queue; the others found it full past the send timeout.
        assert a.t.dropped == 3
    finally:
        server.close()


async def test_reconnects_after_the_connection_is_lost(make_node: MakeNode) -> None:
    a, b = await make_node("a"), await make_node("b")
    await a.t.send(b.address, [sign(b"one")])
    await recv(b.t)
    for conn in list(b.t._open):
        await conn.ws.close()
    await eventually(lambda: a.t.connections == 0, "a to see the connection close")
    await a.t.send(b.address, [sign(b"two")])
    assert body_of(await recv(b.t)) == b"two"
    assert a.t.connects == 2


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="TCP_USER_TIMEOUT is Linux's")
async def test_both_ends_abort_when_their_data_goes_unacknowledged(make_node: MakeNode) -> None:
    # A peer cut off mid-connection must not hold frames in TCP's retransmission back-off
    # (seconds between tries after a few misses): the kernel aborts the connection instead,
    # and the next frame dials afresh.
    a, b = await make_node("a"), await make_node("b")
    await a.t.send(b.address, [sign(b"one")])
    await recv(b.t)
    want = round(CONFIG.ws_unacked_timeout_s * 1000)
    for t in (a.t, b.t):
        (conn,) = t._open
        sock = conn.ws.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == want


async def test_simultaneous_dials_settle_on_one_connection(make_node: MakeNode) -> None:
    for _ in range(5):
        a, b = await make_node("a"), await make_node("b")
        async with asyncio.TaskGroup() as tg:
            for i in range(20):
                tg.create_task(a.t.send(b.address, [sign(b"a%d" % i)]))
                tg.create_task(b.t.send(a.address, [sign(b"b%d" % i)]))
        got_b = {body_of(await recv(b.t)) for _ in range(20)}
        got_a = {body_of(await recv(a.t)) for _ in range(20)}
        assert got_b == {b"a%d" % i for i in range(20)}
        assert got_a == {b"b%d" % i for i in range(20)}

        def settled(a: Node = a, b: Node = b) -> bool:
            return a.t.connections == 1 and b.t.connections == 1

        await eventually(settled, "the losing connection to close")
        # Both ends send on the same, surviving connection.
        await a.t.send(b.address, [sign(b"after")])
        await b.t.send(a.address, [sign(b"after")])
        assert body_of(await recv(b.t)) == b"after"
        assert body_of(await recv(a.t)) == b"after"
        assert a.t.dropped == 0
        assert b.t.dropped == 0
        await a.t.close()
        await b.t.close()


# -- hostile input -------------------------------------------------------------------------


def hello(codec: Codec, address: str, to: NodeId = UNADDRESSED, share: bytes = b"") -> bytes:
    msg = PeerHello(address=address, package="0.0.test", share=share)
    chunks, _ = codec.encode(msg, time.time(), to=to)
    return b"".join([bytes((KIND_HELLO,)), *chunks])


def v1_frame(sender: str, tag: int, fields: list[object], seq: int = 1) -> bytes:
    """A frame as a node of frame version 1 sends it: no receiver, MAC over the body."""
    header: bytes = msgpack.packb([sender, 1, seq, time.time(), tag, fields], use_bin_type=True)
    body = struct.pack("<II", len(header), 0) + header
    return bytes((MAGIC, 1)) + hmac.new(KEY, body, hashlib.sha256).digest() + body


async def raw_session(
    target: Node, first: bytes | str, then: list[bytes | str]
) -> tuple[int | None, list[bytes]]:
    """Dial ``target`` by hand, send messages; return the close code and what came back."""
    received: list[bytes] = []
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://{target.address}{WS_PATH}", max_msg_size=0) as ws,
    ):
        for msg in [first, *then]:
            if isinstance(msg, str):
                await ws.send_str(msg)
            else:
                await ws.send_bytes(msg)
        async with asyncio.timeout(DEADLINE_S):
            async for reply in ws:
                if reply.type is WSMsgType.BINARY:
                    received.append(reply.data)
        return ws.close_code, received


async def test_hostile_connections_are_closed_and_counted(make_node: MakeNode) -> None:
    a, b = await make_node("a", config=PLAIN), await make_node("b", config=PLAIN)
    intruder = Codec(KEY, NodeId("intruder"), max_frame_bytes=CONFIG.max_frame_bytes)
    forger = Codec(OTHER_KEY, NodeId("forger"), max_frame_bytes=CONFIG.max_frame_bytes)
    replayed = hello(intruder, "127.0.0.1:9")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://{a.address}{WS_PATH}") as ws,
    ):
        await ws.send_bytes(replayed)
        assert (await ws.receive()).data[0] == KIND_HELLO
    good_hello = None  # a fresh, valid hello for each connection (a replayed one is refused)
    cases: list[tuple[str, bytes | str | None, list[bytes | str]]] = [
        # A batch first: random bytes would open with a hello's kind once in 256 runs.
        ("no-hello", bytes((KIND_BATCH,)) + os.urandom(199), []),
        ("replay", replayed, []),
        ("bad-mac", hello(forger, "127.0.0.1:9"), []),
        ("text", "hello?", []),
        ("bad-mac", good_hello, [batch(sign(os.urandom(100), OTHER_KEY))]),
        ("truncated", good_hello, [bytes((KIND_BATCH,)) + os.urandom(50)]),
        ("malformed", good_hello, [bytes((0x7F,)) + os.urandom(50)]),
        ("oversized", good_hello, [bytes((KIND_BATCH,)) + bytes(CONFIG.ws_chunk_bytes + 100)]),
        (
            "oversized",
            good_hello,
            [struct.pack("<B7xQ", KIND_CHUNK, CONFIG.max_frame_bytes + 1) + bytes(100)],
        ),
    ]
    expected: dict[str, int] = {}
    for reason, first, then in cases:
        opening = hello(intruder, "127.0.0.1:9") if first is None else first
        code, replies = await raw_session(a, opening, then)
        expected[reason] = expected.get(reason, 0) + 1
        assert a.t.rejected == expected, reason
        assert code not in (None, 1000), reason
        # Only a keyed peer is answered with a hello.
        assert (len(replies) == 1) == (first is None), reason
    # After all that, the node still serves its real peers.
    await b.t.send(a.address, load_frame(b.codec, 7, a))
    assert load_of(a.codec, await recv(a.t)) == 7
    assert a.t.frames_received == 1


async def test_good_frames_before_a_forged_one_are_delivered(make_node: MakeNode) -> None:
    a = await make_node("a", config=PLAIN)
    intruder = Codec(KEY, NodeId("intruder"), max_frame_bytes=CONFIG.max_frame_bytes)
    code, _ = await raw_session(
        a,
        hello(intruder, "127.0.0.1:9"),
        [batch(sign(b"fine")), batch(sign(b"forged", OTHER_KEY)), batch(sign(b"never"))],
    )
    assert body_of(await recv(a.t)) == b"fine"
    assert code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert a.t.rejected == {"bad-mac": 1}
    assert a.t.frames_received == 1


async def test_a_node_with_another_key_cannot_connect(make_node: MakeNode) -> None:
    a = await make_node("a")
    stranger = await make_node("s", key=OTHER_KEY)
    await stranger.t.send(a.address, [sign(b"let me in", OTHER_KEY)])
    await eventually(lambda: stranger.t.dropped == 1, "the stranger to give up")
    assert a.t.rejected["bad-mac"] >= 1
    assert stranger.t.rejected["bad-mac"] == 0  # a never answered with a hello
    assert a.t.frames_received == 0


# -- receivers and frame versions --------------------------------------------------------


def version_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "frame version" in r.getMessage()]


async def test_hellos_teach_each_side_the_others_node_id(make_node: MakeNode) -> None:
    a, b = await make_node("a"), await make_node("b")
    assert a.t.node_at(b.address) is None
    await a.t.send(b.address, load_frame(a.codec, 1, b))
    await recv(b.t)
    assert a.t.node_at(b.address) == "b"
    assert b.t.node_at(a.address) == "a"


async def test_a_dial_names_the_node_it_expects(make_node: MakeNode) -> None:
    b = await make_node("b")
    a = await make_node("a", resolve=lambda address: NodeId("b"))
    await a.t.send(b.address, load_frame(a.codec, 1, b))
    assert load_of(b.codec, await recv(b.t)) == 1
    assert not b.t.rejected
    # A dialer that expects another node there is refused at its hello.
    c = await make_node("c", resolve=lambda address: NodeId("somebody-else"))
    await c.t.send(b.address, load_frame(c.codec, 2, b))
    await eventually(lambda: c.t.dropped == 1, "c to give up")
    assert b.t.rejected == {"wrong-receiver": CONFIG.ws_dial_attempts}
    assert b.t.frames_received == 1


async def test_a_hello_captured_on_its_way_to_a_is_refused_by_b(make_node: MakeNode) -> None:
    a, b = await make_node("a", config=PLAIN), await make_node("b", config=PLAIN)
    intruder = Codec(KEY, NodeId("intruder"), max_frame_bytes=CONFIG.max_frame_bytes)
    captured = hello(intruder, "127.0.0.1:9", to=NodeId("a"))
    code, replies = await raw_session(b, captured, [])
    assert code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert replies == []
    assert b.t.rejected == {"wrong-receiver": 1}
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://{a.address}{WS_PATH}") as ws,
    ):
        await ws.send_bytes(captured)
        assert (await ws.receive()).data[0] == KIND_HELLO  # a, its receiver, takes it
    assert not a.t.rejected


async def test_a_replayed_seed_hello_cannot_take_over_a_real_connection(
    make_node: MakeNode,
) -> None:
    b = await make_node("b", config=PLAIN)
    d = await make_node("d", config=PLAIN, resolve=lambda address: NodeId("b"))
    await d.t.send(b.address, load_frame(d.codec, 1, b))
    await recv(b.t)
    # A hello d sent unaddressed to some seed, captured and replayed to b: fresh to b's
    # replay guard, from d's running process, so b accepts it as a second connection.
    captured = hello(d.codec, d.address)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://{b.address}{WS_PATH}") as ws,
    ):
        await ws.send_bytes(captured)
        async with asyncio.timeout(DEADLINE_S):
            assert (await ws.receive()).data[0] == KIND_HELLO
            assert (await ws.receive()).data == bytes((KIND_BYE,))  # b keeps the real one
        await b.t.send(d.address, load_frame(b.codec, 2, d))
        assert load_of(d.codec, await recv(d.t)) == 2


async def test_a_version_1_peer_is_refused_at_its_hello_and_logged_once(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    a = await make_node("a")
    old_hello = bytes((KIND_HELLO,)) + v1_frame("old", int(PeerHello.TAG), ["127.0.0.1:9"])
    with caplog.at_level("WARNING", logger="node.transport_ws"):
        code, replies = await raw_session(a, old_hello, [])
    assert code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert replies == []
    assert a.t.rejected == {"version": 1}
    [line] = version_warnings(caplog)
    assert f"peer speaks frame version 1, this node {VERSION}: upgrade it" in line


async def test_old_frames_close_the_connection_with_one_log_line(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    a = await make_node("a", config=PLAIN)
    intruder = Codec(KEY, NodeId("intruder"), max_frame_bytes=CONFIG.max_frame_bytes)
    old = [sign(b"old %d" % i, version=1) for i in range(20)]
    with caplog.at_level("WARNING", logger="node.transport_ws"):
        code, _ = await raw_session(
            a, hello(intruder, "127.0.0.1:9", to=NodeId("a")), [batch(*old), batch(*old)]
        )
    assert code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert a.t.rejected == {"version": 1}
    assert len(version_warnings(caplog)) == 1
    assert a.t.frames_received == 0


# -- shutdown ------------------------------------------------------------------------------


async def test_close_ends_everything(make_node: MakeNode) -> None:
    baseline = set(asyncio.all_tasks())
    a, b = await make_node("a"), await make_node("b")
    await a.t.send(b.address, [sign(b"x")])
    await recv(b.t)
    outcome: list[BaseException] = []

    async def waiting_recv() -> None:
        try:
            await a.t.recv()
        except ConnectionError as exc:
            outcome.append(exc)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(waiting_recv())
        await asyncio.sleep(0)
        await a.t.close()
    assert len(outcome) == 1
    with pytest.raises(ConnectionError):
        await a.t.recv()
    with pytest.raises(ConnectionError):
        await a.t.send(b.address, [sign(b"late")])
    await eventually(lambda: b.t.connections == 0, "b to see a leave")
    await b.t.close()
    await a.t.close()  # twice is fine
    await a.runner.cleanup()
    await b.runner.cleanup()
    leftover = {t for t in asyncio.all_tasks() if t not in baseline and not t.done()}
    assert leftover == set()


async def test_unstarted_transport_refuses_peers(make_node: MakeNode) -> None:
    codec = Codec(KEY, NodeId("idle"), max_frame_bytes=CONFIG.max_frame_bytes)
    idle = WsTransport(codec=codec, config=CONFIG, wall_clock=time.time)
    app = web.Application()
    idle.add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await session.ws_connect(f"http://127.0.0.1:{port}{WS_PATH}")
        with pytest.raises(ConnectionError):
            await idle.send(Address("127.0.0.1:9"), [sign(b"x")])
    finally:
        await idle.close()
        await runner.cleanup()


# -- sealing and versions ------------------------------------------------------------------


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]


async def test_compatible_packages_interoperate_sealed(make_node: MakeNode) -> None:
    a = await make_node("a", package="1.0.0")
    b = await make_node("b", package="1.4.2")
    await a.t.send(b.address, load_frame(a.codec, 3, b))
    assert load_of(b.codec, await recv(b.t)) == 3
    await b.t.send(a.address, load_frame(b.codec, 4, a))
    assert load_of(a.codec, await recv(a.t)) == 4
    assert not a.t.rejected
    assert not b.t.rejected
    assert a.t.refusals() == []


async def test_another_protocol_is_refused_once_on_both_sides(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    a = await make_node("a", package="1.0.0")
    future = await make_node("f", protocol=VERSION + 1, package="2.0.0")
    with caplog.at_level("WARNING", logger="node.transport_ws"):
        for n in range(5):
            await a.t.send(future.address, load_frame(a.codec, n, future))
            await eventually(lambda n=n: a.t.dropped == n + 1, "a to drop its frame")
        await eventually(lambda: future.t.rejected["version"] == 1, "the future node's count")
    # One connection, refused by both; no redial while the refusal stands.
    assert a.t.rejected == {"version": 1}
    assert future.t.rejected == {"version": 1}
    assert future.t.frames_received == 0
    lines = refusal_lines(caplog)
    assert len(lines) == 2, lines
    ours = next(line for line in lines if "upgrade this node" in line)
    theirs = next(line for line in lines if "upgrade the peer" in line)
    assert f"speaks protocol {VERSION + 1} (mesh-node 2.0.0)" in ours
    assert f"speaks protocol {VERSION} (mesh-node 1.0.0)" in theirs
    [seen] = a.t.refusals()
    assert seen["node"] == "f"
    assert seen["reason"] == "version"
    assert (seen["protocol"], seen["package"]) == (VERSION + 1, "2.0.0")
    assert future.t.refusals()[0]["node"] == "a"


async def test_an_unsealed_peer_is_refused_once_on_both_sides(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    a = await make_node("a")
    plain = await make_node("p", config=PLAIN)
    with caplog.at_level("WARNING", logger="node.transport_ws"):
        for n in range(3):
            await plain.t.send(a.address, load_frame(plain.codec, n, a))
            await eventually(lambda n=n: plain.t.dropped == n + 1, "p to drop its frame")
    assert a.t.rejected == {"unsealed": 1}
    assert plain.t.rejected == {"unsealed": 1}
    assert a.t.frames_received == 0
    assert len(refusal_lines(caplog)) == 2
    assert a.t.refusals()[0]["reason"] == "unsealed"
    # The same node, sealing now (as after an upgrade): talked to, no longer listed.
    upgraded = await make_node("p")
    await upgraded.t.send(a.address, load_frame(upgraded.codec, 9, a))
    assert load_of(a.codec, await recv(a.t)) == 9
    assert a.t.refusals() == []


async def test_downgraded_and_tampered_messages_close_a_sealed_connection(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    a = await make_node("a")
    intruder = Codec(KEY, NodeId("i"), max_frame_bytes=CONFIG.max_frame_bytes)
    plain = batch(sign(b"downgrade"))
    with caplog.at_level("WARNING", logger="node.transport_ws"):
        exchange = Exchange()
        opening = hello(intruder, "127.0.0.1:9", to=NodeId("a"), share=exchange.public)
        code, replies = await raw_session(a, opening, [plain, plain])
    assert code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert len(replies) == 1  # a's hello, then nothing
    assert a.t.rejected == {"unsealed": 1}
    assert len([r for r in caplog.records if "unsealed message" in r.getMessage()]) == 1
    # A sealed message under the right keys, then the same one again.
    exchange = Exchange()
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"http://{a.address}{WS_PATH}") as ws,
    ):
        await ws.send_bytes(hello(intruder, "127.0.0.1:9", to=NodeId("a"), share=exchange.public))
        reply = (await ws.receive()).data
        answer = read_hello(intruder, reply, time.time(), package="x", sealed=True)
        sealer, _ = exchange.keys(KEY, answer.share, initiator=True, context=PEER_CONTEXT)
        good = bytes((KIND_SEALED,)) + sealer.seal(batch(sign(b"sealed")))
        await ws.send_bytes(good)
        await ws.send_bytes(good)  # replayed
        async with asyncio.timeout(DEADLINE_S):
            assert (await ws.receive()).type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
    assert body_of(await recv(a.t)) == b"sealed"
    assert a.t.rejected == {"unsealed": 1, "sealed": 1}
