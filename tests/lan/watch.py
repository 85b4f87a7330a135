"""Watch what several nodes say about the mesh, with timestamps, from inside a test host.

``python -m tests.lan.watch KEY SPEC TIMEOUT URL...`` polls ``/v1/peers`` of every URL
every 50 ms and exits when SPEC holds on all of them, printing one JSON line
``{"ok": bool, "at": time.monotonic()}``. SPEC is ``NODE=STATE[|STATE...][,NODE=...]``;
the state ``gone`` means the node is not listed. CLOCK_MONOTONIC is shared by every
process of the machine, so the caller can subtract its own timestamps.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from mesh.client import AsyncClient


def parse(spec: str) -> dict[str, set[str]]:
    want: dict[str, set[str]] = {}
    for part in spec.split(","):
        node, states = part.split("=", 1)
        want[node] = set(states.split("|"))
    return want


def holds(peers: list[dict[str, object]], want: dict[str, set[str]]) -> bool:
    seen = {str(p["id"]): str(p["state"]) for p in peers}
    return all(seen.get(node, "gone") in states for node, states in want.items())


async def watch(key: str, spec: str, limit_s: float, urls: list[str]) -> dict[str, object]:
    want = parse(spec)
    clients: dict[str, AsyncClient] = {}
    deadline = time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            ok = True
            for url in urls:
                try:
                    if url not in clients:
                        clients[url] = await AsyncClient.connect(url, key, open_timeout=1.0)
                    async with asyncio.timeout(1.0):
                        peers = await clients[url].peers()
                except Exception:
                    clients.pop(url, None)
                    ok = False
                    break
                if not holds(peers, want):
                    ok = False
                    break
            if ok:
                return {"ok": True, "at": time.monotonic()}
            await asyncio.sleep(0.05)
        return {"ok": False, "at": time.monotonic()}
    finally:
        for c in clients.values():
            await c.close()


if __name__ == "__main__":
    key, spec, timeout, *urls = sys.argv[1:]
    print(json.dumps(asyncio.run(watch(key, spec, float(timeout), urls))), flush=True)
