"""Joining with a code over a real node's HTTP API (``node.join`` behind ``node.api``): the
exchange gives the key; malformed, replayed and repeated attempts, oversized bodies, too
many requests and an invite asked for with another mesh's key are each refused and counted
in ``mesh_rejected_frames``; the node keeps serving."""

from __future__ import annotations

import base64
import json
import secrets
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from mesh.client import key_bytes, sign_request
from mesh.client.local import wait_ready
from node.join import Joiner
from tests.node.conftest import NODE, ROOT, Cluster, node_env, wait_for


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("join"))
    try:
        c.start("a")
        yield c
    finally:
        c.close()


async def _signed(
    c: Cluster, method: str, path: str, body: bytes = b"", key: str = ""
) -> tuple[int, object]:
    headers = sign_request(key_bytes(key or c.key), method, path, body, time.time(), to="a")
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, c.nodes["a"].url + path, data=body, headers=headers) as r,
    ):
        return r.status, await r.json()


async def _invite(c: Cluster) -> str:
    status, reply = await _signed(c, "POST", "/v1/invites", json.dumps({"minutes": 5}).encode())
    assert status == 200, reply
    assert isinstance(reply, dict)
    return str(reply["code"])


async def _join(c: Cluster, nameplate: str, body: bytes) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{c.nodes['a'].url}/v1/join/{nameplate}", data=body) as r,
    ):
        return r.status, await r.json()


def _pake(message: bytes) -> bytes:
    return json.dumps({"pake": base64.b64encode(message).decode()}).encode()


async def _rejected(c: Cluster) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(c.nodes["a"].url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("mesh_rejected_frames_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


async def test_the_exchange_gives_the_key_once(solo: Cluster) -> None:
    code = await _invite(solo)
    joiner = Joiner(code)
    status, reply = await _join(solo, joiner.nameplate, _pake(joiner.message))
    assert status == 200, reply
    pake = base64.b64decode(str(reply["pake"]))
    sealed = base64.b64decode(str(reply["sealed"]))
    assert joiner.finish(pake, sealed) == solo.key
    before = await _rejected(solo)
    # The same message again is a replay; a fresh one on the used code is refused too.
    status, _ = await _join(solo, joiner.nameplate, _pake(joiner.message))
    assert status == 409
    status, _ = await _join(solo, joiner.nameplate, _pake(Joiner(code).message))
    assert status == 410
    after = await _rejected(solo)
    assert after.get("join-replayed-message", 0) == before.get("join-replayed-message", 0) + 1
    assert after.get("join-used-code", 0) == before.get("join-used-code", 0) + 1


async def test_malformed_messages_are_refused_and_burn_the_code(solo: Cluster) -> None:
    code = await _invite(solo)
    nameplate = code.split("-")[0]
    before = await _rejected(solo)
    status, reply = await _join(solo, nameplate, b'{"pake": "not base64!"}')
    assert status == 400, reply
    status, _ = await _join(solo, nameplate, _pake(Joiner(code).message))
    assert status == 410
    status, _ = await _join(solo, nameplate, b"x" * 5000)
    assert status == 413
    after = await _rejected(solo)
    assert after.get("join-bad-message", 0) == before.get("join-bad-message", 0) + 1
    status, listing = await _signed(solo, "GET", "/v1/invites")
    assert status == 200
    assert isinstance(listing, list)
    assert {i["nameplate"]: i["state"] for i in listing}[nameplate] == "used"


async def test_an_invite_asked_with_another_key_is_refused(solo: Cluster) -> None:
    before = await _rejected(solo)
    status, _ = await _signed(solo, "POST", "/v1/invites", b"{}", key=secrets.token_hex(16))
    assert status == 401
    after = await _rejected(solo)
    assert after.get("http-auth", 0) == before.get("http-auth", 0) + 1
    status, listing = await _signed(solo, "GET", "/v1/invites")
    assert isinstance(listing, list)
    assert all(i["state"] != "open" for i in listing)


def test_start_with_a_code_stores_the_key_and_joins(solo: Cluster, tmp_path: Path) -> None:
    code = solo.cli_json("a", "invite")["code"]
    env = {**node_env(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "fresh")}
    ready, log = tmp_path / "b.ready", tmp_path / "b.log"
    argv = [*NODE, "start", "--host", "127.0.0.1", "--port", "0", "--no-mdns", "--preset"]
    argv += ["test", "--name", "b", "--join", solo.nodes["a"].address, "--ready-file", str(ready)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*argv, "--code", code], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)
        )
    try:
        wait_ready(ready, proc, 60, log=log)
        key_file = tmp_path / "fresh" / "mesh" / "key"
        assert key_file.read_text().strip() == solo.key
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        wait_for(lambda: solo.states("a").get("b") == "alive", 30, "b alive at a")
        # The same code again, on a machine with no key: refused, and nothing is written.
        again = tmp_path / "again"
        out2 = subprocess.run(
            [*argv[:-1], str(tmp_path / "c.ready"), "--code", code],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "XDG_CONFIG_HOME": str(again)},
            cwd=str(ROOT),
        )
        assert out2.returncode == 1
        assert "used" in out2.stderr
        assert not (again / "mesh" / "key").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_join_requests_are_rate_limited(solo: Cluster) -> None:
    statuses = []
    async with aiohttp.ClientSession() as s:
        for _ in range(40):
            async with s.get(f"{solo.nodes['a'].url}/v1/join/999") as r:
                statuses.append(r.status)
    assert 429 in statuses
    assert set(statuses) <= {404, 429}
    assert (await _rejected(solo)).get("join-rate-limited", 0) >= 1
    status, _ = await _signed(solo, "GET", "/v1/status")
    assert status == 200
