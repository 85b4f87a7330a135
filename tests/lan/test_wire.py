"""The private wire between two real hosts: what a sniffer on the LAN sees, and what it costs.

Hosts h1 and h2, each node in a mount namespace with a /dev/shm of its own so that the two
are different machines to each other (no shared-memory shortcut). ``tcpdump`` records
h2's interface while h1 sends a task whose argument holds a marker to h2:

- sealed (the default), the marker is nowhere in the capture; the capture holds the two
  hellos (read with the mesh key: their key shares) and sealed messages, none of which
  opens with keys that the mesh key and the recorded shares give;
- ``--unsealed``, the same marker is in the capture: the check can fail.

The same run measures, for both modes, a 64 MiB array made by a task on h2 and fetched
from there by a client on h1 (MiB/s over the whole call, best of five) and no-op tasks
run on h2 for a client on h1 (tasks/s); the
figures go to the LAN figures line (``wire``). The modes take turns (plain, sealed,
sealed, plain).
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

PORT = 7710
KEY = secrets.token_hex(16)
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
NOOP_TASKS = 1000
TRANSFER_MIB = 64

pytestmark = pytest.mark.skipif(
    shutil.which("tcpdump") is None or shutil.which("unshare") is None,
    reason="needs tcpdump and unshare (apt-get install tcpdump util-linux)",
)


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    with Lan(2) as lan:
        yield lan


class Pair:
    """h1 and h2 running nodes in one mode; ended by ``stop``."""

    def __init__(self, lan: Lan, logdir: Path, *, sealed: bool) -> None:
        self.lan = lan
        self.logdir = logdir
        self.sealed = sealed
        self.procs: list[subprocess.Popen[bytes]] = []

    def url(self, i: int) -> str:
        return f"http://{self.lan.host(i).address}:{PORT}"

    def start(self) -> None:
        h1 = self.lan.host(1)
        for i, extra in ((1, ["--label", "wire=near"]), (2, ["--label", "wire=far"])):
            host = self.lan.host(i)
            mode = "sealed" if self.sealed else "plain"
            log = self.logdir / f"h{i}-{mode}-{time.monotonic_ns()}.log"
            ready = log.with_suffix(".ready")
            argv = [
                *OWN_SHM,
                *NODE,
                "start",
                "--host",
                host.address,
                "--port",
                str(PORT),
                "--key",
                KEY,
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
                argv += ["--join", f"{h1.address}:{PORT}"]
            if not self.sealed:
                argv.append("--unsealed")
            env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
            with open(log, "wb") as out:
                proc = self.lan.spawn(
                    host, argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)
                )
            self.procs.append(proc)
            wait_ready(ready, proc, 60, log=log)

    def client(self, script: str, timeout: float = 180) -> Any:
        """A Python client on h1 (for h1's node); prints one JSON line at the end."""
        code = (
            "import json, time\nfrom mesh.client import connect\n"
            f"c = connect({self.url(1)!r}, key={KEY!r})\n" + script
        )
        out = self.lan.run(self.lan.host(1), [sys.executable, "-c", code], timeout)
        if out.returncode != 0:
            raise AssertionError(f"client failed: {out.stderr.strip()[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

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


def capture(lan: Lan, host: Host, path: Path) -> subprocess.Popen[bytes]:
    """tcpdump on ``host``'s interface, peer port only, whole packets, into ``path``."""
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
            "tcp",
            "port",
            str(PORT),
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


def try_to_open(streams: dict[tuple[str, int, str, int], bytes]) -> tuple[int, int]:
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
                        key_bytes(KEY), NodeId(reader), max_frame_bytes=1 << 20, max_skew_s=3600
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
                key_bytes(KEY), share, initiator=initiator, context=PEER_CONTEXT
            )
            for message in sealed[:50]:
                with pytest.raises(RemoteProtocolError):
                    opener.open(message)
    return len(hellos), len(sealed)


# -- the test ------------------------------------------------------------------------------


def marker_script(marker: str) -> str:
    return (
        "far = {'wire': 'far'}\n"
        "for _ in range(100):  # until h1 knows h2\n"
        "    if c.submit_with('whoami', labels=far).result(60) == 'h2':\n"
        "        break\n"
        "    time.sleep(0.1)\n"
        f"r = c.submit_with('echo', [{marker!r} * 4], labels=far).result(60)\n"
        f"print(json.dumps({{'ok': r == {marker!r} * 4}}))\n"
    )


FIGURES_SCRIPT = f"""
import numpy as np
far = {{'wire': 'far'}}
c.gather([c.submit_with('noop', labels=far) for _ in range(50)])  # warm the worker
t0 = time.perf_counter()
c.gather([c.submit_with('noop', labels=far) for _ in range({NOOP_TASKS})])
noop = {NOOP_TASKS} / (time.perf_counter() - t0)
n = {TRANSFER_MIB} * 1024 * 1024
best = 0.0
for _ in range(5):
    t0 = time.perf_counter()
    a = c.result(c.submit_with('make_array', [n], labels=far), 120)  # made on h2, fetched
    best = max(best, {TRANSFER_MIB} / (time.perf_counter() - t0))
    assert a.nbytes == n
    del a
print(json.dumps({{'noop_tasks_per_s': round(noop, 1), 'transfer_mib_per_s': round(best, 1)}}))
"""


def run_mode(lan: Lan, logdir: Path, *, sealed: bool) -> tuple[bytes, dict[str, float]]:
    """One mode: the capture of a marker's trip to h2, and the figures."""
    marker = "MARKER-" + secrets.token_hex(8)
    pcap = logdir / f"{'sealed' if sealed else 'plain'}.pcap"
    pair = Pair(lan, logdir, sealed=sealed)
    dump = capture(lan, lan.host(2), pcap)
    try:
        pair.start()
        assert pair.client(marker_script(marker)) == {"ok": True}
        stop_capture(lan, dump)
        figures = pair.client(FIGURES_SCRIPT, timeout=300)
        status = json.loads(
            lan.run(
                lan.host(1), [*NODE, "status", "--node", pair.url(1), "--key", KEY, "--json"]
            ).stdout
        )
        assert status["sealed"] is sealed
        assert status["refused_peers"] == []
    finally:
        lan.kill(dump, signal.SIGINT)
        pair.stop()
    data = pcap.read_bytes()
    pcap.unlink()
    return data, {**figures, "marker_seen": marker.encode() in data}


def test_a_sniffer_sees_nothing_and_sealing_costs_little(
    lan: Lan, tmp_path: Path, figures: dict[str, Any]
) -> None:
    # The modes take turns in the order ABBA, so that drift of the machine and whatever a
    # run leaves behind hit both alike; best of each.
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    captures: dict[bool, bytes] = {}
    for sealed in (False, True, True, False):
        captures[sealed], run = run_mode(lan, tmp_path, sealed=sealed)
        runs[sealed].append(run)
    # The capture sees task arguments when they travel in the clear...
    assert all(run.pop("marker_seen") for run in runs[False])
    # ...and not when the wire is sealed, even though the hellos were recorded.
    assert not any(run.pop("marker_seen") for run in runs[True])
    hellos, tried = try_to_open(tcp_streams(captures[True]))
    assert hellos >= 2, "the capture should hold both hellos of the peer connection"
    assert tried >= 1, "the capture should hold sealed messages"
    best = {
        mode: {k: max(run[k] for run in runs[sealed]) for k in runs[sealed][0]}
        for mode, sealed in (("plain", False), ("sealed", True))
    }
    figures["wire"] = {
        **best,
        "transfer_ratio": round(
            best["sealed"]["transfer_mib_per_s"] / best["plain"]["transfer_mib_per_s"], 3
        ),
        "noop_ratio": round(
            best["sealed"]["noop_tasks_per_s"] / best["plain"]["noop_tasks_per_s"], 3
        ),
    }
    print("wire figures: " + json.dumps(figures["wire"], sort_keys=True))
