"""What an idle node costs with and without dashboards open, on three real nodes on loopback.

- ``idle_rss_mb`` / ``idle_cpu_percent``: node-1 idle with no page open (measured as
  ``node_loopback`` measures it: the daemon and any worker processes, idle workers gone);
- ``pages20_rss_mb`` / ``pages20_cpu_percent``: the same node, still idle, with 20 pages'
  feeds open (``/dashboard/feed`` with a session cookie, each read as a browser reads it);
- ``pages20_open_s``: how long the 20 feeds took to open and get their first members.

The mesh first runs a few hundred tasks, so the feeds start with a history. CPU is percent of
one core over the window (``--seconds``, default 30). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp
from node_loopback import idle_figures, three_nodes

from mesh.client.local import LocalMesh
from mesh.runtime.auth import key_bytes
from mesh.runtime.http import node_id_at, request_json

PAGES = 20


async def _read(feed: aiohttp.ClientResponse, opened: asyncio.Event) -> None:
    async for line in feed.content:
        if line.startswith(b"event: peers"):
            opened.set()


async def with_pages(mesh: LocalMesh, seconds: float) -> dict[str, float]:
    node = mesh.nodes["node-1"]
    key = key_bytes(mesh.key)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        to = await node_id_at(http, key, node.url)
        token = await request_json(http, key, node.url, "POST", "/v1/dashboard/token", to=to)
        async with http.get(node.url + token["path"], allow_redirects=False) as resp:
            assert resp.status == 303, resp.status
        started = time.monotonic()
        feeds = [await http.get(node.url + "/dashboard/feed") for _ in range(PAGES)]
        opened = [asyncio.Event() for _ in feeds]
        try:
            async with asyncio.TaskGroup() as tg:
                readers = [tg.create_task(_read(f, o)) for f, o in zip(feeds, opened, strict=True)]
                async with asyncio.timeout(60):
                    for o in opened:
                        await o.wait()
                open_s = time.monotonic() - started
                await asyncio.sleep(2.0)  # the first burst of every page is over
                rss, cpu = await asyncio.to_thread(idle_figures, node.pid, seconds)
                for r in readers:
                    r.cancel()
        finally:
            for f in feeds:
                f.close()
    return {
        "pages20_rss_mb": round(rss, 1),
        "pages20_cpu_percent": round(cpu, 2),
        "pages20_open_s": round(open_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="each idle window")
    ns = ap.parse_args()
    result: dict[str, Any] = {}
    with three_nodes() as mesh:
        with mesh.client() as c:
            c.gather(c.map("echo", range(300)), timeout=120)
        rss, cpu = idle_figures(mesh.nodes["node-1"].pid, ns.seconds)
        result["idle_rss_mb"] = round(rss, 1)
        result["idle_cpu_percent"] = round(cpu, 2)
        result.update(asyncio.run(with_pages(mesh, ns.seconds)))
    for k, v in result.items():
        print(f"{k:<24} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
