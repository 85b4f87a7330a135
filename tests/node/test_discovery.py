"""mDNS discovery between real zeroconf instances on 127.0.0.1.

Other tests (or other meshes) may announce on this machine at the same time, so every test
uses fresh node ids and a fresh mesh fingerprint and only looks at its own nodes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections.abc import AsyncIterator, Callable

import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from mesh.protocol.messages import Address, NodeId
from node.discovery import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Discovery,
    default_interfaces,
    instance_label,
)

DEADLINE_S = 15.0
LOOPBACK = ["127.0.0.1"]


async def eventually(check: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(DEADLINE_S):
            # Polled: the condition spans callbacks and counters of several instances.
            while not check():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


class Seen:
    """What one Discovery reported."""

    def __init__(self) -> None:
        self.found: list[tuple[NodeId, Address]] = []
        self.lost: list[NodeId] = []

    def on_found(self, node: NodeId, address: Address) -> None:
        self.found.append((node, address))

    def on_lost(self, node: NodeId) -> None:
        self.lost.append(node)


def fresh(prefix: str) -> NodeId:
    return NodeId(f"{prefix}-{secrets.token_hex(4)}")


@pytest.fixture
def fingerprint() -> str:
    return secrets.token_hex(8)


@pytest.fixture
async def started() -> AsyncIterator[list[Discovery]]:
    """Discovery instances a test starts; all closed at the end, also on failure."""
    running: list[Discovery] = []
    yield running
    for d in running:
        await d.close()


def make(node: NodeId, port: int, fingerprint: str, seen: Seen) -> Discovery:
    return Discovery(
        node=node,
        host="127.0.0.1",
        port=port,
        key_fingerprint=fingerprint,
        on_found=seen.on_found,
        on_lost=seen.on_lost,
        interfaces=LOOPBACK,
    )


async def test_two_nodes_find_each_other_and_see_a_clean_leave(
    fingerprint: str, started: list[Discovery]
) -> None:
    a_id, b_id = fresh("a"), fresh("b")
    seen_a, seen_b = Seen(), Seen()
    a = make(a_id, 4101, fingerprint, seen_a)
    b = make(b_id, 4102, fingerprint, seen_b)
    for d in (a, b):
        await d.start()
        started.append(d)
    await eventually(lambda: bool(seen_a.found and seen_b.found), "both to find the other")
    assert seen_a.found == [(b_id, Address("127.0.0.1:4102"))]
    assert seen_b.found == [(a_id, Address("127.0.0.1:4101"))]
    assert (a.found_count, b.found_count) == (1, 1)
    # Goodbye packets: a hears at once that b left.
    started.remove(b)
    await b.close()
    await eventually(lambda: seen_a.lost == [b_id], "a to see b leave")
    assert seen_b.lost == []


async def test_other_meshes_other_versions_and_junk_are_ignored(
    fingerprint: str, started: list[Discovery]
) -> None:
    a_id, b_id = fresh("a"), fresh("b")
    seen_a, seen_b = Seen(), Seen()
    a = make(a_id, 4111, fingerprint, seen_a)
    await a.start()
    started.append(a)
    strangers = {
        "other-mesh": {"id": fresh("x"), "mesh": secrets.token_hex(8), "v": PROTOCOL_VERSION},
        "other-version": {"id": fresh("y"), "mesh": fingerprint, "v": "99"},
        "bad-record": {"mesh": fingerprint, "v": PROTOCOL_VERSION},
    }
    zc = AsyncZeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only)
    infos = []
    try:
        for port, (reason, props) in enumerate(strangers.items(), start=4120):
            name = f"{reason}-{secrets.token_hex(4)}"
            info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{name}.{SERVICE_TYPE}",
                parsed_addresses=["127.0.0.1"],
                port=port,
                properties=props,
                server=f"{name}.local.",
            )
            await (await zc.async_register_service(info, cooperating_responders=True))
            infos.append(info)
        b = make(b_id, 4112, fingerprint, seen_b)
        await b.start()
        started.append(b)
        await eventually(
            lambda: all(a.ignored[r] >= 1 for r in strangers) and bool(seen_a.found),
            "a to see every stranger and b",
        )
    finally:
        for info in infos:
            await (await zc.async_unregister_service(info))
        await zc.async_close()
    # Only the peer of the same mesh and version was reported; a never reports itself.
    assert seen_a.found == [(b_id, Address("127.0.0.1:4112"))]
    assert a.found_count == 1


async def test_a_node_does_not_report_itself(fingerprint: str, started: list[Discovery]) -> None:
    seen = Seen()
    a = make(fresh("a"), 4131, fingerprint, seen)
    await a.start()
    started.append(a)
    # Its own announcement comes back to its browser and must be recognised as itself.
    b_seen = Seen()
    probe = make(fresh("probe"), 4132, fingerprint, b_seen)
    await probe.start()
    started.append(probe)
    await eventually(lambda: bool(b_seen.found), "the probe to see a")
    assert [node for node, _ in seen.found] == [probe.node]
    assert a.found_count == 1


def test_instance_labels_are_valid_dns_labels() -> None:
    assert instance_label(NodeId("gpu-box-1")) == "gpu-box-1"
    for awkward in ("host.example.com", "n" * 80):
        label = instance_label(NodeId(awkward))
        assert "." not in label
        assert len(label.encode()) <= 63
        assert label == instance_label(NodeId(awkward))
    assert instance_label(NodeId("a.b")) != instance_label(NodeId("a.c"))


def test_interfaces_follow_the_pinned_host() -> None:
    assert default_interfaces("10.77.0.3") == ["10.77.0.3"]
    for address in default_interfaces("0.0.0.0"):
        assert not ipaddress.IPv4Address(address).is_loopback
