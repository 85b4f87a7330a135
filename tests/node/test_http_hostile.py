"""Hostile HTTP against real nodes (``test`` preset): nothing a client or a stranger sends
crashes, stalls or fools a node (issue 11, items 1, 3 and 4 for the HTTP API).

Numbers out of range and deep nesting get a 400; unsigned bodies are refused on their
headers and never read; slow bodies and half-open connections are dropped after their
timeouts; one address holds a bounded number of connections; a request signed for one
node is refused by another. After each, the node is still up and serves an honest client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import aiohttp
import pytest

from mesh.client import AsyncClient, key_bytes, sign_request
from mesh.config import NodeConfig
from mesh.errors import LocalProtocolError
from tests.node.conftest import Cluster, Node

CONFIG = NodeConfig.test()
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def duo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Nodes ``a`` and ``b`` of one mesh (``b`` joined ``a``)."""
    c = Cluster(tmp_path_factory.mktemp("hostile"))
    try:
        c.start("a")
        c.start("b")
        yield c
    finally:
        c.close()


def _host_port(node: Node) -> tuple[str, int]:
    host, port = node.address.rsplit(":", 1)
    return host, int(port)


def _head(method: str, path: str, headers: Mapping[str, str], length: int | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: mesh"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _status(reader: asyncio.StreamReader) -> int | None:
    """The status of the answer, None if the node closed the connection without one."""
    try:
        async with asyncio.timeout(30):
            line = await reader.readline()
    except ConnectionError:
        return None
    return int(line.split()[1]) if line else None


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Whether the node closes the connection (reading and dropping what it answered)."""
    try:
        async with asyncio.timeout(30):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    return True


async def _call(
    c: Cluster, node: str, method: str, path: str, body: bytes = b"", *, to: str | None = None
) -> tuple[int, object]:
    headers = sign_request(key_bytes(c.key), method, path, body, time.time(), to=to or node)
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, c.nodes[node].url + path, data=body, headers=headers) as r,
    ):
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def _still_serves(c: Cluster, node: str) -> None:
    assert c.nodes[node].proc.poll() is None, f"node {node} died"
    body = json.dumps({"task": "echo", "args": [7], "wait": 30}).encode()
    status, reply = await _call(c, node, "POST", "/v1/tasks", body)
    assert status == 200
    assert isinstance(reply, dict)
    assert reply["result"] == 7


def _rss_kib(node: Node) -> int:
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ---------------------------------------------------------------------------------------
# Numbers and nesting
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"task": "echo", "timeout": NaN}', "NaN"),
        (b'{"task": "echo", "timeout": Infinity}', "Infinity"),
        (b'{"task": "echo", "timeout": -Infinity}', "-Infinity"),
        (b'{"task": "echo", "timeout": 1e400}', "out of range"),
        (b'{"task": "echo", "timeout": 1e300}', "timeout must be"),
        (b'{"task": "echo", "timeout": 1' + b"0" * 300 + b"}", "timeout must be"),
        (b'{"task": "echo", "timeout": -1}', "timeout must be"),
        (b'{"task": "echo", "timeout": 0}', "timeout must be"),
        (b'{"task": "echo", "wait": NaN}', "NaN"),
        (b'{"task": "echo", "wait": 1e300}', '"wait" must be'),
        (b'{"task": "echo", "wait": -5}', '"wait" must be'),
        (b'{"task": "echo", "wait": "soon"}', '"wait" must be'),
        (b'{"task": "echo", "resources": {"gpu": NaN}}', "NaN"),
        (b'{"task": "echo", "resources": {"gpu": 1e300}}', "resources must"),
        (b'{"task": "echo", "resources": {"gpu": -1}}', "resources must"),
        (b'{"task": "echo", "args": [' + b"[" * 600 + b"]" * 600 + b"]}", "nested too deeply"),
        (b'{"task": "echo", "args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too deeply"),
        (b'{"task": "echo", "args": [{"$ref": "x", "holder": "a", "nbytes": -1}]}', "reference"),
    ],
)
async def test_numbers_out_of_range_and_deep_nesting_get_400(
    duo: Cluster, body: bytes, reason: str
) -> None:
    status, reply = await _call(duo, "a", "POST", "/v1/tasks", body)
    assert status == 400, reply
    assert isinstance(reply, dict)
    assert reason in reply["error"]
    await _still_serves(duo, "a")


@pytest.mark.parametrize("wait", ["nan", "inf", "-inf", "-1", "1e300", "soon"])
async def test_a_long_poll_wait_out_of_range_gets_400(duo: Cluster, wait: str) -> None:
    status, reply = await _call(duo, "a", "GET", f"/v1/tasks/some-task?wait={wait}")
    assert status == 400, reply
    assert isinstance(reply, dict)
    assert "wait must be" in reply["error"]
    assert duo.nodes["a"].proc.poll() is None


async def test_a_bad_submission_on_a_session_fails_that_task_only(duo: Cluster) -> None:
    deep: list[object] = []
    for _ in range(CONFIG.api_max_nesting + 5):
        deep = [deep]
    async with await AsyncClient.connect(duo.nodes["a"].url, duo.key) as c:
        bad = [
            c.submit_with("echo", [1], timeout=float("nan")),
            c.submit_with("echo", [1], timeout=1e300),
            c.submit_with("echo", [1], resources={"cpu": float("inf")}),
            c.submit("echo", deep),
        ]
        good = c.submit("echo", 5)
        for f in bad:
            with pytest.raises(LocalProtocolError):
                await f
        assert await good == 5
        assert await c.submit("echo", 6) == 6  # the session goes on
    await _still_serves(duo, "a")


# ---------------------------------------------------------------------------------------
# Authentication before the body; body limits and timeouts
# ---------------------------------------------------------------------------------------


async def test_an_unsigned_huge_body_gets_401_before_it_is_sent(duo: Cluster) -> None:
    reader, writer = await asyncio.open_connection(*_host_port(duo.nodes["a"]))
    head = _head("POST", "/v1/tasks", {"Content-Type": "application/json"}, 300 * MIB)
    writer.write(head + b'{"task": ')
    assert await _status(reader) == 401
    assert await _closed(reader)
    writer.close()
    await _still_serves(duo, "a")


async def test_unsigned_100_mb_bodies_leave_the_rss_flat(duo: Cluster) -> None:
    node = duo.nodes["a"]
    before = _rss_kib(node)
    chunk = b"x" * MIB
    sent = []
    for _ in range(3):
        _reader, writer = await asyncio.open_connection(*_host_port(node))
        writer.write(_head("POST", "/v1/tasks", {}, 100 * MIB))
        n = 0
        try:
            async with asyncio.timeout(30):
                for _ in range(100):
                    writer.write(chunk)
                    await writer.drain()
                    n += 1
        except ConnectionError:
            pass
        sent.append(n)
        writer.close()
    # The node closed each connection after its 401: most of each body was never sent.
    assert max(sent) < 100, sent
    assert _rss_kib(node) - before < 20 * 1024
    await _still_serves(duo, "a")


async def test_a_signed_body_over_the_route_limit_gets_413_before_it_is_sent(
    duo: Cluster,
) -> None:
    key = key_bytes(duo.key)
    cases = [
        ("POST", "/v1/tasks", CONFIG.http_submit_body_bytes + 1),
        ("GET", "/v1/status", CONFIG.http_small_body_bytes + 1),
    ]
    for method, path, length in cases:
        headers = sign_request(key, method, path, b"", time.time(), to="a")
        reader, writer = await asyncio.open_connection(*_host_port(duo.nodes["a"]))
        writer.write(_head(method, path, headers, length) + b"{}")
        assert await _status(reader) == 413
        writer.close()
    await _still_serves(duo, "a")


async def test_a_slow_body_is_dropped_after_the_body_timeout(duo: Cluster) -> None:
    body = json.dumps({"task": "echo", "args": ["x" * 1000]}).encode()
    headers = sign_request(key_bytes(duo.key), "POST", "/v1/tasks", body, time.time(), to="a")
    reader, writer = await asyncio.open_connection(*_host_port(duo.nodes["a"]))
    writer.write(_head("POST", "/v1/tasks", headers, len(body)) + body[:10])
    assert await _status(reader) == 408
    assert await _closed(reader)
    writer.close()
    await _still_serves(duo, "a")


async def test_a_body_other_than_the_signed_one_is_refused(duo: Cluster) -> None:
    signed = json.dumps({"task": "echo", "args": [1]}).encode()
    sent = json.dumps({"task": "fail", "args": [1]}).encode()
    headers = sign_request(key_bytes(duo.key), "POST", "/v1/tasks", signed, time.time(), to="a")
    async with (
        aiohttp.ClientSession() as s,
        s.post(duo.nodes["a"].url + "/v1/tasks", data=sent, headers=headers) as r,
    ):
        assert r.status == 401
        assert "does not match its signed hash" in (await r.json())["error"]
    await _still_serves(duo, "a")


# ---------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------


async def test_half_open_connections_are_closed_after_the_head_timeout(duo: Cluster) -> None:
    conns = [await asyncio.open_connection(*_host_port(duo.nodes["b"])) for _ in range(40)]
    for i, (_, writer) in enumerate(conns):
        if i % 2:  # half send a head they never finish, half send nothing
            writer.write(b"GET /v1/status HTTP/1.1\r\nHost: mesh\r\n")
    for reader, _ in conns:
        assert await _status(reader) is None
    for _, writer in conns:
        writer.close()
    await _still_serves(duo, "b")


async def test_one_address_holds_at_most_the_cap_of_connections(duo: Cluster) -> None:
    cap = CONFIG.http_max_connections_per_address
    kept: list[asyncio.StreamWriter] = []
    refused = None
    try:
        # Idle kept-alive connections (each answered once); peer links count as well.
        for _ in range(cap + 1):
            reader, writer = await asyncio.open_connection(*_host_port(duo.nodes["b"]))
            kept.append(writer)
            writer.write(b"GET /v1/hello HTTP/1.1\r\nHost: mesh\r\n\r\n")
            if await _status(reader) is None:
                refused = len(kept)
                break
            await reader.readuntil(b"}")
        assert refused is not None, f"{cap + 1} connections from one address were all served"
        assert refused <= cap + 1
    finally:
        for writer in kept:
            writer.close()
    # Once they are closed the address is served again.
    deadline = time.monotonic() + 10
    while True:
        try:
            await _still_serves(duo, "b")
            break
        except (aiohttp.ClientError, AssertionError):
            assert time.monotonic() < deadline, "b does not serve again after the connections"
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------
# Requests bound to their receiver
# ---------------------------------------------------------------------------------------


async def test_a_request_signed_for_a_is_refused_by_b(duo: Cluster) -> None:
    key = key_bytes(duo.key)
    body = json.dumps({"task": "echo", "args": [1], "wait": 30}).encode()

    async def send(node: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        async with (
            aiohttp.ClientSession() as s,
            s.post(duo.nodes[node].url + "/v1/tasks", data=body, headers=headers) as r,
        ):
            return r.status, await r.json()

    # Captured on its way to a (used there, or not yet): b refuses it either way.
    captured = sign_request(key, "POST", "/v1/tasks", body, time.time(), to="a")
    fresh = sign_request(key, "POST", "/v1/tasks", body, time.time(), to="a")
    assert (await send("a", captured))[0] == 200
    before = await _rejected(duo, "b")
    for headers in (captured, fresh):
        status, reply = await send("b", headers)
        assert status == 401
        assert "this request is for node a, not b" in reply["error"]
    assert await _rejected(duo, "b") == before + 2
    # So is a session handshake.
    handshake = sign_request(key, "GET", "/v1/session", b"", time.time(), to="a")
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(duo.nodes["b"].url + "/v1/session", headers=handshake)
    assert info.value.status == 401
    await _still_serves(duo, "b")


async def test_hello_is_public_and_names_the_node(duo: Cluster) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(duo.nodes["b"].url + "/v1/hello") as r,
    ):
        assert r.status == 200
        hello = await r.json()
    assert hello["id"] == "b"
    assert set(hello) == {"id", "version", "mesh", "instance"}
    status, spec = await _call(duo, "b", "GET", "/openapi.json")
    assert status == 200
    assert isinstance(spec, dict)
    assert "/v1/hello" in spec["paths"]


async def _rejected(c: Cluster, node: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(c.nodes[node].url + "/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mesh_rejected_frames_total{")
    )
