"""The public Python API for submitting work to a mesh, async and sync.

::

    from mesh.client import connect

    c = connect()                       # the local node, key from MESH_KEY or the key file
    f = c.submit("echo", 42)            # a future
    print(f.result())                   # 42
    print(c.gather(c.map("echo", range(1000))))
    ref = c.submit("make_array", 1 << 20).result()   # an ObjectRef: the array stayed there
    print(c.submit("array_sum", ref).result())       # the runner fetches it peer to peer
    arr = c.result(ref)                              # fetch it here

``AsyncClient`` is the same API for asyncio code (``await AsyncClient.connect(...)``).

Submissions travel in batches over one websocket to the node (msgpack bodies made by
``mesh.codec``, arrays out of band and never pickled), and results stream back on it;
there is no HTTP round trip per task. Queries (peers, status, why) are JSON over HTTP.

Every request proves knowledge of the mesh key without sending it: an HMAC-SHA256 over
the method, the path, a hash of the body, a timestamp, a nonce and the id of the node it is
for (``sign_request``), learnt once per node from its public ``/v1/hello``. This module
also holds the key lookup shared by the CLI and the daemon (``resolve_key``).

It starts no node and keeps no global state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import ipaddress
import itertools
import json
import mmap
import os
import re
import secrets
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
)
from pathlib import Path
from typing import Any, Final, Self
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from mesh.codec import Buffer, dumps, encode_body, key_fingerprint, loads
from mesh.errors import (
    AuthenticationError,
    LocalProtocolError,
    MeshError,
    NoCapablePeerError,
    ObjectLostError,
    RemoteProtocolError,
    TaskError,
    TaskLostError,
)
from mesh.messages import ObjectRef, ShmArg
from mesh.shm import open_exact

DEFAULT_PORT: Final = 7470
"""The port ``mesh-node start`` listens on unless told otherwise."""

DEFAULT_URL: Final = f"http://127.0.0.1:{DEFAULT_PORT}"

KEY_ENV: Final = "MESH_KEY"

HEADER_TIME: Final = "X-Mesh-Time"
HEADER_NONCE: Final = "X-Mesh-Nonce"
HEADER_SIGNATURE: Final = "X-Mesh-Signature"
HEADER_BODY: Final = "X-Mesh-Body-SHA256"
"""Hex SHA-256 of the request body: the signature covers it, so a node can check the proof
before reading the body, and the body against it afterwards."""
HEADER_TO: Final = "X-Mesh-To"
"""The id of the node a request is for: a request captured on one node is refused by others."""

SESSION_PATH: Final = "/v1/session"
HELLO_PATH: Final = "/v1/hello"
"""Public: the node's id, version and mesh key fingerprint (what a client signs for)."""

SHM_DIR: Final = Path("/dev/shm")
SHM_PREFIX: Final = "mesh-up-"
SHM_THRESHOLD: Final = 1024 * 1024
"""Arrays from this size on go to a node on the same machine through shared memory."""
OBJECT_CONTENT_TYPE: Final = "application/x-mesh-body"

SEGMENT_PREFIX: Final = "mesh-obj-"
"""Names of object-store segments: ``mesh-obj-<pid>-<token>-<object id>``."""
SEGMENT_CONTENT_TYPE: Final = "application/x-mesh-segment"
"""A holder's answer to a fetch from its own machine: where the body is, not the body."""
HOST_PARAM: Final = "host"
"""Query parameter of ``GET /v1/objects/{id}`` naming the fetcher's ``host_id``."""

_SEGMENT_NAME: Final = re.compile(
    re.escape(SEGMENT_PREFIX) + r"[0-9]{1,10}-[0-9a-f]{8}-[0-9]{1,20}"
)
_BOOT_ID: Final = Path("/proc/sys/kernel/random/boot_id")

_MAX_MESSAGE: Final = 1024 * 1024 * 1024
"""Largest websocket message the client accepts from its node (results above the store
threshold stay on their node, so real results are far smaller)."""


# ---------------------------------------------------------------------------------------
# The mesh key
# ---------------------------------------------------------------------------------------


def key_file() -> Path:
    """Where the key lives when neither ``--key`` nor ``MESH_KEY`` gives it."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mesh" / "key"


def resolve_key(key: str | None = None, *, create: bool = False) -> str:
    """The mesh key: ``key``, else ``$MESH_KEY``, else the key file.

    With ``create`` a missing key file is made (mode 0600, 32 random bytes as hex), which
    is what ``mesh-node start`` does on a machine's first run.
    """
    if key:
        return key
    env = os.environ.get(KEY_ENV)
    if env:
        return env
    path = key_file()
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if text:
        return text
    if not create:
        raise MeshError(
            f"no mesh key: pass --key, set {KEY_ENV}, or start a node once to create {path}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    text = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return text


def key_bytes(key: str) -> bytes:
    """The 32 bytes every node and client derives from the key text.

    Hashing lets an operator type a passphrase of any length while the codec always gets a
    full-strength HMAC key; every party derives the same bytes.
    """
    if not key:
        raise LocalProtocolError("the mesh key is empty")
    return hashlib.sha256(b"mesh-key\x00" + key.encode()).digest()


def sign_request(
    key: bytes,
    method: str,
    path: str,
    body: bytes,
    now: float,
    *,
    to: str,
    nonce: str | None = None,
) -> dict[str, str]:
    """Headers proving ``key`` for one request to node ``to``; ``path`` includes the query
    string. The node checks them before it reads the body, then the body against them."""
    stamp = f"{now:.3f}"
    nonce = nonce or secrets.token_hex(12)
    digest = hashlib.sha256(body).hexdigest()
    return {
        HEADER_TIME: stamp,
        HEADER_NONCE: nonce,
        HEADER_BODY: digest,
        HEADER_TO: to,
        HEADER_SIGNATURE: request_mac(key, method, path, digest, stamp, nonce, to),
    }


def request_mac(
    key: bytes, method: str, path: str, body_sha256: str, stamp: str, nonce: str, to: str
) -> str:
    """The signature a node expects for a request (hex)."""
    text = "\n".join((method.upper(), path, body_sha256, stamp, nonce, to)).encode()
    return hmac.new(key, text, hashlib.sha256).hexdigest()


def normalise_url(url: str | None) -> str:
    """``host:port`` or a URL -> ``http://host:port`` (no trailing slash)."""
    if not url:
        return DEFAULT_URL
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


# ---------------------------------------------------------------------------------------
# HTTP helpers (also used by the daemon to fetch objects from their holders)
# ---------------------------------------------------------------------------------------


async def _raise_for(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    text = (await resp.text()).strip()
    message = text
    if resp.content_type == "application/json":
        try:
            message = str((await resp.json()).get("error", text))
        except (ValueError, aiohttp.ContentTypeError):
            message = text
    if resp.status == 401:
        # The node says why (bad proof, or a request meant for another node).
        if not message.startswith("authentication failed"):
            message = "authentication failed: the node did not accept this key"
        raise AuthenticationError(message)
    raise MeshError(f"{resp.method} {resp.url.path}: {resp.status} {message}")


async def node_id_at(session: aiohttp.ClientSession, key: bytes, base: str) -> str:
    """The id of the node at ``base`` (from ``GET /v1/hello``): what requests to it are
    signed for. Raises ``AuthenticationError`` if the node belongs to another mesh (its
    key fingerprint differs), ``MeshError`` if it cannot be reached or is no mesh node."""
    try:
        async with session.get(base + HELLO_PATH) as resp:
            await _raise_for(resp)
            hello = await resp.json()
    except (aiohttp.ClientError, ValueError) as exc:
        raise MeshError(f"cannot reach the node at {base}: {exc}") from exc
    node = hello.get("id") if isinstance(hello, dict) else None
    if not isinstance(node, str) or not node:
        raise MeshError(f"the node at {base} did not say its id")
    theirs, ours = hello.get("mesh"), key_fingerprint(key)
    if theirs != ours:
        raise AuthenticationError(
            f"authentication failed: the node at {base} belongs to another mesh "
            f"(key fingerprint {theirs}, this key's is {ours})"
        )
    return node


async def request_json(
    session: aiohttp.ClientSession,
    key: bytes,
    base: str,
    method: str,
    path: str,
    payload: Any = None,
    *,
    to: str,
) -> Any:
    """One signed JSON request to node ``to`` at ``base`` (its id: ``node_id_at``);
    returns the decoded reply or raises a ``MeshError``."""
    body = b"" if payload is None else json.dumps(payload).encode()
    headers = sign_request(key, method, path, body, time.time(), to=to)
    if body:
        headers["Content-Type"] = "application/json"
    try:
        async with session.request(method, base + path, data=body, headers=headers) as resp:
            await _raise_for(resp)
            return await resp.json()
    except aiohttp.ClientError as exc:
        raise MeshError(f"cannot reach the node at {base}: {exc}") from exc


# ---------------------------------------------------------------------------------------
# Objects: fetched over HTTP, or mapped from the holder's segment on the same machine
# ---------------------------------------------------------------------------------------


def host_id() -> str:
    """What identifies this machine's shared memory; "" where none can be shared.

    Two processes with the same value see the same files in ``SHM_DIR``: the kernel's boot
    id (one per running kernel) and the device and inode of the shared-memory directory
    (a container or mount namespace with a tmpfs of its own differs there).
    """
    try:
        boot = _BOOT_ID.read_text().strip()
        st = os.stat(SHM_DIR)
    except OSError:
        return ""
    if not boot:
        return ""
    return hashlib.sha256(f"{boot}:{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:32]


def is_segment_name(name: str) -> bool:
    """Whether ``name`` is an object-store segment name (no path, the store's prefix)."""
    return _SEGMENT_NAME.fullmatch(name) is not None


def map_object_segment(name: str, nbytes: int) -> mmap.mmap:
    """Map object-store segment ``name`` read-only; it must hold exactly ``nbytes``.

    Raises ``RemoteProtocolError`` (reason ``bad-segment``) for a name outside the store's
    prefix or a file of another size, ``FileNotFoundError`` when the segment is gone (its
    object was released) and ``PermissionError`` when it belongs to another user.
    """
    fd = _open_segment(name, nbytes)
    try:
        # Every page will be read: map them in one call rather than fault them one by one.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def check_object_segment(name: str, nbytes: int) -> None:
    """Raise what ``map_object_segment`` would, without mapping anything."""
    os.close(_open_segment(name, nbytes))


def _open_segment(name: str, nbytes: int) -> int:
    if not is_segment_name(name):
        raise RemoteProtocolError(f"bad object segment name {name!r}", reason="bad-segment")
    return open_exact(SHM_DIR / name, nbytes, what=f"object segment {name}")


def _segment_answer(data: bytes, ref: ObjectRef) -> ShmArg:
    """The segment a holder named in its answer, checked against ``ref``."""
    try:
        body = json.loads(data)
        name, nbytes = body["segment"], body["nbytes"]
    except (ValueError, TypeError, KeyError):
        raise RemoteProtocolError("malformed segment answer", reason="bad-segment") from None
    if not isinstance(name, str) or not is_segment_name(name):
        raise RemoteProtocolError(f"bad object segment name {name!r}", reason="bad-segment")
    if type(nbytes) is not int or nbytes <= 0 or (ref.nbytes and nbytes != ref.nbytes):
        raise RemoteProtocolError(
            f"object {ref.id}: segment of {nbytes!r} bytes, the reference says {ref.nbytes}",
            reason="bad-segment",
        )
    return ShmArg(name=name, nbytes=nbytes)


async def _read_into(
    resp: aiohttp.ClientResponse, ref: ObjectRef, allocate: Callable[[int], Buffer]
) -> Buffer:
    """The response body, read chunk by chunk into one buffer of the announced size."""
    size = resp.content_length
    if size is None or size <= 0 or (ref.nbytes and size != ref.nbytes):
        raise RemoteProtocolError(
            f"object {ref.id}: body of {size} bytes, the reference says {ref.nbytes}",
            reason="bad-size",
        )
    buffer = allocate(size)
    view = memoryview(buffer).cast("B")
    if view.nbytes != size:
        raise LocalProtocolError(f"allocated {view.nbytes} bytes for a {size}-byte object")
    pos = 0
    # iter_chunks hands over each received chunk as it is; readany() would join them first.
    async for chunk, _ in resp.content.iter_chunks():
        end = pos + len(chunk)
        if end > size:
            raise RemoteProtocolError(f"object {ref.id}: body over {size} bytes", reason="bad-size")
        view[pos:end] = chunk
        pos = end
    if pos != size:
        raise RemoteProtocolError(
            f"object {ref.id}: body cut at {pos} of {size} bytes", reason="truncated"
        )
    return buffer


async def fetch_body(
    session: aiohttp.ClientSession,
    key: bytes,
    address: str,
    ref: ObjectRef,
    *,
    host: str = "",
    allocate: Callable[[int], Buffer] = bytearray,
) -> ShmArg | Buffer:
    """The encoded body of ``ref`` from the node at ``address`` (``host:port``), which
    must be its holder: the request is signed for ``ref.holder``.

    ``host`` is the fetcher's ``host_id()``: a holder on the same machine then answers with
    the shared-memory segment that holds the body (a ``ShmArg``, checked but not opened)
    instead of sending it. Otherwise the body is read into ``allocate(size)``, one buffer of
    the announced size, and that buffer is returned. Raises ``ObjectLostError`` if the
    holder does not have it (or cannot be reached), ``RemoteProtocolError`` for an answer
    that does not match ``ref``.
    """
    path = f"/v1/objects/{ref.id}"
    if host:
        path += f"?{HOST_PARAM}={host}"
    headers = sign_request(key, "GET", path, b"", time.time(), to=ref.holder)
    try:
        async with session.get(normalise_url(address) + path, headers=headers) as resp:
            if resp.status == 404:
                raise ObjectLostError(ref.id, ref.holder)
            await _raise_for(resp)
            if resp.content_type == SEGMENT_CONTENT_TYPE:
                if not host:
                    raise RemoteProtocolError(
                        "segment answer to a remote fetch", reason="bad-segment"
                    )
                return _segment_answer(await resp.read(), ref)
            return await _read_into(resp, ref, allocate)
    except aiohttp.ClientError as exc:
        raise ObjectLostError(ref.id, ref.holder) from exc


async def fetch_bytes(
    session: aiohttp.ClientSession,
    key: bytes,
    address: str,
    ref: ObjectRef,
    *,
    allocate: Callable[[int], Buffer] = bytearray,
) -> Buffer:
    """``fetch_body`` without a host: always the bytes, read into ``allocate(size)``."""
    body = await fetch_body(session, key, address, ref, allocate=allocate)
    if isinstance(body, ShmArg):  # fetch_body refuses segment answers to remote fetches
        raise RemoteProtocolError("segment answer to a remote fetch", reason="bad-segment")
    return body


async def fetch_object(
    session: aiohttp.ClientSession, key: bytes, address: str, ref: ObjectRef, *, host: str = ""
) -> Any:
    """The value behind ``ref``, fetched from the node at ``address`` (``host:port``).

    With ``host`` (this machine's ``host_id()``) a holder on the same machine lends its
    segment: the value's arrays are read-only views of it, with no copy at all.
    """
    body = await fetch_body(session, key, address, ref, host=host)
    if isinstance(body, ShmArg):
        try:
            mapping = await asyncio.to_thread(map_object_segment, body.name, body.nbytes)
        except FileNotFoundError:
            raise ObjectLostError(ref.id, ref.holder) from None
        except PermissionError:
            # Another user's node: its segments are private, so take the bytes instead.
            body = await fetch_bytes(session, key, address, ref)
        else:
            return loads(memoryview(mapping))
    return loads(body)


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


def error_from(info: Mapping[str, Any], task_id: str, node: str) -> MeshError:
    """The exception a failed task's error record stands for."""
    kind = str(info.get("kind", "task"))
    message = str(info.get("message", "task failed"))
    if kind == "no-peer":
        missing = info.get("missing")
        err: MeshError = NoCapablePeerError(
            str(info.get("task", "")), dict(missing) if isinstance(missing, dict) else {}
        )
        return err
    if kind == "lost":
        return TaskLostError(f"task {task_id}: {message}")
    if kind == "auth":
        return AuthenticationError(message)
    if kind == "bad-request":
        return LocalProtocolError(message)
    return TaskError(
        message,
        task_id=task_id,
        node=node,
        exc_type=str(info.get("type", "")),
        remote_traceback=str(info.get("traceback", "")),
    )


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


class TaskFuture(concurrent.futures.Future[Any]):
    """A ``concurrent.futures.Future`` for the sync client, with ``task_id`` and ``node``."""

    def __init__(self) -> None:
        super().__init__()
        self.task_id = ""
        self.node = ""
        self.cid = -1


AnyFuture = AsyncTaskFuture | TaskFuture


# ---------------------------------------------------------------------------------------
# The async client
# ---------------------------------------------------------------------------------------


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
    ) -> None:
        self.url = url
        self.node_id = node_id
        """The id of the node at ``url``: every request to it is signed for it."""
        self._key = key
        self._session = session
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, Callable[[str, bool, Any, str, Any], None]] = {}
        self._batch: list[list[Any]] = []
        self._has_batch = asyncio.Event()
        self._closed = False
        self._failure: MeshError | None = None
        self._addresses: dict[str, str] = {}
        self._main: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._shm_dir = SHM_DIR if _is_loopback(url) and SHM_DIR.is_dir() else None

    @classmethod
    async def connect(
        cls, url: str | None = None, key: str | None = None, *, open_timeout: float = 10.0
    ) -> AsyncClient:
        """Open a session with the node at ``url`` (default: this machine's node)."""
        base = normalise_url(url)
        kb = key_bytes(resolve_key(key))
        session = aiohttp.ClientSession()
        try:
            try:
                async with asyncio.timeout(open_timeout):
                    node_id = await node_id_at(session, kb, base)
                    headers = sign_request(kb, "GET", SESSION_PATH, b"", time.time(), to=node_id)
                    ws = await session.ws_connect(
                        base + SESSION_PATH,
                        headers=headers,
                        max_msg_size=_MAX_MESSAGE,
                        autoping=True,
                    )
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401:
                    raise AuthenticationError(
                        "authentication failed: the node did not accept this key"
                    ) from None
                raise MeshError(f"cannot open a session with {base}: {exc}") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise MeshError(f"cannot reach the node at {base}: {exc}") from exc
        except BaseException:
            await session.close()
            raise
        client = cls(url=base, key=kb, session=session, ws=ws, node_id=node_id)
        # The one background task: it owns the reader and writer, and close() awaits it.
        client._main = asyncio.create_task(client._run())
        return client

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
        if self._main is not None:
            self._main.cancel()
            try:
                await self._main
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        self._fail_all(MeshError("the client was closed"))
        await self._session.close()

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._writer())
                await self._reader()
                raise MeshError(f"the node at {self.url} closed the session")
        except* MeshError as group:
            self._failure = MeshError(str(group.exceptions[0]))
        except* (aiohttp.ClientError, ConnectionError) as group:
            self._failure = MeshError(f"lost the node at {self.url}: {group.exceptions[0]}")
        finally:
            self._tg = None
            self._fail_all(self._failure or MeshError("the client was closed"))

    def _fail_all(self, exc: MeshError) -> None:
        waiting, self._waiting = self._waiting, {}
        for deliver in waiting.values():
            deliver("", False, {"kind": "lost", "message": str(exc)}, "", exc)

    async def _writer(self) -> None:
        while True:
            await self._has_batch.wait()
            self._has_batch.clear()
            batch, self._batch = self._batch, []
            if batch:
                await self._ws.send_bytes(dumps({"op": "submit", "tasks": batch}))

    async def _reader(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                if msg.type == aiohttp.WSMsgType.ERROR:
                    raise MeshError(f"session error: {self._ws.exception()}")
                continue
            try:
                body = loads(msg.data)
            except MeshError as exc:
                raise MeshError(f"the node sent an unreadable message: {exc}") from exc
            if not isinstance(body, dict):
                continue
            op = body.get("op")
            if op == "results":
                for item in body.get("items", ()):
                    self._on_result(item)
            elif op == "error":
                raise MeshError(str(body.get("message", "session error")))

    def _on_result(self, item: Any) -> None:
        if not (isinstance(item, list) and len(item) == 6):
            return
        cid, task_id, ok, value, node, error = item
        deliver = self._waiting.pop(cid, None) if type(cid) is int else None
        if deliver is not None:
            deliver(str(task_id), bool(ok), value if ok else error, str(node), None)

    # -- submitting ------------------------------------------------------------------------

    def _enqueue(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: Mapping[str, Any],
        deliver: Callable[[str, bool, Any, str, Any], None],
    ) -> int:
        if self._closed or self._failure is not None:
            exc = self._failure or MeshError("the client is closed")
            deliver("", False, {"kind": "lost", "message": str(exc)}, "", exc)
            return -1
        cid = next(self._ids)
        if self._shm_dir is not None:
            files: list[str] = []
            args = tuple(self._to_shm(a, files) for a in args)
            kwargs = {k: self._to_shm(v, files) for k, v in kwargs.items()}
            if files:
                deliver = _removing(files, self._shm_dir, deliver)
        self._waiting[cid] = deliver
        self._batch.append([cid, name, list(args), kwargs, dict(options)])
        self._has_batch.set()
        return cid

    def _to_shm(self, value: Any, files: list[str]) -> Any:
        """A large array for a node on this machine goes through shared memory: the node
        reads it from there at memory speed instead of through a websocket."""
        if not isinstance(value, np.ndarray) or value.nbytes < SHM_THRESHOLD:
            return value
        if self._shm_dir is None:
            return value
        chunks, size = encode_body(value)
        name = f"{SHM_PREFIX}{secrets.token_hex(12)}"
        try:
            with open(self._shm_dir / name, "xb") as f:
                for chunk in chunks:
                    f.write(chunk)
        except OSError:
            _unlink(self._shm_dir / name)
            return value
        files.append(name)
        return ShmArg(name=name, nbytes=size)

    def _submit_future(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: Mapping[str, Any]
    ) -> AsyncTaskFuture:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        handle = AsyncTaskFuture(fut)

        def deliver(task_id: str, ok: bool, value: Any, node: str, exc: Any) -> None:
            handle.task_id, handle.node = task_id, node
            if fut.done():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(exc if exc is not None else error_from(value, task_id, node))

        if _has_future(args, kwargs):
            # Arguments that are still running: submit once they are known. Their values
            # (references included) travel, not the futures.
            async def later() -> None:
                try:
                    a, kw = await _resolve(args, kwargs)
                except MeshError as exc:
                    deliver("", False, None, "", exc)
                    return
                self._enqueue(name, a, kw, options, deliver)

            self._spawn(later(), deliver)
            return handle
        self._enqueue(name, args, kwargs, options, deliver)
        return handle

    def _spawn(
        self,
        coro: Coroutine[Any, Any, None],
        deliver: Callable[[str, bool, Any, str, Any], None],
    ) -> None:
        """Run ``coro`` under the session's task group (it waits for earlier futures)."""
        if self._tg is None:
            coro.close()
            exc = self._failure or MeshError("the client is closed")
            deliver("", False, None, "", exc)
            return
        self._tg.create_task(coro)

    def submit(self, name: str, /, *args: Any, **kwargs: Any) -> AsyncTaskFuture:
        """Submit task ``name``; returns a future at once (submissions are batched)."""
        return self._submit_future(name, args, kwargs, {})

    def submit_with(
        self,
        name: str,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
        resources: Mapping[str, float] | None = None,
    ) -> AsyncTaskFuture:
        """``submit`` with options: a run-time ``timeout`` and extra ``labels`` or
        ``resources`` the node that runs it must have (on top of the task's own)."""
        return self._submit_future(
            name, tuple(args), dict(kwargs or {}), _options(timeout, labels, resources)
        )

    def map(self, name: str, iterable: Iterable[Any]) -> list[AsyncTaskFuture]:
        """One task per item (each item is the single argument); all sent in one batch."""
        return [self._submit_future(name, (x,), {}, {}) for x in iterable]

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
        """The value behind ``ref``, fetched from the node that holds it."""
        # A holder on this machine lends its segment instead of sending the bytes.
        host = host_id() if self._shm_dir is not None else ""
        return await fetch_object(self._session, self._key, await self._holder(ref), ref, host=host)

    async def release(self, ref: ObjectRef) -> bool:
        """Free ``ref`` on its holder; False if it was not held (any more)."""
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


def _is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _removing(
    files: list[str], directory: Path, deliver: Callable[[str, bool, Any, str, Any], None]
) -> Callable[[str, bool, Any, str, Any], None]:
    """``deliver`` that first removes shared-memory files the node did not consume."""

    def wrapped(task_id: str, ok: bool, value: Any, node: str, exc: Any) -> None:
        for name in files:
            _unlink(directory / name)
        deliver(task_id, ok, value, node, exc)

    return wrapped


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


def _is_future(x: Any) -> bool:
    return isinstance(x, AsyncTaskFuture)


def _has_future(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return any(map(_is_future, args)) or any(map(_is_future, kwargs.values()))


async def _resolve(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    a = tuple([await x if _is_future(x) else x for x in args])
    kw = {k: (await v if _is_future(v) else v) for k, v in kwargs.items()}
    return a, kw


# ---------------------------------------------------------------------------------------
# The sync client: the async client on a private event loop thread
# ---------------------------------------------------------------------------------------


def event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when it is installed (the ``fast`` extra), which takes a
    good part off the cost of every message; asyncio's own otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Client:
    """The synchronous client. Made by ``connect()``; close it (or use ``with``)."""

    def __init__(self, url: str | None = None, key: str | None = None, *, timeout: float = 10.0):
        self._loop = event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="mesh-client", daemon=True
        )
        self._thread.start()
        try:
            self._async: AsyncClient = self._call(
                AsyncClient.connect(url, key, open_timeout=timeout)
            )
        except BaseException:
            self._stop_loop()
            raise
        self.url = self._async.url

    def _call(self, coro: Awaitable[Any], timeout: float | None = None) -> Any:
        async def run() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

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

    def _deliverer(self, fut: TaskFuture) -> Callable[[str, bool, Any, str, Any], None]:
        def deliver(task_id: str, ok: bool, value: Any, node: str, exc: Any) -> None:
            fut.task_id, fut.node = task_id, node
            if fut.done():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(exc if exc is not None else error_from(value, task_id, node))

        return deliver

    def _submit_many(
        self, calls: list[tuple[str, tuple[Any, ...], dict[str, Any], dict[str, Any]]]
    ) -> list[TaskFuture]:
        futures = [TaskFuture() for _ in calls]
        pending = [(c, f) for c, f in zip(calls, futures, strict=True)]

        def enqueue_all() -> None:
            for (name, args, kwargs, options), fut in pending:
                deliver = self._deliverer(fut)
                if any(isinstance(x, TaskFuture) for x in (*args, *kwargs.values())):
                    self._enqueue_after(name, args, kwargs, options, deliver)
                else:
                    fut.cid = self._async._enqueue(name, args, kwargs, options, deliver)

        self._loop.call_soon_threadsafe(enqueue_all)
        return futures

    def _enqueue_after(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: dict[str, Any],
        deliver: Callable[[str, bool, Any, str, Any], None],
    ) -> None:
        async def later() -> None:
            try:
                a = tuple([await _wrap(x) for x in args])
                kw = {k: await _wrap(v) for k, v in kwargs.items()}
            except MeshError as exc:
                deliver("", False, None, "", exc)
                return
            self._async._enqueue(name, a, kw, options, deliver)

        self._async._spawn(later(), deliver)

    def submit(self, name: str, /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Submit task ``name``; returns a future at once."""
        return self._submit_many([(name, args, kwargs, {})])[0]

    def submit_with(
        self,
        name: str,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
        resources: Mapping[str, float] | None = None,
    ) -> TaskFuture:
        """``submit`` with a run-time ``timeout`` and extra ``labels``/``resources``."""
        options = _options(timeout, labels, resources)
        return self._submit_many([(name, tuple(args), dict(kwargs or {}), options)])[0]

    def map(self, name: str, iterable: Iterable[Any]) -> list[TaskFuture]:
        """One task per item (the item is its single argument), sent in one batch."""
        return self._submit_many([(name, (x,), {}, {}) for x in iterable])

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

    def peers(self) -> list[dict[str, Any]]:
        """Every node the connected node knows: id, address, state, load, capabilities."""
        peers: list[dict[str, Any]] = self._call(self._async.peers())
        return peers

    def status(self) -> dict[str, Any]:
        """The connected node's id, peers, running, queued and completed counts."""
        status: dict[str, Any] = self._call(self._async.status())
        return status

    def why(self, task_id: str) -> dict[str, Any]:
        """The auction record of a task submitted through this node."""
        record: dict[str, Any] = self._call(self._async.why(task_id))
        return record

    def release(self, ref: ObjectRef) -> bool:
        """Free ``ref`` on the node that holds it; False if it was not held."""
        released: bool = self._call(self._async.release(ref))
        return released

    def result(self, value: Any, timeout: float | None = None) -> Any:
        """``value`` with references fetched: an ``ObjectRef``, a future, or plain data."""
        if isinstance(value, TaskFuture):
            value = value.result(timeout)
        if isinstance(value, ObjectRef):
            return self._call(self._async.fetch(value), timeout)
        return value


async def _wrap(x: Any) -> Any:
    if isinstance(x, TaskFuture):
        return await asyncio.wrap_future(x)
    return x


def connect(url: str | None = None, key: str | None = None, *, timeout: float = 10.0) -> Client:
    """A sync client for the node at ``url`` (default: this machine's node on the default
    port); ``key`` defaults to ``$MESH_KEY``, then the key file."""
    return Client(url, key, timeout=timeout)
