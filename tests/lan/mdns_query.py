"""An mDNS browser that shares no code with python-zeroconf: raw DNS over multicast.

Joins the mDNS group on port 5353 (as any browser does), sends a PTR query for a service
type, collects the multicast answers, follows up with TXT queries for instances whose TXT
did not come along, and prints a JSON list of ``{"instance", "txt": {...}}``. The DNS
parser is a small one written for this: it reads names (with compression), PTR and TXT and
skips everything else. Run inside a test host: ``python -m tests.lan.mdns_query TYPE``.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

GROUP = ("224.0.0.251", 5353)
PTR, TXT = 12, 16


def encode_query(name: str, qtype: int) -> bytes:
    # id 0, no flags (RFC 6762 section 18), one question, class IN.
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split("."))
    return struct.pack("!6H", 0, 0, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!2H", qtype, 1)


def read_name(data: bytes, pos: int) -> tuple[str, int]:
    """The name at ``pos`` and the position after it, following compression pointers."""
    labels: list[str] = []
    end = -1
    for _ in range(128):  # bounds pointer loops in malformed packets
        length = data[pos]
        if length & 0xC0 == 0xC0:
            if end < 0:
                end = pos + 2
            pos = ((length & 0x3F) << 8) | data[pos + 1]
            continue
        if length == 0:
            return ".".join(labels) + ".", (end if end >= 0 else pos + 1)
        labels.append(data[pos + 1 : pos + 1 + length].decode(errors="replace"))
        pos += 1 + length
    raise ValueError("name too long")


def parse(data: bytes) -> list[tuple[str, int, object]]:
    """(name, type, value) of every PTR and TXT record in a DNS message."""
    _, _, qd, an, ns, ar = struct.unpack_from("!6H", data, 0)
    pos = 12
    for _ in range(qd):
        _, pos = read_name(data, pos)
        pos += 4
    out: list[tuple[str, int, object]] = []
    for _ in range(an + ns + ar):
        name, pos = read_name(data, pos)
        rtype, _, _, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        rdata = data[pos : pos + rdlen]
        if rtype == PTR:
            out.append((name, PTR, read_name(data, pos)[0]))
        elif rtype == TXT:
            strings, i = [], 0
            while i < len(rdata):
                strings.append(rdata[i + 1 : i + 1 + rdata[i]].decode(errors="replace"))
                i += 1 + rdata[i]
            out.append((name, TXT, strings))
        pos += rdlen
    return out


def ask(sock: socket.socket, name: str, qtype: int, wait: float) -> list[tuple[str, int, object]]:
    """Query ``name`` twice, 1.2 s apart, collecting records for ``wait`` seconds.

    A responder multicasts a record at most once a second (RFC 6762 section 6), so a
    single query right after an announcement may go unanswered; browsers repeat theirs.
    """
    query = encode_query(name, qtype)
    sock.sendto(query, GROUP)
    repeat_at: float | None = time.monotonic() + 1.2
    records: list[tuple[str, int, object]] = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        if repeat_at is not None and time.monotonic() >= repeat_at:
            sock.sendto(query, GROUP)
            repeat_at = None
        sock.settimeout(min(left, 0.2))
        try:
            data, _ = sock.recvfrom(9000)
        except TimeoutError:
            continue
        try:
            records.extend(parse(data))
        except (ValueError, IndexError, struct.error):
            continue  # a malformed packet from someone else
    return records


def browse(service: str, wait: float = 3.0) -> list[dict[str, object]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", GROUP[1]))
    group = socket.inet_aton(GROUP[0]) + socket.inet_aton("0.0.0.0")
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    txts: dict[str, dict[str, str]] = {}
    instances: set[str] = set()

    def absorb(records: list[tuple[str, int, object]]) -> None:
        for name, rtype, value in records:
            if rtype == PTR and name == service and isinstance(value, str):
                instances.add(value)
            elif rtype == TXT and isinstance(value, list):
                pairs = (s.split("=", 1) for s in value)
                txts[name] = {p[0]: p[1] if len(p) > 1 else "" for p in pairs}

    absorb(ask(sock, service, PTR, wait))
    for inst in sorted(instances - set(txts)):
        absorb(ask(sock, inst, TXT, 2.5))
    return [{"instance": i, "txt": txts.get(i, {})} for i in sorted(instances)]


if __name__ == "__main__":
    print(json.dumps(browse(sys.argv[1] if len(sys.argv) > 1 else "_mesh-node._tcp.local.")))
