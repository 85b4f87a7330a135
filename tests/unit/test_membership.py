"""The membership core driven by hand: a few cores, a hand-moved clock, no event loop."""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import pytest

from mesh.config import MembershipConfig
from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.protocol.core import MemberState
from mesh.protocol.membership import (
    MAX_ID_LEN,
    MemberChanged,
    MemberDown,
    MemberPurged,
    Membership,
    MembershipEvent,
    MemberSuspect,
    MemberUp,
)
from mesh.protocol.messages import (
    Ack,
    Address,
    Capabilities,
    Dead,
    Delta,
    Digest,
    Gossip,
    Join,
    Left,
    Load,
    NodeId,
    NodeRecord,
    Ping,
    PingReq,
    Suspect,
    Wire,
)

CAPS = Capabilities(
    resources={"cpu": 4.0, "memory": 8e9}, libraries={"numpy": "1.26"}, tasks=("t",), labels={}
)
IDLE = Load(running=0, queued=0, backlog_s=0.0)
CFG = MembershipConfig.test()

Drop = Callable[[NodeId, Address, Wire], bool]


class Net:
    """Cores by address; messages are delivered at once (zero latency) unless dropped."""

    def __init__(self, config: MembershipConfig = CFG) -> None:
        self.config = config
        self.now = 0.0
        self.cores: dict[Address, Membership] = {}
        self.down: set[Address] = set()
        self.stalled: set[Address] = set()
        self.buffered: dict[Address, list[tuple[NodeId, Wire]]] = {}
        self.drop: Drop = lambda src, dst, msg: False
        self.events: dict[NodeId, list[MembershipEvent]] = {}

    def add(self, name: str, seed: int = 0) -> Membership:
        address = Address(f"{name}:7340")
        core = Membership(
            node=NodeId(name),
            address=address,
            config=self.config,
            rng=random.Random(f"{name}/{seed}"),
            now=self.now,
            capabilities=CAPS,
            load=IDLE,
        )
        self.cores[address] = core
        self.down.discard(address)
        return core

    def crash(self, core: Membership) -> None:
        self.down.add(core.address)

    def flush(self) -> None:
        queue: deque[tuple[NodeId, Address, Wire]] = deque()
        for address, core in self.cores.items():
            if address in self.down or address in self.stalled:
                continue
            for dst, msg in core.take_outgoing():
                queue.append((core.node, dst, msg))
        while queue:
            src, dst, msg = queue.popleft()
            if dst in self.down or dst not in self.cores or self.drop(src, dst, msg):
                continue
            if dst in self.stalled:
                self.buffered.setdefault(dst, []).append((src, msg))
                continue
            core = self.cores[dst]
            core.receive(src, msg, self.now)
            for out_dst, out in core.take_outgoing():
                queue.append((core.node, out_dst, out))
        for core in self.cores.values():
            self.events.setdefault(core.node, []).extend(core.take_events())

    def step(self, dt: float) -> None:
        self.now += dt
        for address, core in self.cores.items():
            if address in self.down or address in self.stalled:
                continue
            due = core.next_timer()
            if due is not None and due <= self.now:
                core.handle_timer(self.now)
        self.flush()

    def run(self, duration: float, dt: float = 0.01) -> None:
        end = self.now + duration
        while self.now < end - 1e-9:
            self.step(dt)

    def resume(self, core: Membership) -> None:
        """End a stall: the core sees ``now`` jump, then what arrived meanwhile."""
        self.stalled.discard(core.address)
        core.handle_timer(self.now)
        for src, msg in self.buffered.pop(core.address, []):
            core.receive(src, msg, self.now)
        self.flush()

    def state(self, viewer: Membership, node: Membership) -> MemberState | None:
        view = viewer.member(node.node)
        return None if view is None else view.state


def mesh_of(n: int, net: Net | None = None) -> tuple[Net, list[Membership]]:
    net = net or Net()
    cores = [net.add(f"n{i}") for i in range(n)]
    for core in cores[1:]:
        core.join(cores[0].address, net.now)
    net.flush()
    net.run(1.0)
    return net, cores


def all_alive(cores: list[Membership]) -> bool:
    return all(
        v is not None and v.state is MemberState.ALIVE
        for a in cores
        for v in (a.member(b.node) for b in cores)
    )


# ---------------------------------------------------------------------------------------
# Joining and records
# ---------------------------------------------------------------------------------------


def test_join_via_seed_address_only() -> None:
    net = Net()
    a, b, c = net.add("a"), net.add("b"), net.add("c")
    assert {v.node for v in a.members()} == {"a"}
    b.join(a.address, net.now)
    c.join(a.address, net.now)
    net.flush()
    net.run(1.0)
    assert all_alive([a, b, c])
    assert MemberUp(node=NodeId("c")) in net.events[NodeId("b")]
    assert sorted(v.node for v in b.members()) == ["a", "b", "c"]


def test_join_is_retried_until_the_seed_answers_and_is_idempotent() -> None:
    net = Net()
    a, b = net.add("a"), net.add("b")
    net.crash(a)
    b.join(a.address, net.now)
    b.join(a.address, net.now)
    net.flush()
    net.run(0.5)
    assert b.member(a.node) is None
    net.down.discard(a.address)  # the seed comes up later; b keeps asking
    net.run(1.0)
    assert all_alive([a, b])
    joins_before = sum(isinstance(m, Join) for _, m in b.take_outgoing())
    b.join(a.address, net.now)  # already a member: nothing to do
    assert joins_before == 0
    assert not b.take_outgoing()


def test_record_changes_propagate_with_versions() -> None:
    net, (a, b, c) = mesh_of(3)
    v0 = a.record.version
    busy = Load(running=2, queued=5, backlog_s=3.5)
    a.set_load(busy, net.now)
    assert a.record.version == v0 + 1
    net.run(0.5)
    for other in (b, c):
        view = other.member(a.node)
        assert view is not None
        assert view.load == busy
        assert MemberChanged(node=a.node) in net.events[other.node]
    caps = replace(CAPS, tasks=("t", "u"))
    a.set_capabilities(caps, net.now)
    net.run(0.5)
    assert c.member(a.node) is not None
    seen = c.member(a.node)
    assert seen is not None
    assert seen.capabilities == caps
    assert c.record_of(a.node) == a.record


def test_load_changes_are_coalesced_to_the_budget() -> None:
    cfg = replace(CFG, record_min_interval_s=1.0, record_updates_per_s=1e9)
    net, (a, _) = mesh_of(2, Net(cfg))
    a.set_load(Load(running=1, queued=0, backlog_s=0.0), net.now)
    v = a.record.version
    for k in range(5):
        a.set_load(Load(running=1, queued=k + 1, backlog_s=0.0), net.now)
    assert a.record.version == v  # within the interval: held back
    net.run(1.1)
    assert a.record.version == v + 1
    assert a.record.load.queued == 5  # only the newest value is published


def test_missed_gossip_is_repaired_by_digest_exchange() -> None:
    net, (a, _b, c) = mesh_of(3)
    # Every message that would carry a's next record to c is lost.
    net.drop = lambda src, dst, msg: (
        dst == c.address
        and any(isinstance(u, NodeRecord) and u.node == a.node for u in getattr(msg, "updates", ()))
    )
    a.set_load(Load(running=1, queued=1, backlog_s=1.0), net.now)
    net.run(0.2)
    assert c.record_of(a.node) != a.record
    # Gossip has given up on the change by now (its retransmit count is spent): only a
    # digest exchange can carry it to c.
    carried_by: list[str] = []

    def watch(src: NodeId, dst: Address, msg: Wire) -> bool:
        updates = getattr(msg, "updates", ())
        if dst == c.address and a.record in updates and not carried_by:
            carried_by.append(type(msg).__name__)
        return False

    net.drop = watch
    net.run(2 * CFG.anti_entropy_interval_s)
    assert c.record_of(a.node) == a.record
    assert carried_by == ["Delta"]


# ---------------------------------------------------------------------------------------
# Failure detection
# ---------------------------------------------------------------------------------------


def test_suspicion_is_refuted_by_a_higher_incarnation() -> None:
    net, (a, b, c) = mesh_of(3)
    inc = c.incarnation
    # Cut c off just long enough to be suspected, not declared dead.
    net.drop = lambda src, dst, msg: dst == c.address or src == c.node
    seen_suspect = False
    for _ in range(200):
        net.step(0.01)
        if net.state(a, c) is MemberState.SUSPECT or net.state(b, c) is MemberState.SUSPECT:
            seen_suspect = True
            break
    assert seen_suspect
    net.drop = lambda src, dst, msg: False
    net.run(1.0)
    assert c.incarnation > inc
    assert net.state(a, c) is MemberState.ALIVE
    assert net.state(b, c) is MemberState.ALIVE
    suspected = [
        e for e in net.events[a.node] + net.events[b.node] if e == MemberSuspect(node=c.node)
    ]
    assert suspected
    assert c.stats().refutations >= 1
    assert not any(isinstance(e, MemberDown) for e in net.events[a.node] + net.events[b.node])


def test_crashed_node_is_declared_dead_then_purged() -> None:
    net, (a, b, c) = mesh_of(3)
    net.crash(c)
    net.run(2.0)
    for viewer in (a, b):
        assert net.state(viewer, c) is MemberState.DEAD
        assert MemberDown(node=c.node, state=MemberState.DEAD) in net.events[viewer.node]
        assert [v.node for v in viewer.members() if v.state is MemberState.ALIVE] != []
    net.run(CFG.dead_grace_s + 0.5)
    for viewer in (a, b):
        assert viewer.member(c.node) is None
        assert MemberPurged(node=c.node) in net.events[viewer.node]
        assert viewer.stats().tombstones == 1


def test_a_refused_address_is_dead_at_once_and_then_everywhere() -> None:
    net, (a, b, c) = mesh_of(3)
    net.crash(c)
    a.gone(c.address, net.now)
    net.flush()  # no time passes: no probe, no suspicion
    assert net.state(a, c) is MemberState.DEAD
    assert net.events[a.node][-1] == MemberDown(node=c.node, state=MemberState.DEAD)
    assert MemberSuspect(node=c.node) not in net.events[a.node]
    net.run(CFG.probe_interval_s)  # gossip spreads the claim
    assert net.state(b, c) is MemberState.DEAD
    assert a.stats().gone == 1
    assert b.stats().gone == 0
    # Known dead already, an unknown address, or this node's own: nothing changes.
    a.gone(c.address, net.now)
    a.gone(Address("nobody:7340"), net.now)
    a.gone(a.address, net.now)
    assert a.stats().gone == 1
    assert net.state(a, b) is MemberState.ALIVE


def test_a_live_node_declared_gone_refutes() -> None:
    net, (a, b, c) = mesh_of(3)
    inc = c.incarnation
    a.gone(c.address, net.now)
    net.flush()
    net.run(1.0)
    assert c.incarnation > inc
    assert all_alive([a, b, c])


def test_purged_node_restarting_is_accepted_with_a_new_incarnation() -> None:
    net, (a, b, c) = mesh_of(3)
    net.crash(c)
    net.run(2.0 + CFG.dead_grace_s + 0.5)
    assert a.member(c.node) is None
    # Stale gossip of the old life must not bring it back.
    old = c.record
    a.receive(b.node, Gossip(updates=(old,)), net.now)
    assert a.member(c.node) is None
    c2 = net.add("n2", seed=1)  # same id and address, fresh state: incarnation 0
    c2.join(a.address, net.now)
    net.flush()
    net.run(1.0)
    assert c2.incarnation > old.incarnation
    assert net.state(a, c2) is MemberState.ALIVE
    assert net.state(b, c2) is MemberState.ALIVE
    assert all_alive([a, b, c2])


def test_restart_before_purge_refutes_its_death() -> None:
    net, (a, b, c) = mesh_of(3)
    net.crash(c)
    net.run(2.0)
    assert net.state(a, c) is MemberState.DEAD
    c2 = net.add("n2", seed=1)
    c2.join(a.address, net.now)
    net.flush()
    net.run(1.0)
    assert all_alive([a, b, c2])
    assert MemberUp(node=c.node) in net.events[b.node]


def test_graceful_leave_is_seen_at_once() -> None:
    net, (a, b, c) = mesh_of(3)
    c.leave(net.now)
    net.flush()  # no time passes: the peers were told directly
    for viewer in (a, b):
        assert net.state(viewer, c) is MemberState.LEFT
        assert MemberDown(node=c.node, state=MemberState.LEFT) in net.events[viewer.node]
    assert c.next_timer() is None
    assert c.member(c.node) is not None
    own = c.member(c.node)
    assert own is not None
    assert own.state is MemberState.LEFT
    net.run(CFG.dead_grace_s + 0.5)
    assert a.member(c.node) is None
    assert b.member(c.node) is None


def test_a_stalled_node_convicts_nobody_and_refutes() -> None:
    net, (a, b, c) = mesh_of(3)
    net.stalled.add(a.address)
    net.run(0.4 * CFG.suspicion_mult * CFG.probe_interval_s)  # shorter than b's verdict on a
    net.now += 2.0  # then a long pause in which nobody runs, a's loop included
    net.resume(a)
    assert a.stats().stalls == 1
    net.run(1.0)
    assert a.stats().deaths == 0
    assert not any(isinstance(e, MemberDown) for e in net.events[a.node])
    assert all_alive([a, b, c])


def test_stall_restarts_held_suspicions() -> None:
    net, (a, b, _) = mesh_of(3)
    suspicion = Suspect(node=b.node, incarnation=b.incarnation, by=NodeId("n2"))
    a.receive(NodeId("n2"), Gossip(updates=(suspicion,)), net.now)
    assert net.state(a, b) is MemberState.SUSPECT
    net.now += 10.0  # a's loop stalled far past the suspicion timeout
    a.handle_timer(net.now)
    assert net.state(a, b) is MemberState.SUSPECT  # restarted, not expired
    assert a.stats().deaths == 0
    net.flush()
    net.run(0.5)
    assert net.state(a, b) is MemberState.ALIVE  # b heard of it and refuted


def test_lifeguard_confirmations_shorten_a_suspicion() -> None:
    net, (a, b, *_rest) = mesh_of(5)
    lo = CFG.suspicion_mult * 2.0 * CFG.probe_interval_s
    hi = lo * CFG.suspicion_max_mult
    net.crash(b)
    t0 = net.now
    a.receive(
        NodeId("n2"),
        Gossip(updates=(Suspect(node=b.node, incarnation=0, by=NodeId("n2")),)),
        net.now,
    )
    for by in ("n3", "n4"):
        a.receive(
            NodeId(by),
            Gossip(updates=(Suspect(node=b.node, incarnation=0, by=NodeId(by)),)),
            net.now,
        )
    while net.state(a, b) is MemberState.SUSPECT:
        net.step(0.01)
    assert net.state(a, b) is MemberState.DEAD
    assert net.now - t0 < hi - 0.05


# ---------------------------------------------------------------------------------------
# Bad input and bounds
# ---------------------------------------------------------------------------------------


def _record(node: str, **kw: object) -> NodeRecord:
    fields: dict[str, object] = {
        "node": NodeId(node),
        "address": Address(f"{node}:1"),
        "incarnation": 0,
        "version": 1,
        "capabilities": CAPS,
        "load": IDLE,
    }
    fields.update(kw)
    return NodeRecord(**fields)  # type: ignore[arg-type]


BAD: list[tuple[str, Wire, str]] = [
    ("not-membership", IDLE, "unexpected-type"),
    ("empty-id", Gossip(updates=(_record(""),)), "bad-node"),
    ("long-id", Gossip(updates=(_record("x" * (MAX_ID_LEN + 1)),)), "bad-node"),
    ("neg-incarnation", Gossip(updates=(_record("z", incarnation=-1),)), "bad-counter"),
    ("huge-version", Gossip(updates=(_record("z", version=2**63),)), "bad-counter"),
    ("not-int-version", Gossip(updates=(_record("z", version=1.5),)), "bad-counter"),
    ("empty-address", Gossip(updates=(_record("z", address=""),)), "bad-address"),
    (
        "nan-resource",
        Gossip(updates=(_record("z", capabilities=replace(CAPS, resources={"cpu": math.nan})),)),
        "bad-capabilities",
    ),
    (
        "too-many-tasks",
        Gossip(updates=(_record("z", capabilities=replace(CAPS, tasks=("t",) * 300)),)),
        "bad-capabilities",
    ),
    (
        "neg-load",
        Gossip(updates=(_record("z", load=Load(running=-1, queued=0, backlog_s=0.0)),)),
        "bad-load",
    ),
    (
        "inf-backlog",
        Gossip(updates=(_record("z", load=Load(running=0, queued=0, backlog_s=math.inf)),)),
        "bad-load",
    ),
    ("load-in-updates", Gossip(updates=(IDLE,)), "unexpected-type"),  # type: ignore[arg-type]
    ("list-not-tuple", Gossip(updates=[_record("z")]), "oversized"),  # type: ignore[arg-type]
    (
        "too-many-updates",
        Gossip(updates=(Left(node=NodeId("z"), incarnation=0),) * 300),
        "oversized",
    ),
    (
        "bad-claim-by",
        Gossip(updates=(Suspect(node=NodeId("z"), incarnation=0, by=NodeId("")),)),
        "bad-node",
    ),
    ("neg-seq", Ping(seq=-1, reply_to=Address("n1:7340"), updates=()), "bad-counter"),
    ("ping-no-reply-to", Ping(seq=1, reply_to=Address(""), updates=()), "bad-address"),
    (
        "ack-bad-update",
        Ack(seq=1, updates=(Dead(node=NodeId("z"), incarnation=-3, by=NodeId("y")),)),
        "bad-counter",
    ),
    (
        "pingreq-bad-target",
        PingReq(
            seq=1,
            target=NodeId(""),
            target_address=Address("z:1"),
            reply_to=Address("n1:7340"),
            updates=(),
        ),
        "bad-node",
    ),
    ("join-impersonation", Join(record=_record("someone-else")), "impersonation"),
    (
        "digest-bad-rank",
        Digest(reply_to=Address("n1:7340"), entries={NodeId("z"): (0, 1, 9)}),
        "bad-counter",
    ),
    (
        "digest-short-entry",
        Digest(reply_to=Address("n1:7340"), entries={NodeId("z"): (0, 1)}),  # type: ignore[dict-item]
        "bad-field",
    ),
    (
        "digest-too-big",
        Digest(
            reply_to=Address("n1:7340"), entries={NodeId(f"z{i}"): (0, 1, 0) for i in range(300)}
        ),
        "oversized",
    ),
    (
        "delta-want-too-big",
        Delta(reply_to=Address("n1:7340"), updates=(), want=(NodeId("z"),) * 300),
        "oversized",
    ),
    (
        "delta-want-bad-id",
        Delta(reply_to=Address("n1:7340"), updates=(), want=(NodeId(""),)),
        "bad-node",
    ),
]


def _snapshot(core: Membership) -> tuple[object, ...]:
    return (
        core.members(),
        core.record,
        core.next_timer(),
        core.stats().refutations,
        core.stats().members,
    )


@pytest.mark.parametrize(("name", "msg", "reason"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_changes_nothing(name: str, msg: Wire, reason: str) -> None:
    net, (a, b, _c) = mesh_of(3)
    a.take_events()
    before = _snapshot(a)
    with pytest.raises(RemoteProtocolError) as info:
        a.receive(b.node, msg, net.now)
    assert info.value.reason == reason
    assert _snapshot(a) == before
    assert a.take_outgoing() == []
    assert a.take_events() == []


def test_message_claiming_to_come_from_self_is_refused() -> None:
    net, (a, _b, _) = mesh_of(3)
    before = _snapshot(a)
    with pytest.raises(RemoteProtocolError):
        a.receive(a.node, Gossip(updates=()), net.now)
    assert _snapshot(a) == before


def test_unknown_members_are_capped() -> None:
    cfg = replace(CFG, max_members=16)
    net, (a, b) = mesh_of(2, Net(cfg))
    for batch in range(10):
        records = tuple(_record(f"ghost{batch}-{i}") for i in range(10))
        a.receive(b.node, Gossip(updates=records), net.now)
        a.receive(b.node, Delta(reply_to=b.address, updates=records, want=()), net.now)
    assert len(a.members()) <= 16
    assert a.stats().rejected.get("capacity", 0) > 0
    # Claims about unknown nodes never add anything.
    a.receive(
        b.node, Gossip(updates=(Dead(node=NodeId("nobody"), incarnation=5, by=b.node),)), net.now
    )
    assert a.member(NodeId("nobody")) is None


def test_undrained_events_are_bounded() -> None:
    cfg = replace(CFG, max_events=50, max_members=256)
    net = Net(cfg)
    a = net.add("a")
    for i in range(200):
        a.receive(NodeId("b"), Gossip(updates=(_record(f"x{i}"),)), net.now)
    assert len(a.take_events()) <= 50
    assert a.stats().events_dropped > 0


def test_relayed_probes_are_bounded() -> None:
    cfg = replace(CFG, max_relays=4)
    net = Net(cfg)
    a = net.add("a")
    for i in range(20):
        req = PingReq(
            seq=i,
            target=NodeId("t"),
            target_address=Address("t:1"),
            reply_to=Address("r:1"),
            updates=(),
        )
        a.receive(NodeId("r"), req, net.now)
    pings = [m for _, m in a.take_outgoing() if isinstance(m, Ping)]
    assert len(pings) == 4
    assert a.stats().rejected["relay-capacity"] == 16


def test_learn_takes_records_without_gossiping_them() -> None:
    net = Net()
    a = net.add("a")
    a.learn([_record("p"), _record("q")], net.now)
    assert {v.node for v in a.members()} == {"a", "p", "q"}
    with pytest.raises(LocalProtocolError):
        a.learn([_record("r", incarnation=-1)], net.now)
    assert a.member(NodeId("r")) is None
    a.take_outgoing()
    net.now += CFG.gossip_interval_s
    a.handle_timer(net.now)
    assert not any(isinstance(m, Gossip) for _, m in a.take_outgoing())


def test_indirect_probe_keeps_a_node_alive_behind_a_broken_link() -> None:
    net, (a, _b, c) = mesh_of(3)

    def broken(src: NodeId, dst: Address, msg: Wire) -> bool:
        return (src == a.node and dst == c.address) or (src == c.node and dst == a.address)

    net.drop = broken
    net.run(3.0)
    assert net.state(a, c) is MemberState.ALIVE
    assert net.state(c, a) is MemberState.ALIVE
