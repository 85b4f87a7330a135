"""A real peer frame captured on its way to one node and replayed to another is refused.

Two real nodes ``a`` and ``b``, and a key holder in this process (``spy``) that joins the
mesh through ``a`` over the ordinary websocket transport. ``a`` answers its join with a
``Delta`` sent to the spy, which is the captured frame: made by the daemon, naming its
receiver. Replayed to ``b``, it is refused before ``b``'s replay guard sees it and counted
in ``b``'s ``mesh_rejected_frames{reason="wrong-receiver"}``; meanwhile the real nodes'
own traffic never trips that counter.
"""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
from aiohttp import web

from mesh.client import key_bytes
from mesh.config import NodeConfig
from mesh.protocol.codec import Buffer, Codec
from mesh.protocol.messages import Address, Capabilities, Delta, Join, Load, NodeId, NodeRecord
from node.transport_ws import WsTransport
from tests.node.conftest import Cluster, wait_for

DEADLINE_S = 30.0


async def rejected(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(
            r'^mesh_rejected_frames_total\{reason="([^"]*)"\} (\S+)$', text, re.MULTILINE
        )
    }


async def test_a_frame_for_one_node_replayed_to_another_is_refused_and_counted(
    cluster: Cluster,
) -> None:
    a = cluster.start("a")
    b = cluster.start("b")
    wait_for(lambda: cluster.all_alive(["a", "b"]), 30, "a and b alive")

    codec = Codec(key_bytes(cluster.key), NodeId("spy"), max_frame_bytes=1 << 24)
    spy = WsTransport(codec=codec, config=NodeConfig(), wall_clock=time.time)
    app = web.Application()
    spy.add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        address = Address(f"127.0.0.1:{runner.addresses[0][1]}")
        await spy.start(address)
        record = NodeRecord(
            node=NodeId("spy"),
            address=address,
            incarnation=0,
            version=1,
            capabilities=Capabilities(resources={}, libraries={}, tasks=(), labels={}),
            load=Load(running=0, queued=0, backlog_s=0.0),
        )
        chunks, _ = codec.encode(Join(record=record), time.time(), to=NodeId("a"))
        await spy.send(Address(a.address), chunks)

        # What a sends the spy: the Delta answering its join, addressed to the spy.
        captured: Buffer | None = None
        async with asyncio.timeout(DEADLINE_S):
            while captured is None:
                frame = await spy.recv()
                got = codec.decode(frame, time.time(), authenticated=True)
                if got.sender == "a" and isinstance(got.msg, Delta):
                    assert got.to == "spy"
                    captured = bytes(frame)

        async with aiohttp.ClientSession() as session:
            before = await rejected(session, b.url)
            assert before.get("wrong-receiver", 0) == 0, before
            await spy.send(Address(b.address), [captured])
            counts: dict[str, float] = {}

            async def refused() -> bool:
                counts.update(await rejected(session, b.url))
                return counts.get("wrong-receiver", 0) >= 1

            async with asyncio.timeout(DEADLINE_S):
                while not await refused():  # noqa: ASYNC110 - another process's counters
                    await asyncio.sleep(0.05)
            assert counts["wrong-receiver"] == 1
            # The real nodes' own frames always name their receiver correctly.
            assert (await rejected(session, a.url)).get("wrong-receiver", 0) == 0
        assert spy.rejected == {}
    finally:
        await spy.close()
        await runner.cleanup()
