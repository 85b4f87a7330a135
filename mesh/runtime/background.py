"""The background tasks of one service, owned in one place, as anyio's ``TaskGroup.start()``.

A service (the peer transport, mDNS discovery, ...) has a main coroutine that sets it up,
calls ``ready()`` and then runs until it is cancelled, and other tasks it starts on the way,
often from callbacks. ``Background`` makes all of them children of one ``asyncio.TaskGroup``
held by one parent task, so that nothing runs unowned:

- ``start(main)`` returns once main has called ``ready()``; if main fails first, ``start``
  raises what it raised and nothing is left running;
- ``spawn(coro, name)`` adds a task, from synchronous code too; once the service is stopping
  it closes ``coro`` instead and returns False;
- a task that fails ends the service: the others are cancelled, the failure is logged at
  once (nobody may be waiting on the service) and ``stop`` raises it;
- ``stop()`` cancels the parent, hence every task, and returns once all have ended. Main's
  ``finally`` runs before the other tasks are cancelled. A ``stop`` that is cancelled
  meanwhile cancels the parent once more (cutting main's clean-up short) and stops waiting.

A service calls ``start`` from its ``start``/``__aenter__`` and ``stop`` from its
``close``/``__aexit__``. This module may use asyncio; it knows nothing of any service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeAlias

from mesh.errors import LocalProtocolError

log = logging.getLogger(__name__)

Ready: TypeAlias = Callable[[], None]
Main: TypeAlias = Callable[[Ready], Coroutine[Any, Any, None]]


async def until_cancelled() -> None:
    """Wait until cancelled: the tail of a main that holds its service open."""
    await asyncio.get_running_loop().create_future()


class Background:
    """A service's background tasks: one parent task, one TaskGroup (module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._parent: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._ready = False
        self._stopping = False
        self._raised = False

    @property
    def running(self) -> bool:
        """Started, not stopping, and no task has failed."""
        return self._tg is not None and self._ready and not self._stopping

    async def start(self, main: Main) -> None:
        """Run ``main`` as the parent task; return once it has called ``ready()``."""
        if self._parent is not None:
            raise LocalProtocolError(f"{self.name} was already started")
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        parent = self._parent = asyncio.create_task(self._run(main, ready), name=self.name)
        parent.add_done_callback(self._ended)
        try:
            await asyncio.wait((ready, parent), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            parent.cancel()
            await asyncio.wait((parent,))
            raise
        if not ready.done():
            self._raised = True
            raise _unwrap(parent.exception())  # CancelledError if it was cancelled

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> bool:
        """Run ``coro`` beside main; False (``coro`` closed, never run) once stopping."""
        tg = self._tg
        if tg is None or self._stopping:
            coro.close()
            return False
        try:
            tg.create_task(coro, name=name)
        except RuntimeError:  # the group is shutting down after a failure
            coro.close()
            return False
        return True

    async def stop(self) -> None:
        """Cancel every task and wait until all have ended; raise a failure among them.

        Safe to call more than once, and before ``start``.
        """
        self._stopping = True
        parent = self._parent
        if parent is None:
            return
        parent.cancel()
        try:
            await asyncio.wait((parent,))
        except asyncio.CancelledError:
            parent.cancel()
            raise
        if parent.cancelled() or self._raised:
            return
        exc = parent.exception()
        if exc is not None:
            self._raised = True
            raise exc

    async def _run(self, main: Main, ready: asyncio.Future[None]) -> None:
        def signal() -> None:
            if not ready.done():
                self._ready = True
                ready.set_result(None)

        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await main(signal)
                if not ready.done():
                    raise LocalProtocolError(f"{self.name} ended before it was ready")
        finally:
            self._tg = None

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()  # retrieved, so asyncio never reports it as lost
        if exc is not None and self._ready:
            # Failed after start() returned: nobody to raise it to until stop(), so log it now.
            log.error("%s failed", self.name, exc_info=exc)


def _unwrap(exc: BaseException | None) -> BaseException:
    """The one failure a TaskGroup wrapped, else what it raised (``_run`` always raises
    before ``ready()``, so ``exc`` is never None)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if exc is not None else LocalProtocolError("ended before it was ready")
