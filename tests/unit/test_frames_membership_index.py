"""``Membership.node_at``: the address index the driver names frame receivers with.

One core driven by hand: records arrive with ``learn`` or gossip, deaths as gossiped
claims, purges and tombstone expiry by moving the clock. The index must follow the table
(members in any state, remembered tombstones) and hold nothing else, whatever the order.
"""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from mesh.config import MembershipConfig
from mesh.protocol.membership import Membership
from mesh.protocol.messages import Address, Capabilities, Dead, Gossip, Load, NodeId, NodeRecord
from tests.unit.test_messages import SETTINGS

CFG = MembershipConfig.test()
CAPS = Capabilities(resources={"cpu": 1.0}, libraries={}, tasks=(), labels={})
IDLE = Load(running=0, queued=0, backlog_s=0.0)
WITNESS = NodeId("w")


def core() -> Membership:
    return Membership(
        node=NodeId("me"),
        address=Address("me:1"),
        config=CFG,
        rng=random.Random(0),
        now=0.0,
        capabilities=CAPS,
        load=IDLE,
    )


def record(node: str, address: str, *, incarnation: int = 0, version: int = 1) -> NodeRecord:
    return NodeRecord(
        node=NodeId(node),
        address=Address(address),
        incarnation=incarnation,
        version=version,
        capabilities=CAPS,
        load=IDLE,
    )


def kill(m: Membership, node: str, incarnation: int, now: float) -> None:
    claim = Dead(node=NodeId(node), incarnation=incarnation, by=WITNESS)
    m.receive(WITNESS, Gossip(updates=(claim,)), now)


def test_members_are_found_by_address_and_follow_a_move() -> None:
    m = core()
    m.learn([record("a", "a:1"), record("b", "b:1")], 0.0)
    assert (m.node_at(Address("a:1")), m.node_at(Address("b:1"))) == ("a", "b")
    assert m.node_at(Address("nobody:1")) is None
    m.learn([record("a", "a:2", version=2)], 0.1)
    assert m.node_at(Address("a:1")) is None
    assert m.node_at(Address("a:2")) == "a"


def test_a_dead_node_is_found_until_its_tombstone_expires() -> None:
    m = core()
    m.learn([record("w", "w:1"), record("d", "d:1")], 0.0)
    kill(m, "d", 0, 0.1)
    assert m.node_at(Address("d:1")) == "d"  # dead members are pinged back to life
    m.handle_timer(0.2 + CFG.dead_grace_s)
    assert m.member(NodeId("d")) is None
    assert m.node_at(Address("d:1")) == "d"  # and purged ones while remembered
    m.handle_timer(0.3 + CFG.dead_grace_s + CFG.tombstone_s)
    assert m.stats().tombstones == 0
    assert m.node_at(Address("d:1")) is None


def test_a_new_node_at_a_dead_nodes_address_takes_it_over() -> None:
    m = core()
    m.learn([record("w", "w:1"), record("old", "x:1")], 0.0)
    kill(m, "old", 0, 0.1)
    m.learn([record("new", "x:1")], 0.2)
    assert m.node_at(Address("x:1")) == "new"
    m.handle_timer(0.3 + CFG.dead_grace_s + CFG.tombstone_s)  # old purged, then forgotten
    m.handle_timer(0.4 + 2 * (CFG.dead_grace_s + CFG.tombstone_s))
    assert m.node_at(Address("x:1")) == "new"


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("record"),
            st.sampled_from("abcde"),
            st.sampled_from(["p:1", "q:1", "r:1", "s:1"]),
            st.integers(0, 3),
        ),
        st.tuples(st.just("kill"), st.sampled_from("abcde"), st.just(""), st.integers(0, 3)),
        st.tuples(st.just("wait"), st.just(""), st.just(""), st.integers(1, 20)),
    ),
    max_size=40,
)


@SETTINGS
@given(ops)
def test_the_index_follows_the_table_whatever_happens(
    steps: list[tuple[str, str, str, int]],
) -> None:
    m = core()
    now = 0.0
    version = 1
    for op, node, address, n in steps:
        now += 0.01
        if op == "record":
            version += 1
            m.learn([record(node, address, incarnation=n, version=version)], now)
        elif op == "kill":
            kill(m, node, n, now)
        else:
            now += n
            m.handle_timer(now)
        where: dict[NodeId, Address] = {
            **{n: t.address for n, t in m._tombstones.items()},
            **{n: x.record.address for n, x in m._members.items()},
        }
        # Each (node, address) of the table is indexed once, and nothing else is.
        indexed = [(holder, a) for a, holder in m._at.items()]
        indexed += [(holder, a) for a, others in m._also.items() for holder in others]
        assert sorted(indexed) == sorted(where.items())
        for a in where.values():
            assert m.node_at(a) is not None
