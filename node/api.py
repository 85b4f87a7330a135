"""The node's HTTP API: JSON for the CLI and scripts, a msgpack websocket for the client.

Routes (all under the node's one port, next to the peer websocket):

- ``GET /v1/status``, ``GET /v1/peers``: what ``mesh-node status`` and ``peers`` print.
- ``POST /v1/tasks`` ``{"task", "args", "kwargs", "timeout", "wait"}``: submit one task;
  with ``wait`` (seconds) the reply carries its result.
- ``GET /v1/tasks/{id}`` (``?wait=S`` to long-poll), ``DELETE /v1/tasks/{id}`` (cancel),
  ``GET /v1/tasks/{id}/why``: the auction record.
- ``GET /v1/objects/{id}``: a stored object, encoded by ``mesh.protocol.codec`` (peers fetch
  referenced arguments here); ``DELETE`` releases it. With ``?host=`` equal to this
  node's ``host_id`` (a fetcher on the same machine) the answer is instead the JSON
  ``{"segment", "nbytes"}`` of the shared-memory segment that holds the body. With
  ``?seal=`` (the fetcher's X25519 share) the body comes sealed
  (``mesh.runtime.http``); a node with ``wire_sealed`` sends bodies no other way (403).
- ``POST /v1/objects/{id}/rebuild``: the reference of a copy of a lost object this node
  owns, made again from its lineage (``node.lineage``) unless one is; 404 says why it
  cannot be.
- ``GET /v1/session``: the client's websocket; batches of submissions in, streamed
  results out (the messages of ``mesh.protocol.session``).
- ``GET /v1/hello``, ``GET /metrics`` (Prometheus text) and ``GET /openapi.json``:
  readable without the key; they hold no task data. ``/v1/hello`` says the node's id,
  version, key fingerprint (what a client signs its requests for) and ``instance``, a
  random token per process (two processes claiming one id differ in it).
- ``POST /v1/invites`` ``{"minutes"}`` issues a one-time join code, ``GET /v1/invites``
  lists the codes issued, ``DELETE /v1/invites/{nameplate}`` revokes one (``node.join``).
- ``GET /v1/join/{nameplate}`` (is that invite open here?) and ``POST /v1/join/{nameplate}``
  ``{"pake"}`` (one SPAKE2 exchange: the answer carries the sealed mesh key) are for a
  machine that has no key yet, so they are unsigned: bounded instead to a shared budget
  of requests per second, 1 KiB bodies and one attempt per code.
- ``POST /v1/probe`` ``{"address"}``: whether this node can reach ``address`` (a peer's
  ``mesh-node doctor`` asking whether a firewall drops its port).
- The dashboard's routes (``node.dashboard.web``): ``GET /v1/events``, ``POST
  /v1/dashboard/token`` and ``GET /v1/mesh/feed`` signed like the rest; ``/dashboard`` and
  below for a browser, admitted by ``node.dashboard.access`` (Host, Origin, session cookie)
  instead of a signature, answering 403 or 401 otherwise.

Every other request must carry the proof of ``mesh.runtime.auth.sign_request``: an HMAC over
method, path, body hash, timestamp, nonce and the id of the node it is for, within
``api_auth_skew_s`` and never seen before. The proof is checked on the headers alone,
before a byte of the body is read; then the body is read (bounded in size per route and
in time) and checked against the signed hash. A failure is a 401 ``authentication
failed`` (413 too large, 408 too slow), counted in ``Api.rejected``, and nothing changes.
Every number a request carries is checked where it enters (finite, in range) with a 400;
an unexpected error in a handler is a 500 naming an internal error, logged once.

This module only translates HTTP to calls on a ``Service`` (the daemon); it holds no task
state itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Any, Final, Protocol

import numpy as np
from aiohttp import ClientError, ClientSession, ClientTimeout, WSMsgType, web

from mesh import __version__
from mesh.config import NodeConfig
from mesh.errors import ErrorInfo, FailureKind, MeshError, ObjectLostError, RemoteProtocolError
from mesh.protocol.codec import Buffer, Chunks, dumps, key_fingerprint, loads
from mesh.protocol.messages import NodeId, ObjectRef, Segment, TaskId, Wire, field_names
from mesh.protocol.sealing import (
    OBJECT_CONTEXT,
    PUBLIC_BYTES,
    SESSION_CONTEXT,
    Exchange,
    Opener,
    Sealer,
    seal_body,
    sealed_size,
)
from mesh.protocol.session import (
    BadTask,
    Forget,
    Outcome,
    Results,
    SessionError,
    Submission,
    decode_request,
)
from mesh.runtime.auth import (
    HEADER_BODY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIME,
    HEADER_TO,
    request_mac,
)
from mesh.runtime.http import (
    HELLO_PATH,
    HOST_PARAM,
    OBJECT_CONTENT_TYPE,
    SEAL_HEADER,
    SEAL_PARAM,
    SEGMENT_CONTENT_TYPE,
    SESSION_PATH,
    SIZE_HEADER,
    is_loopback,
)
from node.dashboard.access import Denied
from node.dashboard.events import EventLog
from node.dashboard.web import Dashboard, is_dashboard
from node.http_guard import ConnectionGuard
from node.join import DEFAULT_TTL_S, MAX_TTL_S, Invites, JoinRefused
from node.store import OwnedSegment
from tasks import MAX_RETRIES_LIMIT

log = logging.getLogger(__name__)


PUBLIC_PATHS: Final = frozenset({HELLO_PATH, "/metrics", "/openapi.json"})
JOIN_PREFIX: Final = "/v1/join/"
"""Unsigned: a joining machine has no key yet (``node.join``)."""
INVITES_PATH: Final = "/v1/invites"
PROBE_PATH: Final = "/v1/probe"
JOIN_BODY_BYTES: Final = 1024
PROBE_TIMEOUT_S: Final = 3.0
_JOIN_TOO_LARGE: Final = f"a join request is at most {JOIN_BODY_BYTES} bytes"
SUBMIT_PATH: Final = "/v1/tasks"
LEASES_PATH: Final = "/v1/objects/leases"
BODY: Final = web.RequestKey("mesh.body", bytes)
"""Key of a signed request's body, read and checked by the middleware, in the request."""

# Reasons requests are refused for, as counted in ``Api.rejected`` (besides those of
# ``node.http_guard``).
AUTH_FAILED: Final = "http-auth"
WRONG_RECEIVER: Final = "http-wrong-receiver"
BODY_HASH: Final = "http-body-hash"
BODY_TOO_LARGE: Final = "http-body-too-large"
BODY_TIMEOUT: Final = "http-body-timeout"

INTERNAL_ERROR: Final = "InternalError"
"""``ErrorInfo.exc_type`` of a task or submission that failed by a bug on this node's side."""

_MAX_AMOUNT: Final = 1e18
"""Largest resource amount a submission may ask for (bytes of memory fit, infinity not)."""

Deliver = Callable[[Outcome], None]
"""Called once per submitted task, with how it ended."""


class BadRequest(MeshError):
    """A request the API cannot accept; answered with 400 and this message."""


class Service(Protocol):
    """What the API needs from the daemon."""

    config: NodeConfig

    @property
    def node_id(self) -> str:
        """This node's id: signed requests must name it."""
        ...

    def status(self) -> dict[str, Any]: ...

    def peers(self) -> list[dict[str, Any]]: ...

    def why(self, task_id: str) -> dict[str, Any] | None: ...

    def task_info(self, task_id: str) -> dict[str, Any] | None: ...

    events: EventLog
    """What the dashboards of the mesh read of this node (``node.dashboard.events``)."""

    def node_stats(self) -> dict[str, Any]:
        """This node's own figures for the dashboards (objects held, bytes fetched)."""
        ...

    def submit(
        self,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        options: Mapping[str, Any],
        deliver: Deliver,
        group: str = "",
    ) -> Awaitable[TaskId]:
        """``group`` names the submissions that came together (one client batch)."""
        ...

    def cancel(self, task_id: str) -> bool: ...

    host_id: str
    """This machine's ``mesh.runtime.shm.host_id`` ("" shares nothing)."""

    def object_body(self, object_id: str) -> Awaitable[tuple[Chunks, int] | None]:
        """A stored object's body as chunks and its size (read back if it was spilled);
        None if it is not held."""
        ...

    def object_segment(self, object_id: str) -> Awaitable[Segment | None]:
        """The segment holding a stored object for a process on this machine; None: send
        the bytes instead. Raises ``ObjectLostError`` if the object is not held."""
        ...

    def release_object(self, object_id: str) -> bool: ...

    def hold(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """``key`` (a session, a JSON result) holds the references in ``value`` (``node.refs``)."""
        ...

    def forget(self, key: Hashable, ids: Iterable[str] | None = None) -> None: ...

    def session_ended(self, key: Hashable) -> None: ...

    def lease(self, node: NodeId, renew: Iterable[str], give_up: Iterable[str]) -> int:
        """Node ``node`` renews its leases on ``renew`` and gives up ``give_up``."""
        ...

    def rebuild_object(self, object_id: str) -> Awaitable[ObjectRef]:
        """The copy of an object this node owns whose holder cannot give it any more: made
        again now unless one is (``node.lineage``). Raises ``ObjectLostError`` saying why
        it cannot be."""
        ...

    def take_upload(self, upload: Segment) -> Awaitable[OwnedSegment]:
        """A same-machine client's shared-memory upload, taken over as the store's own segment
        (``node.store.ObjectStore.take_upload``); raises ``MeshError`` naming the upload."""
        ...

    def metrics(self) -> bytes: ...

    def wait_task(self, task_id: str) -> Awaitable[None] | None: ...


# ---------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------


class Refused(MeshError):
    """A request the API refuses before its handler runs; ``reason`` is what is counted."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class RequestAuth:
    """Checks request proofs on their headers; remembers nonces so a captured request
    cannot be replayed. Takes the time as an argument and touches no socket."""

    def __init__(self, key: bytes, *, skew_s: float, max_nonces: int) -> None:
        self._key = key
        self._skew = skew_s
        self._max = max_nonces
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._floor = -float("inf")
        self.failures = 0
        """Requests refused by ``verify`` or ``verify_body``, all reasons."""

    def verify(
        self, method: str, path: str, headers: Mapping[str, str], *, node_id: str, now: float
    ) -> None:
        """Accept a request to node ``node_id`` on its headers (``path`` with its query), or
        raise ``Refused`` (401): a missing or bad proof, a stale or replayed one, or a
        proof made for another node. The body is checked later, by ``verify_body``."""
        try:
            self._verify(method, path, headers, node_id, now)
        except Refused:
            self.failures += 1
            raise

    def verify_body(self, headers: Mapping[str, str], body: bytes) -> None:
        """Raise ``Refused`` (401) unless ``body`` is the one the verified headers sign."""
        if hashlib.sha256(body).hexdigest() != headers.get(HEADER_BODY, ""):
            self.failures += 1
            raise Refused(
                401, BODY_HASH, "authentication failed: the body does not match its signed hash"
            )

    def _verify(
        self, method: str, path: str, headers: Mapping[str, str], node_id: str, now: float
    ) -> None:
        stamp = headers.get(HEADER_TIME, "")
        nonce = headers.get(HEADER_NONCE, "")
        sig = headers.get(HEADER_SIGNATURE, "")
        digest = headers.get(HEADER_BODY, "")
        to = headers.get(HEADER_TO, "")
        if not self._fresh(stamp, nonce, sig, digest, to, now):
            raise Refused(401, AUTH_FAILED, _NOT_PROVEN)
        want = request_mac(self._key, method, path, digest, stamp, nonce, to)
        if not hmac.compare_digest(want, sig):
            raise Refused(401, AUTH_FAILED, _NOT_PROVEN)
        if to != node_id:
            raise Refused(
                401,
                WRONG_RECEIVER,
                f"authentication failed: this request is for node {to}, not {node_id}",
            )
        if nonce in self._nonces:
            raise Refused(401, AUTH_FAILED, _NOT_PROVEN)
        self._remember(nonce, float(stamp), now)

    def _fresh(self, stamp: str, nonce: str, sig: str, digest: str, to: str, now: float) -> bool:
        if not (stamp and nonce and sig and to) or len(digest) != 64:
            return False
        if len(nonce) > 64 or len(stamp) > 32 or len(sig) > 128 or len(to) > 256:
            return False
        try:
            at = float(stamp)
        except ValueError:
            return False
        # NaN fails the comparison, so it is never fresh.
        return abs(now - at) <= self._skew and at > self._floor

    def _remember(self, nonce: str, at: float, now: float) -> None:
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


_NOT_PROVEN: Final = "authentication failed: the request does not prove the mesh key"


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
    if isinstance(value, np.ndarray | np.generic):
        # tolist() gives bytes, complex numbers and datetimes too, which JSON has not.
        return jsonable(value.tolist())
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return str(value)


def parse_json(data: bytes) -> Any:
    """A request body as JSON; ``BadRequest`` for malformed JSON, ``NaN`` or ``Infinity``
    (which Python's parser accepts), numbers too large for a float, or nesting too deep
    for the parser."""
    try:
        return json.loads(data or b"null", parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise BadRequest("JSON nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise BadRequest(f"malformed JSON: {exc}") from None


def _no_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a number the API accepts")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"number out of range: {text[:40]}")
    return value


def from_json(value: Any, *, max_depth: int) -> Any:
    """Undo ``jsonable`` for arguments: ``{"$ref": ...}`` becomes an ``ObjectRef``.
    Containers nested deeper than ``max_depth`` are a ``BadRequest``."""
    return _from_json(value, max_depth)


def _from_json(value: Any, depth_left: int) -> Any:
    if isinstance(value, dict | list) and depth_left <= 0:
        raise BadRequest("arguments nested too deeply")
    if isinstance(value, dict):
        if "$ref" in value and "holder" in value:
            return _object_ref(value)
        if "$bytes" in value and len(value) == 1:
            try:
                return base64.b64decode(str(value["$bytes"]), validate=True)
            except ValueError as exc:
                raise BadRequest(f"bad $bytes value: {exc}") from None
        return {str(k): _from_json(v, depth_left - 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v, depth_left - 1) for v in value]
    return value


def _object_ref(value: dict[str, Any]) -> ObjectRef:
    oid, holder = value["$ref"], value["holder"]
    nbytes, dtype, shape = value.get("nbytes", 0), value.get("dtype", ""), value.get("shape", [])
    if not (isinstance(oid, str) and oid and isinstance(holder, str) and holder):
        raise BadRequest("bad object reference: $ref and holder must be strings")
    if not (_is_count(nbytes) and isinstance(dtype, str) and isinstance(shape, list)):
        raise BadRequest("bad object reference: nbytes, dtype or shape malformed")
    if len(shape) > 32 or not all(_is_count(d) for d in shape):
        raise BadRequest("bad object reference: shape must be sizes")
    return ObjectRef(id=oid, holder=NodeId(holder), nbytes=nbytes, dtype=dtype, shape=tuple(shape))


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_AMOUNT


def check_nesting(values: Iterable[Any], max_depth: int) -> None:
    """``BadRequest`` if a list, tuple, map or wire value (a ``TaskCall`` holds arguments of
    its own) in ``values`` nests deeper than ``max_depth`` (arguments that arrived as
    msgpack, which ``from_json`` does not see)."""
    stack: list[tuple[Any, int]] = [(v, max_depth) for v in values]
    while stack:
        value, left = stack.pop()
        if isinstance(value, dict):
            children: Iterable[Any] = value.values()
        elif isinstance(value, list | tuple):
            children = value
        elif isinstance(value, Wire):
            children = [getattr(value, n) for n in field_names(type(value))]
        else:
            continue
        if left <= 0:
            raise BadRequest("arguments nested too deeply")
        stack.extend((c, left - 1) for c in children if isinstance(c, dict | list | tuple | Wire))


def seconds(value: Any, what: str, *, maximum: float, zero: bool = False) -> float:
    """``value`` as seconds in (0, maximum], or [0, maximum] with ``zero``; else a
    ``BadRequest`` naming ``what``. NaN, infinities and wrong types are refused."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{what} must be a number of seconds")
    # Comparisons, not float(): NaN fails both, and a huge int never overflows.
    if not ((value >= 0 if zero else value > 0) and value <= maximum):
        low = "0" if zero else "more than 0"
        raise BadRequest(f"{what} must be {low} and at most {maximum:g} seconds")
    return float(value)


def _error(status: int, message: str, *, close: bool = False, **extra: Any) -> web.Response:
    resp = web.json_response({"error": message, **extra}, status=status)
    if close:
        resp.force_close()
    return resp


_OPTION_NAMES: Final = (
    "timeout",
    "labels",
    "resources",
    "libraries",
    "max_retries",
    "retry_exceptions",
)


def parse_options(raw: Any, config: NodeConfig) -> dict[str, Any]:
    """Validate submission options (``timeout``, ``labels``, ``resources``, ``libraries``,
    ``max_retries``, ``retry_exceptions``): the one check for both the JSON and the session
    path."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest("options must be an object")
    out: dict[str, Any] = {}
    timeout = raw.get("timeout")
    if timeout is not None:
        out["timeout"] = seconds(timeout, "timeout", maximum=config.api_max_task_timeout_s)
    for name, what in (("labels", "strings"), ("libraries", "version specifiers")):
        given = raw.get(name)
        if given is not None:
            if not isinstance(given, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in given.items()
            ):
                raise BadRequest(f"{name} must map names to {what}")
            out[name] = dict(given)
    resources = raw.get("resources")
    if resources is not None:
        if not isinstance(resources, dict) or not all(
            isinstance(k, str) and _is_amount(v) for k, v in resources.items()
        ):
            raise BadRequest(f"resources must map names to numbers from 0 to {_MAX_AMOUNT:g}")
        out["resources"] = {k: float(v) for k, v in resources.items()}
    retries = raw.get("max_retries")
    if retries is not None:
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise BadRequest("max_retries must be an integer")
        if not 0 <= retries <= MAX_RETRIES_LIMIT:
            raise BadRequest(f"max_retries must be from 0 to {MAX_RETRIES_LIMIT}")
        out["max_retries"] = retries
    on = raw.get("retry_exceptions")
    if on is not None:
        if isinstance(on, bool):
            out["retry_exceptions"] = on
        elif isinstance(on, list) and all(isinstance(e, str) and e.isidentifier() for e in on):
            out["retry_exceptions"] = tuple(on)
        else:
            raise BadRequest("retry_exceptions must be true, false or a list of class names")
    return out


def _is_amount(value: Any) -> bool:
    # NaN fails the comparison; a huge int is refused before float() could overflow.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 <= value <= _MAX_AMOUNT


# ---------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------


class Api:
    """Adds the API routes and the auth middleware to the daemon's application, and makes
    the connection guard its site must use (``node.http_guard.GuardedSite``)."""

    def __init__(
        self,
        service: Service,
        key: bytes,
        *,
        exempt: frozenset[str] = frozenset(),
        invites: Invites | None = None,
        instance: str = "",
    ):
        """``exempt``: paths that authenticate by other means (the peer websocket).
        ``invites``: the join codes this node issues (None: it issues none). ``instance``:
        this process's token in ``/v1/hello``."""
        self.service = service
        self.invites = invites
        self.instance = instance
        self.config = service.config
        self._key = key
        self.fingerprint = key_fingerprint(key)
        self.auth = RequestAuth(
            key, skew_s=self.config.api_auth_skew_s, max_nonces=self.config.api_nonce_cache
        )
        self.exempt = PUBLIC_PATHS | exempt
        self.rejected: Counter[str] = invites.refused if invites is not None else Counter()
        """Requests and connections refused at the HTTP edge, by reason (``http-...``,
        and ``join-...`` counted by ``invites``)."""
        self.internal_errors = 0
        """Requests and submissions that failed by an unexpected error on this node."""
        self._logged: set[str] = set()
        """Refusal reasons logged once already."""
        self.guard = ConnectionGuard(
            max_per_address=self.config.http_max_connections_per_address,
            max_half_open=self.config.http_max_half_open,
            header_timeout_s=self.config.http_header_timeout_s,
            rejected=self.rejected,
        )
        self.sessions = 0
        self._session_ids = itertools.count(1)
        self.dashboard = Dashboard(service, key, self.rejected)
        self.served_bytes = 0
        """Object bytes sent through ``GET /v1/objects/{id}``."""
        self.shared_segments = 0
        """Object fetches answered with a segment instead of bytes."""

    def add_routes(self, app: web.Application) -> None:
        app.middlewares.append(self._middleware)
        r = app.router
        r.add_get(HELLO_PATH, self._hello)
        r.add_get("/v1/status", self._status)
        r.add_get("/v1/peers", self._peers)
        r.add_post(SUBMIT_PATH, self._submit)
        r.add_get("/v1/tasks/{id}", self._task)
        r.add_delete("/v1/tasks/{id}", self._cancel)
        r.add_get("/v1/tasks/{id}/why", self._why)
        r.add_get("/v1/objects/{id}", self._object)
        r.add_delete("/v1/objects/{id}", self._release)
        r.add_post("/v1/objects/{id}/rebuild", self._rebuild)
        r.add_post(LEASES_PATH, self._lease)
        r.add_get(SESSION_PATH, self._session)
        r.add_get("/metrics", self._metrics)
        r.add_get("/openapi.json", self._openapi)
        r.add_post(INVITES_PATH, self._invite)
        r.add_get(INVITES_PATH, self._invites)
        r.add_delete(INVITES_PATH + "/{nameplate}", self._revoke)
        r.add_get(JOIN_PREFIX + "{nameplate}", self._join_open)
        r.add_post(JOIN_PREFIX + "{nameplate}", self._join)
        r.add_post(PROBE_PATH, self._probe)
        self.dashboard.add_routes(app)

    async def close(self) -> None:
        """End the dashboards' feeds (before the server stops)."""
        await self.dashboard.close()

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            joining = request.path.startswith(JOIN_PREFIX)
            if is_dashboard(request.path):
                self.dashboard.admit(request)
            elif request.path not in self.exempt and not joining:
                await self._admit(request)
            unsigned = request.path in self.exempt or is_dashboard(request.path) or joining
            if unsigned and (request.content_length or 0) > self.config.http_small_body_bytes:
                raise Refused(413, BODY_TOO_LARGE, "request body too large")
            return await handler(request)
        except Denied as exc:
            self.rejected[exc.reason] += 1
            return _error(exc.status, str(exc))
        except JoinRefused as exc:  # counted and logged by ``Invites``
            return _error(exc.status, str(exc), close=True)
        except Refused as exc:
            self.rejected[exc.reason] += 1
            if exc.reason not in self._logged:
                # One line the first time for each reason; after that the counter tells.
                self._logged.add(exc.reason)
                log.warning(
                    "refused %s %s from %s: %s (further ones are counted as %s)",
                    request.method,
                    request.path[:80],
                    request.remote,
                    exc,
                    exc.reason,
                )
            # Closing the connection: the rest of a refused body is never read.
            return _error(exc.status, str(exc), close=True)
        except BadRequest as exc:
            return _error(400, str(exc))
        except (web.HTTPException, ConnectionError):
            raise  # aiohttp's own answers (404, 405, ...) and a client gone away
        except Exception as exc:
            # A bug behind one request must not take the node down or leak a traceback.
            self.internal_errors += 1
            log.exception("internal error answering %s %s", request.method, request.path)
            return _error(500, f"internal error: {type(exc).__name__}", kind=INTERNAL_ERROR)

    async def _admit(self, request: web.Request) -> None:
        """Check a request's proof on its headers, then read its body (bounded in size and
        time) into ``request[BODY]`` and check it against the signed hash."""
        self.auth.verify(
            request.method,
            request.raw_path,
            request.headers,
            node_id=self.service.node_id,
            now=time.time(),
        )
        limit = (
            self.config.http_submit_body_bytes
            if request.method == "POST" and request.path == SUBMIT_PATH
            else self.config.http_small_body_bytes
        )
        if (request.content_length or 0) > limit:
            raise Refused(413, BODY_TOO_LARGE, f"request body over {limit} bytes")
        body = bytearray()
        if request.can_read_body:
            try:
                async with asyncio.timeout(self.config.http_body_timeout_s):
                    async for chunk in request.content.iter_any():
                        body += chunk
                        if len(body) > limit:
                            raise Refused(413, BODY_TOO_LARGE, f"request body over {limit} bytes")
            except TimeoutError:
                raise Refused(
                    408,
                    BODY_TIMEOUT,
                    f"request body not received within {self.config.http_body_timeout_s:g} s",
                ) from None
        data = bytes(body)
        self.auth.verify_body(request.headers, data)
        request[BODY] = data

    # -- public ----------------------------------------------------------------------------

    async def _hello(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "id": self.service.node_id,
                "version": __version__,
                "mesh": self.fingerprint,
                "instance": self.instance,
            }
        )

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

    # -- joining with a code ----------------------------------------------------------------

    def _need_invites(self) -> Invites:
        if self.invites is None:
            raise web.HTTPNotFound(text="this node issues no invites")
        return self.invites

    async def _invite(self, request: web.Request) -> web.Response:
        body = parse_json(request[BODY]) or {}
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        minutes = body.get("minutes", DEFAULT_TTL_S / 60)
        ttl = 60 * seconds(minutes, '"minutes"', maximum=MAX_TTL_S / 60)
        try:
            invite = self._need_invites().issue(time.monotonic(), ttl)
        except MeshError as exc:
            raise BadRequest(str(exc)) from None
        return web.json_response(
            {"code": invite.code, **invite.public(time.monotonic()), "node": self.service.node_id}
        )

    async def _invites(self, request: web.Request) -> web.Response:
        return web.json_response(self._need_invites().listing(time.monotonic()))

    async def _revoke(self, request: web.Request) -> web.Response:
        nameplate = request.match_info["nameplate"]
        if not self._need_invites().revoke(nameplate, time.monotonic()):
            return _error(404, f"no open invite {nameplate}")
        return web.json_response({"nameplate": nameplate, "revoked": True})

    def _join_peer(self, request: web.Request) -> str:
        return request.remote or "?"

    async def _join_open(self, request: web.Request) -> web.Response:
        invites = self._need_invites()
        now = time.monotonic()
        invites.admit(now, self._join_peer(request))
        nameplate = request.match_info["nameplate"]
        if not invites.is_open(nameplate, now, self._join_peer(request)):
            return _error(404, f"no open invite {nameplate[:16]!r} here")
        return web.json_response({"nameplate": nameplate, "open": True})

    async def _join(self, request: web.Request) -> web.Response:
        invites = self._need_invites()
        peer = self._join_peer(request)
        invites.admit(time.monotonic(), peer)
        if (request.content_length or 0) > JOIN_BODY_BYTES:
            raise Refused(413, BODY_TOO_LARGE, _JOIN_TOO_LARGE)
        data = bytearray()
        try:
            async with asyncio.timeout(self.config.http_body_timeout_s):
                async for chunk in request.content.iter_any():
                    data += chunk
                    if len(data) > JOIN_BODY_BYTES:
                        raise Refused(413, BODY_TOO_LARGE, _JOIN_TOO_LARGE)
        except TimeoutError:
            raise Refused(408, BODY_TIMEOUT, "join request body not received in time") from None
        body = parse_json(bytes(data))
        text = body.get("pake") if isinstance(body, dict) else None
        try:
            message = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
        except ValueError:
            message = b""
        reply, sealed = invites.answer(
            request.match_info["nameplate"], message, time.monotonic(), peer
        )
        return web.json_response(
            {
                "pake": base64.b64encode(reply).decode(),
                "sealed": base64.b64encode(sealed).decode(),
                "node": self.service.node_id,
            }
        )

    async def _probe(self, request: web.Request) -> web.Response:
        body = parse_json(request[BODY])
        address = body.get("address") if isinstance(body, dict) else None
        host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise BadRequest('"address" must be HOST:PORT')
        reply: dict[str, Any] = {"address": address, "reachable": False}
        try:
            async with (
                ClientSession(timeout=ClientTimeout(total=PROBE_TIMEOUT_S)) as http,
                http.get(f"http://{host}:{port}{HELLO_PATH}") as resp,
            ):
                hello = await resp.json()
            reply["reachable"] = True
            reply["id"] = hello.get("id") if isinstance(hello, dict) else None
        except (ClientError, TimeoutError, ValueError) as exc:
            reply["error"] = str(exc) or type(exc).__name__
        return web.json_response(reply)

    # -- tasks ---------------------------------------------------------------------------

    async def _submit(self, request: web.Request) -> web.Response:
        body = parse_json(request[BODY])
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
        options = parse_options({k: body[k] for k in _OPTION_NAMES if k in body}, self.config)
        wait = seconds(body.get("wait", 0), '"wait"', maximum=self.config.api_max_wait_s, zero=True)
        depth = self.config.api_max_nesting
        args = from_json(args, max_depth=depth)
        # Decoded value by value: keywords named "$ref" and "holder" are no reference.
        kwargs = {k: from_json(v, max_depth=depth - 1) for k, v in kwargs.items()}
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        def deliver(outcome: Outcome) -> None:
            # A reference handed out over JSON is kept for a while, then let go.
            key = ("json", outcome.task_id)
            self.service.hold(key, outcome.value, ttl=self.config.api_ref_ttl_s)
            if not done.done():
                done.set_result(outcome)

        try:
            task_id = await self.service.submit(name, args, kwargs, options, deliver)
        except MeshError as exc:
            raise BadRequest(str(exc)) from None
        if not wait:
            return web.json_response({"task_id": task_id, "state": "submitted"}, status=202)
        try:
            async with asyncio.timeout(wait):
                outcome = await asyncio.shield(done)
        except TimeoutError:
            return web.json_response(
                {"task_id": task_id, "state": "running", "error": f"no result within {wait:g} s"},
                status=202,
            )
        return web.json_response(result_json(outcome))

    async def _task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["id"]
        raw = request.query.get("wait", "0")
        try:
            number = float(raw)
        except ValueError:
            raise BadRequest("wait must be a number of seconds") from None
        wait = seconds(number, "wait", maximum=self.config.api_max_wait_s, zero=True)
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
            except ObjectLostError as exc:
                return _error(404, f"object {object_id} is not held here: {exc}")
            if shared is not None:
                self.shared_segments += 1
                answer = {"segment": shared.name, "nbytes": shared.nbytes}
                return web.Response(
                    body=json.dumps(answer).encode(), content_type=SEGMENT_CONTENT_TYPE
                )
        try:
            body = await self.service.object_body(object_id)
        except ObjectLostError as exc:  # a spill file that cannot be read back
            return _error(404, f"object {object_id} is not held here: {exc}")
        if body is None:
            return _error(404, f"object {object_id} is not held here")
        chunks, size = body
        public = self._share(request, required=self.config.wire_sealed)
        if isinstance(public, web.Response):
            return public
        resp = web.StreamResponse(headers={"Content-Type": OBJECT_CONTENT_TYPE})
        pieces: Iterable[Buffer] = chunks
        if public:
            exchange = Exchange()
            sealer, _ = exchange.keys(self._key, public, initiator=False, context=OBJECT_CONTEXT)
            resp.headers[SEAL_HEADER] = exchange.public.hex()
            resp.headers[SIZE_HEADER] = str(size)
            pieces = seal_body(sealer, chunks, size)
            resp.content_length = sealed_size(size)
        else:
            resp.content_length = size
        await resp.prepare(request)
        if request.method == "HEAD":  # headers only: a body would be read as the next answer
            await resp.write_eof()
            return resp
        for piece in pieces:
            await resp.write(piece)
        await resp.write_eof()
        self.served_bytes += size
        return resp

    def _share(self, request: web.Request, *, required: bool) -> bytes | web.Response:
        """The requester's X25519 share (``?seal=``), b"" when it asks for nothing sealed,
        or the refusal: a share that is none, or none where ``required``."""
        share = request.query.get(SEAL_PARAM)
        if share is None:
            if not required:
                return b""
            self.rejected["unsealed"] += 1
            return _error(
                403, f"{request.path} travels sealed only from this node (ask with ?seal=)"
            )
        try:
            public = bytes.fromhex(share)
        except ValueError:
            public = b""
        if len(public) != PUBLIC_BYTES:
            self.rejected["bad-handshake"] += 1
            return _error(400, "seal: not an X25519 share in hex")
        return public

    async def _release(self, request: web.Request) -> web.Response:
        object_id = request.match_info["id"]
        if not self.service.release_object(object_id):
            return _error(404, f"object {object_id} is not held here")
        return web.json_response({"released": object_id})

    async def _lease(self, request: web.Request) -> web.Response:
        body = parse_json(request[BODY])
        if not isinstance(body, dict) or not isinstance(body.get("node"), str):
            raise BadRequest('a lease message is {"node", "renew": [ids], "drop": [ids]}')
        lists = [body.get(k, []) for k in ("renew", "drop")]
        if not all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in lists):
            raise BadRequest('"renew" and "drop" must be lists of object ids')
        kept = self.service.lease(NodeId(body["node"]), lists[0], lists[1])
        return web.json_response({"kept": kept})

    async def _rebuild(self, request: web.Request) -> web.Response:
        object_id = request.match_info["id"]
        try:
            async with asyncio.timeout(self.config.api_max_wait_s):
                ref = await self.service.rebuild_object(object_id)
        except TimeoutError:
            return _error(504, f"object {object_id} is still being made again")
        except ObjectLostError as exc:
            return _error(404, str(exc))
        return web.json_response(jsonable(ref))

    # -- client session ------------------------------------------------------------------

    async def _session(self, request: web.Request) -> web.StreamResponse:
        # A client on another machine seals its session (its share in the signed path);
        # the node answers with its own share as the first message, and every message after
        # it, both ways, is sealed under the keys the two shares give.
        required = self.config.wire_sealed and not is_loopback(request.remote or "")
        public = self._share(request, required=required)
        if isinstance(public, web.Response):
            return public
        ws = web.WebSocketResponse(max_msg_size=self.config.api_max_body_bytes, heartbeat=30.0)
        await ws.prepare(request)
        sealer: Sealer | None = None
        opener: Opener | None = None
        if public:
            exchange = Exchange()
            sealer, opener = exchange.keys(
                self._key, public, initiator=False, context=SESSION_CONTEXT
            )
            await ws.send_bytes(exchange.public)

        async def send(message: dict[str, Any]) -> None:
            data = dumps(message)
            await ws.send_bytes(data if sealer is None else sealer.seal(data))

        self.sessions += 1
        session = next(self._session_ids)
        key = ("session", session)
        batches = itertools.count(1)
        out: list[tuple[Any, Outcome]] = []
        ready = asyncio.Event()

        def deliver_for(cid: Any) -> Deliver:
            def deliver(outcome: Outcome) -> None:
                self.service.hold(key, outcome.value)
                out.append((cid, outcome))
                ready.set()

            return deliver

        async def writer() -> None:
            while True:
                await ready.wait()
                ready.clear()
                batch = tuple(out)
                out.clear()
                if batch:
                    await send(Results(items=batch).encode())

        try:
            async with asyncio.TaskGroup() as tg:
                writing = tg.create_task(writer())
                async for msg in ws:
                    if msg.type != WSMsgType.BINARY:
                        continue
                    try:
                        data = msg.data if opener is None else opener.open(msg.data)
                        tasks = decode_request(loads(data))
                    except MeshError as exc:
                        if isinstance(exc, RemoteProtocolError) and exc.reason == "sealed":
                            self.rejected["sealed"] += 1
                        await send(SessionError(message=str(exc)).encode())
                        break
                    if isinstance(tasks, Forget):
                        self.service.forget(key, tasks.ids)
                        continue
                    group = f"{session}.{next(batches)}"
                    for task in tasks:
                        await self._take(task, deliver_for(task.cid), group)
                writing.cancel()
        except* ConnectionError:
            pass  # the client went away mid-write
        except* Exception:
            # The response is a websocket already: a bug here ends this session only.
            self.internal_errors += 1
            log.exception("internal error in a client session")
        finally:
            self.sessions -= 1
            self.service.session_ended(key)
            await ws.close()
        return ws

    async def _take(self, task: Submission | BadTask, deliver: Deliver, group: str) -> None:
        """Submit one task of a session's batch; a task that cannot be gets its failure."""
        if isinstance(task, BadTask):
            deliver(_refused(task.reason))
            return
        args, kwargs = list(task.args), task.kwargs
        try:
            check_nesting((args, kwargs), self.config.api_max_nesting)
            options = parse_options(task.options, self.config)
            if any(isinstance(v, Segment) for v in (*args, *kwargs.values())):
                args = [await self._upload(a) for a in args]
                kwargs = {k: await self._upload(v) for k, v in kwargs.items()}
                # What an upload held is an argument one level down, bounded the same.
                held = [u.value for u in (*args, *kwargs.values()) if isinstance(u, OwnedSegment)]
                check_nesting(held, self.config.api_max_nesting - 1)
            await self.service.submit(task.name, args, kwargs, options, deliver, group)
        except MeshError as exc:  # BadRequest, a full store, a node shutting down
            deliver(_refused(str(exc)))
        except Exception as exc:
            # A bug behind one submission fails that task, not the session or the node.
            self.internal_errors += 1
            log.exception("internal error submitting %.100r from a session", task.name)
            message = f"internal error: {type(exc).__name__}: {exc}"
            error = ErrorInfo(kind=FailureKind.INTERNAL, message=message, exc_type=INTERNAL_ERROR)
            deliver(Outcome(task_id="", error=error))

    async def _upload(self, value: Any) -> Any:
        """A same-machine client's shared-memory argument, taken by the store."""
        if not isinstance(value, Segment):
            return value
        try:
            return await self.service.take_upload(value)
        except MeshError as exc:
            raise BadRequest(str(exc)) from None


def _refused(reason: str) -> Outcome:
    """The outcome of a session task the node refused."""
    return Outcome(task_id="", error=ErrorInfo(kind=FailureKind.BAD_REQUEST, message=reason))


def result_json(outcome: Outcome) -> dict[str, Any]:
    """How ``GET /v1/tasks/{id}`` and a waited-for ``POST /v1/tasks`` show a task's end."""
    doc: dict[str, Any] = {"task_id": outcome.task_id, "ok": outcome.ok, "node": outcome.node}
    if outcome.error is None:
        doc["result"] = jsonable(outcome.value)
    else:
        doc["error"] = outcome.error.message
        doc["details"] = jsonable(outcome.error.encode())
    return doc


def _op(
    summary: str,
    *,
    body: dict[str, Any] | None = None,
    params: tuple[str, ...] = (),
    query: tuple[tuple[str, str], ...] = (),
    more: dict[str, str] | None = None,
    content: str = "application/json",
) -> dict[str, Any]:
    """One signed operation: ``body`` its JSON body's schema, ``params`` in the path,
    ``query`` (name, type), ``more`` statuses besides the ones every signed route may
    answer."""
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"meshSignature": []}],
        "responses": {
            "200": {"description": "OK", "content": {content: {}}},
            "400": {"description": "malformed request or number out of range, with the reason"},
            "401": {"description": "authentication failed (bad proof, body or receiver)"},
            "408": {"description": "the body did not arrive in time"},
            "413": {"description": "the body is too large for this route"},
            "500": {"description": "internal error on the node (logged there)"},
            **{code: {"description": text} for code, text in (more or {}).items()},
        },
    }
    parameters = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
    ] + [{"name": q, "in": "query", "schema": {"type": kind}} for q, kind in query]
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


_UNKNOWN: Final = {"404": "unknown or finished id"}
_SUBMIT_BODY: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["task"],
    "properties": {
        "task": {"type": "string"},
        "args": {"oneOf": [{"type": "array"}, {"type": "object"}]},
        "kwargs": {"type": "object"},
        "timeout": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
        "wait": {"type": "number", "minimum": 0},
        "labels": {"type": "object"},
        "resources": {"type": "object"},
        "libraries": {"type": "object", "additionalProperties": {"type": "string"}},
        "max_retries": {"type": "integer", "minimum": 0},
        "retry_exceptions": {
            "oneOf": [{"type": "boolean"}, {"type": "array", "items": {"type": "string"}}]
        },
    },
}
_IDS: Final = {"type": "array", "items": {"type": "string"}}
_LEASE_BODY: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["node"],
    "properties": {"node": {"type": "string"}, "renew": _IDS, "drop": _IDS},
}
_SSE: Final = "text/event-stream"


def _join_op(summary: str, responses: dict[str, str], body: bool) -> dict[str, Any]:
    """One unsigned join operation (a machine with no key yet)."""
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": [
            {"name": "nameplate", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "responses": {
            code: {"description": text, "content": {"application/json": {}}}
            for code, text in responses.items()
        },
    }
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["pake"],
                        "properties": {"pake": {"type": "string", "format": "byte"}},
                    }
                }
            },
        }
    return op


def _page_op(
    summary: str,
    *,
    query: tuple[str, ...] = (),
    path: tuple[str, ...] = (),
    content: str = "application/json",
    more: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One dashboard operation: admitted by its session cookie, Host and Origin."""
    responses = {
        "200": {"description": "OK", "content": {content: {}}},
        "401": {"description": "no dashboard session"},
        "403": {"description": "wrong Host header, or a cross-site Origin"},
        "413": {"description": "a body was sent (none is read)"},
    }
    responses.update({code: {"description": text} for code, text in (more or {}).items()})
    parameters = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in path
    ] + [{"name": q, "in": "query", "schema": {"type": "string"}} for q in query]
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"dashboardSession": []}],
        "responses": responses,
    }
    if parameters:
        op["parameters"] = parameters
    return op


OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.0.3",
    "info": {
        "title": "mesh-node",
        "version": "1",
        "description": (
            "The HTTP API of one Mesh node. Requests prove the mesh key with headers "
            f"{HEADER_TIME} (unix seconds), {HEADER_NONCE} (random, single use), "
            f"{HEADER_BODY} (hex SHA-256 of the body), {HEADER_TO} (the receiving node's "
            f"id, from {HELLO_PATH}) and {HEADER_SIGNATURE}: hex HMAC-SHA256 under the key "
            "over METHOD\\nPATH?QUERY\\nbody sha256\\ntime\\nnonce\\nreceiver id. "
            "The proof is checked before the body is read."
        ),
    },
    "components": {
        "securitySchemes": {
            "meshSignature": {"type": "apiKey", "in": "header", "name": HEADER_SIGNATURE},
            "dashboardSession": {
                "type": "apiKey",
                "in": "cookie",
                "name": "mesh-dashboard-NODE",
                "description": "set by GET /dashboard?token=T; NODE is a hash of the node id",
            },
        }
    },
    "paths": {
        HELLO_PATH: {
            "get": {
                "summary": "This node's id, version and key fingerprint (no key needed)",
                "responses": {
                    "200": {
                        "description": '{"id", "version", "mesh"}',
                        "content": {"application/json": {}},
                    }
                },
            }
        },
        "/v1/status": {"get": _op("This node: id, peers, running, queued, completed")},
        "/v1/peers": {"get": _op("Known nodes: id, address, state, load, capabilities")},
        "/v1/tasks": {
            "post": _op(
                "Submit a task; with wait, answer with its result",
                body=_SUBMIT_BODY,
                more={"202": "submitted (or still running after wait)"},
            )
        },
        "/v1/tasks/{id}": {
            "get": _op(
                "A task's state and result (?wait=S long-polls)",
                params=("id",),
                query=(("wait", "number"),),
                more=_UNKNOWN,
            ),
            "delete": _op("Cancel a task", params=("id",), more=_UNKNOWN),
        },
        "/v1/tasks/{id}/why": {
            "get": _op("The auction record of a task", params=("id",), more=_UNKNOWN)
        },
        "/v1/objects/{id}": {
            "get": _op(
                "A stored object (mesh codec body)",
                params=("id",),
                query=((HOST_PARAM, "string"), (SEAL_PARAM, "string")),
                more={**_UNKNOWN, "403": "the body would travel unsealed from a sealing node"},
                content=OBJECT_CONTENT_TYPE,
            ),
            "delete": _op("Release a stored object", params=("id",), more=_UNKNOWN),
        },
        LEASES_PATH: {
            "post": _op(
                "Node `node` renews its leases on objects stored here and gives up others",
                body=_LEASE_BODY,
            ),
        },
        "/v1/objects/{id}/rebuild": {
            "post": _op(
                "The copy of a lost object this node owns, made again from its lineage",
                params=("id",),
                more={
                    "404": "the object cannot be made again (the reason says why)",
                    "504": "still being made again",
                },
            ),
        },
        SESSION_PATH: {"get": _op("Client websocket: msgpack batches of submissions/results")},
        "/v1/events": {
            "get": _op(
                "This node's recent events and figures, for the dashboards",
                query=(("after", "integer"), ("epoch", "string"), ("wait", "integer")),
            )
        },
        "/v1/dashboard/token": {"post": _op("A one-time token for the dashboard page")},
        "/v1/mesh/feed": {
            "get": _op("The mesh as Server-Sent Events (mesh-node top)", content=_SSE)
        },
        "/dashboard": {
            "get": _page_op(
                "The dashboard page; with ?token= it sets the session cookie",
                query=("token",),
                content="text/html",
                more={
                    "303": "token taken: the session cookie is set, see the page",
                    "401": "no session, or a bad token: a page that asks for a token",
                },
            )
        },
        "/dashboard/feed": {"get": _page_op("The mesh as Server-Sent Events", content=_SSE)},
        "/dashboard/why": {
            "get": _page_op(
                "A task's auction record, from the node that submitted it",
                query=("node", "task"),
                more={"400": "node or task missing", "404": "no such record here"},
            )
        },
        "/dashboard/static/{name}": {
            "get": _page_op(
                "The page's script and style",
                path=("name",),
                content="text/plain",
                more={"404": "no such file"},
            )
        },
        INVITES_PATH: {
            "post": _op(
                "Issue a one-time join code (valid for `minutes`, one attempt)",
                body={
                    "type": "object",
                    "properties": {"minutes": {"type": "number", "minimum": 0}},
                },
            ),
            "get": _op("The join codes this node issued: nameplate, state, expiry (no words)"),
        },
        INVITES_PATH + "/{nameplate}": {
            "delete": _op(
                "Revoke an open join code", params=("nameplate",), more={"404": "no open invite"}
            )
        },
        JOIN_PREFIX + "{nameplate}": {
            "get": _join_op(
                "Whether an invite is open here (no key needed; rate-limited)",
                {
                    "200": "open",
                    "404": "no invite by that nameplate",
                    "410": "the invite is used, revoked or expired",
                    "429": "rate limit",
                },
                body=False,
            ),
            "post": _join_op(
                "One SPAKE2 exchange for an invite: burns it; answers with the sealed mesh key"
                " (no key needed; rate-limited, 1 KiB)",
                {
                    "200": '{"pake", "sealed", "node"}',
                    "400": "malformed request or SPAKE2 message (the invite is used)",
                    "404": "no invite by that nameplate",
                    "408": "the body did not arrive in time",
                    "409": "a SPAKE2 message sent before (replay)",
                    "410": "the invite is used, revoked or expired",
                    "413": "body over 1 KiB",
                    "429": "rate limit",
                },
                body=True,
            ),
        },
        PROBE_PATH: {
            "post": _op(
                "Whether this node can reach a node at `address` (for mesh-node doctor)",
                body={
                    "type": "object",
                    "required": ["address"],
                    "properties": {"address": {"type": "string"}},
                },
            )
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (no key needed)",
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This description (no key needed)",
                "responses": {"200": {"description": "OpenAPI 3.0 JSON"}},
            }
        },
    },
}
