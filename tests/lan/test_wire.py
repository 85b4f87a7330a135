"""The private wire between two real hosts: what a sniffer on the LAN sees, and what it costs.

Hosts h1 and h2 run two meshes side by side: a sealed one (the default) and a plain one
(``--unsealed``), each with its own key and port. Each node is in a mount namespace with a
/dev/shm of its own, so that the two hosts are different machines to each other (no
shared-memory shortcut). ``tcpdump`` records h2's interface while a client on h1 sends, in
each mesh, a task whose argument holds a marker to h2:

- in the sealed mesh the marker is nowhere in the capture; the capture holds the two
  hellos (read with the mesh key: their key shares) and sealed messages, none of which
  opens with keys that the mesh key and the recorded shares give;
- in the plain mesh the same kind of marker is in the capture: the check can fail.

The same run measures what sealing costs, on the two meshes taking turns batch by batch
(so that drift of the machine hits both alike): no-op tasks run on h2 for the client on
h1 (tasks/s, and the CPU time the mesh's processes spent per task) and a 64 MiB array
made by a task on h2 and fetched from there (MiB/s over the whole call). Each figure is
the median of its batches; they go to the LAN figures line (``wire``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.client.local import wait_ready
from mesh.errors import RemoteProtocolError
from mesh.protocol.codec import Codec
from mesh.protocol.framing import KIND_HELLO, KIND_SEALED, read_hello
from mesh.protocol.messages import NodeId
from mesh.protocol.sealing import PEER_CONTEXT, Exchange
from mesh.runtime.auth import key_bytes
from tests.lan.harness import Host, Lan

PORTS = {False: 7710, True: 7711}  # plain, sealed
KEYS = {False: secrets.token_hex(16), True: secrets.token_hex(16)}
ROOT = Path(__file__).resolve().parents[2]
NODE = [sys.executable, "-m", "node"]
# A node of its own mount namespace, with a private /dev/shm: another machine to its peers.
OWN_SHM = [
    "unshare",
    "-m",
    "--propagation",
    "private",
    "sh",
    "-c",
    'mount -t tmpfs -o size=1g tmpfs /dev/shm && exec "$@"',
    "sh",
]
NOOP_TASKS = 500  # per batch
NOOP_BATCHES = 12  # per mode
TRANSFER_MIB = 64
TRANSFERS = 5  # per mode

pytestmark = pytest.mark.skipif(
    shutil.which("tcpdump") is None or shutil.which("unshare") is None,
    reason="needs tcpdump and unshare (apt-get install tcpdump util-linux)",
)


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    with Lan(2) as lan:
        yield lan


class Pair:
    """h1 and h2 running nodes of one mode's mesh; ended by ``stop``."""

    def __init__(self, lan: Lan, logdir: Path, *, sealed: bool) -> None:
        self.lan = lan
        self.logdir = logdir
        self.sealed = sealed
        self.port = PORTS[sealed]
        self.key = KEYS[sealed]
        self.procs: list[subprocess.Popen[bytes]] = []

    def url(self, i: int) -> str:
        return f"http://{self.lan.host(i).address}:{self.port}"

    def start(self) -> None:
        h1 = self.lan.host(1)
        for i, extra in ((1, ["--label", "wire=near"]), (2, ["--label", "wire=far"])):
            host = self.lan.host(i)
            mode = "sealed" if self.sealed else "plain"
            log = self.logdir / f"h{i}-{mode}.log"
            ready = log.with_suffix(".ready")
            argv = [
                *OWN_SHM,
                *NODE,
                "start",
                "--host",
                host.address,
                "--port",
                str(self.port),
                "--key",
                self.key,
                "--name",
                f"h{i}",
                "--no-mdns",
                "--slots",
                "1",
                "--ready-file",
                str(ready),
                *extra,
            ]
            if i == 2:
                argv += ["--join", f"{h1.address}:{self.port}"]
            if not self.sealed:
                argv.append("--unsealed")
            env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
            with open(log, "wb") as out:
                proc = self.lan.spawn(
                    host, argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)
                )
            self.procs.append(proc)
            wait_ready(ready, proc, 60, log=log)

    def connect(self) -> str:
        """Python source binding ``c`` to a client of h1's node."""
        return f"c = connect({self.url(1)!r}, key={self.key!r})\n"

    def status(self) -> Any:
        argv = [*NODE, "status", "--node", self.url(1), "--key", self.key, "--json"]
        return json.loads(self.lan.run(self.lan.host(1), argv).stdout)

    def stop(self) -> None:
        for proc in self.procs:
            self.lan.kill(proc, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.lan.kill(proc)
                proc.wait(timeout=10)
        self.procs.clear()


def client(lan: Lan, script: str, timeout: float = 180) -> Any:
    """A Python client on h1 running ``script``; returns the JSON line it prints last."""
    code = "import json, os, time\nfrom mesh.client import connect\n" + script
    out = lan.run(lan.host(1), [sys.executable, "-c", code], timeout)
    if out.returncode != 0:
        raise AssertionError(f"client failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def capture(lan: Lan, host: Host, path: Path) -> subprocess.Popen[bytes]:
    """tcpdump on ``host``'s interface, the two meshes' ports only, whole packets, into
    ``path``."""
    proc = lan.spawn(
        host,
        [
            "tcpdump",
            "--immediate-mode",
            "-i",
            "eth0",
            "-s",
            "0",
            "-U",
            "-n",
            "-w",
            str(path),
            f"tcp and (port {PORTS[False]} or port {PORTS[True]})",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()  # "listening on eth0 ...": capturing from here
    assert "listening" in line, line
    return proc


def stop_capture(lan: Lan, proc: subprocess.Popen[bytes]) -> None:
    lan.kill(proc, signal.SIGINT)
    proc.communicate(timeout=30)


# -- reading a capture ---------------------------------------------------------------------


def tcp_streams(pcap: bytes) -> dict[tuple[str, int, str, int], bytes]:
    """Each direction's TCP payload, in sequence order, from a pcap of Ethernet frames."""
    magic = struct.unpack_from("<I", pcap)[0]
    assert magic in (0xA1B2C3D4, 0xA1B23C4D), hex(magic)
    segments: dict[tuple[str, int, str, int], dict[int, bytes]] = {}
    pos = 24
    while pos + 16 <= len(pcap):
        incl = struct.unpack_from("<I", pcap, pos + 8)[0]
        frame = pcap[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:
            continue
        total = struct.unpack_from(">H", ip, 2)[0]
        src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack_from(">HHI", tcp)
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            segments.setdefault((src, sport, dst, dport), {})[seq] = payload
    streams = {}
    for flow, parts in segments.items():
        out = bytearray()
        base = min(parts)
        for seq in sorted(parts):
            offset = seq - base
            if offset + len(parts[seq]) > len(out):  # skip retransmitted bytes
                out += parts[seq][max(0, len(out) - offset) :]
        streams[flow] = bytes(out)
    return streams


def ws_messages(stream: bytes) -> list[bytes]:
    """The websocket messages of one direction of a peer connection (after the HTTP
    upgrade), unmasked; [] for a stream that is no websocket."""
    end = stream.find(b"\r\n\r\n")
    if end < 0 or b"upgrade: websocket" not in stream[:end].lower():
        return []
    pos, out = end + 4, []
    while pos + 2 <= len(stream):
        opcode, second = stream[pos] & 0x0F, stream[pos + 1]
        length, pos = second & 0x7F, pos + 2
        if length == 126:
            length, pos = struct.unpack_from(">H", stream, pos)[0], pos + 2
        elif length == 127:
            length, pos = struct.unpack_from(">Q", stream, pos)[0], pos + 8
        mask = b""
        if second & 0x80:
            mask, pos = stream[pos : pos + 4], pos + 4
        data = stream[pos : pos + length]
        pos += length
        if mask:
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        if opcode == 2:
            out.append(data)
    return out


def try_to_open(streams: dict[tuple[str, int, str, int], bytes], key: str) -> tuple[int, int]:
    """What a recorder holding the mesh key gets out of the peer connections: the hellos
    (read, and their key shares with them), and the sealed messages, each tried with keys
    derived from the mesh key and every recorded share. Returns (hellos, sealed messages
    tried); fails if any sealed message opens."""
    hellos: list[bytes] = []
    sealed: list[bytes] = []
    for messages in map(ws_messages, streams.values()):
        for message in messages:
            if message[:1] == bytes((KIND_HELLO,)):
                for reader in ("h1", "h2"):  # hellos are read as their receiver reads them
                    codec = Codec(
                        key_bytes(key), NodeId(reader), max_frame_bytes=1 << 20, max_skew_s=3600
                    )
                    try:
                        hello = read_hello(codec, message, time.time(), package="", sealed=True)
                    except RemoteProtocolError:
                        continue
                    hellos.append(hello.share)
                    break
            elif message[:1] == bytes((KIND_SEALED,)):
                sealed.append(message[1:])
    for share in hellos:
        for initiator in (True, False):
            _, opener = Exchange().keys(
                key_bytes(key), share, initiator=initiator, context=PEER_CONTEXT
            )
            for message in sealed[:50]:
                with pytest.raises(RemoteProtocolError):
                    opener.open(message)
    return len(hellos), len(sealed)


# -- the test ------------------------------------------------------------------------------


def marker_script(pair: Pair, marker: str) -> str:
    """The marker goes to h2 twice: from h1's node to h2's (a peer connection), and from a
    client on h1 straight to h2's node (a client session: sealed in the sealed mesh,
    where one that will not seal is refused)."""
    direct = f"d = connect({pair.url(2)!r}, key={pair.key!r}, sealed={pair.sealed})\n"
    refused = (
        "try:\n"
        f"    connect({pair.url(2)!r}, key={pair.key!r}, sealed=False).close()\n"
        "    refused = False\n"
        "except Exception as exc:\n"
        "    refused = 'sealed only' in str(exc)\n"
        if pair.sealed
        else "refused = True\n"
    )
    return (
        pair.connect() + direct + refused + "far = {'wire': 'far'}\n"
        "for _ in range(100):  # until h1 knows h2\n"
        "    if c.submit_with('whoami', labels=far).result(60) == 'h2':\n"
        "        break\n"
        "    time.sleep(0.1)\n"
        f"r = c.submit_with('echo', [{marker!r} * 4], labels=far).result(60)\n"
        f"s = d.submit_with('echo', [{marker!r} * 4], labels=far).result(60)\n"
        f"print(json.dumps({{'ok': r == s == {marker!r} * 4, 'refused': refused}}))\n"
    )


# Both meshes from one client, taking turns (ABBA...) batch by batch. The CPU time is that
# of the mesh's processes on both hosts (the nodes and their workers), read from /proc:
# the namespaces share one pid space.
FIGURES_SCRIPT = """
import statistics
import numpy as np
PIDS = {pids!r}
TICK = os.sysconf("SC_CLK_TCK")

def stat(pid):
    with open(f"/proc/{{pid}}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()

def cpu_s(roots):
    children = {{}}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                children.setdefault(int(stat(name)[1]), []).append(int(name))
            except OSError:
                pass
    total, todo = 0, list(roots)
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            fields = stat(pid)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK

{connect_plain}plain = c
{connect_sealed}clients = {{"plain": plain, "sealed": c}}
far = {{"wire": "far"}}
for c in clients.values():
    c.gather([c.submit_with("noop", labels=far) for _ in range(100)])  # warm the workers
order = [("plain", "sealed"), ("sealed", "plain")]
noop = {{m: [] for m in clients}}
cpu = {{m: [] for m in clients}}
for b in range({batches}):
    for mode in order[b % 2]:
        c = clients[mode]
        cpu0 = cpu_s(PIDS[mode])
        t0 = time.perf_counter()
        c.gather([c.submit_with("noop", labels=far) for _ in range({tasks})])
        noop[mode].append({tasks} / (time.perf_counter() - t0))
        cpu[mode].append((cpu_s(PIDS[mode]) - cpu0) / {tasks} * 1e6)
n = {mib} * 1024 * 1024
transfer = {{m: [] for m in clients}}
for b in range({transfers}):
    for mode in order[b % 2]:
        c = clients[mode]
        t0 = time.perf_counter()
        a = c.result(c.submit_with("make_array", [n], labels=far), 120)  # made on h2, fetched
        transfer[mode].append({mib} / (time.perf_counter() - t0))
        assert a.nbytes == n
        del a
print(json.dumps({{
    m: {{
        "noop_tasks_per_s": round(statistics.median(noop[m]), 1),
        "noop_cpu_us_per_task": round(statistics.median(cpu[m]), 1),
        "transfer_mib_per_s": round(statistics.median(transfer[m]), 1),
    }}
    for m in clients
}}))
"""


def test_a_sniffer_sees_nothing_and_sealing_costs_little(
    lan: Lan, tmp_path: Path, figures: dict[str, Any]
) -> None:
    pairs = {sealed: Pair(lan, tmp_path, sealed=sealed) for sealed in (False, True)}
    markers = {sealed: "MARKER-" + secrets.token_hex(8) for sealed in pairs}
    pcap = tmp_path / "wire.pcap"
    dump = capture(lan, lan.host(2), pcap)
    try:
        for pair in pairs.values():
            pair.start()
        for sealed, pair in pairs.items():
            assert client(lan, marker_script(pair, markers[sealed])) == {
                "ok": True,
                "refused": True,
            }
        stop_capture(lan, dump)
        script = FIGURES_SCRIPT.format(
            pids={
                "sealed" if sealed else "plain": [p.pid for p in pair.procs]
                for sealed, pair in pairs.items()
            },
            connect_plain=pairs[False].connect(),
            connect_sealed=pairs[True].connect(),
            batches=NOOP_BATCHES,
            tasks=NOOP_TASKS,
            transfers=TRANSFERS,
            mib=TRANSFER_MIB,
        )
        measured = client(lan, script, timeout=600)
        for sealed, pair in pairs.items():
            status = pair.status()
            assert status["sealed"] is sealed
            assert status["refused_peers"] == []
    finally:
        lan.kill(dump, signal.SIGINT)
        for pair in pairs.values():
            pair.stop()
    streams = tcp_streams(pcap.read_bytes())
    pcap.unlink()
    by_mode = {
        sealed: {
            flow: data for flow, data in streams.items() if PORTS[sealed] in (flow[1], flow[3])
        }
        for sealed in pairs
    }
    # The capture sees task arguments when they travel in the clear...
    assert any(markers[False].encode() in data for data in by_mode[False].values())
    # ...and not when the wire is sealed, even though the hellos were recorded.
    assert not any(markers[True].encode() in data for data in by_mode[True].values())
    hellos, tried = try_to_open(by_mode[True], KEYS[True])
    assert hellos >= 2, "the capture should hold both hellos of the peer connection"
    assert tried >= 1, "the capture should hold sealed messages"
    plain, sealed = measured["plain"], measured["sealed"]
    figures["wire"] = {
        **measured,
        "transfer_ratio": round(sealed["transfer_mib_per_s"] / plain["transfer_mib_per_s"], 3),
        "noop_ratio": round(sealed["noop_tasks_per_s"] / plain["noop_tasks_per_s"], 3),
        "noop_cpu_ratio": round(sealed["noop_cpu_us_per_task"] / plain["noop_cpu_us_per_task"], 3),
    }
    print("wire figures: " + json.dumps(figures["wire"], sort_keys=True))
