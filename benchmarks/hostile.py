"""One node under hostile load while an honest client works through another.

Starts three ``mesh-node`` processes on loopback (a, b, c: ``node_loopback.three_nodes``).
An honest client on c runs ``--tasks`` no-op tasks one after the other, first
on a quiet mesh, then while a second process (this file with ``--attack``) turns on node a,
from its own loopback address (127.0.0.66, as a stranger on the LAN has an address of its
own) everything that used to stop a node:

- unsigned request bodies of 100 MB (``--big`` of them, a few at a time);
- bodies declared at 300 MB and trickled a few bytes a second, and request heads trickled
  the same way (slowloris);
- ``--half-open`` TCP connections that never send a byte;
- replays: a request signed for node b sent to node a, and the same request twice to b
  (peer frames replayed to another node are refused the same way; the node tests show it).

Every loop is bounded in count and time, every target is on this machine, and each attack
stops by itself. Printed last, one JSON line:

- ``tasks``, ``completed``, ``duplicates``, ``executions``: the honest tasks of the attacked
  phase, their results (all, exactly once), and how many runs the nodes counted for them;
- ``node_crashes``: nodes that were not running at the end (goal 0);
- ``peak_rss_mb``: node a's daemon during the attack (goal <= 150);
- ``idle_p99_ms``, ``attack_p99_ms``, ``p99_ratio``: the honest client's task latency
  (submit to result) before and during the attack (goal ratio <= 5);
- ``rejected``: what node a counted as refused, by reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import psutil
from node_loopback import three_nodes

from mesh.client import Client, key_bytes, sign_request

ATTACKER = "127.0.0.66"
"""The attacker's source address: on a LAN a stranger has an address of its own, and a
node's per-address limits are meant to hold it back without holding back the peers."""

MB = 1_000_000


# ---------------------------------------------------------------------------------------
# The attacker (a process of its own, so that its work does not slow the honest client)
# ---------------------------------------------------------------------------------------


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port, local_addr=(ATTACKER, 0))


async def _closed_by_peer(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the node answered (possibly nothing) before it closed, within ``seconds``."""
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                data += chunk
    return data


async def _big_body(host: str, port: int, stats: Counter[str]) -> None:
    """An unsigned POST declaring 100 MB, sent as fast as the node takes it."""
    try:
        reader, writer = await _open(host, port)
    except OSError:
        stats["big-refused-connect"] += 1
        return
    head = (
        f"POST /v1/tasks HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {100 * MB}\r\n\r\n"
    ).encode()
    chunk = b"[" * (1 << 20)
    sent = 0
    try:
        writer.write(head)
        async with asyncio.timeout(30):
            while sent < 100 * MB:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
    except (ConnectionError, TimeoutError, OSError):
        pass
    answer = await _closed_by_peer(reader, 5)
    stats["big-sent-mb"] += sent // MB
    stats["big-answered-" + (answer[9:12].decode(errors="replace") or "none")] += 1
    writer.close()


async def _trickle(host: str, port: int, stats: Counter[str], *, head_only: bool) -> None:
    """A request (or only its head) a few bytes a second, until the node hangs up."""
    try:
        reader, writer = await _open(host, port)
    except OSError:
        stats["trickle-refused-connect"] += 1
        return
    head = f"POST /v1/tasks HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {300 * MB}\r\n"
    data = head.encode() if head_only else (head + "\r\n").encode() + b"{" * 100_000
    started = time.monotonic()
    try:
        async with asyncio.timeout(60):
            for i in range(0, len(data), 8):
                writer.write(data[i : i + 8])
                await writer.drain()
                if reader.at_eof():
                    break
                await asyncio.sleep(1.0)
    except (ConnectionError, TimeoutError, OSError):
        pass
    await _closed_by_peer(reader, 1)
    kind = "slow-head" if head_only else "slow-body"
    stats[f"{kind}-held-s-max"] = max(
        stats[f"{kind}-held-s-max"], round(time.monotonic() - started)
    )
    writer.close()


async def _half_open(host: str, port: int, n: int, seconds: float, stats: Counter[str]) -> None:
    """``n`` connections that send nothing, held until the node closes them or time is up."""
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(n):
        try:
            conns.append(await _open(host, port))
        except OSError:
            stats["half-open-refused-connect"] += 1
    stats["half-open-opened"] += len(conns)

    async def wait_close(reader: asyncio.StreamReader) -> bool:
        await _closed_by_peer(reader, seconds)
        return reader.at_eof()

    closed = await asyncio.gather(*(wait_close(r) for r, _ in conns))
    stats["half-open-closed-by-node"] += sum(closed)
    for _, w in conns:
        w.close()


async def _replays(
    host: str, port: int, key: str, node_b: str, b_url: str, stats: Counter[str]
) -> None:
    """Requests signed for node b: to a (another receiver) and twice to b (a replay)."""
    import aiohttp

    kb = key_bytes(key)
    for i in range(50):
        headers = sign_request(kb, "GET", "/v1/status", b"", time.time(), to=node_b)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{host}:{port}/v1/status", headers=headers) as resp:
                stats[f"replay-to-a-{resp.status}"] += 1
            if i % 10 == 0:
                for _ in range(2):
                    async with http.get(f"{b_url}/v1/status", headers=headers) as resp:
                        stats[f"replay-to-b-{resp.status}"] += 1


async def attack(address: str, key: str, node_b: str, b_url: str, ns: argparse.Namespace) -> None:
    host, _, port_text = address.rpartition(":")
    port = int(port_text)
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    stats: Counter[str] = Counter()
    print("attacking", flush=True)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_half_open(host, port, ns.half_open, ns.seconds, stats))
        for i in range(20):
            tg.create_task(_trickle(host, port, stats, head_only=i % 2 == 0))
        tg.create_task(_replays(host, port, key, node_b, b_url, stats))
        sem = asyncio.Semaphore(4)

        async def big() -> None:
            async with sem:
                await _big_body(host, port, stats)

        for _ in range(ns.big):
            tg.create_task(big())
    print(json.dumps(dict(stats)), flush=True)


# ---------------------------------------------------------------------------------------
# The honest side
# ---------------------------------------------------------------------------------------


def latencies(c: Client, n: int) -> tuple[list[float], int, int]:
    """``n`` no-ops one after the other: latencies (ms), results, results seen twice."""
    out: list[float] = []
    ids: Counter[int] = Counter()
    for i in range(n):
        t = time.perf_counter()
        ids[c.submit("echo", i).result(timeout=120)] += 1
        out.append((time.perf_counter() - t) * 1000)
    return out, sum(ids.values()), sum(v - 1 for v in ids.values() if v > 1)


def executed(c: Client, url: str) -> int:
    """Tasks the node at ``url`` ran to completion, from its metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    m = re.search(r'^mesh_executed_total\{outcome="ok"\} (\S+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def rejected(url: str) -> dict[str, int]:
    import urllib.request

    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {
        m.group(1): int(float(m.group(2)))
        for m in re.finditer(r'^mesh_rejected_frames_total\{reason="([^"]+)"\} (\S+)$', text, re.M)
    }


class RssPeak(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--big", type=int, default=20, help="unsigned 100 MB bodies")
    ap.add_argument("--half-open", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60.0, help="longest the attack lasts")
    ap.add_argument("--quick", action="store_true", help="small counts for a smoke run")
    ap.add_argument("--attack", nargs=4, metavar=("ADDRESS", "KEY", "NODE_B", "B_URL"))
    ns = ap.parse_args()
    if ns.quick:
        ns.tasks, ns.big, ns.half_open, ns.seconds = 200, 4, 100, 20.0
    if ns.attack:
        address, key, node_b, b_url = ns.attack
        asyncio.run(attack(address, key, node_b, b_url, ns))
        return
    result: dict[str, Any] = {}
    attacker: subprocess.Popen[str] | None = None
    with three_nodes() as mesh:
        a, b, c = (mesh.nodes[f"node-{i}"] for i in (1, 2, 3))
        urls = [n.url for n in (a, b, c)]
        try:
            with mesh.client(c.name) as client:
                latencies(client, 200)  # warm every worker
                idle, _, _ = latencies(client, ns.tasks)
                before = sum(executed(client, u) for u in urls)
                peak = RssPeak(a.pid)
                peak.start()
                attacker = subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--attack",
                        a.address,
                        mesh.key,
                        b.name,
                        b.url,
                        "--big",
                        str(ns.big),
                        "--half-open",
                        str(ns.half_open),
                        "--seconds",
                        str(ns.seconds),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    env={**os.environ},
                )
                assert attacker.stdout is not None
                attacker.stdout.readline()  # "attacking"
                time.sleep(2.0)  # let the half-open connections and big bodies pile up
                hostile, completed, duplicates = latencies(client, ns.tasks)
                peak.stop.set()
                runs = sum(executed(client, u) for u in urls) - before
                attack_stats = json.loads(
                    attacker.communicate(timeout=ns.seconds + 60)[0].strip().splitlines()[-1]
                )
            idle_p99 = float(np.percentile(idle, 99))
            attack_p99 = float(np.percentile(hostile, 99))
            result = {
                "tasks": ns.tasks,
                "completed": completed,
                "duplicates": duplicates,
                "executions": runs,
                "node_crashes": sum(not n.running() for n in (a, b, c)),
                "peak_rss_mb": round(peak.peak / 2**20, 1),
                "idle_p99_ms": round(idle_p99, 3),
                "attack_p99_ms": round(attack_p99, 3),
                "p99_ratio": round(attack_p99 / idle_p99, 2),
                "rejected": rejected(urls[0]),
                "attack": attack_stats,
            }
        finally:
            if attacker is not None and attacker.poll() is None:
                attacker.kill()
                attacker.wait()
    for k, v in result.items():
        print(f"{k:<16} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
