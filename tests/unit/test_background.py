"""``Background``: one owner for a service's tasks, started and stopped as a whole.

Every test runs on the event loop alone (no sockets, no sleeps): a main coroutine that
sets something up, says it is ready and waits to be cancelled, and tasks spawned beside it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest

from mesh.errors import LocalProtocolError
from mesh.runtime.background import Background, Ready, until_cancelled

DEADLINE_S = 5.0


class Service:
    """Records what happens to its main and its spawned tasks."""

    def __init__(self) -> None:
        self.background = Background("svc")
        self.log: list[str] = []

    async def main(self, ready: Ready) -> None:
        self.log.append("setup")
        await asyncio.sleep(0)  # setting up takes a turn of the loop
        try:
            ready()
            await until_cancelled()
        finally:
            self.log.append("teardown")

    async def child(self, name: str) -> None:
        try:
            await until_cancelled()
        finally:
            self.log.append(f"{name} ended")


async def test_start_returns_once_ready_and_stop_ends_every_task() -> None:
    svc = Service()
    baseline = set(asyncio.all_tasks())
    async with asyncio.timeout(DEADLINE_S):
        await svc.background.start(svc.main)
        assert svc.log == ["setup"]
        assert svc.background.running
        assert svc.background.spawn(svc.child("a"), "a")
        assert svc.background.spawn(svc.child("b"), "b")
        await asyncio.sleep(0)
        await svc.background.stop()
    # Main's clean-up runs first, then the others are cancelled.
    assert svc.log[:2] == ["setup", "teardown"]
    assert sorted(svc.log[2:]) == ["a ended", "b ended"]
    assert not svc.background.running
    assert {t for t in asyncio.all_tasks() if t not in baseline and not t.done()} == set()


async def test_spawn_after_stop_closes_the_coroutine() -> None:
    svc = Service()
    await svc.background.start(svc.main)
    await svc.background.stop()
    coro = svc.child("late")
    assert not svc.background.spawn(coro, "late")
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED  # never to run
    await svc.background.stop()  # twice is fine


async def test_spawn_before_start_is_refused() -> None:
    svc = Service()
    coro = svc.child("early")
    assert not svc.background.spawn(coro, "early")
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    await svc.background.stop()  # stop before start is fine


async def test_a_main_that_fails_before_ready_fails_start() -> None:
    background = Background("svc")

    async def main(ready: Ready) -> None:
        raise OSError("no interface")

    with pytest.raises(OSError, match="no interface"):
        await background.start(main)
    assert not background.running
    await background.stop()  # nothing left to stop, nothing raised twice


async def test_a_main_that_returns_before_ready_fails_start() -> None:
    background = Background("svc")

    async def main(ready: Ready) -> None:
        return

    with pytest.raises(LocalProtocolError, match="before it was ready"):
        await background.start(main)


async def test_start_twice_is_refused() -> None:
    svc = Service()
    await svc.background.start(svc.main)
    with pytest.raises(LocalProtocolError, match="already started"):
        await svc.background.start(svc.main)
    await svc.background.stop()


async def test_a_failing_task_ends_the_service_is_logged_and_raised_by_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    svc = Service()
    await svc.background.start(svc.main)
    svc.background.spawn(svc.child("bystander"), "bystander")
    failed = asyncio.Event()

    async def broken() -> None:
        failed.set()
        raise ValueError("a bug")

    with caplog.at_level(logging.ERROR, logger="mesh.runtime.background"):
        svc.background.spawn(broken(), "broken")
        async with asyncio.timeout(DEADLINE_S):
            await failed.wait()
            # Polled: the service ends on a later turn of the loop, with no event to wait on.
            while not caplog.records:  # noqa: ASYNC110
                await asyncio.sleep(0)
        assert not svc.background.running
        assert [r.getMessage() for r in caplog.records] == ["svc failed"]
    assert {"teardown", "bystander ended"} <= set(svc.log)
    assert not svc.background.spawn(svc.child("late"), "late")
    with pytest.raises(ExceptionGroup) as raised:
        await svc.background.stop()
    assert [type(e) for e in raised.value.exceptions] == [ValueError]
    await svc.background.stop()  # raised once


async def test_cancelling_start_leaves_nothing_running() -> None:
    background = Background("svc")
    torn_down = asyncio.Event()

    async def slow(ready: Ready) -> None:
        try:
            await until_cancelled()  # never ready
        finally:
            torn_down.set()

    async with asyncio.timeout(DEADLINE_S):
        starting = asyncio.create_task(background.start(slow))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
    assert torn_down.is_set()
    assert not background.running


async def test_a_cancelled_stop_cuts_the_clean_up_short_and_still_ends_the_tasks() -> None:
    background = Background("svc")
    cleaning = asyncio.Event()
    children_done: list[str] = []

    async def main(ready: Ready) -> None:
        try:
            ready()
            await until_cancelled()
        finally:
            cleaning.set()
            await until_cancelled()  # a clean-up that hangs

    async def child() -> None:
        try:
            await until_cancelled()
        finally:
            children_done.append("child")

    await background.start(main)
    background.spawn(child(), "child")
    async with asyncio.timeout(DEADLINE_S):
        stopping = asyncio.create_task(background.stop())
        await cleaning.wait()
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        # The second cancel reached main's clean-up; the group still ends its children.
        while children_done != ["child"]:  # noqa: ASYNC110
            await asyncio.sleep(0)
