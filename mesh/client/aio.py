"""The async client: one session with one node, which auctions every task it submits.

Submissions travel in batches over one websocket to the node, results stream back on it
(``mesh.protocol.session``); there is no HTTP round trip per task. Queries (peers, status, why) are
signed JSON over HTTP (``mesh.runtime.http``). A client on the node's own machine hands large
arrays over through shared memory (``mesh.runtime.shm``) rather than through the socket, and maps
objects held on the machine instead of fetching their bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Self
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from mesh.errors import AuthenticationError, MeshError, ObjectLostError, RemoteProtocolError
from mesh.protocol.args import find_in_call, walk_call_async
from mesh.protocol.codec import dumps, encode_body, loads
from mesh.protocol.messages import NodeId, ObjectRef, Segment
from mesh.protocol.sealing import SESSION_CONTEXT, Exchange, Opener, Sealer
from mesh.protocol.session import (
    Forget,
    Outcome,
    Results,
    SessionError,
    Submission,
    Submit,
    decode_reply,
)
from mesh.runtime.auth import key_bytes, resolve_key, sign_request
from mesh.runtime.background import Background, Ready
from mesh.runtime.http import (
    SEAL_PARAM,
    SESSION_PATH,
    fetch_object,
    is_loopback,
    node_id_at,
    normalise_url,
    request_json,
)
from mesh.runtime.shm import UploadFiles, host_id, unlink

SHM_THRESHOLD: Final = 1024 * 1024
"""Arrays from this size on go to a node on the same machine through shared memory."""

_MAX_MESSAGE: Final = 1024 * 1024 * 1024
"""Largest websocket message the client accepts from its node (results above the store
threshold stay on their node, so real results are far smaller)."""


class AsyncTaskFuture:
    """The eventual result of one submitted task; await it or call ``result()`` once done.

    ``task_id`` and ``node`` (the node that ran it) are filled when known.
    """

    __slots__ = ("_future", "node", "task_id")

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self._future = future
        self.task_id = ""
        self.node = ""

    def __await__(self) -> Any:
        return self._future.__await__()

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> Any:
        """The task's value (an ``ObjectRef`` if it stayed on its node); raises its error."""
        return self._future.result()

    def exception(self) -> BaseException | None:
        return self._future.exception()

    def add_done_callback(self, fn: Callable[[AsyncTaskFuture], None]) -> None:
        self._future.add_done_callback(lambda _f: fn(self))

    def _settle(self, outcome: Outcome) -> None:
        self.task_id, self.node = outcome.task_id, outcome.node
        if self._future.done():
            return
        if outcome.error is None:
            self._future.set_result(outcome.value)
        else:
            self._future.set_exception(outcome.error.exception(outcome.task_id, outcome.node))

    def _fail(self, exc: MeshError) -> None:
        if not self._future.done():
            self._future.set_exception(exc)


_FUTURES: Final = (AsyncTaskFuture, concurrent.futures.Future)
"""Arguments that are results still to come: a task waits for them before it is sent."""


@dataclass(slots=True, eq=False)
class _Pending:
    """A task sent and not yet answered, and the shared-memory uploads it left."""

    future: AsyncTaskFuture
    uploads: list[str] = field(default_factory=list)

    def settle(self, outcome: Outcome) -> None:
        self._remove_uploads()
        self.future._settle(outcome)

    def fail(self, exc: MeshError) -> None:
        self._remove_uploads()
        self.future._fail(exc)

    def _remove_uploads(self) -> None:
        # The node removes an upload once it has read it: what is left belongs to a task
        # it refused unread, or to a session that ended first.
        for name in self.uploads:
            unlink(name)


class AsyncClient:
    """Talks to one node; every task it submits is auctioned by that node.

    Create with ``await AsyncClient.connect(url, key)``; use ``async with`` or ``close()``.
    """

    def __init__(
        self,
        *,
        url: str,
        key: bytes,
        session: aiohttp.ClientSession,
        ws: aiohttp.ClientWebSocketResponse,
        node_id: str,
        seal: tuple[Sealer, Opener] | None = None,
    ) -> None:
        self.url = url
        self.node_id = node_id
        """The id of the node at ``url``: every request to it is signed for it."""
        self._key = key
        self._session = session
        self._ws = ws
        self._seal = seal
        """The session's sealer and opener when it is sealed (a node on another machine)."""
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Pending] = {}
        self._batch: list[Submission] = []
        self._live: dict[str, int] = {}
        """Object id -> how many ``ObjectRef``s to it this client's results brought that
        are not garbage-collected yet."""
        self._forgotten: list[str] = []
        self._has_batch = asyncio.Event()
        self._closed = False
        self._failure: MeshError | None = None
        self._addresses: dict[str, str] = {}
        self._background = Background(f"session {url}")
        self._same_host = is_loopback(urlsplit(url).hostname or "")
        """The node runs on this machine: large arrays go to it through shared memory."""
        self._uploads = UploadFiles()

    @classmethod
    async def connect(
        cls,
        url: str | None = None,
        key: str | None = None,
        *,
        open_timeout: float = 10.0,
        sealed: bool | None = None,
    ) -> AsyncClient:
        """Open a session with the node at ``url`` (default: this machine's node).

        The session is sealed (``mesh.protocol.sealing``) unless the node is on this
        machine (``sealed=None``, the default), or as ``sealed`` says."""
        base = normalise_url(url)
        kb = key_bytes(resolve_key(key))
        if sealed is None:
            sealed = not is_loopback(urlsplit(base).hostname or "")
        exchange = Exchange() if sealed else None
        path = (
            SESSION_PATH
            if exchange is None
            else f"{SESSION_PATH}?{SEAL_PARAM}={exchange.public.hex()}"
        )
        session = aiohttp.ClientSession()
        try:
            try:
                async with asyncio.timeout(open_timeout):
                    node_id = await node_id_at(session, kb, base)
                    headers = sign_request(kb, "GET", path, b"", time.time(), to=node_id)
                    ws = await session.ws_connect(
                        base + path,
                        headers=headers,
                        max_msg_size=_MAX_MESSAGE,
                        autoping=True,
                    )
                    seal = None if exchange is None else await _seal(ws, kb, exchange)
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401:
                    raise AuthenticationError(
                        "authentication failed: the node did not accept this key"
                    ) from None
                if exc.status == 403 and exchange is None:
                    raise MeshError(
                        f"{base} takes sessions from other machines sealed only "
                        "(connect with sealed=None, the default, or True)"
                    ) from None
                raise MeshError(f"cannot open a session with {base}: {exc}") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise MeshError(f"cannot reach the node at {base}: {exc}") from exc
        except BaseException:
            await session.close()
            raise
        client = cls(url=base, key=kb, session=session, ws=ws, node_id=node_id, seal=seal)
        # The session's tasks (reader, writer, submissions waiting for their arguments)
        # are owned by one Background, which close() stops.
        await client._background.start(client._run)
        return client

    @property
    def sealed(self) -> bool:
        """Whether this session's messages travel sealed (``mesh.protocol.sealing``)."""
        return self._seal is not None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """End the session; futures still pending fail with ``MeshError``."""
        if self._closed:
            return
        self._closed = True
        await self._ws.close()
        await self._background.stop()
        self._fail_all(MeshError("the client was closed"))
        self._uploads.close()
        await self._session.close()

    async def _run(self, ready: Ready) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._writer())
                ready()
                await self._reader()
                raise MeshError(f"the node at {self.url} closed the session")
        except* MeshError as group:
            self._failure = MeshError(str(group.exceptions[0]))
        except* (aiohttp.ClientError, ConnectionError) as group:
            self._failure = MeshError(f"lost the node at {self.url}: {group.exceptions[0]}")
        finally:
            self._fail_all(self._failure or MeshError("the client was closed"))

    def _fail_all(self, exc: MeshError) -> None:
        waiting, self._waiting = self._waiting, {}
        for pending in waiting.values():
            pending.fail(exc)

    async def _writer(self) -> None:
        while True:
            await self._has_batch.wait()
            self._has_batch.clear()
            await self._flush()

    async def _flush(self) -> None:
        # Its own frame: once sent, nothing here keeps the tasks' arguments alive.
        batch, self._batch = self._batch, []
        if batch:
            await self._send(Submit(tasks=tuple(batch)).encode())
        forgotten, self._forgotten = self._forgotten, []
        if forgotten:
            await self._send(Forget(ids=tuple(forgotten)).encode())

    async def _send(self, message: dict[str, Any]) -> None:
        data = dumps(message)
        await self._ws.send_bytes(data if self._seal is None else self._seal[0].seal(data))

    # -- references ------------------------------------------------------------------------

    def _track(self, value: Any) -> None:
        """Count the ``ObjectRef``s a result brings; when the last one of an object is
        garbage-collected, the node is told to let the object go (``node.refs``)."""
        me = weakref.ref(self)
        loop = asyncio.get_running_loop()
        for ref in find_in_call([value], {}, ObjectRef):
            self._live[ref.id] = self._live.get(ref.id, 0) + 1
            weakref.finalize(ref, _ref_gone, me, loop, ref.id).atexit = False

    def _ref_gone(self, object_id: str) -> None:
        n = self._live.get(object_id, 0) - 1
        if n > 0:
            self._live[object_id] = n
            return
        if self._live.pop(object_id, None) is not None:
            self._forgotten.append(object_id)
            self._has_batch.set()

    async def _reader(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                if msg.type == aiohttp.WSMsgType.ERROR:
                    raise MeshError(f"session error: {self._ws.exception()}")
                continue
            try:
                data = msg.data if self._seal is None else self._seal[1].open(msg.data)
                reply = decode_reply(loads(data))
            except MeshError as exc:
                raise MeshError(f"the node sent an unreadable message: {exc}") from exc
            if isinstance(reply, SessionError):
                raise MeshError(reply.message)
            self._settle(reply)
            del reply  # nothing here may keep a result's references alive

    def _settle(self, reply: Results) -> None:
        for cid, outcome in reply.items:
            self._track(outcome.value)
            pending = self._waiting.pop(cid, None) if type(cid) is int else None
            if pending is not None:
                pending.settle(outcome)

    # -- submitting ------------------------------------------------------------------------

    def _submit(
        self, name: str, args: Iterable[Any], kwargs: Mapping[str, Any], options: dict[str, Any]
    ) -> AsyncTaskFuture:
        future = AsyncTaskFuture(asyncio.get_running_loop().create_future())
        args = tuple(args)
        if not find_in_call(args, kwargs, _FUTURES):
            self._enqueue(future, name, args, kwargs, options)
            return future
        # Arguments still running: send the task once they are known. Their values
        # (references included) travel, not the futures.
        if self._failure is not None or not self._background.spawn(
            self._submit_later(future, name, args, kwargs, options), "mesh-submit"
        ):
            future._fail(self._failure or MeshError("the client is closed"))
        return future

    async def _submit_later(
        self,
        future: AsyncTaskFuture,
        name: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        options: dict[str, Any],
    ) -> None:
        try:
            known, kw = await walk_call_async(args, kwargs, _FUTURES, _value_of)
        except MeshError as exc:
            future._fail(exc)
            return
        self._enqueue(future, name, known, kw, options)

    def _enqueue(
        self,
        future: AsyncTaskFuture,
        name: str,
        args: Iterable[Any],
        kwargs: Mapping[str, Any],
        options: dict[str, Any],
    ) -> None:
        if self._closed or self._failure is not None:
            future._fail(self._failure or MeshError("the client is closed"))
            return
        cid = next(self._ids)
        pending = _Pending(future)
        if self._same_host:
            args = [self._to_shm(a, pending.uploads) for a in args]
            kwargs = {k: self._to_shm(v, pending.uploads) for k, v in kwargs.items()}
        self._waiting[cid] = pending
        self._batch.append(
            Submission(cid=cid, name=name, args=tuple(args), kwargs=dict(kwargs), options=options)
        )
        self._has_batch.set()

    def _to_shm(self, value: Any, uploads: list[str]) -> Any:
        """A large array for a node on this machine goes through shared memory: the node
        reads it from there at memory speed instead of through a websocket."""
        if not isinstance(value, np.ndarray) or value.nbytes < SHM_THRESHOLD:
            return value
        chunks, size = encode_body(value)
        try:
            name = self._uploads.write(chunks, size)
        except OSError:
            return value
        uploads.append(name)
        return Segment(name=name, nbytes=size)

    def submit(self, name: str, /, *args: Any, **kwargs: Any) -> AsyncTaskFuture:
        """Submit task ``name``; returns a future at once (submissions are batched)."""
        return self._submit(name, args, kwargs, {})

    def submit_with(
        self,
        name: str,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
        resources: Mapping[str, float] | None = None,
        libraries: Mapping[str, str] | None = None,
        max_retries: int | None = None,
        retry_exceptions: bool | Iterable[str] | None = None,
    ) -> AsyncTaskFuture:
        """``submit`` with options: a run-time ``timeout``, extra ``labels``, ``resources``
        or ``libraries`` (distribution -> version specifier, ``""`` for any) the node that
        runs it must have (on top of the task's own), and ``max_retries`` /
        ``retry_exceptions`` in place of the task's own (``tasks.task``)."""
        options = _options(timeout, labels, resources)
        if libraries:
            options["libraries"] = {str(k): str(v) for k, v in libraries.items()}
        if max_retries is not None:
            options["max_retries"] = int(max_retries)
        if retry_exceptions is not None:
            options["retry_exceptions"] = (
                retry_exceptions
                if isinstance(retry_exceptions, bool)
                else [str(e) for e in retry_exceptions]
            )
        return self._submit(name, args, kwargs or {}, options)

    def map(self, name: str, iterable: Iterable[Any]) -> list[AsyncTaskFuture]:
        """One task per item (each item is the single argument); all sent in one batch."""
        return [self._submit(name, (x,), {}, {}) for x in iterable]

    async def gather(self, futures: Iterable[AsyncTaskFuture]) -> list[Any]:
        """The results in order; raises the first error found."""
        return [await f for f in list(futures)]

    async def as_completed(
        self, futures: Iterable[AsyncTaskFuture]
    ) -> AsyncIterator[AsyncTaskFuture]:
        """The futures in the order they finish."""
        pending = list(futures)
        done: asyncio.Queue[AsyncTaskFuture] = asyncio.Queue()
        for f in pending:
            f.add_done_callback(done.put_nowait)
        for _ in range(len(pending)):
            yield await done.get()

    # -- queries -----------------------------------------------------------------------------

    async def request(self, method: str, path: str, payload: Any = None) -> Any:
        """A signed JSON request to the node (the HTTP API the CLI uses)."""
        return await request_json(
            self._session, self._key, self.url, method, path, payload, to=self.node_id
        )

    async def peers(self) -> list[dict[str, Any]]:
        """Every node this node knows: id, address, state, load, capabilities."""
        peers: list[dict[str, Any]] = await self.request("GET", "/v1/peers")
        for p in peers:
            self._addresses[str(p["id"])] = str(p["address"])
        return peers

    async def status(self) -> dict[str, Any]:
        """This node's id, peers, running, queued and completed counts."""
        status: dict[str, Any] = await self.request("GET", "/v1/status")
        return status

    async def why(self, task_id: str) -> dict[str, Any]:
        """The auction record of a task submitted to this node."""
        record: dict[str, Any] = await self.request("GET", f"/v1/tasks/{task_id}/why")
        return record

    async def result(self, value: Any) -> Any:
        """``value`` with references fetched: an ``ObjectRef``, a future, or plain data."""
        if isinstance(value, AsyncTaskFuture):
            value = await value
        if isinstance(value, ObjectRef):
            return await self.fetch(value)
        return value

    async def _holder(self, ref: ObjectRef) -> str:
        address = self._addresses.get(ref.holder)
        if address is None:
            await self.peers()
            address = self._addresses.get(ref.holder)
        if address is None:
            raise ObjectLostError(ref.id, ref.holder)
        return address

    async def fetch(self, ref: ObjectRef) -> Any:
        """The value behind ``ref``, fetched from the node that holds it; if that node
        cannot give it any more, from the copy this client's node (its owner) makes again."""
        try:
            return await self._fetch(ref)
        except ObjectLostError as lost:
            try:
                copy = await self.request("POST", f"/v1/objects/{ref.id}/rebuild")
            except MeshError as exc:
                raise ObjectLostError(ref.id, ref.holder, f"{lost}; {exc}") from exc
            return await self._fetch(_ref_of(copy))

    async def _fetch(self, ref: ObjectRef) -> Any:
        # A holder on this machine lends its segment instead of sending the bytes.
        host = host_id() if self._same_host else ""
        return await fetch_object(self._session, self._key, await self._holder(ref), ref, host=host)

    async def release(self, ref: ObjectRef) -> bool:
        """Free ``ref`` on its holder; False if it was not held (any more)."""
        if self._live.pop(ref.id, None) is not None:
            self._forgotten.append(ref.id)
            self._has_batch.set()
        base = normalise_url(await self._holder(ref))
        try:
            await request_json(
                self._session, self._key, base, "DELETE", f"/v1/objects/{ref.id}", to=ref.holder
            )
        except AuthenticationError:
            raise
        except MeshError as exc:
            if " 404 " in str(exc):
                return False
            raise
        return True


def _ref_of(raw: Any) -> ObjectRef:
    """An ``ObjectRef`` from its JSON form (the node's ``jsonable``)."""
    try:
        return ObjectRef(
            id=str(raw["$ref"]),
            holder=NodeId(str(raw["holder"])),
            nbytes=int(raw["nbytes"]),
            dtype=str(raw.get("dtype", "")),
            shape=tuple(int(n) for n in raw.get("shape", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"bad object reference from the node: {exc}") from None


def _ref_gone(
    client: weakref.ReferenceType[AsyncClient], loop: asyncio.AbstractEventLoop, object_id: str
) -> None:
    """An ``ObjectRef`` was collected (in whichever thread): count it in the client's loop."""
    live = client()
    if live is not None and not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(live._ref_gone, object_id)


async def _value_of(future: AsyncTaskFuture | concurrent.futures.Future[Any]) -> Any:
    if isinstance(future, AsyncTaskFuture):
        return await future
    return await asyncio.wrap_future(future)


async def _seal(
    ws: aiohttp.ClientWebSocketResponse, key: bytes, exchange: Exchange
) -> tuple[Sealer, Opener]:
    """The session's keys, from the node's share: its first message."""
    msg = await ws.receive()
    if msg.type != aiohttp.WSMsgType.BINARY:
        await ws.close()
        raise MeshError("the node ended the session before sealing it")
    return exchange.keys(key, msg.data, initiator=True, context=SESSION_CONTEXT)


def _options(
    timeout: float | None,
    labels: Mapping[str, str] | None,
    resources: Mapping[str, float] | None,
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if timeout is not None:
        options["timeout"] = float(timeout)
    if labels:
        options["labels"] = {str(k): str(v) for k, v in labels.items()}
    if resources:
        options["resources"] = {str(k): float(v) for k, v in resources.items()}
    return options
