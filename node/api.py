"""The node's HTTP API: JSON for the CLI and scripts, a msgpack websocket for the client.

Routes (all under the node's one port, next to the peer websocket):

- ``GET /v1/status``, ``GET /v1/peers``: what ``mesh-node status`` and ``peers`` print.
- ``POST /v1/tasks`` ``{"task", "args", "kwargs", "timeout", "wait"}``: submit one task;
  with ``wait`` (seconds) the reply carries its result.
- ``GET /v1/tasks/{id}`` (``?wait=S`` to long-poll), ``DELETE /v1/tasks/{id}`` (cancel),
  ``GET /v1/tasks/{id}/why``: the auction record.
- ``GET /v1/objects/{id}``: a stored object, encoded by ``mesh.codec`` (peers fetch
  referenced arguments here); ``DELETE`` releases it. With ``?host=`` equal to this
  node's ``host_id`` (a fetcher on the same machine) the answer is instead the JSON
  ``{"segment", "nbytes"}`` of the shared-memory segment that holds the body.
- ``GET /v1/session``: the client's websocket; batches of submissions in, streamed
  results out, both msgpack bodies made by ``mesh.codec``.
- ``GET /metrics`` (Prometheus text) and ``GET /openapi.json``: readable without the key;
  they hold no task data.

Every other request must carry the proof of ``mesh.client.sign_request``: an HMAC over
method, path, body hash, timestamp and nonce, within ``api_auth_skew_s`` and never seen
before. Otherwise the answer is 401 ``authentication failed`` and nothing changes.

This module only translates HTTP to calls on a ``Service`` (the daemon); it holds no task
state itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import mmap
import os
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

import numpy as np
from aiohttp import WSMsgType, web

from mesh.client import (
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIME,
    HOST_PARAM,
    OBJECT_CONTENT_TYPE,
    SEGMENT_CONTENT_TYPE,
    SESSION_PATH,
    SHM_DIR,
    SHM_PREFIX,
    request_mac,
)
from mesh.codec import Chunks, dumps, loads
from mesh.config import NodeConfig
from mesh.errors import LocalProtocolError, MeshError, ObjectLostError
from mesh.messages import ObjectRef, ShmArg, TaskId, Wire, field_names
from node.store import Upload

log = logging.getLogger(__name__)

_SHM_NAME: Final = re.compile(re.escape(SHM_PREFIX) + r"[0-9a-f]{24}")
_SHM_MAX: Final = 64 * 1024 * 1024 * 1024

PUBLIC_PATHS: Final = frozenset({"/metrics", "/openapi.json"})

Deliver = Callable[[TaskId, bool, Any, str], None]
"""Called once per submitted task: (task id, ok, value or error record, node that ran it)."""


class BadRequest(MeshError):
    """A request the API cannot accept; answered with 400 and this message."""


class Service(Protocol):
    """What the API needs from the daemon."""

    config: NodeConfig

    def status(self) -> dict[str, Any]: ...

    def peers(self) -> list[dict[str, Any]]: ...

    def why(self, task_id: str) -> dict[str, Any] | None: ...

    def task_info(self, task_id: str) -> dict[str, Any] | None: ...

    def submit(
        self,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        options: Mapping[str, Any],
        deliver: Deliver,
    ) -> TaskId: ...

    def cancel(self, task_id: str) -> bool: ...

    host_id: str
    """This machine's ``mesh.client.host_id`` ("" shares nothing)."""

    def object_body(self, object_id: str) -> tuple[Chunks, int] | None: ...

    def object_segment(self, object_id: str) -> Awaitable[ShmArg | None]:
        """The segment holding a stored object for a process on this machine; None: send
        the bytes instead. Raises ``ObjectLostError`` if the object is not held."""
        ...

    def release_object(self, object_id: str) -> bool: ...

    def metrics(self) -> bytes: ...

    def wait_task(self, task_id: str) -> Awaitable[None] | None: ...


# ---------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------


class RequestAuth:
    """Checks request proofs; remembers nonces so a captured request cannot be replayed."""

    def __init__(self, key: bytes, *, skew_s: float, max_nonces: int) -> None:
        self._key = key
        self._skew = skew_s
        self._max = max_nonces
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._floor = -float("inf")
        self.failures = 0

    def check(self, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> bool:
        stamp = headers.get(HEADER_TIME, "")
        nonce = headers.get(HEADER_NONCE, "")
        sig = headers.get(HEADER_SIGNATURE, "")
        ok = self._check(method, path, body, stamp, nonce, sig, time.time())
        if not ok:
            self.failures += 1
        return ok

    def _check(
        self, method: str, path: str, body: bytes, stamp: str, nonce: str, sig: str, now: float
    ) -> bool:
        if not (stamp and nonce and sig) or len(nonce) > 64 or len(stamp) > 32:
            return False
        try:
            at = float(stamp)
        except ValueError:
            return False
        if not abs(now - at) <= self._skew or at <= self._floor:
            return False
        want = request_mac(self._key, method, path, hashlib.sha256(body).hexdigest(), stamp, nonce)
        if not hmac.compare_digest(want, sig):
            return False
        if nonce in self._nonces:
            return False
        self._nonces[nonce] = at
        while self._nonces:
            t = next(iter(self._nonces.values()))
            if len(self._nonces) > self._max:
                # Forgetting a nonce must not reopen it: refuse anything not newer.
                self._nonces.popitem(last=False)
                self._floor = max(self._floor, t)
            elif t < now - self._skew:
                self._nonces.popitem(last=False)
            else:
                break
        return True


# ---------------------------------------------------------------------------------------
# JSON conversion of results
# ---------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """A JSON-friendly form of a wire value: arrays as lists, refs as ``{"$ref": ...}``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, ObjectRef):
        return {
            "$ref": value.id,
            "holder": value.holder,
            "nbytes": value.nbytes,
            "dtype": value.dtype,
            "shape": list(value.shape),
        }
    if isinstance(value, Wire):
        return {n: jsonable(getattr(value, n)) for n in field_names(type(value))}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return str(value)


def from_json(value: Any) -> Any:
    """Undo ``jsonable`` for arguments: ``{"$ref": ...}`` becomes an ``ObjectRef``."""
    if isinstance(value, dict):
        if "$ref" in value and "holder" in value:
            try:
                return ObjectRef(
                    id=str(value["$ref"]),
                    holder=value["holder"],
                    nbytes=int(value.get("nbytes", 0)),
                    dtype=str(value.get("dtype", "")),
                    shape=tuple(int(d) for d in value.get("shape", ())),
                )
            except (TypeError, ValueError) as exc:
                raise BadRequest(f"bad object reference: {exc}") from None
        if "$bytes" in value and len(value) == 1:
            try:
                return base64.b64decode(str(value["$bytes"]), validate=True)
            except ValueError as exc:
                raise BadRequest(f"bad $bytes value: {exc}") from None
        return {str(k): from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def parse_options(raw: Any) -> dict[str, Any]:
    """Validate submission options (``timeout``, ``labels``, ``resources``)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest("options must be an object")
    out: dict[str, Any] = {}
    timeout = raw.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise BadRequest("timeout must be a positive number of seconds")
        out["timeout"] = float(timeout)
    labels = raw.get("labels")
    if labels is not None:
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise BadRequest("labels must map strings to strings")
        out["labels"] = dict(labels)
    resources = raw.get("resources")
    if resources is not None:
        if not isinstance(resources, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in resources.items()
        ):
            raise BadRequest("resources must map names to numbers")
        out["resources"] = {k: float(v) for k, v in resources.items()}
    return out


# ---------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------


class Api:
    """Adds the API routes and the auth middleware to the daemon's application."""

    def __init__(self, service: Service, key: bytes, *, exempt: frozenset[str] = frozenset()):
        """``exempt``: paths that authenticate by other means (the peer websocket)."""
        self.service = service
        self.config = service.config
        self.auth = RequestAuth(
            key, skew_s=self.config.api_auth_skew_s, max_nonces=self.config.api_nonce_cache
        )
        self.exempt = PUBLIC_PATHS | exempt
        self.sessions = 0
        self.served_bytes = 0
        """Object bytes sent through ``GET /v1/objects/{id}``."""
        self.shared_segments = 0
        """Object fetches answered with a segment instead of bytes."""

    def add_routes(self, app: web.Application) -> None:
        app.middlewares.append(self._middleware)
        r = app.router
        r.add_get("/v1/status", self._status)
        r.add_get("/v1/peers", self._peers)
        r.add_post("/v1/tasks", self._submit)
        r.add_get("/v1/tasks/{id}", self._task)
        r.add_delete("/v1/tasks/{id}", self._cancel)
        r.add_get("/v1/tasks/{id}/why", self._why)
        r.add_get("/v1/objects/{id}", self._object)
        r.add_delete("/v1/objects/{id}", self._release)
        r.add_get(SESSION_PATH, self._session)
        r.add_get("/metrics", self._metrics)
        r.add_get("/openapi.json", self._openapi)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in self.exempt:
            return await handler(request)
        body = await request.read() if request.can_read_body else b""
        if not self.auth.check(request.method, request.raw_path, body, request.headers):
            return _error(401, "authentication failed: the request does not prove the mesh key")
        try:
            return await handler(request)
        except BadRequest as exc:
            return _error(400, str(exc))

    # -- queries -------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.service.status())

    async def _peers(self, request: web.Request) -> web.Response:
        return web.json_response(self.service.peers())

    async def _why(self, request: web.Request) -> web.Response:
        record = self.service.why(request.match_info["id"])
        if record is None:
            return _error(404, f"no auction record for task {request.match_info['id']}")
        return web.json_response(record)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.service.metrics(), content_type="text/plain", charset="utf-8")

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    # -- tasks ---------------------------------------------------------------------------

    async def _submit(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read() or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"malformed JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        name = body.get("task")
        if not isinstance(name, str) or not name:
            raise BadRequest('"task" must name a task')
        raw_args: Any = body.get("args", [])
        kwargs: Any = body.get("kwargs", {})
        if isinstance(raw_args, dict):
            if not isinstance(kwargs, dict):
                raise BadRequest('"kwargs" must be a JSON object')
            kwargs = {**raw_args, **kwargs}
            raw_args = []
        args = raw_args
        if not isinstance(args, list):
            raise BadRequest('"args" must be a JSON array (positional) or object (keywords)')
        if not isinstance(kwargs, dict):
            raise BadRequest('"kwargs" must be a JSON object')
        options = parse_options({"timeout": body.get("timeout")})
        for extra in ("labels", "resources"):
            if extra in body:
                options.update(parse_options({extra: body[extra]}))
        wait = body.get("wait", 0)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
            raise BadRequest('"wait" must be a number of seconds')
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[TaskId, bool, Any, str]] = loop.create_future()

        def deliver(task_id: TaskId, ok: bool, value: Any, node: str) -> None:
            if not done.done():
                done.set_result((task_id, ok, value, node))

        try:
            task_id = self.service.submit(
                name, from_json(args), from_json(kwargs), options, deliver
            )
        except LocalProtocolError as exc:
            raise BadRequest(str(exc)) from None
        if not wait:
            return web.json_response({"task_id": task_id, "state": "submitted"}, status=202)
        try:
            async with asyncio.timeout(float(wait)):
                tid, ok, value, node = await asyncio.shield(done)
        except TimeoutError:
            return web.json_response(
                {"task_id": task_id, "state": "running", "error": f"no result within {wait} s"},
                status=202,
            )
        return web.json_response(_result_json(tid, ok, value, node))

    async def _task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["id"]
        raw = request.query.get("wait", "0")
        try:
            wait = float(raw)
        except ValueError:
            raise BadRequest(f"wait must be seconds, not {raw!r}") from None
        waiter = self.service.wait_task(task_id) if wait > 0 else None
        if waiter is not None:
            try:
                async with asyncio.timeout(wait):
                    await waiter
            except TimeoutError:
                pass
        info = self.service.task_info(task_id)
        if info is None:
            return _error(404, f"unknown task {task_id}")
        return web.json_response(info)

    async def _cancel(self, request: web.Request) -> web.Response:
        task_id = request.match_info["id"]
        if not self.service.cancel(task_id):
            return _error(404, f"unknown or finished task {task_id}")
        return web.json_response({"task_id": task_id, "cancelled": True})

    # -- objects -------------------------------------------------------------------------

    async def _object(self, request: web.Request) -> web.StreamResponse:
        object_id = request.match_info["id"]
        host = request.query.get(HOST_PARAM, "")
        if host and host == self.service.host_id:
            try:
                shared = await self.service.object_segment(object_id)
            except ObjectLostError:
                return _error(404, f"object {object_id} is not held here")
            if shared is not None:
                self.shared_segments += 1
                answer = {"segment": shared.name, "nbytes": shared.nbytes}
                return web.Response(
                    body=json.dumps(answer).encode(), content_type=SEGMENT_CONTENT_TYPE
                )
        body = self.service.object_body(object_id)
        if body is None:
            return _error(404, f"object {object_id} is not held here")
        chunks, size = body
        resp = web.StreamResponse(headers={"Content-Type": OBJECT_CONTENT_TYPE})
        resp.content_length = size
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(chunk)
        await resp.write_eof()
        self.served_bytes += size
        return resp

    async def _release(self, request: web.Request) -> web.Response:
        object_id = request.match_info["id"]
        if not self.service.release_object(object_id):
            return _error(404, f"object {object_id} is not held here")
        return web.json_response({"released": object_id})

    # -- client session ------------------------------------------------------------------

    async def _session(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=self.config.api_max_body_bytes, heartbeat=30.0)
        await ws.prepare(request)
        self.sessions += 1
        out: list[list[Any]] = []
        ready = asyncio.Event()

        def deliver_for(cid: Any) -> Deliver:
            def deliver(task_id: TaskId, ok: bool, value: Any, node: str) -> None:
                out.append([cid, task_id, ok, value, node, None if ok else value])
                ready.set()

            return deliver

        async def writer() -> None:
            while True:
                await ready.wait()
                ready.clear()
                batch = out[:]
                out.clear()
                if batch:
                    await ws.send_bytes(dumps({"op": "results", "items": batch}))

        try:
            async with asyncio.TaskGroup() as tg:
                writing = tg.create_task(writer())
                async for msg in ws:
                    if msg.type != WSMsgType.BINARY:
                        continue
                    try:
                        await self._on_session_message(msg.data, deliver_for)
                    except MeshError as exc:
                        await ws.send_bytes(dumps({"op": "error", "message": str(exc)}))
                        break
                writing.cancel()
        finally:
            self.sessions -= 1
            await ws.close()
        return ws

    async def _on_session_message(self, data: bytes, deliver_for: Callable[[Any], Deliver]) -> None:
        body = loads(data)
        if not isinstance(body, dict) or body.get("op") != "submit":
            raise BadRequest("expected {'op': 'submit', 'tasks': [...]}")
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise BadRequest("tasks must be a list")
        for item in tasks:
            if not (isinstance(item, list) and len(item) == 5):
                raise BadRequest("each task is [id, name, args, kwargs, options]")
            cid, name, args, kwargs, options = item
            deliver = deliver_for(cid)
            if not isinstance(name, str) or not isinstance(args, list):
                deliver(TaskId(""), False, _bad("task name or args malformed"), "")
                continue
            if not isinstance(kwargs, dict):
                deliver(TaskId(""), False, _bad("kwargs must be a map"), "")
                continue
            try:
                if _has_shm(args) or _has_shm(list(kwargs.values())):
                    args = [await load_shm(a) for a in args]
                    kwargs = {k: await load_shm(v) for k, v in kwargs.items()}
                self.service.submit(name, args, kwargs, parse_options(options), deliver)
            except (BadRequest, LocalProtocolError) as exc:
                deliver(TaskId(""), False, _bad(str(exc)), "")


def _has_shm(values: list[Any]) -> bool:
    return any(isinstance(v, ShmArg) for v in values)


async def load_shm(value: Any) -> Any:
    """The value a same-machine client left in shared memory, as an ``Upload``.

    Mapped, not read: the array stays in the client's pages and costs no copy here. The
    daemon's store adopts the file as the object's segment; an upload it does not adopt
    removes the file when dropped. A file of the wrong size is removed at once.
    """
    if not isinstance(value, ShmArg):
        return value
    if not _SHM_NAME.fullmatch(value.name) or not 0 < value.nbytes <= _SHM_MAX:
        raise BadRequest(f"bad shared-memory argument {value.name!r}")
    path = SHM_DIR / value.name

    def read() -> mmap.mmap:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != value.nbytes:
                with contextlib.suppress(OSError):
                    path.unlink()
                raise BadRequest(f"shared-memory argument {value.name} has the wrong size")
            return mmap.mmap(f.fileno(), value.nbytes, access=mmap.ACCESS_READ)

    try:
        data = await asyncio.to_thread(read)
    except FileNotFoundError:
        raise BadRequest(
            f"shared-memory argument {value.name} not found: is the client on this machine?"
        ) from None
    except OSError as exc:
        raise BadRequest(f"shared-memory argument {value.name}: {exc.strerror}") from None
    try:
        decoded = loads(memoryview(data))
    except MeshError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise BadRequest(f"shared-memory argument {value.name}: {exc}") from None
    return Upload(value.name, value.nbytes, data, decoded)


def _bad(message: str) -> dict[str, Any]:
    return {"kind": "bad-request", "message": message}


def _result_json(task_id: str, ok: bool, value: Any, node: str) -> dict[str, Any]:
    if ok:
        return {"task_id": task_id, "ok": True, "result": jsonable(value), "node": node}
    error = jsonable(value) if isinstance(value, dict) else {"message": str(value)}
    return {
        "task_id": task_id,
        "ok": False,
        "node": node,
        "error": error.get("message", "task failed"),
        "details": error,
    }


result_json = _result_json


def _op(summary: str, *, body: bool = False, params: tuple[str, ...] = ()) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"meshSignature": []}],
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {}}},
            "401": {"description": "authentication failed"},
        },
    }
    if params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in params
        ]
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["task"],
                        "properties": {
                            "task": {"type": "string"},
                            "args": {"oneOf": [{"type": "array"}, {"type": "object"}]},
                            "kwargs": {"type": "object"},
                            "timeout": {"type": "number"},
                            "wait": {"type": "number"},
                            "labels": {"type": "object"},
                            "resources": {"type": "object"},
                        },
                    }
                }
            },
        }
        op["responses"]["400"] = {"description": "malformed request, with the reason"}
    return op


OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.0.3",
    "info": {
        "title": "mesh-node",
        "version": "1",
        "description": (
            "The HTTP API of one Mesh node. Requests prove the mesh key with headers "
            f"{HEADER_TIME} (unix seconds), {HEADER_NONCE} (random, single use) and "
            f"{HEADER_SIGNATURE}: hex HMAC-SHA256 under the key over "
            "METHOD\\nPATH?QUERY\\nsha256(body) hex\\ntime\\nnonce."
        ),
    },
    "components": {
        "securitySchemes": {
            "meshSignature": {"type": "apiKey", "in": "header", "name": HEADER_SIGNATURE}
        }
    },
    "paths": {
        "/v1/status": {"get": _op("This node: id, peers, running, queued, completed")},
        "/v1/peers": {"get": _op("Known nodes: id, address, state, load, capabilities")},
        "/v1/tasks": {"post": _op("Submit a task; with wait, answer with its result", body=True)},
        "/v1/tasks/{id}": {
            "get": _op("A task's state and result (?wait=S long-polls)", params=("id",)),
            "delete": _op("Cancel a task", params=("id",)),
        },
        "/v1/tasks/{id}/why": {"get": _op("The auction record of a task", params=("id",))},
        "/v1/objects/{id}": {
            "get": _op("A stored object (mesh codec body)", params=("id",)),
            "delete": _op("Release a stored object", params=("id",)),
        },
        SESSION_PATH: {"get": _op("Client websocket: msgpack batches of submissions/results")},
        "/metrics": {"get": {"summary": "Prometheus metrics (no key needed)", "responses": {}}},
        "/openapi.json": {"get": {"summary": "This description (no key needed)", "responses": {}}},
    },
}
