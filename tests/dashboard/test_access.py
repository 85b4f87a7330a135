"""Bad input at a real node's dashboard: a forged or used token, a cross-site Origin, a wrong
Host header, and a feed client that never reads. Each gets a clear refusal (the slow reader
is dropped and counted), and the node keeps serving everyone else."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from mesh.client.local import LocalMesh
from tests.dashboard.conftest import new_mesh, open_session, token_path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with new_mesh(tmp_path_factory.mktemp("access"), n=2) as mesh:
        yield mesh


def _jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1


async def test_forged_and_used_tokens_get_the_login_page(pair: LocalMesh) -> None:
    url = pair.nodes["node-1"].url
    async with aiohttp.ClientSession(cookie_jar=_jar()) as http:
        async with http.get(url + "/dashboard?token=forged") as resp:
            assert resp.status == 401
            text = await resp.text()
            assert "unknown, used or expired" in text
            assert 'name="token"' in text
        path = await token_path(pair)
        async with http.get(url + path, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/dashboard"
        async with http.get(url + "/dashboard") as resp:
            assert resp.status == 200
            assert "task stream" in (await resp.text()).lower()
        async with aiohttp.ClientSession(cookie_jar=_jar()) as other:
            async with other.get(url + path, allow_redirects=False) as resp:
                assert resp.status == 401, "a token works once"
            async with other.get(url + "/dashboard/feed") as resp:
                assert resp.status == 401
                assert "no dashboard session" in (await resp.json())["error"]


async def test_wrong_host_and_cross_site_origin_are_refused(pair: LocalMesh) -> None:
    url = pair.nodes["node-1"].url
    async with aiohttp.ClientSession(cookie_jar=_jar()) as http:
        await open_session(http, pair)
        async with http.get(url + "/dashboard", headers={"Host": "rebound.example.com"}) as r:
            assert r.status == 403
            assert "wrong Host header" in (await r.json())["error"]
        origin = {"Origin": "http://evil.example"}
        async with http.get(url + "/dashboard/feed", headers=origin) as r:
            assert r.status == 403
            assert "cross-site" in (await r.json())["error"]
        async with http.get(url + "/dashboard/why?node=node-1&task=x", headers=origin) as r:
            assert r.status == 403
        async with http.get(url + "/dashboard/why?node=node-1&task=nope") as r:
            assert r.status == 404  # the same session, from its own origin, is served


def _fail_many(mesh: LocalMesh) -> None:
    with mesh.client("node-2") as c:
        futures = [c.submit("fail", f"{i:04d}" + "x" * 8000) for i in range(40)]
        for f in futures:
            with pytest.raises(Exception, match="xxxx"):
                f.result(timeout=60)


async def _metric(http: aiohttp.ClientSession, url: str, reason: str) -> float:
    async with http.get(url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if f'reason="{reason}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_feed_client_that_never_reads_is_dropped(pair: LocalMesh, tmp_path: Path) -> None:
    url = pair.nodes["node-1"].url
    host, port = urlsplit(url).hostname, urlsplit(url).port
    assert host is not None
    assert port is not None
    async with aiohttp.ClientSession(cookie_jar=_jar()) as http:
        await open_session(http, pair)
        cookie = "; ".join(f"{c.key}={c.value}" for c in http.cookie_jar)
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect((host, port))
        head = f"GET /dashboard/feed HTTP/1.1\r\nHost: {host}:{port}\r\nCookie: {cookie}\r\n\r\n"
        stuck.sendall(head.encode())
        try:
            async with http.get(url + "/dashboard/feed") as reader, asyncio.TaskGroup() as tg:
                assert reader.status == 200
                seen = bytearray()

                async def read() -> None:
                    async for chunk in reader.content.iter_any():
                        seen.extend(chunk)

                reading = tg.create_task(read())
                # About 1 MB of events: failures whose messages are 8 kB each.
                await asyncio.to_thread(_fail_many, pair)
                deadline = time.monotonic() + 40
                while await _metric(http, url, "dashboard-slow-reader") < 1:
                    assert time.monotonic() < deadline, "the stuck feed client was never dropped"
                    await asyncio.sleep(0.5)
                # Only the stuck one: the reading client is served on, and gets what follows.
                with pair.client("node-1") as c:
                    assert await asyncio.to_thread(lambda: c.submit("echo", 1).result(timeout=30))
                deadline = time.monotonic() + 30
                while b'"task":"echo"' not in seen:
                    assert time.monotonic() < deadline, "the reading client got nothing more"
                    await asyncio.sleep(0.1)
                assert seen.count(b'"kind":"end"') >= 40
                assert await _metric(http, url, "dashboard-slow-reader") == 1
                reading.cancel()
        finally:
            stuck.close()
        async with http.get(url + "/v1/hello") as resp:
            assert resp.status == 200
