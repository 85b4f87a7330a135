"""The in-memory network and its asynchronous transport."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

import pytest

from mesh.errors import LocalProtocolError
from mesh.protocol.messages import Address
from mesh.runtime.transport import InMemoryNetwork, InMemoryTransport
from tests.transport_suite import CHECKS, DEADLINE_S, Check, recv_bytes

A = Address("a:1")
B = Address("b:1")
C = Address("c:1")


@pytest.fixture
async def pair() -> AsyncIterator[tuple[InMemoryTransport, InMemoryTransport]]:
    net = InMemoryNetwork(random.Random(1), latency=(0.0, 0.002))
    a, b = net.transport(A, queue_frames=8), net.transport(B, queue_frames=8)
    yield a, b
    await a.close()
    await b.close()


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
async def test_transport_suite(
    check: Check, pair: tuple[InMemoryTransport, InMemoryTransport]
) -> None:
    await check(*pair)


async def wait_until(cond: Callable[[], bool]) -> None:
    """Poll a condition on the network's internal state, within a deadline."""
    async with asyncio.timeout(DEADLINE_S):
        while not cond():  # noqa: ASYNC110 - nothing to wait on: deliveries are loop timers
            await asyncio.sleep(0.001)


async def test_send_waits_while_the_destination_queue_is_full() -> None:
    net = InMemoryNetwork(random.Random(2))
    a, b = net.transport(A, queue_frames=3), net.transport(B)
    for i in range(3):
        await a.send(B, [bytes([i])])
    blocked = asyncio.ensure_future(a.send(B, [b"\x03"]))
    await wait_until(lambda: len(b._inbox) == 3)
    for _ in range(10):
        await asyncio.sleep(0)
    assert not blocked.done()
    assert await recv_bytes(b) == b"\x00"
    async with asyncio.timeout(DEADLINE_S):
        await blocked
    assert [await recv_bytes(b) for _ in range(3)] == [b"\x01", b"\x02", b"\x03"]
    await a.close()
    await b.close()


async def test_try_send_refuses_while_the_destination_queue_is_full() -> None:
    net = InMemoryNetwork(random.Random(2))
    a, b = net.transport(A, queue_frames=2), net.transport(B)
    assert a.try_send(B, [b"\x00"])
    assert a.try_send(B, [b"\x01"])
    assert not a.try_send(B, [b"\x02"])
    await wait_until(lambda: len(b._inbox) == 2)
    assert b.try_recv() == b"\x00"
    assert a.try_send(B, [b"\x02"])
    assert [await recv_bytes(b) for _ in range(2)] == [b"\x01", b"\x02"]
    await a.close()
    await b.close()
    with pytest.raises(ConnectionError):
        a.try_send(B, [b"\x03"])


async def test_loss_and_unknown_destinations_drop_and_count() -> None:
    net = InMemoryNetwork(random.Random(3), loss=1.0)
    a, b = net.transport(A), net.transport(B)
    await a.send(B, [b"x"])
    await a.send(C, [b"y"])
    assert a.dropped == 2
    assert net.dropped == 2  # loss drew both; C has no listener either
    net.loss = 0.0
    await a.send(B, [b"z"])
    assert await recv_bytes(b) == b"z"
    await a.close()
    await b.close()


async def test_partition_and_heal() -> None:
    net = InMemoryNetwork(random.Random(4))
    a, b, c = net.transport(A), net.transport(B), net.transport(C)
    net.partition([[A, B], [C]])
    await a.send(C, [b"lost"])
    await a.send(B, [b"same side"])
    assert await recv_bytes(b) == b"same side"
    assert a.dropped == 1
    net.heal()
    await a.send(C, [b"healed"])
    assert await recv_bytes(c) == b"healed"
    for t in (a, b, c):
        await t.close()


async def test_send_after_close_raises_and_address_is_freed() -> None:
    net = InMemoryNetwork(random.Random(5))
    a = net.transport(A)
    with pytest.raises(LocalProtocolError):
        net.transport(A)
    await a.close()
    with pytest.raises(ConnectionError):
        await a.send(B, [b"x"])
    again = net.transport(A)
    await again.close()


def test_decide_is_seeded_and_shared() -> None:
    def draws(seed: int) -> list[float | None]:
        net = InMemoryNetwork(random.Random(seed), latency=(0.001, 0.005), loss=0.3)
        return [net.decide(A, B) for _ in range(200)]

    first = draws(9)
    assert first == draws(9)
    lost = sum(d is None for d in first)
    assert 20 < lost < 100
    assert all(d is None or 0.001 <= d <= 0.005 for d in first)


def test_bad_network_parameters_are_refused() -> None:
    with pytest.raises(LocalProtocolError):
        InMemoryNetwork(random.Random(0), latency=(0.2, 0.1))
    with pytest.raises(LocalProtocolError):
        InMemoryNetwork(random.Random(0), loss=1.5)
