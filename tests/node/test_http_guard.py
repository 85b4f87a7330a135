"""The HTTP edge in process: ``node.api.Api`` behind ``node.http_guard.GuardedSite`` on
127.0.0.1, in front of a stand-in for the daemon, with limits small enough to reach.

What a real node does with the same code is in ``test_http_hostile.py``; here the counters
are read directly: every refusal is counted under its own reason, connections are closed
after the head timeout or past a cap, and an unexpected error is one named 500.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from mesh.config import NodeConfig
from mesh.errors import AuthenticationError
from mesh.protocol.messages import TaskId
from mesh.runtime.auth import key_bytes, sign_request
from mesh.runtime.http import node_id_at, request_json
from node.api import Api, Deliver, Service
from node.http_guard import ConnectionGuard, GuardedSite

KEY = key_bytes("guard test key")
CONFIG = dataclasses.replace(
    NodeConfig.test(),
    http_header_timeout_s=0.3,
    http_body_timeout_s=0.3,
    http_max_connections_per_address=4,
    http_max_half_open=1024,
)


class FakeService:
    """The parts of the daemon these tests reach; ``status`` can be made to fail."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.node_id = "here"
        self.host_id = ""
        self.broken = False
        self.submitted: list[tuple[str, Mapping[str, Any]]] = []

    def status(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("a bug")
        return {"id": self.node_id}

    def submit(
        self,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        options: Mapping[str, Any],
        deliver: Deliver,
    ) -> TaskId:
        self.submitted.append((name, options))
        return TaskId(f"t{len(self.submitted)}")

    def metrics(self) -> bytes:
        return b""


@asynccontextmanager
async def serve(config: NodeConfig = CONFIG) -> AsyncIterator[tuple[Api, FakeService, str]]:
    fake = FakeService(config)
    api = Api(cast(Service, fake), KEY)
    app = web.Application()
    api.add_routes(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, lingering_time=0)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    try:
        await GuardedSite(runner, sock, guard=api.guard).start()
        yield api, fake, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


async def until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10.0
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Whether the other side closes the connection (without an answer) within 10 s."""
    try:
        async with asyncio.timeout(10.0):
            return await reader.read(1) == b""
    except ConnectionError:
        return True


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_hello_says_who_the_node_is_and_signed_requests_pass() -> None:
    async with serve() as (api, _, url), aiohttp.ClientSession() as s:
        assert await node_id_at(s, KEY, url) == "here"
        with pytest.raises(AuthenticationError, match="another mesh"):
            await node_id_at(s, key_bytes("other"), url)
        assert await request_json(s, KEY, url, "GET", "/v1/status", to="here") == {"id": "here"}
        assert not api.rejected


async def test_a_request_for_another_node_is_counted_as_such() -> None:
    async with serve() as (api, fake, url), aiohttp.ClientSession() as s:
        with pytest.raises(AuthenticationError, match="for node elsewhere, not here"):
            await request_json(s, KEY, url, "GET", "/v1/status", to="elsewhere")
        body = json.dumps({"task": "echo"}).encode()
        headers = sign_request(KEY, "POST", "/v1/tasks", body, time.time(), to="elsewhere")
        async with s.post(url + "/v1/tasks", data=body, headers=headers) as r:
            assert r.status == 401
        assert api.rejected["http-wrong-receiver"] == 2
        assert api.auth.failures == 2
        assert not fake.submitted


async def test_an_unexpected_error_is_a_named_500_and_the_next_request_works() -> None:
    async with serve() as (api, fake, url), aiohttp.ClientSession() as s:
        fake.broken = True
        headers = sign_request(KEY, "GET", "/v1/status", b"", time.time(), to="here")
        async with s.get(url + "/v1/status", headers=headers) as r:
            assert r.status == 500
            reply = await r.json()
        assert reply == {"error": "internal error: RuntimeError", "kind": "InternalError"}
        assert api.internal_errors == 1
        fake.broken = False
        assert await request_json(s, KEY, url, "GET", "/v1/status", to="here") == {"id": "here"}


async def test_refused_bodies_are_counted_by_reason() -> None:
    async with serve() as (api, fake, url):
        port = _port(url)
        # A signed body that does not come in time: 408 after the body timeout.
        headers = sign_request(KEY, "POST", "/v1/tasks", b"x" * 100, time.time(), to="here")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_head("POST", "/v1/tasks", headers, 100) + b"x" * 10)
        status = await asyncio.wait_for(reader.readline(), 10)
        assert status.split()[1] == b"408"
        writer.close()
        # Declared over the route's limit: 413 before a byte of it is read.
        headers = sign_request(KEY, "GET", "/v1/status", b"", time.time(), to="here")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_head("GET", "/v1/status", headers, CONFIG.http_small_body_bytes + 1))
        status = await asyncio.wait_for(reader.readline(), 10)
        assert status.split()[1] == b"413"
        writer.close()
        # The body is not the signed one.
        headers = sign_request(KEY, "POST", "/v1/tasks", b'{"task": "a"}', time.time(), to="here")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_head("POST", "/v1/tasks", headers, 13) + b'{"task": "b"}')
        status = await asyncio.wait_for(reader.readline(), 10)
        assert status.split()[1] == b"401"
        writer.close()
        assert api.rejected == {
            "http-body-timeout": 1,
            "http-body-too-large": 1,
            "http-body-hash": 1,
        }
        assert not fake.submitted


async def test_half_open_connections_are_closed_after_the_head_timeout() -> None:
    async with serve(dataclasses.replace(CONFIG, http_max_connections_per_address=100)) as (
        api,
        _,
        url,
    ):
        conns = [await asyncio.open_connection("127.0.0.1", _port(url)) for _ in range(20)]
        for i, (_, writer) in enumerate(conns):
            if i % 2:  # half of them start a head and never finish it
                writer.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
        await until(lambda: api.guard.half_open == 20, "20 half-open connections")
        for reader, _ in conns:
            assert await closed_by_peer(reader)
        await until(lambda: api.guard.connections == 0, "every connection to be forgotten")
        assert api.guard.half_open == 0
        assert api.rejected["http-header-timeout"] == 20
        for _, writer in conns:
            writer.close()


async def test_a_websocket_lives_past_the_head_timeout() -> None:
    async with serve() as (api, _, url), aiohttp.ClientSession() as s:
        headers = sign_request(KEY, "GET", "/v1/session", b"", time.time(), to="here")
        async with s.ws_connect(url + "/v1/session", headers=headers) as ws:
            await until(lambda: api.sessions == 1, "the session")
            # A connection opened after the websocket is closed by the head timeout...
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(url))
            assert await closed_by_peer(reader)
            writer.close()
            # ... and the websocket still works.
            assert not ws.closed
            await ws.send_bytes(b"not msgpack")
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.BINARY
        assert api.rejected == {"http-header-timeout": 1}


async def test_one_address_holds_at_most_its_cap_of_connections() -> None:
    async with serve() as (api, _, url):
        cap = CONFIG.http_max_connections_per_address
        kept = []
        for _ in range(cap):
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(url))
            writer.write(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.readline(), 10)).split()[1] == b"200"
            kept.append(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(url))
        writer.write(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await closed_by_peer(reader)
        writer.close()
        assert api.rejected["http-too-many-connections"] == 1
        assert api.guard.per_address["127.0.0.1"] == cap
        for w in kept:
            w.close()
        await until(lambda: api.guard.connections == 0, "the kept connections to close")
        async with aiohttp.ClientSession() as s, s.get(url + "/v1/hello") as r:
            assert r.status == 200


async def test_the_half_open_cap_refuses_more_at_once() -> None:
    guard = ConnectionGuard(
        max_per_address=100, max_half_open=3, header_timeout_s=60.0, rejected=Counter()
    )
    opened: list[tuple[asyncio.Protocol, _Transport]] = []
    for _ in range(4):
        protocol = guard.wrap(_Inner)()
        transport = _Transport()
        protocol.connection_made(cast(asyncio.Transport, transport))
        opened.append((protocol, transport))
    assert [t.closed for _, t in opened] == [False, False, False, True]
    assert guard.rejected == {"http-too-many-half-open": 1}
    assert guard.half_open == 3
    opened[0][0].data_received(b"GET / HTTP/1.1\r\n")
    opened[0][0].data_received(b"\r\n")  # the end of a head, split across two reads
    assert guard.half_open == 2
    for protocol, _ in opened:
        protocol.connection_lost(None)
    assert guard.half_open == 0
    assert guard.connections == 0


class _Inner(asyncio.Protocol):
    pass


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def get_extra_info(self, name: str) -> Any:
        return ("10.0.0.1", 1234) if name == "peername" else None

    def close(self) -> None:
        self.closed = True


def _head(method: str, path: str, headers: Mapping[str, str], length: int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
