"""What sealing costs the peer transport: CPU per message, sealed against plain.

Two ``WsTransport``s in this process, over 127.0.0.1, once sealed (AES-GCM under keys from
an X25519 exchange, the default) and once plain (HMAC only), taking turns round by round.
Each round sends small frames (a ``Load``, about the size of a call for proposals or a
bid) one at a time and waits for each to arrive, as the contract net's messages go, and
then in bursts that the writer batches. The CPU time of the process (both ends: sealing
and opening, framing, websockets, the event loop) per message is the median over rounds.

One process and loopback keep the machine's noise out: between two hosts the no-op task
rate moves by a third from batch to batch (``tests/lan/test_wire.py``), far more than
sealing costs; here the two modes differ by what sealing itself adds. In bursts a sealed
link is the cheaper: one AES-GCM tag covers a whole batch of frames, whose per-frame HMACs
it then need not check.

Prints, as its last line, one JSON object: microseconds per message for each mode and
pattern, and the sealed/plain ratios.

    python benchmarks/wire.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import time
from contextlib import AsyncExitStack

from aiohttp import web

from mesh.config import NodeConfig
from mesh.protocol.codec import Buffer, Codec
from mesh.protocol.messages import Address, Load, NodeId
from node.transport_ws import WsTransport

KEY = b"benchmark-key-32-bytes-long-1234"
BURST = 100


async def transport(name: str, sealed: bool, stack: AsyncExitStack) -> tuple[WsTransport, Codec]:
    config = dataclasses.replace(NodeConfig(), wire_sealed=sealed)
    codec = Codec(KEY, NodeId(name), max_frame_bytes=config.max_frame_bytes)
    t = WsTransport(codec=codec, config=config, wall_clock=time.time)
    app = web.Application()
    t.add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    await t.start(Address(f"127.0.0.1:{runner.addresses[0][1]}"))
    stack.push_async_callback(t.close)
    return t, codec


def frames(codec: Codec, to: NodeId, n: int) -> list[list[Buffer]]:
    return [
        codec.encode(Load(running=i, queued=0, backlog_s=0.0), time.time(), to=to)[0]
        for i in range(n)
    ]


async def one_by_one(a: WsTransport, b: WsTransport, batch: list[list[Buffer]]) -> float:
    start = time.process_time()
    for frame in batch:
        await a.send(b.address, frame)
        await b.recv()
    return (time.process_time() - start) / len(batch) * 1e6


async def bursts(a: WsTransport, b: WsTransport, batch: list[list[Buffer]]) -> float:
    start = time.process_time()
    for i in range(0, len(batch), BURST):
        part = batch[i : i + BURST]
        for frame in part:
            await a.send(b.address, frame)
        for _ in part:
            await b.recv()
    return (time.process_time() - start) / len(batch) * 1e6


async def measure(rounds: int, per_round: int) -> dict[str, float]:
    patterns = {"one_by_one": one_by_one, "burst": bursts}
    async with AsyncExitStack() as stack:
        pairs = {}
        for sealed in (False, True):
            a, ca = await transport("a", sealed, stack)
            b, cb = await transport("b", sealed, stack)
            await one_by_one(a, b, frames(ca, cb.sender, 200))  # connect and warm up
            pairs[sealed] = (a, ca, b, cb)
        us: dict[tuple[str, bool], list[float]] = {}
        for r in range(rounds):
            for sealed in (False, True) if r % 2 == 0 else (True, False):
                a, ca, b, cb = pairs[sealed]
                for name, run in patterns.items():
                    batch = frames(ca, cb.sender, per_round)
                    us.setdefault((name, sealed), []).append(await run(a, b, batch))
    out: dict[str, float] = {}
    for name in patterns:
        plain_us = statistics.median(us[(name, False)])
        sealed_us = statistics.median(us[(name, True)])
        out[f"{name}_plain_us"] = round(plain_us, 2)
        out[f"{name}_sealed_us"] = round(sealed_us, 2)
        out[f"{name}_ratio"] = round(sealed_us / plain_us, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (CI)")
    args = parser.parse_args()
    rounds, per_round = (4, 500) if args.quick else (12, 2000)
    out = asyncio.run(measure(rounds, per_round))
    for key, value in out.items():
        print(f"  {key:<22} {value}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
