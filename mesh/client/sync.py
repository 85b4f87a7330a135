"""The sync client: an ``AsyncClient`` on an event loop of its own, in a background thread.

Each method is the async client's method of the same name, handed to that loop, as Dask's
sync client does: a query waits for its answer (``_blocking``); a submission does not even
wait (``_submitting``): it returns a ``TaskFuture`` at once and the loop submits it, so that
a thousand submissions still go in one batch. Nothing here knows the protocol.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from mesh.client.aio import AsyncClient, AsyncTaskFuture
from mesh.protocol.messages import ObjectRef
from mesh.runtime.loop import event_loop

P = ParamSpec("P")
T = TypeVar("T")


class TaskFuture(concurrent.futures.Future[Any]):
    """A ``concurrent.futures.Future`` for the sync client, with ``task_id`` and ``node``."""

    def __init__(self) -> None:
        super().__init__()
        self.task_id = ""
        self.node = ""

    def _follow(self, source: AsyncTaskFuture) -> None:
        """End as ``source`` ends (called on the client's loop)."""
        source.add_done_callback(self._settle)

    def _settle(self, source: AsyncTaskFuture) -> None:
        self.task_id, self.node = source.task_id, source.node
        try:
            exc = source.exception()
            if exc is None:
                self.set_result(source.result())
            else:
                self.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by its owner meanwhile


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    """The async client's ``method`` for this thread: run on the client's loop, waited for."""

    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._call(method(self._async, *args, **kwargs))

    return call


def _submitting(
    method: Callable[Concatenate[AsyncClient, P], AsyncTaskFuture],
) -> Callable[Concatenate[Client, P], TaskFuture]:
    """The async client's submit ``method`` for this thread: returns a ``TaskFuture`` at
    once, and the client's loop submits the task."""

    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> TaskFuture:
        return self._submit([functools.partial(method, self._async, *args, **kwargs)])[0]

    return call


class Client:
    """The synchronous client. Made by ``connect()``; close it (or use ``with``)."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 10.0,
        sealed: bool | None = None,
    ):
        self._loop = event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="mesh-client", daemon=True
        )
        self._thread.start()
        try:
            self._async = self._call(
                AsyncClient.connect(url, key, open_timeout=timeout, sealed=sealed)
            )
        except BaseException:
            self._stop_loop()
            raise
        self.url = self._async.url

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the client's loop and wait for it (cancelled if ``timeout`` ends)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def close(self) -> None:
        """End the session and the client's thread."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._async.close(), timeout=10)
        finally:
            self._stop_loop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting --------------------------------------------------------------------------

    def _submit(self, calls: list[Callable[[], AsyncTaskFuture]]) -> list[TaskFuture]:
        """Futures for ``calls`` of the async client's submit methods, which the loop makes
        together (so that they go in one batch)."""
        futures = [TaskFuture() for _ in calls]

        def submit_all() -> None:
            for call, future in zip(calls, futures, strict=True):
                try:
                    future._follow(call())
                except Exception as exc:  # options the async client refuses
                    future.set_exception(exc)

        self._loop.call_soon_threadsafe(submit_all)
        return futures

    submit = _submitting(AsyncClient.submit)
    submit_with = _submitting(AsyncClient.submit_with)

    def map(self, name: str, iterable: Iterable[Any]) -> list[TaskFuture]:
        """One task per item (the item is its single argument), sent in one batch."""
        return self._submit([functools.partial(self._async.submit, name, x) for x in iterable])

    def gather(self, futures: Iterable[TaskFuture], timeout: float | None = None) -> list[Any]:
        """The results in order; raises the first error found."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for f in list(futures):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out.append(f.result(left))
        return out

    def as_completed(
        self, futures: Iterable[TaskFuture], timeout: float | None = None
    ) -> Iterator[TaskFuture]:
        """The futures in the order they finish."""
        done = concurrent.futures.as_completed(list(futures), timeout=timeout)
        yield from done  # type: ignore[misc]

    # -- queries -----------------------------------------------------------------------------

    peers = _blocking(AsyncClient.peers)
    status = _blocking(AsyncClient.status)
    why = _blocking(AsyncClient.why)
    release = _blocking(AsyncClient.release)

    def result(self, value: Any, timeout: float | None = None) -> Any:
        """``value`` with references fetched: an ``ObjectRef``, a future, or plain data."""
        if isinstance(value, TaskFuture):
            value = value.result(timeout)
        if isinstance(value, ObjectRef):
            return self._call(self._async.fetch(value), timeout)
        return value


def connect(
    url: str | None = None,
    key: str | None = None,
    *,
    timeout: float = 10.0,
    sealed: bool | None = None,
) -> Client:
    """A sync client for the node at ``url`` (default: this machine's node on the default
    port); ``key`` defaults to ``$MESH_KEY``, then the key file. The session is sealed
    unless the node is on this machine (``sealed=None``), or as ``sealed`` says."""
    return Client(url, key, timeout=timeout, sealed=sealed)
