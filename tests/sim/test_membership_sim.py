"""Membership at N = 100 in the simulator: convergence, detection, partitions, loss, stalls.

Each node is a ``NodeCore`` as ``mesh-node`` runs it (membership and an idle contract)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pytest

from mesh.config import MembershipConfig, MeshConfig
from mesh.protocol.codec import dumps
from mesh.protocol.core import MemberState
from mesh.protocol.membership import MemberDown, Membership
from mesh.protocol.messages import (
    Ack,
    Address,
    Capabilities,
    Dead,
    Delta,
    Digest,
    Gossip,
    Left,
    Load,
    MembershipUpdate,
    NodeId,
    NodeRecord,
    Ping,
    PingReq,
    Suspect,
    Wire,
)
from mesh.protocol.node_core import MEMBERSHIP_TAGS, NodeCore
from mesh.runtime.sim import Simulation, WireSizer

CAPS = Capabilities(
    resources={"cpu": 8.0, "gpu": 1.0, "memory": 16e9},
    libraries={"numpy": "1.26.4", "torch": "2.13.0"},
    tasks=("vision.features", "vision.infer"),
    labels={"room": "é-lab"},
)
IDLE = Load(running=0, queued=0, backlog_s=0.0)
N = 100


@dataclass
class Cluster:
    sim: Simulation[NodeCore[Membership]]
    ids: list[NodeId]
    config: MembershipConfig
    false_deaths: set[NodeId]
    crashed: set[NodeId]

    def core(self, node: NodeId) -> Membership:
        return self.sim.core(node).membership

    def live(self) -> list[NodeId]:
        return [n for n in self.ids if n not in self.crashed]

    def states(self, of: NodeId) -> list[MemberState | None]:
        out = []
        for viewer in self.live():
            if viewer == of:
                continue
            view = self.core(viewer).member(of)
            out.append(None if view is None else view.state)
        return out

    def converged(self) -> bool:
        live = self.live()
        for viewer in live:
            core = self.core(viewer)
            alive = {v.node for v in core.members() if v.state is MemberState.ALIVE}
            if alive != set(live) or len(core.members()) != len(live):
                return False
        return True


def build(
    n: int = N, *, seed: int, loss: float = 0.0, config: MembershipConfig | None = None
) -> Cluster:
    """n nodes that each join node 0 by address, a quarter second apart."""
    cfg = config or MembershipConfig.lan()
    mesh_config = replace(MeshConfig.lan(), membership=cfg)
    sim: Simulation[NodeCore[Membership]] = Simulation(
        seed=seed, latency=(0.0002, 0.002), loss=loss
    )
    ids = [NodeId(f"node-{i:03d}") for i in range(n)]
    seed_address = Address("10.0.0.1:7340")
    cluster = Cluster(sim=sim, ids=ids, config=cfg, false_deaths=set(), crashed=set())

    def factory(
        node: NodeId, address: Address, now: float, rng: random.Random
    ) -> NodeCore[Membership]:
        core = NodeCore.build(
            node=node, address=address, config=mesh_config, rng=rng, now=now, capabilities=CAPS
        )
        if address != seed_address:
            core.join(seed_address, now)
        return core

    def on_step(now: float, node: NodeId) -> None:
        for ev in cluster.core(node).take_events():
            if (
                isinstance(ev, MemberDown)
                and ev.state is MemberState.DEAD
                and ev.node not in cluster.crashed
            ):
                cluster.false_deaths.add(ev.node)

    sim.on_step.append(on_step)
    for i, node in enumerate(ids):
        sim.add_node(node, Address(f"10.0.{i // 250}.{i % 250 + 1}:7340"), factory, at=0.02 * i)
    return cluster


def run_until(cluster: Cluster, deadline: float, cond: object) -> float:
    """Run until ``cond()`` holds (checked every 0.1 s); returns the time, or fails."""
    sim = cluster.sim
    while sim.now < deadline:
        sim.run_for(0.1)
        if cond():  # type: ignore[operator]
            return sim.now
    raise AssertionError(f"not reached by t={deadline}")


# ---------------------------------------------------------------------------------------


def test_wire_sizes_equal_codec_sizes() -> None:
    sizer = WireSizer()
    rng = random.Random(3)
    for i in range(300):
        rec = NodeRecord(
            node=NodeId(f"n{rng.getrandbits(64):x}"),
            address=Address(f"10.0.0.{i % 250}:{rng.randrange(65536)}"),
            incarnation=rng.choice([0, 1, 127, 128, 300, 70000, 2**33]),
            version=rng.randrange(2**20),
            capabilities=replace(CAPS, tasks=tuple(f"t{k}" for k in range(rng.randrange(40)))),
            load=Load(
                running=rng.randrange(3), queued=rng.randrange(-0, 5000), backlog_s=rng.random()
            ),
        )
        claims: list[MembershipUpdate] = [
            Suspect(node=rec.node, incarnation=rec.incarnation, by=NodeId("x")),
            Dead(node=rec.node, incarnation=rec.incarnation, by=NodeId("x")),
            Left(node=rec.node, incarnation=rec.incarnation),
        ]
        updates = tuple([rec] * rng.randrange(20) + claims[: rng.randrange(4)])
        msgs: list[Wire] = [
            rec,
            Gossip(updates=updates),
            Ping(seq=rng.randrange(2**40), reply_to=rec.address, updates=updates[:3]),
            Ack(seq=i, updates=()),
            PingReq(
                seq=i, target=rec.node, target_address=rec.address, reply_to=rec.address, updates=()
            ),
            Digest(
                reply_to=rec.address,
                entries={NodeId(f"k{j}"): (j, j * 1000, j % 4) for j in range(rng.randrange(300))},
            ),
            Delta(reply_to=rec.address, updates=updates, want=(rec.node,) * rng.randrange(20)),
        ]
        for msg in msgs:
            assert sizer(msg) == len(dumps(msg)), msg


def test_nodes_join_through_one_seed_and_records_converge() -> None:
    c = build(seed=1)
    run_until(c, 20.0, c.converged)
    changer = c.ids[42]
    busy = Load(running=3, queued=9, backlog_s=12.5)
    t0 = c.sim.now
    c.sim.act(changer, t0, lambda core, now: core.membership.set_load(busy, now))
    c.sim.run_for(0.0)

    def everyone_has_it() -> bool:
        return all(
            (v := c.core(x).member(changer)) is not None and v.load == busy for x in c.live()
        )

    t = run_until(c, t0 + 5.0, everyone_has_it)
    assert t - t0 <= 2.0
    assert not c.false_deaths


def test_crashes_are_detected_everywhere_and_purged() -> None:
    c = build(seed=2)
    run_until(c, 20.0, c.converged)
    t0 = c.sim.now
    victims = [c.ids[7], c.ids[50], c.ids[99]]
    for v in victims:
        c.crashed.add(v)
        c.sim.crash(v, t0)

    def all_dead() -> bool:
        return all(s is MemberState.DEAD for v in victims for s in c.states(v))

    t = run_until(c, t0 + 20.0, all_dead)
    assert t - t0 <= 12.0
    run_until(
        c,
        t + c.config.dead_grace_s + 5.0,
        lambda: all(s is None for v in victims for s in c.states(v)),
    )
    assert c.converged()
    assert not c.false_deaths


def test_partition_then_heal_reconverges_with_no_dead_listed() -> None:
    c = build(seed=3)
    run_until(c, 20.0, c.converged)
    left, right = c.ids[:50], c.ids[50:]
    t0 = c.sim.now
    c.sim.partition([left, right], at=t0)

    def split() -> bool:
        return all(
            (v := c.core(x).member(y)) is None or v.state is MemberState.DEAD
            for x, y in ((left[0], right[0]), (right[-1], left[-1]), (left[10], right[30]))
        )

    run_until(c, t0 + 30.0, split)
    c.sim.run_for(5.0)
    c.sim.heal()
    c.false_deaths.clear()  # during the partition, each side rightly lost the other
    run_until(c, c.sim.now + 60.0, c.converged)
    for x in c.ids:
        assert all(v.state is MemberState.ALIVE for v in c.core(x).members())


def test_loss_and_stalls_cause_no_false_deaths() -> None:
    c = build(seed=4, loss=0.05)
    run_until(c, 20.0, c.converged)
    t0 = c.sim.now
    rng = random.Random(4)
    for node in rng.sample(c.ids, 5):
        c.sim.stall(node, t0 + rng.uniform(1.0, 40.0), 2.0)
    c.sim.run_for(60.0)
    assert not c.false_deaths
    assert c.converged()
    assert sum(c.core(x).stats().stalls for x in c.ids) == 5


def test_restarted_node_is_accepted_again() -> None:
    c = build(seed=5)
    run_until(c, 20.0, c.converged)
    node = c.ids[17]
    old = c.core(node).incarnation
    t0 = c.sim.now
    c.crashed.add(node)
    c.sim.crash(node, t0)
    run_until(c, t0 + 20.0, lambda: all(s is MemberState.DEAD for s in c.states(node)))
    c.sim.restart(node, c.sim.now)
    c.crashed.discard(node)
    c.sim.run_for(0.0)
    run_until(c, c.sim.now + 20.0, c.converged)
    assert c.core(node).incarnation > old


def test_same_seed_same_run() -> None:
    def run(seed: int) -> tuple[int, int, int]:
        c = build(20, seed=seed, loss=0.05)
        c.sim.run_until(15.0)
        return c.sim.stats.sent, c.sim.stats.bytes_sent, c.sim.stats.dropped

    assert run(9) == run(9)
    assert run(9) != run(10)


class _Echo:
    """A second core on each node: answers every wire type 96+ message with itself."""

    def __init__(self, peers: Sequence[Address]) -> None:
        self.peers = list(peers)
        self.out: list[tuple[Address, Wire]] = []
        self.got = 0
        self.fired = False

    def receive(self, src: NodeId, msg: Wire, now: float) -> None:
        self.got += 1

    def handle_timer(self, now: float) -> None:
        self.fired = True
        self.out.extend((p, IDLE) for p in self.peers)

    def next_timer(self) -> float | None:
        return None if self.fired else 1.0

    def take_outgoing(self) -> list[tuple[Address, Wire]]:
        out, self.out = self.out, []
        return out


@dataclass(eq=False)
class _Beside:
    """Membership and an echo core on one node: membership's messages go to membership."""

    membership: Membership
    echo: _Echo

    def receive(self, src: NodeId, msg: Wire, now: float) -> None:
        core = self.membership if int(msg.TAG) in MEMBERSHIP_TAGS else self.echo
        core.receive(src, msg, now)

    def handle_timer(self, now: float) -> None:
        for core in (self.membership, self.echo):
            due = core.next_timer()
            if due is not None and due <= now:
                core.handle_timer(now)

    def next_timer(self) -> float | None:
        times = (self.membership.next_timer(), self.echo.next_timer())
        return min((t for t in times if t is not None), default=None)

    def take_outgoing(self) -> list[tuple[Address, Wire]]:
        return self.membership.take_outgoing() + self.echo.take_outgoing()


def test_extra_cores_are_hosted_and_every_delivery_is_observed() -> None:
    sim: Simulation[_Beside] = Simulation(seed=6)
    addresses = [Address(f"h{i}") for i in range(3)]
    echoes: dict[NodeId, _Echo] = {}
    seen: list[tuple[str, int]] = []

    def factory(node: NodeId, address: Address, now: float, rng: random.Random) -> _Beside:
        echo = _Echo([a for a in addresses if a != address])
        echoes[node] = echo
        membership = Membership(
            node=node,
            address=address,
            config=MembershipConfig.test(),
            rng=rng,
            now=now,
            capabilities=CAPS,
            load=IDLE,
        )
        return _Beside(membership, echo)

    sim.on_deliver.append(lambda now, src, dst, msg, size: seen.append((type(msg).__name__, size)))
    for i, a in enumerate(addresses):
        sim.add_node(NodeId(f"h{i}"), a, factory)
    sim.run_until(2.0)
    assert all(e.got == 2 for e in echoes.values())
    assert ("Load", len(dumps(IDLE))) in seen
    assert sim.stats.delivered == len(seen)


@pytest.mark.parametrize("n", [10, 100])
def test_leave_is_seen_by_everyone_at_once(n: int) -> None:
    c = build(n, seed=8)
    run_until(c, 20.0, c.converged)
    leaver = c.ids[n // 2]
    c.sim.act(leaver, c.sim.now, lambda core, now: core.leave(now))
    c.sim.run_for(0.05)
    c.crashed.add(leaver)
    assert all(s is MemberState.LEFT for s in c.states(leaver))
    assert not c.false_deaths
