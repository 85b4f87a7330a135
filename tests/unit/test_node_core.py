"""Hand-stepped tests of the node core: the glue between membership and the contract.

Two or three ``NodeCore``s as ``mesh-node`` builds them, a float clock the test moves, and
messages that go from one node to another only when ``pump`` carries them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from mesh.config import MeshConfig
from mesh.errors import RemoteProtocolError
from mesh.protocol.contract import Execute, TaskSpec
from mesh.protocol.core import MemberState
from mesh.protocol.membership import MemberDown, Membership, MemberUp
from mesh.protocol.messages import Address, Capabilities, Load, NodeId, Requirements, TaskId
from mesh.protocol.node_core import NodeCore, NodeEvent

CONFIG = MeshConfig.test()
INTERVAL = CONFIG.node.load_gossip_interval_s
IDLE = Load(running=0, queued=0, backlog_s=0.0)


def caps(label: str) -> Capabilities:
    return Capabilities(
        resources={"cpu": 2.0, "memory": 8e9}, libraries={}, tasks=("t",), labels={"x": label}
    )


def spec(i: int, label: str) -> TaskSpec:
    return TaskSpec(
        task_id=TaskId(f"task-{i}"),
        requirements=Requirements(
            task="t", resources={"cpu": 1.0}, libraries={}, labels={"x": label}
        ),
        est_runtime_s=1.0,
    )


class Nodes:
    """Nodes by address; ``pump`` carries what they send until nothing is left."""

    def __init__(self, *names: str) -> None:
        self.by_address: dict[Address, NodeCore[Membership]] = {}
        self.events: dict[str, list[NodeEvent]] = {}
        self.down: set[str] = set()
        for i, name in enumerate(names):
            self.by_address[Address(name)] = NodeCore.build(
                node=NodeId(name),
                address=Address(name),
                config=CONFIG,
                rng=random.Random(i),
                now=0.0,
                capabilities=caps(name),
            )
            self.events[name] = []

    def __getitem__(self, name: str) -> NodeCore[Membership]:
        return self.by_address[Address(name)]

    def pump(self, now: float) -> None:
        moved = True
        while moved:
            moved = False
            for address, node in self.by_address.items():
                if address in self.down:
                    continue
                self.events[address].extend(node.take_events())
                for dst, msg in node.take_outgoing():
                    moved = True
                    if dst not in self.down and dst in self.by_address:
                        self.by_address[dst].receive(node.contract.node, msg, now)

    def run_until(self, end: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Serve every timer due before ``end``, in time order, pumping after each, until
        ``stop()`` holds."""
        while not stop():
            due = [
                (t, a)
                for a, n in self.by_address.items()
                if a not in self.down and (t := n.next_timer()) is not None and t < end
            ]
            if not due:
                return
            t, address = min(due)
            self.by_address[address].handle_timer(t)
            self.pump(t)


def joined(*names: str) -> Nodes:
    nodes = Nodes(*names)
    for name in names[1:]:
        nodes[name].join(Address(names[0]), 0.0)
    nodes.pump(0.0)
    nodes.run_until(1.0)
    for name in names:
        assert len(nodes[name].membership.live_members()) == len(names) - 1
    return nodes


def test_a_node_whose_contract_is_idle_asks_only_for_membership_timers() -> None:
    nodes = joined("a", "b")
    for name in ("a", "b"):
        node = nodes[name]
        assert node.next_timer() == node.membership.next_timer()


def test_load_reaches_the_gossiped_record_at_the_next_look_not_before() -> None:
    nodes = joined("a", "b")
    a, b = nodes["a"], nodes["b"]
    a.submit(spec(1, "b"), "payload", 1.1)
    nodes.pump(1.1)
    nodes.run_until(2.0, lambda: any(isinstance(ev, Execute) for ev in nodes.events["b"]))
    busy = b.contract.load()
    assert busy.running == 1
    assert b.membership.record.load == IDLE  # not yet: b looks at its load every INTERVAL
    look = INTERVAL * math.ceil(1.1 / INTERVAL)  # b's first look after the task came
    nodes.run_until(look)
    assert b.membership.record.load == IDLE
    nodes.run_until(look + 1e-9)
    assert b.membership.record.load == busy
    nodes.run_until(look + 3.0)
    seen_by_a = a.membership.member(NodeId("b"))
    assert seen_by_a is not None
    assert seen_by_a.load == busy


def test_a_peer_membership_declares_dead_is_given_up_by_the_contract() -> None:
    nodes = joined("a", "b", "c")
    a = nodes["a"]
    a.submit(spec(1, "b"), "payload", 1.0)
    nodes.pump(1.0)
    nodes.run_until(2.0, lambda: any(isinstance(ev, Execute) for ev in nodes.events["b"]))
    nodes.down.add(Address("b"))
    nodes.run_until(30.0)
    downs = [ev for ev in nodes.events["a"] if isinstance(ev, MemberDown)]
    assert [(ev.node, ev.state) for ev in downs] == [(NodeId("b"), MemberState.DEAD)]
    assert a.contract.stats()["peers_down"] == 1
    assert any(isinstance(ev, MemberUp) for ev in nodes.events["a"])  # passed on to the owner


def test_a_message_of_no_core_is_refused() -> None:
    nodes = Nodes("a")
    with pytest.raises(RemoteProtocolError) as err:
        nodes["a"].receive(NodeId("b"), IDLE, 0.0)
    assert err.value.reason == "unroutable"
