"""``mesh-node doctor``: why this machine does not see the mesh, in plain words, with the fix.

Two halves. ``examine`` looks (the key file, the node here, one mDNS browse, the hello of
every address announced, a peer asked whether it hears this node's announcements and can
connect to its port) and returns ``Observations``. ``diagnose`` is a pure function of those:
a list of ``Finding`` (a name tests assert on, a message, a fix, and whether it is a
problem). The exit status is 0 when no finding is a problem.

The doctor only reads: it starts no node, changes no file, and sends nothing but mDNS
queries, hellos and signed status requests.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import aiohttp
import ifaddr

from mesh import __version__
from mesh.errors import MeshError
from mesh.protocol.codec import key_fingerprint
from mesh.runtime.auth import key_bytes, key_file, resolve_key
from mesh.runtime.http import HELLO_PATH, request_json
from node.discovery import PROTOCOL_VERSION, Browsed, Record, browse, default_interfaces

log = logging.getLogger(__name__)

Severity = Literal["problem", "note", "ok"]

BROWSE_S: Final = 4.0
HELLO_TIMEOUT_S: Final = 3.0
MAX_ADDRESSES: Final = 64
"""Hellos sent at most (one per announced address)."""
MAX_SKEW_S: Final = 60.0
"""Clocks further apart fail request proofs (``NodeConfig.api_auth_skew_s``)."""
PEERS_ASKED: Final = 3


@dataclass(frozen=True, kw_only=True, slots=True)
class Finding:
    """One thing the doctor found."""

    name: str
    """Stable, for scripts and tests: ``multicast-not-received``, ``port-blocked``, ..."""
    severity: Severity
    message: str
    fix: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class Hello:
    """What a node said at one address (``GET /v1/hello``)."""

    address: str
    id: str = ""
    mesh: str = ""
    version: str = ""
    instance: str = ""
    clock_offset_s: float = 0.0
    """Its clock minus ours (from the answer's Date header; whole seconds)."""
    error: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerView:
    """What a peer of this mesh says about this node."""

    id: str
    address: str
    hears_us: bool | None
    """Whether its mDNS found this node (None: it could not be asked)."""
    reaches_us: bool | None
    """Whether it could connect to this node's port (None: not asked)."""
    error: str = ""


@dataclass(kw_only=True, slots=True)
class Observations:
    """Everything ``examine`` saw; ``diagnose`` judges it."""

    key_file: str = ""
    key_file_mode: int | None = None
    """Permission bits of the key file, None if there is none."""
    fingerprint: str | None = None
    """Of the key this machine has (None: no key)."""
    node_url: str = ""
    local: Hello | None = None
    """The node here, None if none answers at ``node_url``."""
    local_address: str = ""
    local_mdns: bool = False
    local_peers: list[tuple[str, str, str]] = field(default_factory=list)
    """(id, address, state) of the peers the node here knows."""
    interfaces: list[tuple[str, str]] = field(default_factory=list)
    """(interface name, address) the browse used."""
    browse_s: float = BROWSE_S
    records: list[Record] = field(default_factory=list)
    hellos: list[Hello] = field(default_factory=list)
    views: list[PeerView] = field(default_factory=list)


_MULTICAST_FIX: Final = (
    "allow UDP port 5353 (multicast 224.0.0.251) in this machine's firewall; on Wi-Fi, let "
    "the access point pass multicast (turn off client isolation, 'multicast enhancement', "
    "IGMP snooping without a querier); or start with --join HOST:PORT of a member"
)


def _where(interfaces: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{name} ({addr})" for name, addr in interfaces) or "no interface"


def diagnose(obs: Observations) -> list[Finding]:
    """The findings, problems first; one ``all-well`` finding when there is no problem."""
    found: list[Finding] = []
    add = found.append
    path = obs.key_file
    if obs.key_file_mode is not None and obs.key_file_mode & 0o077:
        add(
            Finding(
                name="key-file-permissions",
                severity="problem",
                message=f"the key file {path} can be read by other users "
                f"(mode {obs.key_file_mode:04o})",
                fix=f"chmod 600 {path}",
            )
        )
    if obs.fingerprint is None:
        add(
            Finding(
                name="no-key",
                severity="problem",
                message="this machine has no mesh key",
                fix="run `mesh-node invite` on a member, then `mesh-node start --code CODE` here",
            )
        )
    local = obs.local
    if local is None:
        add(
            Finding(
                name="no-local-node",
                severity="problem",
                message=f"no mesh node answers at {obs.node_url}",
                fix="start one: `mesh-node start` (or point the doctor at it with --node URL)",
            )
        )
    elif obs.fingerprint is not None and local.mesh != obs.fingerprint:
        add(
            Finding(
                name="key-mismatch",
                severity="problem",
                message=f"the node here runs with key {local.mesh}, this machine's key is "
                f"{obs.fingerprint}",
                fix="restart the node with the key of the mesh it belongs to",
            )
        )
    mine = local.mesh if local is not None else obs.fingerprint
    my_id = local.id if local is not None else ""
    ours = [r for r in obs.records if r.mesh == mine and r.node != my_id]
    others = [r for r in obs.records if r.mesh != mine]
    where = _where(obs.interfaces)

    from_others = [r for r in obs.records if r.node != my_id]
    alive = [n for n, _, state in obs.local_peers if state == "alive"]
    if not from_others:
        if alive:
            why = (
                f"though {len(alive)} peer{'s' if len(alive) != 1 else ''} of this mesh "
                f"({', '.join(alive[:4])}) {'are' if len(alive) != 1 else 'is'} alive"
            )
        elif obs.records:
            why = "only this node's own, so either no other node runs on this LAN or"
        else:
            why = "not even this node's own" if local is not None and obs.local_mdns else ""
        add(
            Finding(
                name="multicast-not-received",
                # A lone node that hears itself may simply be the first one.
                severity="note" if obs.records and not alive else "problem",
                message=f"no mDNS announcement from another node arrived on {where} in "
                f"{obs.browse_s:g} s{', ' + why if why else ''}"
                f"{' ' if why.endswith('or') else ': '}multicast is not received here",
                fix=_MULTICAST_FIX,
            )
        )
    deaf = [v for v in obs.views if v.hears_us is False]
    if deaf and local is not None and obs.local_mdns:
        names = ", ".join(v.id for v in deaf)
        add(
            Finding(
                name="multicast-not-sent",
                severity="problem",
                message=f"{names} never received this node's mDNS announcement, sent on {where}",
                fix="allow outgoing UDP port 5353 to 224.0.0.251 here, and check that the "
                "interface is the one the LAN is on (--mdns-interface ADDR)",
            )
        )
    blocked = [v for v in obs.views if v.reaches_us is False]
    if blocked and local is not None:
        v = blocked[0]
        port = obs.local_address.rpartition(":")[2]
        add(
            Finding(
                name="port-blocked",
                severity="problem",
                message=f"{v.id} cannot connect to this node at {obs.local_address}"
                f" ({v.error or 'no answer'}): a firewall drops the port",
                fix=f"allow incoming TCP port {port}: `sudo ufw allow {port}/tcp`, or "
                f"`sudo nft add rule inet filter input tcp dport {port} accept`",
            )
        )
    if others:
        keys = sorted({r.mesh for r in others})
        shown = ", ".join(f"{r.node} at {r.address}" for r in others[:4])
        alone = not ours and not any(s == "alive" for _, _, s in obs.local_peers)
        add(
            Finding(
                name="other-mesh",
                severity="problem" if alone else "note",
                message=f"found {len(others)} node{'s' if len(others) != 1 else ''} with a "
                f"different key ({shown}; key {', '.join(keys)}, this machine's "
                f"{mine or 'none'})",
                fix="if this machine belongs with them, run `mesh-node invite` on one of them "
                "and `mesh-node start --code CODE` here",
            )
        )
    old = [r for r in ours if r.version != PROTOCOL_VERSION]
    for r in old:
        add(
            Finding(
                name="incompatible-version",
                severity="problem",
                message=f"{r.node} at {r.address} speaks mesh protocol v{r.version} "
                f"(mesh-node {r.package or 'older than 0.1'}); this machine speaks "
                f"v{PROTOCOL_VERSION} (mesh-node {__version__})",
                fix=f"run the same mesh-node version on every machine: upgrade {r.node} "
                "(or this one)",
            )
        )
    by_id: dict[str, dict[str, str]] = {}
    for h in obs.hellos:
        if h.id and h.mesh == mine and h.instance:
            by_id.setdefault(h.id, {})[h.instance] = h.address
    for node, instances in sorted(by_id.items()):
        if len(instances) > 1:
            at = " and ".join(sorted(instances.values()))
            add(
                Finding(
                    name="duplicate-id",
                    severity="problem",
                    message=f"{len(instances)} nodes call themselves {node}: at {at}",
                    fix="give each machine its own name (--name); a copied configuration "
                    "or start script carries the same one",
                )
            )
    announced = {a for r in ours for a in _addresses(r)}
    silent = [h for h in obs.hellos if h.error and h.address in announced]
    for h in silent:
        add(
            Finding(
                name="peer-unreachable",
                severity="problem",
                message=f"a node announces {h.address} but does not answer there ({h.error})",
                fix="a firewall on that machine drops its port, or it listens on another "
                "address: check it with `mesh-node doctor` there",
            )
        )
    for h in obs.hellos:
        if not h.error and abs(h.clock_offset_s) > MAX_SKEW_S:
            side = "ahead of" if h.clock_offset_s > 0 else "behind"
            add(
                Finding(
                    name="clock-off",
                    severity="problem",
                    message=f"the clock of {h.id or h.address} is {abs(h.clock_offset_s):.0f} s "
                    f"{side} this machine's: signed requests between them fail",
                    fix="turn on time synchronisation on both: `sudo timedatectl set-ntp true`",
                )
            )
    if local is not None and ours and not [v for v in obs.views if v.reaches_us is not None]:
        add(
            Finding(
                name="port-not-tested",
                severity="note",
                message="no peer could be asked whether it reaches this node's port",
            )
        )
    problems = [f for f in found if f.severity == "problem"]
    if not problems:
        seen = len({r.node for r in ours})
        found.append(
            Finding(
                name="all-well",
                severity="ok",
                message=f"all is well: {seen} other node{'s' if seen != 1 else ''} of this mesh "
                f"seen by mDNS on {where}",
            )
        )
    order = {"problem": 0, "note": 1, "ok": 2}
    return sorted(found, key=lambda f: order[f.severity])


def _addresses(r: Record) -> list[str]:
    return [f"{a}:{r.port}" for a in r.addresses]


# ---------------------------------------------------------------------------------------
# Looking
# ---------------------------------------------------------------------------------------


def interface_names(addresses: Sequence[str]) -> list[tuple[str, str]]:
    """(interface name, address) for each address of this machine."""
    names: dict[str, str] = {}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                names[ip.ip] = adapter.nice_name
    return [(names.get(a, "?"), a) for a in addresses]


async def _hello(http: aiohttp.ClientSession, address: str) -> Hello:
    try:
        async with asyncio.timeout(HELLO_TIMEOUT_S):
            async with http.get(f"http://{address}{HELLO_PATH}") as resp:
                body = await resp.json()
                date = resp.headers.get("Date")
        if not isinstance(body, dict):
            raise ValueError("not a hello")
        offset = 0.0
        if date:
            offset = email.utils.parsedate_to_datetime(date).timestamp() - time.time()
        return Hello(
            address=address,
            id=str(body.get("id", "")),
            mesh=str(body.get("mesh", "")),
            version=str(body.get("version", "")),
            instance=str(body.get("instance", "")),
            clock_offset_s=round(offset, 1),
        )
    except (aiohttp.ClientError, TimeoutError, ValueError, TypeError) as exc:
        return Hello(address=address, error=str(exc) or type(exc).__name__)


async def _view(
    http: aiohttp.ClientSession, key: bytes, peer: Hello, me: str, my_address: str
) -> PeerView:
    base = f"http://{peer.address}"
    try:
        async with asyncio.timeout(HELLO_TIMEOUT_S * 3):
            status = await request_json(http, key, base, "GET", "/v1/status", to=peer.id)
            probe = await request_json(
                http, key, base, "POST", "/v1/probe", {"address": my_address}, to=peer.id
            )
    except (MeshError, TimeoutError) as exc:
        return PeerView(
            id=peer.id, address=peer.address, hears_us=None, reaches_us=None, error=str(exc)
        )
    seen = status.get("mdns_seen") if isinstance(status, dict) else None
    hears = (me in seen) if isinstance(seen, list) and status.get("mdns") else None
    reaches = bool(probe.get("reachable")) if isinstance(probe, dict) else None
    error = str(probe.get("error", "")) if isinstance(probe, dict) else ""
    return PeerView(
        id=peer.id, address=peer.address, hears_us=hears, reaches_us=reaches, error=error
    )


async def examine(
    *,
    node_url: str,
    key: str | None = None,
    browse_s: float = BROWSE_S,
    interfaces: Sequence[str] | None = None,
) -> Observations:
    """Look at this machine and its LAN (a few seconds: one mDNS browse, then hellos)."""
    obs = Observations(node_url=node_url, browse_s=browse_s)
    path = key_file()
    obs.key_file = str(path)
    try:
        obs.key_file_mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        obs.key_file_mode = None
    secret: str | None
    try:
        secret = resolve_key(key)
    except MeshError:
        secret = None
    kb = key_bytes(secret) if secret else None
    obs.fingerprint = key_fingerprint(kb) if kb is not None else None
    chosen = list(interfaces) if interfaces is not None else default_interfaces("")
    obs.interfaces = interface_names(chosen)
    host_port = node_url.split("://", 1)[-1].rstrip("/")
    async with aiohttp.ClientSession() as http:
        async with asyncio.TaskGroup() as tg:
            browsing = tg.create_task(_browse(browse_s, chosen))
            local = await _hello(http, host_port)
            if not local.error:
                obs.local = local
                obs.local_address = host_port
                if kb is not None and local.mesh == obs.fingerprint:
                    await _local_state(http, kb, node_url, local, obs)
        browsed = browsing.result()
        obs.records = list(browsed.records)
        addresses = [a for r in browsed.records for a in _addresses(r)]
        addresses += [addr for _, addr, _ in obs.local_peers]
        unique = [a for a in dict.fromkeys(addresses) if a != obs.local_address]
        hellos = await asyncio.gather(*(_hello(http, a) for a in unique[:MAX_ADDRESSES]))
        obs.hellos = [*hellos, *([obs.local] if obs.local else [])]
        if obs.local is not None and kb is not None and obs.local.mesh == obs.fingerprint:
            peers = [h for h in hellos if not h.error and h.mesh == obs.fingerprint and h.id][
                :PEERS_ASKED
            ]
            me = obs.local.id
            obs.views = list(
                await asyncio.gather(
                    *(_view(http, kb, p, me, obs.local_address) for p in peers if p.id != me)
                )
            )
    return obs


async def _browse(seconds: float, interfaces: list[str]) -> Browsed:
    try:
        return await browse(seconds, interfaces=interfaces)
    except OSError as exc:  # no multicast socket at all: nothing is received
        log.warning("mDNS browse failed: %s", exc)
        return Browsed(interfaces=tuple(interfaces), records=(), bad_records=0)


async def _local_state(
    http: aiohttp.ClientSession, kb: bytes, url: str, local: Hello, obs: Observations
) -> None:
    try:
        async with asyncio.timeout(HELLO_TIMEOUT_S * 2):
            status = await request_json(http, kb, url, "GET", "/v1/status", to=local.id)
            peers = await request_json(http, kb, url, "GET", "/v1/peers", to=local.id)
    except (MeshError, TimeoutError):
        return
    if isinstance(status, dict):
        obs.local_mdns = bool(status.get("mdns"))
        address = status.get("address")
        if isinstance(address, str) and address:
            obs.local_address = address
    if isinstance(peers, list):
        obs.local_peers = [
            (str(p.get("id")), str(p.get("address")), str(p.get("state")))
            for p in peers
            if isinstance(p, dict) and not p.get("self")
        ]


def report(findings: Sequence[Finding]) -> str:
    """The findings for people: one paragraph each, the fix indented under it."""
    marks = {"problem": "PROBLEM", "note": "note", "ok": "ok"}
    lines: list[str] = []
    for f in findings:
        lines.append(f"{marks[f.severity]}: {f.message} [{f.name}]")
        if f.fix:
            lines.append(f"    fix: {f.fix}")
    return "\n".join(lines)


def as_json(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    return [
        {"name": f.name, "severity": f.severity, "message": f.message, "fix": f.fix}
        for f in findings
    ]


__all__ = [
    "Finding",
    "Hello",
    "Observations",
    "PeerView",
    "as_json",
    "diagnose",
    "examine",
    "report",
]
