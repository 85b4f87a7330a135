"""Checks every ``Transport`` must pass, as plain async functions of two connected ends.

Each check takes ``a`` and ``b``, two open transports that can reach each other, and
leaves closing them to the caller. The in-memory transport runs them in
``tests/unit/test_inmemory_transport.py``; the websocket transport reuses them as they
are. Waits are bounded with ``asyncio.timeout``; no check depends on how fast a machine is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from mesh.runtime.transport import Transport

DEADLINE_S = 10.0

Check = Callable[[Transport, Transport], Awaitable[None]]


async def recv_bytes(t: Transport) -> bytes:
    async with asyncio.timeout(DEADLINE_S):
        return bytes(await t.recv())


async def check_send_recv(a: Transport, b: Transport) -> None:
    await a.send(b.address, [b"hello"])
    assert await recv_bytes(b) == b"hello"


async def check_chunks_arrive_as_one_frame(a: Transport, b: Transport) -> None:
    await a.send(b.address, [b"ab", bytearray(b"cd"), memoryview(b"ef")])
    assert await recv_bytes(b) == b"abcdef"


async def check_both_directions(a: Transport, b: Transport) -> None:
    await a.send(b.address, [b"to-b"])
    await b.send(a.address, [b"to-a"])
    assert await recv_bytes(b) == b"to-b"
    assert await recv_bytes(a) == b"to-a"


async def check_order_is_kept(a: Transport, b: Transport) -> None:
    n = 500

    async def produce() -> None:
        for i in range(n):
            await a.send(b.address, [i.to_bytes(4, "big")])

    async with asyncio.TaskGroup() as tg:
        tg.create_task(produce())
        got = [int.from_bytes(await recv_bytes(b), "big") for _ in range(n)]
    assert got == list(range(n))


async def check_large_frame(a: Transport, b: Transport) -> None:
    payload = bytes(range(256)) * (4 * 1024 * 4)  # 4 MiB
    await a.send(b.address, [payload[:100], payload[100:]])
    assert await recv_bytes(b) == payload


async def check_slow_reader_loses_nothing(a: Transport, b: Transport) -> None:
    """A producer far ahead of its reader is pushed back; every frame still arrives."""
    n = 2000

    async def produce() -> None:
        for i in range(n):
            await a.send(b.address, [i.to_bytes(4, "big"), bytes(100)])

    async with asyncio.TaskGroup() as tg:
        tg.create_task(produce())
        got = []
        for _ in range(n):
            got.append(int.from_bytes((await recv_bytes(b))[:4], "big"))
            if len(got) % 100 == 0:
                await asyncio.sleep(0)  # let the producer run into a full queue
    assert got == list(range(n))


async def check_close_wakes_a_pending_recv(a: Transport, b: Transport) -> None:
    outcome: list[str] = []

    async def receive() -> None:
        try:
            await b.recv()
        except ConnectionError:
            outcome.append("closed")
        else:
            outcome.append("frame")

    async with asyncio.timeout(DEADLINE_S), asyncio.TaskGroup() as tg:
        tg.create_task(receive())
        await asyncio.sleep(0)
        await b.close()
    assert outcome == ["closed"]


async def check_calls_that_never_wait(a: Transport, b: Transport) -> None:
    """``try_send`` queues without waiting (or says the queue is full, queueing nothing);
    ``try_recv`` gives what has arrived, or None, never waiting for more."""
    assert b.try_recv() is None
    async with asyncio.timeout(DEADLINE_S):
        for i in range(3):
            while not a.try_send(b.address, [bytes([i])]):  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.001)
        got = [await recv_bytes(b)]
        while len(got) < 3:
            frame = b.try_recv()
            if frame is None:
                await asyncio.sleep(0.001)
            else:
                got.append(bytes(frame))
    assert got == [b"\x00", b"\x01", b"\x02"]
    assert b.try_recv() is None


CHECKS: list[Check] = [
    check_send_recv,
    check_calls_that_never_wait,
    check_chunks_arrive_as_one_frame,
    check_both_directions,
    check_order_is_kept,
    check_large_frame,
    check_slow_reader_loses_nothing,
    check_close_wakes_a_pending_recv,
]
"""Every check, in the order to run them; ``check_close_wakes_a_pending_recv`` closes ``b``."""
