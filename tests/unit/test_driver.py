"""The driver over the in-memory network: every frame names its receiver; the core lives
on the driver's clock.

Each node is a ``Driver`` with a recording core and a resolver backed by a dict (what
membership and the transport know in a daemon). Frames are captured off the network with a
bare transport and replayed to another node, which must refuse and count them without
handing anything to its core. A driver given a fake clock shows that the core sees no other.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import msgpack

from mesh.protocol.codec import Buffer, Codec
from mesh.protocol.messages import (
    Address,
    Capabilities,
    Gossip,
    Join,
    Load,
    NodeId,
    NodeRecord,
    Wire,
    WireType,
)
from mesh.runtime.driver import Driver
from mesh.runtime.transport import InMemoryNetwork, InMemoryTransport
from tests.unit.test_codec import body, mac

KEY = b"driver-test-key-0123456789abcdef"
DEADLINE_S = 10.0
GOSSIP = Gossip(updates=())


@dataclass
class Recorder:
    """A core that records what it receives and when, sends what a test puts in ``out``,
    and asks for a timer at ``due``."""

    born: float
    got: list[tuple[NodeId, Wire]] = field(default_factory=list)
    out: list[tuple[Address, Wire]] = field(default_factory=list)
    due: float | None = None
    seen: list[tuple[str, float]] = field(default_factory=list)
    """(what, now) for every call that came with a ``now``."""

    def receive(self, src: NodeId, msg: Wire, now: float) -> None:
        self.got.append((src, msg))
        self.seen.append(("receive", now))

    def handle_timer(self, now: float) -> None:
        self.due = None
        self.seen.append(("timer", now))

    def next_timer(self) -> float | None:
        return self.due

    def take_outgoing(self) -> list[tuple[Address, Wire]]:
        out, self.out = self.out, []
        return out


@dataclass
class FakeClock:
    """A monotonic clock that moves only when a test sets ``t``."""

    t: float

    def __call__(self) -> float:
        return self.t


@dataclass
class Peer:
    driver: Driver[Recorder]
    core: Recorder
    address: Address

    def send(self, dst: Address, msg: Wire) -> None:
        self.core.out.append((dst, msg))
        self.driver.wake()


async def eventually(check: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(DEADLINE_S):
            # Deliveries are loop timers of the in-memory network: nothing to wait on.
            while not check():  # noqa: ASYNC110
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def recv(t: InMemoryTransport) -> Buffer:
    async with asyncio.timeout(DEADLINE_S):
        return await t.recv()


class Mesh:
    """Drivers on one in-memory network; ``ids`` is everyone's view of who is where."""

    def __init__(self, tg: asyncio.TaskGroup) -> None:
        self.net = InMemoryNetwork(random.Random(7), latency=(0.0, 0.001))
        self.ids: dict[Address, NodeId] = {}
        self.peers: list[Peer] = []
        self.lookups = 0
        self._tg = tg

    def resolve(self, address: Address) -> NodeId | None:
        self.lookups += 1
        return self.ids.get(address)

    def add(
        self, name: str, *, known: bool = True, clock: Callable[[], float] = time.monotonic
    ) -> Peer:
        address = Address(f"{name}:1")
        if known:
            self.ids[address] = NodeId(name)
        driver = Driver(
            node=NodeId(name),
            transport=self.net.transport(address),
            codec=Codec(KEY, NodeId(name), max_frame_bytes=1 << 20),
            core=Recorder,
            resolve=self.resolve,
            authenticated=False,
            clock=clock,
        )
        self._tg.create_task(driver.run())
        peer = Peer(driver, driver.core, address)
        self.peers.append(peer)
        return peer

    def stop(self) -> None:
        for p in self.peers:
            p.driver.stop()


@asynccontextmanager
async def mesh() -> AsyncIterator[Mesh]:
    async with asyncio.TaskGroup() as tg:
        m = Mesh(tg)
        try:
            yield m
        finally:
            m.stop()


def join_of(name: str) -> Join:
    record = NodeRecord(
        node=NodeId(name),
        address=Address(f"{name}:1"),
        incarnation=0,
        version=1,
        capabilities=Capabilities(resources={}, libraries={}, tasks=(), labels={}),
        load=Load(running=0, queued=0, backlog_s=0.0),
    )
    return Join(record=record)


async def test_frames_reach_the_node_they_name() -> None:
    async with mesh() as m:
        a, b = m.add("a"), m.add("b")
        a.send(b.address, GOSSIP)
        await eventually(lambda: bool(b.core.got), "b to receive")
        assert b.core.got == [(NodeId("a"), GOSSIP)]
        assert not b.driver.rejected
        assert m.lookups == 1  # one lookup per frame sent


async def test_a_frame_captured_on_its_way_to_b_is_refused_by_c() -> None:
    async with mesh() as m:
        a, c = m.add("a"), m.add("c")
        # b's address is served by a bare transport: whatever a sends there is captured.
        tap = m.net.transport(Address("b:1"))
        m.ids[tap.address] = NodeId("b")
        a.send(tap.address, GOSSIP)
        frame = bytes(await recv(tap))
        b_codec = Codec(KEY, NodeId("b"), max_frame_bytes=1 << 20)
        assert b_codec.decode(frame, m.peers[0].driver.wall_clock()).to == "b"
        # Replayed to c from anywhere on the network:
        await tap.send(c.address, [frame])
        await eventually(lambda: bool(c.driver.rejected), "c to refuse the replay")
        assert c.driver.rejected == {"wrong-receiver": 1}
        assert c.core.got == []
        assert len(c.driver.codec.replay) == 0
        # c still hears a's frames that are its own.
        a.send(c.address, GOSSIP)
        await eventually(lambda: bool(c.core.got), "c to receive its own frame")
        await tap.close()


async def test_an_unknown_receiver_gets_only_a_join() -> None:
    async with mesh() as m:
        a, seed = m.add("a"), m.add("seed", known=False)  # a knows the seed by address only
        a.send(seed.address, GOSSIP)
        a.send(seed.address, join_of("a"))
        await eventually(lambda: bool(seed.core.got), "the seed to receive the join")
        assert seed.core.got == [(NodeId("a"), join_of("a"))]
        assert a.driver.dropped == {"no-receiver": 1}
        assert not seed.driver.rejected


async def test_a_blank_frame_of_another_type_is_refused_by_the_receiver() -> None:
    async with mesh() as m:
        b = m.add("b")
        # A key holder's frame naming nobody, on a type that must name its receiver.
        header = msgpack.packb(["x", 1, 1, b.driver.wall_clock(), "", int(WireType.GOSSIP), [[]]])
        tap = m.net.transport(Address("x:1"))
        await tap.send(b.address, [mac(body(header), key=KEY)])
        await eventually(lambda: bool(b.driver.rejected), "b to refuse it")
        assert b.driver.rejected == {"wrong-receiver": 1}
        assert b.core.got == []
        await tap.close()


async def test_a_version_1_frame_is_refused_and_counted() -> None:
    async with mesh() as m:
        b = m.add("b")
        now = b.driver.wall_clock()
        header = msgpack.packb(["old", 1, 1, now, int(WireType.GOSSIP), [[]]])
        tap = m.net.transport(Address("old:1"))
        await tap.send(b.address, [mac(body(header), key=KEY, version=1)])
        await eventually(lambda: bool(b.driver.rejected), "b to refuse it")
        assert b.driver.rejected == {"version": 1}
        assert b.core.got == []
        await tap.close()


async def test_the_core_sees_only_the_drivers_clock() -> None:
    clock = FakeClock(1000.0)
    async with mesh() as m:
        a, b = m.add("a"), m.add("b", clock=clock)
        assert b.core.born == 1000.0
        clock.t = 1001.0
        b.driver.command(lambda now: b.core.seen.append(("command", now)))
        clock.t = 1002.0
        a.send(b.address, GOSSIP)
        await eventually(lambda: bool(b.core.got), "b to receive")
        # A timer three fake seconds ahead: the driver arms the loop for three real
        # seconds, but a step taken once the fake clock reaches it runs it at once.
        b.core.due = 1005.0
        b.driver.wake()
        await asyncio.sleep(0)  # the step it asked for
        assert b.core.seen[-1] == ("receive", 1002.0)
        clock.t = 1005.0
        b.driver.wake()
        await eventually(lambda: b.core.due is None, "b's timer to run")
        assert b.core.seen == [("command", 1001.0), ("receive", 1002.0), ("timer", 1005.0)]
