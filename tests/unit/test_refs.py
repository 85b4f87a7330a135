"""``node.refs``: who holds which objects, and leases per (object, node)."""

from __future__ import annotations

from mesh.protocol.messages import NodeId, ObjectRef
from node.refs import Holds, Leases, refs_in


def _ref(oid: str, holder: str = "h") -> ObjectRef:
    return ObjectRef(id=oid, holder=NodeId(holder), nbytes=10)


def test_an_object_is_held_while_some_key_holds_it() -> None:
    holds = Holds()
    a, b = _ref("a"), _ref("b", "k")
    assert holds.hold("s1", [a, b]) == [a, b]
    assert holds.hold(("task", 1), [a]) == []  # held already: no new lease needed
    assert holds.drop("s1") == [b]
    assert "a" in holds
    assert "b" not in holds
    assert holds.drop(("task", 1), ["a", "zzz"]) == [a]
    assert len(holds) == 0
    assert holds.drop("never") == []


def test_keys_with_a_deadline_let_go_then() -> None:
    holds = Holds()
    holds.hold("session", [_ref("a"), _ref("b", "k")])
    holds.hold("other", [_ref("b", "k")])
    holds.release_at("session", 10.0)
    assert holds.expire(9.9) == []
    assert holds.by_holder() == {"h": ["a"], "k": ["b"]}
    assert [r.id for r in holds.expire(10.0)] == ["a"]
    assert holds.by_holder() == {"k": ["b"]}


def test_an_object_lives_while_any_nodes_lease_runs() -> None:
    leases = Leases()
    a, b = NodeId("a"), NodeId("b")
    leases.start("x", a, until=10.0)
    assert leases.renew(b, ["x", "unknown"], until=12.0) == 1
    assert leases.give_up(a, ["x"]) == []  # b still keeps it
    assert leases.lapsed(11.0) == []
    assert leases.lapsed(12.0) == ["x"]
    assert "x" not in leases


def test_giving_up_the_last_lease_frees_at_once_and_a_lost_give_up_lapses() -> None:
    leases = Leases()
    leases.start("x", NodeId("a"), until=10.0)
    leases.start("y", NodeId("a"), until=10.0)
    assert leases.give_up(NodeId("a"), ["x", "x"]) == ["x"]
    # y's give-up was lost: its lease lapses by itself.
    assert leases.lapsed(10.0) == ["y"]
    # A renewal never shortens a lease.
    leases.start("z", NodeId("a"), until=20.0)
    leases.renew(NodeId("a"), ["z"], until=15.0)
    assert leases.lapsed(16.0) == []


def test_refs_are_found_inside_results() -> None:
    a, b = _ref("a"), _ref("b")
    assert refs_in({"x": [a, 1], "y": (b,)}) == [a, b]
    assert refs_in(3) == []
