"""mDNS discovery of mesh peers with python-zeroconf: a finder, never a liveness signal.

Each node registers one instance of ``_mesh-node._tcp.local.`` whose TXT record carries
``id`` (node id), ``mesh`` (``mesh.protocol.codec.key_fingerprint`` of the mesh key, so that two
meshes on one LAN ignore each other without revealing a key), ``v`` (protocol version) and
``pkg`` (the mesh-node package version), and browses the same type. Each peer of the same
mesh is reported once through ``on_found(node, "host:port")``, and again if its address
changes. A clean shutdown sends goodbye packets, which peers report through ``on_lost``; a
crashed node stays in browsers for about 19 minutes (zeroconf raises PTR TTLs to 1125 s), so
whether a peer is alive is for gossip to decide, never for this module.

``browse`` is the same search done once, for a program that is no node (``mesh-node doctor``,
a machine joining with a code): every record it resolves in a time window, of any mesh.

This module does not connect to peers, keep a peer table or judge liveness; it only tells
the daemon who announced itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import Any, Final

import ifaddr
from zeroconf import DNSQuestionType, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh import __version__
from mesh.errors import LocalProtocolError
from mesh.protocol.codec import VERSION
from mesh.protocol.messages import Address, NodeId
from mesh.runtime.background import Background, Ready, until_cancelled

log = logging.getLogger(__name__)

SERVICE_TYPE: Final = "_mesh-node._tcp.local."
PROTOCOL_VERSION: Final = str(VERSION)
"""The peer protocol's version, the one peer hellos compare: a node of another one is not
dialled, and ``mesh-node doctor`` names it."""
RESOLVE_TIMEOUT_MS: Final = 3000
_MAX_LABEL: Final = 63


def instance_label(node: NodeId) -> str:
    """The DNS label a node registers under: its id, or a digest if the id cannot be one."""
    if node and len(node.encode()) <= _MAX_LABEL and "." not in node:
        return node
    return "mesh-" + hashlib.sha256(node.encode()).hexdigest()[:20]


def default_interfaces(host: str) -> list[str]:
    """Where to announce and listen: the pinned host, else every non-loopback IPv4 address.

    A node bound to one address (``--host``) must not advertise addresses it does not serve
    on; an unpinned node is reachable on all of them. Loopback is left out because peers on
    other machines cannot use it; tests on one machine pass ``["127.0.0.1"]`` explicitly.
    """
    if host and host not in ("0.0.0.0", "::"):
        return [host]
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.IPv4Address(ip.ip).is_loopback:
                found.append(ip.ip)
    return sorted(set(found))


class Discovery:
    """Registers this node over mDNS and reports the peers of the same mesh."""

    def __init__(
        self,
        *,
        node: NodeId,
        host: str,
        port: int,
        key_fingerprint: str,
        on_found: Callable[[NodeId, Address], None],
        on_lost: Callable[[NodeId], None] | None = None,
        interfaces: Sequence[str] | None = None,
        cooperating_responders: bool = True,
    ) -> None:
        if not 0 < port < 65536:
            raise LocalProtocolError(f"port {port} cannot be announced")
        self.node = node
        self.host = host
        self.port = port
        self.fingerprint = key_fingerprint
        self._on_found = on_found
        self._on_lost = on_lost
        self.interfaces = list(interfaces) if interfaces is not None else None
        self._cooperating = cooperating_responders
        self._background = Background(f"mdns {node}")
        self._peers: dict[str, tuple[NodeId, Address]] = {}  # instance name -> peer
        self._found: set[NodeId] = set()
        self.found_count = 0
        """Distinct peers found through mDNS since start (``status``: "mDNS found nobody")."""
        self.ignored: dict[str, int] = {"other-mesh": 0, "other-version": 0, "bad-record": 0}
        """Instances seen but not reported, by reason."""

    @property
    def found(self) -> frozenset[NodeId]:
        """The peers found through mDNS since start (``mesh-node doctor``: do they hear us?)."""
        return frozenset(self._found)

    async def start(self) -> None:
        """Register this node and start browsing for peers; returns once announced."""
        await self._background.start(self._serve)

    async def close(self) -> None:
        """Stop browsing and unregister (goodbye packets: peers see this node leave)."""
        await self._background.stop()

    async def __aenter__(self) -> Discovery:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, ready: Ready) -> None:
        interfaces = (
            self.interfaces if self.interfaces is not None else default_interfaces(self.host)
        )
        if not interfaces:
            raise LocalProtocolError("no IPv4 interface to announce this node on")
        pinned = self.host not in ("", "0.0.0.0", "::")
        announced = [self.host] if pinned else interfaces
        label = instance_label(self.node)
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            parsed_addresses=announced,
            port=self.port,
            properties={
                "id": self.node,
                "mesh": self.fingerprint,
                "v": PROTOCOL_VERSION,
                "pkg": __version__,
            },
            server=f"{label}.local.",
        )
        async with AsyncExitStack() as stack:
            zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
            stack.push_async_callback(zc.async_close)
            # Node ids are unique in a mesh, so conflict probing only delays the
            # announcement. The call returns once the records are queued; awaiting its
            # result waits until they have been announced.
            await (await zc.async_register_service(info, cooperating_responders=self._cooperating))
            stack.push_async_callback(_unregister, zc, info)
            browser = AsyncServiceBrowser(zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
            stack.push_async_callback(browser.async_cancel)
            log.info("mDNS: announced %s on %s, browsing %s", label, announced, SERVICE_TYPE)
            ready()
            await until_cancelled()

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # Called by the browser on the event loop; resolving needs awaits, so it is a task.
        if state_change is ServiceStateChange.Removed:
            peer = self._peers.pop(name, None)
            if peer is not None and self._on_lost is not None:
                self._on_lost(peer[0])
            return
        self._background.spawn(self._resolve(zeroconf, service_type, name), f"mdns {name}")

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("mDNS: %s did not resolve", name)
            return
        found = self._peer_of(info)
        if found is None or not self._background.running:
            return
        node, address = found
        if self._peers.get(name) == found:
            return
        self._peers[name] = found
        if node not in self._found:
            self._found.add(node)
            self.found_count = len(self._found)
        log.info("mDNS: found %s at %s", node, address)
        self._on_found(node, address)

    def _peer_of(self, info: AsyncServiceInfo) -> tuple[NodeId, Address] | None:
        """The peer an instance describes, or None for itself, other meshes and junk."""
        props: dict[Any, Any] = info.properties or {}
        node = _text(props.get(b"id"))
        mesh = _text(props.get(b"mesh"))
        version = _text(props.get(b"v"))
        if not node or mesh is None or version is None or not info.port:
            self.ignored["bad-record"] += 1
            return None
        if node == self.node:
            return None
        if mesh != self.fingerprint:
            self.ignored["other-mesh"] += 1
            return None
        if version != PROTOCOL_VERSION:
            self.ignored["other-version"] += 1
            return None
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses:
            self.ignored["bad-record"] += 1
            return None
        # A peer announcing several addresses is reachable on each; prefer one that is not
        # loopback unless loopback is all there is (one machine, tests).
        usable = [a for a in addresses if not ipaddress.IPv4Address(a).is_loopback]
        host = (usable or addresses)[0]
        return NodeId(node), Address(f"{host}:{info.port}")


async def _unregister(zc: AsyncZeroconf, info: AsyncServiceInfo) -> None:
    # Awaiting the returned task waits until the goodbyes have been sent.
    await (await zc.async_unregister_service(info))


def _text(value: object) -> str | None:
    if not isinstance(value, bytes):
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Record:
    """One resolved instance of the service, whatever mesh it belongs to."""

    instance: str
    node: str
    mesh: str
    version: str
    package: str
    """The mesh-node version it runs ("" for a node older than the ``pkg`` record)."""
    addresses: tuple[str, ...]
    port: int

    @property
    def address(self) -> str:
        """``host:port`` to reach it at: a non-loopback address if it has one."""
        usable = [a for a in self.addresses if not ipaddress.IPv4Address(a).is_loopback]
        return f"{(usable or list(self.addresses) or ['?'])[0]}:{self.port}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Browsed:
    """What one ``browse`` saw."""

    interfaces: tuple[str, ...]
    """The addresses it listened and asked on."""
    records: tuple[Record, ...]
    bad_records: int
    """Instances that resolved to something that is no mesh record."""


def record_of(name: str, info: AsyncServiceInfo) -> Record | None:
    """The record an instance resolved to, or None for junk."""
    props: dict[Any, Any] = info.properties or {}
    node, mesh, version = (_text(props.get(k)) for k in (b"id", b"mesh", b"v"))
    addresses = tuple(info.parsed_addresses(IPVersion.V4Only))
    if not node or mesh is None or version is None or not info.port or not addresses:
        return None
    return Record(
        instance=name,
        node=node,
        mesh=mesh,
        version=version,
        package=_text(props.get(b"pkg")) or "",
        addresses=addresses,
        port=int(info.port),
    )


async def browse(
    seconds: float,
    *,
    interfaces: Sequence[str] | None = None,
    enough: Callable[[Sequence[Record]], bool] | None = None,
) -> Browsed:
    """Every mesh record resolved within ``seconds`` on ``interfaces`` (default: all
    non-loopback IPv4 addresses), returning early once ``enough(records)`` holds."""
    chosen = list(interfaces) if interfaces is not None else default_interfaces("")
    if not chosen:
        return Browsed(interfaces=(), records=(), bad_records=0)
    names: asyncio.Queue[str] = asyncio.Queue()
    found: dict[str, Record] = {}
    infos: dict[str, AsyncServiceInfo] = {}
    bad = 0

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.put_nowait(name)

    async def resolve(zc: Zeroconf, name: str) -> None:
        nonlocal bad
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zc, RESOLVE_TIMEOUT_MS, question_type=DNSQuestionType.QM):
            return
        record = record_of(name, info)
        if record is None:
            bad += 1
        else:
            found[name] = record
            infos[name] = info

    def refresh(zc: Zeroconf) -> None:
        # A resolve ends with the first complete answer, but two hosts announcing one name
        # (a copied configuration) both answer, and each answer flushes the other's address
        # from the cache a second later: every address seen meanwhile is kept.
        for name, info in infos.items():
            info.load_from_cache(zc)
            again = record_of(name, info)
            if again is not None:
                known = found[name].addresses
                more = tuple(a for a in again.addresses if a not in known)
                found[name] = replace(again, addresses=known + more)

    azc = AsyncZeroconf(interfaces=chosen, ip_version=IPVersion.V4Only)
    # Questions ask for answers by multicast (QM): a node on this machine shares port 5353
    # with this browser, and a unicast answer reaches only one of the two sockets.
    try:
        browser = AsyncServiceBrowser(
            azc.zeroconf, SERVICE_TYPE, handlers=[on_change], question_type=DNSQuestionType.QM
        )
        try:
            async with asyncio.timeout(seconds), asyncio.TaskGroup() as tg:
                while enough is None or not enough(list(found.values())):
                    try:
                        async with asyncio.timeout(0.2):
                            name = await names.get()
                    except TimeoutError:
                        refresh(azc.zeroconf)
                        continue
                    tg.create_task(resolve(azc.zeroconf, name))
        except TimeoutError:
            pass
        finally:
            await browser.async_cancel()
        refresh(azc.zeroconf)
    finally:
        await azc.async_close()
    return Browsed(interfaces=tuple(chosen), records=tuple(found.values()), bad_records=bad)
