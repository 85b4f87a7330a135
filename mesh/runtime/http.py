"""Talking to a node over HTTP: its routes, signed JSON requests, and object transfer.

What a client, the CLI and a node fetching a task's inputs from their holder share. Every
request is signed for the node it goes to (``mesh.runtime.auth.sign_request``), whose id is learnt
once from its public ``/v1/hello`` (``node_id_at``).

An object is fetched from its holder with ``GET /v1/objects/{id}``. A fetcher on the
holder's own machine adds its ``mesh.runtime.shm.host_id``, and the holder then answers with the
shared-memory segment that holds the body (a ``mesh.protocol.messages.Segment``) instead of sending
it; otherwise the body is read chunk by chunk into one buffer of the announced size.
Bodies that travel are sealed (``mesh.protocol.sealing``): the fetcher puts its X25519
share in the signed path (``SEAL_PARAM``), the holder answers with its own share and size
in ``SEAL_HEADER`` / ``SIZE_HEADER`` and the body in sealed pieces under keys only the two
of them hold, so a body crossing the network is private to them.

It keeps no state: the caller owns the ``aiohttp.ClientSession``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Callable
from typing import Any, Final

import aiohttp

from mesh.errors import (
    AuthenticationError,
    LocalProtocolError,
    MeshError,
    ObjectLostError,
    RemoteProtocolError,
)
from mesh.protocol.codec import Buffer, key_fingerprint, loads
from mesh.protocol.messages import ObjectRef, Segment
from mesh.protocol.sealing import OBJECT_CONTEXT, BodyOpener, Exchange, Opener, sealed_size
from mesh.runtime.auth import sign_request
from mesh.runtime.shm import is_object_segment, map_object

DEFAULT_PORT: Final = 7470
"""The port ``mesh-node start`` listens on unless told otherwise."""

DEFAULT_URL: Final = f"http://127.0.0.1:{DEFAULT_PORT}"

SESSION_PATH: Final = "/v1/session"
"""The client's websocket (``mesh.protocol.session`` messages)."""
HELLO_PATH: Final = "/v1/hello"
"""Public: the node's id, version and mesh key fingerprint (what a client signs for)."""

OBJECT_CONTENT_TYPE: Final = "application/x-mesh-body"
SEGMENT_CONTENT_TYPE: Final = "application/x-mesh-segment"
"""A holder's answer to a fetch from its own machine: where the body is, not the body."""
HOST_PARAM: Final = "host"
"""Query parameter of ``GET /v1/objects/{id}`` naming the fetcher's ``host_id``."""
SEAL_PARAM: Final = "seal"
"""Query parameter of ``GET /v1/objects/{id}``: the fetcher's X25519 share, in hex."""
SEAL_HEADER: Final = "X-Mesh-Seal"
"""The holder's X25519 share (hex) on a sealed body."""
SIZE_HEADER: Final = "X-Mesh-Size"
"""The size of a sealed body before sealing."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalise_url(url: str | None) -> str:
    """``host:port`` or a URL -> ``http://host:port`` (no trailing slash)."""
    if not url:
        return DEFAULT_URL
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


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


def _segment_answer(data: bytes, ref: ObjectRef) -> Segment:
    """The segment a holder named in its answer, checked against ``ref``."""
    try:
        body = json.loads(data)
        name, nbytes = body["segment"], body["nbytes"]
    except (ValueError, TypeError, KeyError):
        raise RemoteProtocolError("malformed segment answer", reason="bad-segment") from None
    if not isinstance(name, str) or not is_object_segment(name):
        raise RemoteProtocolError(f"bad object segment name {name!r}", reason="bad-segment")
    if type(nbytes) is not int or nbytes <= 0 or (ref.nbytes and nbytes != ref.nbytes):
        raise RemoteProtocolError(
            f"object {ref.id}: segment of {nbytes!r} bytes, the reference says {ref.nbytes}",
            reason="bad-segment",
        )
    return Segment(name=name, nbytes=nbytes)


def _sealed_size(
    resp: aiohttp.ClientResponse, ref: ObjectRef, key: bytes, exchange: Exchange
) -> tuple[int, Opener]:
    """The size of a sealed answer's body and what opens it, from its headers;
    ``RemoteProtocolError`` if they do not describe one."""
    share, size = resp.headers.get(SEAL_HEADER), resp.headers.get(SIZE_HEADER, "")
    if share is None:
        raise RemoteProtocolError(
            f"object {ref.id}: the holder sent it unsealed", reason="unsealed"
        )
    try:
        public = bytes.fromhex(share)
    except ValueError:
        raise RemoteProtocolError("bad key share", reason="bad-handshake") from None
    if not size.isdigit() or int(size) <= 0 or resp.content_length != sealed_size(int(size)):
        raise RemoteProtocolError(f"object {ref.id}: bad sealed size", reason="bad-size")
    _, opener = exchange.keys(key, public, initiator=True, context=OBJECT_CONTEXT)
    return int(size), opener


async def _read_into(
    resp: aiohttp.ClientResponse,
    ref: ObjectRef,
    allocate: Callable[[int], Buffer],
    sealed: tuple[int, Opener] | None,
) -> Buffer:
    """The response body, read chunk by chunk (and opened, if sealed) into one buffer of
    the announced size."""
    size = resp.content_length if sealed is None else sealed[0]
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
    opener = None if sealed is None else BodyOpener(sealed[1], size, view)
    # iter_chunks hands over each received chunk as it is; readany() would join them first.
    async for chunk, _ in resp.content.iter_chunks():
        if opener is not None:
            opener.feed(chunk)
            pos = opener.opened
            continue
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
    sealed: bool = True,
) -> Segment | Buffer:
    """The encoded body of ``ref`` from the node at ``address`` (``host:port``), which
    must be its holder: the request is signed for ``ref.holder``.

    ``host`` is the fetcher's ``host_id()``: a holder on the same machine then answers with
    the shared-memory segment that holds the body (a ``Segment``, checked but not opened)
    instead of sending it. Otherwise the body is read into ``allocate(size)``, one buffer of
    the announced size, and that buffer is returned. Raises ``ObjectLostError`` if the
    holder does not have it (or cannot be reached), ``RemoteProtocolError`` for an answer
    that does not match ``ref``. ``sealed`` (the default) asks for the body sealed and
    refuses it otherwise (``RemoteProtocolError``, reason ``unsealed``).
    """
    path = f"/v1/objects/{ref.id}"
    query = [f"{HOST_PARAM}={host}"] if host else []
    exchange = Exchange() if sealed else None
    if exchange is not None:
        query.append(f"{SEAL_PARAM}={exchange.public.hex()}")
    if query:
        path += "?" + "&".join(query)
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
            sealed_as = None if exchange is None else _sealed_size(resp, ref, key, exchange)
            return await _read_into(resp, ref, allocate, sealed_as)
    except aiohttp.ClientError as exc:
        raise ObjectLostError(ref.id, ref.holder) from exc


async def fetch_bytes(
    session: aiohttp.ClientSession,
    key: bytes,
    address: str,
    ref: ObjectRef,
    *,
    allocate: Callable[[int], Buffer] = bytearray,
    sealed: bool = True,
) -> Buffer:
    """``fetch_body`` without a host: always the bytes, read into ``allocate(size)``."""
    body = await fetch_body(session, key, address, ref, allocate=allocate, sealed=sealed)
    if isinstance(body, Segment):  # fetch_body refuses segment answers to remote fetches
        raise RemoteProtocolError("segment answer to a remote fetch", reason="bad-segment")
    return body


async def fetch_object(
    session: aiohttp.ClientSession,
    key: bytes,
    address: str,
    ref: ObjectRef,
    *,
    host: str = "",
    sealed: bool = True,
) -> Any:
    """The value behind ``ref``, fetched from the node at ``address`` (``host:port``).

    With ``host`` (this machine's ``host_id()``) a holder on the same machine lends its
    segment: the value's arrays are read-only views of it, with no copy at all.
    """
    body = await fetch_body(session, key, address, ref, host=host, sealed=sealed)
    if isinstance(body, Segment):
        try:
            mapping = await asyncio.to_thread(map_object, body.name, body.nbytes)
        except (FileNotFoundError, PermissionError):
            # The name is gone (the object spilled, or was released, since it was lent) or
            # is another user's, whose segments are private: take the bytes instead. The
            # holder answers that as for any fetch, with the body or "lost".
            body = await fetch_bytes(session, key, address, ref, sealed=sealed)
        else:
            return loads(memoryview(mapping))
    return loads(body)
