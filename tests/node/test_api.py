"""The HTTP API of a real node: authentication, bad input, metrics, the peer endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from mesh.client import AsyncClient, key_bytes, sign_request
from mesh.protocol.codec import dumps, loads
from mesh.protocol.sealing import SESSION_CONTEXT, Exchange
from mesh.protocol.session import Results, SessionError, Submission, Submit, decode_reply
from mesh.runtime.http import SEAL_PARAM, SESSION_PATH
from tests.node.conftest import Cluster, wait_for


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("solo"))
    try:
        c.start("solo")
        yield c
    finally:
        c.close()


async def call(
    c: Cluster,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    sign_body: bytes | None = None,
    now: float | None = None,
    to: str = "solo",
) -> tuple[int, Any]:
    """One request to the node; signed with ``key`` (default: the mesh key) for node ``to``
    unless ``headers`` are given. Returns status and decoded JSON (or text)."""
    if headers is None:
        kb = key_bytes(key or c.key)
        signed = body if sign_body is None else sign_body
        stamp = time.time() if now is None else now
        headers = sign_request(kb, method, path, signed, stamp, to=to)
    headers = {**headers, "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, c.nodes["solo"].url + path, data=body, headers=headers) as r,
    ):
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


def rejected_total(metrics: str) -> float:
    return sum(
        float(m.group(1))
        for m in re.finditer(r"^mesh_rejected_frames_total\{[^}]*\} (\S+)$", metrics, re.M)
    )


async def metrics(c: Cluster) -> str:
    status, text = await call(c, "GET", "/metrics", headers={})
    assert status == 200
    assert isinstance(text, str)
    return text


async def test_requests_without_a_valid_proof_get_401_and_change_nothing(solo: Cluster) -> None:
    status, body = await call(solo, "GET", "/v1/status", headers={})
    assert status == 401
    assert "authentication failed" in body["error"]
    _, before = await call(solo, "GET", "/v1/status")
    submit = json.dumps({"task": "echo", "args": [1], "wait": 5}).encode()
    attempts = [
        await call(solo, "POST", "/v1/tasks", submit, key="not the mesh key"),
        await call(solo, "POST", "/v1/tasks", submit, sign_body=b"{}"),  # body swapped
        await call(solo, "POST", "/v1/tasks", submit, now=time.time() - 3600),  # stale
    ]
    for status, body in attempts:
        assert status == 401
        assert "authentication failed" in body["error"]
    _, after = await call(solo, "GET", "/v1/status")
    assert after["outcomes"] == before["outcomes"]
    assert after["completed"] == before["completed"]


async def test_a_replayed_request_is_refused(solo: Cluster) -> None:
    headers = sign_request(key_bytes(solo.key), "GET", "/v1/status", b"", time.time(), to="solo")
    first, _ = await call(solo, "GET", "/v1/status", headers=headers)
    again, _ = await call(solo, "GET", "/v1/status", headers=headers)
    assert first == 200
    assert again == 401


async def test_submit_and_read_back(solo: Cluster) -> None:
    body = json.dumps({"task": "echo", "args": {"x": [1, "two"]}, "wait": 30}).encode()
    status, reply = await call(solo, "POST", "/v1/tasks", body)
    assert status == 200
    assert reply["ok"] is True
    assert reply["result"] == [1, "two"]
    assert reply["node"] == "solo"
    status, info = await call(solo, "GET", f"/v1/tasks/{reply['task_id']}")
    assert status == 200
    assert info["state"] == "done"
    assert info["result"] == [1, "two"]
    status, _ = await call(solo, "GET", "/v1/tasks/no-such-task")
    assert status == 404


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"args": []}).encode(), '"task"'),
        (json.dumps({"task": "echo", "args": 5}).encode(), '"args"'),
        (json.dumps({"task": "echo", "timeout": -1}).encode(), "timeout"),
    ],
)
async def test_malformed_submissions_get_400_with_the_reason(
    solo: Cluster, body: bytes, reason: str
) -> None:
    status, reply = await call(solo, "POST", "/v1/tasks", body)
    assert status == 400
    assert reason in reply["error"]


async def test_unknown_task_fails_at_once_naming_what_is_missing(solo: Cluster) -> None:
    started = time.monotonic()
    body = json.dumps({"task": "no_such_task", "wait": 30}).encode()
    status, reply = await call(solo, "POST", "/v1/tasks", body)
    assert status == 200
    assert reply["ok"] is False
    assert "no peer can run no_such_task" in reply["error"]
    assert "task=no_such_task" in reply["error"]
    assert time.monotonic() - started < 10


async def test_metrics_and_openapi_need_no_key(solo: Cluster) -> None:
    text = await metrics(solo)
    for name in (
        "mesh_peers",
        "mesh_tasks_total",
        "mesh_bids_total",
        "mesh_bytes_sent_total",
        "mesh_bytes_received_total",
        "mesh_rejected_frames_total",
    ):
        assert name in text
    assert 'mesh_peers{state="alive"}' in text
    status, spec = await call(solo, "GET", "/openapi.json", headers={})
    assert status == 200
    assert spec["openapi"].startswith("3.")
    assert {"/v1/tasks", "/v1/peers", "/v1/status", "/metrics"} <= set(spec["paths"])


async def test_junk_on_the_peer_endpoint_drops_the_connection(solo: Cluster) -> None:
    before = rejected_total(await metrics(solo))
    url = f"ws://{solo.nodes['solo'].address}/mesh/ws"
    junk = [os.urandom(200), b"M\x01" + os.urandom(100), os.urandom(3 * 1024 * 1024)]
    dropped = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    async with aiohttp.ClientSession() as s:
        for payload in junk:
            async with s.ws_connect(url, max_msg_size=0) as ws:
                try:
                    await ws.send_bytes(payload)
                except (ConnectionError, aiohttp.ClientError):
                    # The node may drop the connection before a big frame is all written:
                    # that is the very behaviour under test.
                    continue
                msg = await ws.receive(timeout=10)
                assert msg.type in dropped
            assert ws.closed
        async with s.ws_connect(url) as ws:
            await ws.send_str("hello")
            msg = await ws.receive(timeout=10)
            assert msg.type in dropped

    async def counted() -> bool:
        return rejected_total(await metrics(solo)) >= before + 4

    deadline = time.monotonic() + 10
    while not await counted():
        assert time.monotonic() < deadline, "rejected frames were not counted"
        await asyncio.sleep(0.1)
    assert solo.nodes["solo"].proc.poll() is None
    status, reply = await call(
        solo, "POST", "/v1/tasks", json.dumps({"task": "echo", "args": [7], "wait": 30}).encode()
    )
    assert status == 200
    assert reply["result"] == 7


def test_port_in_use_is_a_one_line_error(solo: Cluster, tmp_path: Any) -> None:
    other = Cluster(tmp_path, key=solo.key)
    port = solo.nodes["solo"].address.rsplit(":", 1)[1]
    try:
        node = other.start("second", "--port", port, join=False, wait=False)
        code = node.proc.wait(timeout=60)
        lines = node.output().strip().splitlines()
    finally:
        other.close()
    assert code == 1
    assert len(lines) == 1
    assert port in lines[0]
    assert "in use" in lines[0]
    wait_for(lambda: solo.nodes["solo"].proc.poll() is None, 1, "the first node still up")


async def sealed_session(c: Cluster, public: bytes) -> tuple[aiohttp.ClientSession, Any]:
    path = f"{SESSION_PATH}?{SEAL_PARAM}={public.hex()}"
    headers = sign_request(key_bytes(c.key), "GET", path, b"", time.time(), to="solo")
    http = aiohttp.ClientSession()
    return http, await http.ws_connect(c.nodes["solo"].url + path, headers=headers)


async def test_a_sealed_session_says_everything_sealed_and_refuses_anything_else(
    solo: Cluster,
) -> None:
    # A client on another machine asks with its X25519 share; the node answers with its
    # own, and from then on each message, both ways, opens only with the keys the two give.
    kb = key_bytes(solo.key)
    exchange = Exchange()
    http, ws = await sealed_session(solo, exchange.public)
    async with http, ws:
        share = await ws.receive_bytes(timeout=10)
        sealer, opener = exchange.keys(kb, share, initiator=True, context=SESSION_CONTEXT)
        marker = "sealed-session-marker"
        submit = Submit(tasks=(Submission(cid=1, name="echo", args=(marker,), kwargs={}),))
        await ws.send_bytes(sealer.seal(dumps(submit.encode())))
        sealed = await ws.receive_bytes(timeout=30)
        assert marker.encode() not in sealed
        reply = decode_reply(loads(opener.open(sealed)))
        assert isinstance(reply, Results)
        assert [(cid, o.value) for cid, o in reply.items] == [(1, marker)]
        before = rejected_total(await metrics(solo))
        # The same message unsealed ends the session, counted.
        await ws.send_bytes(dumps(submit.encode()))
        error = decode_reply(loads(opener.open(await ws.receive_bytes(timeout=10))))
        assert isinstance(error, SessionError)
        assert "failed to open" in error.message
        assert (await ws.receive(timeout=10)).type in {WSMsgType.CLOSE, WSMsgType.CLOSED}
    assert rejected_total(await metrics(solo)) == before + 1


@pytest.mark.parametrize("share", ["zz" * 32, "01" * 31, ""])
async def test_a_bad_session_share_is_refused_before_the_session(solo: Cluster, share: str) -> None:
    status, reply = await call(solo, "GET", f"{SESSION_PATH}?{SEAL_PARAM}={share}")
    assert status == 400
    assert "X25519" in reply["error"]


@pytest.mark.parametrize("sealed", [True, False])
async def test_a_client_on_this_machine_seals_its_session_when_asked(
    solo: Cluster, sealed: bool
) -> None:
    url = solo.nodes["solo"].url
    async with await AsyncClient.connect(url, solo.key, sealed=sealed) as c:
        assert c.sealed is sealed
        assert await c.submit("echo", [1, "two"]) == [1, "two"]
    async with await AsyncClient.connect(url, solo.key) as c:
        assert not c.sealed  # loopback: nothing leaves the machine
