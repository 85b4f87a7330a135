"""Hostile but well-typed messages against the membership core in a live state.

The core, ``me``, knows six peers: some alive, one suspect, one dead, one departed, with a
probe in flight. Every fuzzed message is framed and decoded by a real ``Codec`` first.
After every step:

* ``receive`` accepts or raises ``RemoteProtocolError``, and a rejected message changes
  nothing a driver can see (no event, no message, same members, record, timer, counters);
* ``next_timer`` is None or a finite float, and ``handle_timer`` at and after it raises
  nothing;
* everything ``take_outgoing`` returns survives the codec, and an honest peer accepts it:
  this node never gossips a record or claim (its own above all) that peers refuse;
* the member table and tombstones stay within ``max_members``;
* local operations still work: set_load, set_capabilities, join.

Messages are generic (any registered wire type, fields drawn from what the core knows) or
targeted: records and claims about this node itself and its peers at incarnations around
the ones in use and at the edge of what is accepted, acks to the probe in flight, joins
whose record names the sender, digests and deltas about known nodes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mesh.config import MembershipConfig
from mesh.errors import RemoteProtocolError
from mesh.protocol.membership import MAX_COUNTER, Membership
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
    MembershipUpdate,
    NodeId,
    NodeRecord,
    Ping,
    PingReq,
    Suspect,
    Wire,
)

from .hostile import (
    FUZZ,
    LONG,
    CodecHop,
    Pools,
    any_wire,
    encodes,
    hostile_floats,
    hostile_ints,
    hostile_text,
    memory_cap,
    only_remote_errors,
    wire_of,
)

CFG = MembershipConfig.test()
ME = "me"
PEERS = ("a", "b", "c", "d", "e", "f")
CAPS = Capabilities(
    resources={"cpu": 4.0, "memory": 8e9}, libraries={"numpy": "1.26"}, tasks=("t",), labels={}
)
IDLE = Load(running=0, queued=0, backlog_s=0.0)
EDGE = (0, 1, 2, MAX_COUNTER - 1, MAX_COUNTER, MAX_COUNTER + 1, 2**63 - 1, 2**64 - 1)
"""Incarnations and versions at the edges of what a core accepts."""

Draw = Callable[[st.SearchStrategy[Any]], Any]


def address(node: str) -> Address:
    return Address(f"{node}:7340")


def record(node: str, incarnation: int = 1, version: int = 1) -> NodeRecord:
    return NodeRecord(
        node=NodeId(node),
        address=address(node),
        incarnation=incarnation,
        version=version,
        capabilities=CAPS,
        load=IDLE,
    )


def observer() -> Membership:
    """An honest peer that has never heard of anyone: what it refuses, every peer refuses."""
    return Membership(
        node=NodeId("observer"),
        address=Address("observer:7340"),
        config=CFG,
        rng=random.Random(1),
        now=0.0,
        capabilities=CAPS,
        load=IDLE,
    )


class World:
    """One membership core and what it sent."""

    def __init__(self) -> None:
        self.core = Membership(
            node=NodeId(ME),
            address=address(ME),
            config=CFG,
            rng=random.Random(3),
            now=0.0,
            capabilities=CAPS,
            load=IDLE,
        )
        self.hop = CodecHop(ME)
        self.now = 0.0
        self.seqs: set[int] = set()
        self.pools_now = Pools()

    def pools(self) -> Pools:
        counters = {0, 1, self.core.incarnation, self.core.record.version, *self.seqs}
        for v in self.core.members():
            counters.add(v.incarnation)
        nodes = (ME, *PEERS, "ghost")
        return Pools(
            nodes=nodes,
            addresses=(*(address(n) for n in nodes), "observer:7340"),
            counters=tuple(sorted(counters)),
        )

    # ------------------------------------------------------------------ checks

    def check_timer(self) -> float | None:
        t = self.core.next_timer()
        assert t is None or (type(t) is float and math.isfinite(t)), f"next_timer() = {t!r}"
        return t

    def snapshot(self) -> tuple[Any, ...]:
        stats = self.core.stats()
        return (
            self.core.members(),
            self.core.record,
            self.core.next_timer(),
            (stats.refutations, stats.suspicions, stats.deaths, stats.stalls, stats.members),
            stats.tombstones,
        )

    def absorb(self) -> None:
        honest = observer()
        for dst, msg in self.core.take_outgoing():
            assert type(dst) is str, f"sent {msg} to {dst!r}"
            assert dst, f"sent {msg} to nowhere"
            assert type(encodes(msg, ME, "observer")) is type(msg)
            err = only_remote_errors(lambda m=msg: honest.receive(NodeId(ME), m, self.now))
            assert err is None, f"an honest peer refuses what this node sent ({err}): {msg}"
            if isinstance(msg, Ping | PingReq):
                self.seqs.add(msg.seq)
        self.core.take_events()
        self.check_timer()
        stats = self.core.stats()
        assert stats.members <= CFG.max_members
        assert stats.tombstones <= CFG.max_members

    # ------------------------------------------------------------------ the flow

    def run_due(self, until: float | None = None, limit: int = 60) -> None:
        """Serve every timer due by ``until`` at its own time (at most ``limit`` of them)."""
        until = self.now if until is None else until
        for _ in range(limit):
            t = self.check_timer()
            if t is None or t > until:
                break
            self.now = max(self.now, t)
            self.core.handle_timer(self.now)
            self.absorb()
        self.now = max(self.now, until)

    def stall(self) -> None:
        t = self.core.next_timer()
        self.now = max(self.now, t if t is not None else self.now) + 3 * CFG.stall_threshold_s
        self.core.handle_timer(self.now)
        self.absorb()

    def deliver(self, src: str, msg: Wire) -> RemoteProtocolError | None:
        """Frame ``msg`` from ``src``, decode it and feed it to the core; check the outcome."""
        self.run_due()
        got = self.hop.carry(src, msg)
        if got is None:
            return None
        before = self.snapshot()
        err = only_remote_errors(lambda: self.core.receive(NodeId(src), got, self.now))
        if err is not None:
            out = self.core.take_outgoing()
            events = self.core.take_events()
            assert out == [], f"rejected ({err.reason}) yet sent {out}"
            assert events == [], f"rejected ({err.reason}) yet produced {events}"
            assert self.snapshot() == before, f"rejected ({err.reason}) yet changed state"
        self.absorb()
        return err

    def wind_down(self) -> None:
        """Serve timers a while, then check that local operations still go through."""
        self.run_due(self.now + 1.0, limit=20)
        self.core.set_load(Load(running=1, queued=2, backlog_s=0.5), self.now)
        self.core.set_capabilities(Capabilities(**{**_fields(CAPS), "tasks": ("t", "v")}), self.now)
        self.core.join(address("seed"), self.now)
        self.absorb()
        self.run_due(self.now + 0.5, limit=10)


def _fields(w: Wire) -> dict[str, Any]:
    return {n: getattr(w, n) for n in type(w).__dataclass_fields__}  # type: ignore[attr-defined]


def build() -> World:
    """The live state every example starts from (deterministic)."""
    w = World()
    w.core.learn([record(n) for n in PEERS], 0.0)
    claims = (
        Suspect(node=NodeId("d"), incarnation=1, by=NodeId("a")),
        Dead(node=NodeId("e"), incarnation=1, by=NodeId("a")),
        Left(node=NodeId("f"), incarnation=1),
    )
    assert w.deliver("a", Gossip(updates=claims)) is None
    w.run_due(0.25)  # probes go unanswered: some peers become suspect too
    states = {v.node: v.state for v in w.core.members()}
    assert (states["d"], states["e"], states["f"]) == ("suspect", "dead", "left"), states
    assert w.seqs, "a probe is in flight"
    return w


# ---------------------------------------------------------------------------------------
# Bugs found by this suite and not fixed yet: (name, trigger). Each has a regression
# example below that fails while it is open (``xfail``), so its fix must remove it here.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Targeted messages
# ---------------------------------------------------------------------------------------

SOURCES = st.one_of(st.sampled_from(PEERS), st.sampled_from(("ghost", "x" * 128, "y" * 129)))


def counters(w: World) -> st.SearchStrategy[int]:
    near = [c + d for c in w.pools_now.counters for d in (-1, 0, 1) if c + d >= 0]
    return st.one_of(st.sampled_from(near), st.sampled_from(EDGE), hostile_ints())


def capabilities(w: World) -> st.SearchStrategy[Capabilities]:
    return st.one_of(st.just(CAPS), wire_of(Capabilities, w.pools_now, 1))


def loads() -> st.SearchStrategy[Load]:
    sizes = st.one_of(st.integers(0, 100), st.sampled_from(EDGE), hostile_ints())
    backlog = st.one_of(st.floats(0, 1e6), hostile_floats())
    return st.builds(Load, running=sizes, queued=sizes, backlog_s=backlog)


def nodes(w: World) -> st.SearchStrategy[NodeId]:
    return st.one_of(st.sampled_from((ME, ME, *PEERS)), w.pools_now.node_ids()).map(NodeId)


def records(w: World, node: st.SearchStrategy[NodeId] | None = None) -> st.SearchStrategy[Any]:
    return st.builds(
        NodeRecord,
        node=node if node is not None else nodes(w),
        address=st.one_of(st.sampled_from([address(n) for n in (ME, *PEERS)]), hostile_text()),
        incarnation=counters(w),
        version=counters(w),
        capabilities=capabilities(w),
        load=loads(),
    )


def updates(w: World) -> st.SearchStrategy[tuple[MembershipUpdate, ...]]:
    claim = st.one_of(
        st.builds(Suspect, node=nodes(w), incarnation=counters(w), by=nodes(w)),
        st.builds(Dead, node=nodes(w), incarnation=counters(w), by=nodes(w)),
        st.builds(Left, node=nodes(w), incarnation=counters(w)),
    )
    one = st.one_of(records(w), claim, claim)
    return st.one_of(
        st.lists(one, max_size=4).map(tuple),
        st.tuples(one, st.sampled_from(LONG[:2])).map(lambda p: (p[0],) * p[1]),
        st.sampled_from(LONG[:2]).map(
            lambda n: tuple(record(f"flood-{i}") for i in range(n))  # past the table's room
        ),
    )


def reply_to(w: World) -> st.SearchStrategy[Address]:
    own = [address(n) for n in (ME, *PEERS)]
    return st.one_of(st.sampled_from(own), w.pools_now.address_values()).map(Address)


def targeted(draw: Draw, w: World) -> tuple[str, Wire]:
    kind = draw(
        st.sampled_from(("gossip", "gossip", "ping", "ack", "ping-req", "join", "digest", "delta"))
    )
    src = draw(SOURCES)
    if kind == "gossip":
        return src, Gossip(updates=draw(updates(w)))
    if kind == "ping":
        return src, Ping(
            seq=draw(counters(w)), reply_to=draw(reply_to(w)), updates=draw(updates(w))
        )
    if kind == "ack":
        seq = draw(st.one_of(st.sampled_from(sorted(w.seqs) or [1]), counters(w)))
        return src, Ack(seq=seq, updates=draw(updates(w)))
    if kind == "ping-req":
        return src, PingReq(
            seq=draw(counters(w)),
            target=draw(nodes(w)),
            target_address=draw(reply_to(w)),
            reply_to=draw(reply_to(w)),
            updates=draw(updates(w)),
        )
    if kind == "join":
        named = st.just(NodeId(src)) if draw(st.integers(0, 4)) else nodes(w)
        return src, Join(record=draw(records(w, named)))
    if kind == "digest":
        entry = st.tuples(counters(w), counters(w), st.one_of(st.integers(0, 3), hostile_ints()))
        entries = draw(
            st.one_of(
                st.dictionaries(nodes(w), entry, max_size=5),
                st.sampled_from(LONG[:2]).map(
                    lambda n: {NodeId(f"flood-{i}"): (1, 1, 0) for i in range(n)}
                ),
            )
        )
        return src, Digest(reply_to=draw(reply_to(w)), entries=entries)
    want = draw(
        st.one_of(
            st.lists(nodes(w), max_size=4).map(tuple),
            st.sampled_from(LONG).map(lambda n: tuple(NodeId(f"flood-{i}") for i in range(n))),
        )
    )
    return src, Delta(reply_to=draw(reply_to(w)), updates=draw(updates(w)), want=want)


# ---------------------------------------------------------------------------------------
# The fuzz loop
# ---------------------------------------------------------------------------------------

STEPS = ("targeted", "targeted", "targeted", "generic", "time", "time", "local")
DT = (0.0, CFG.probe_timeout_s, CFG.probe_interval_s, 1.0, CFG.dead_grace_s + 0.1)


def step(draw: Draw, w: World) -> None:
    w.pools_now = w.pools()
    what = draw(st.sampled_from(STEPS))
    if what == "targeted":
        w.deliver(*targeted(draw, w))
    elif what == "generic":
        w.deliver(draw(SOURCES), draw(any_wire(w.pools_now)))
    elif what == "time":
        if draw(st.integers(0, 3)) == 0:
            w.stall()
        else:
            w.run_due(w.now + draw(st.sampled_from(DT)))
    else:
        choice = draw(st.sampled_from(("load", "caps", "join")))
        if choice == "load":
            load = Load(running=draw(st.integers(0, 8)), queued=0, backlog_s=draw(st.floats(0, 60)))
            w.core.set_load(load, w.now)
        elif choice == "caps":
            tasks = draw(st.lists(st.sampled_from(("t", "u", "v")), max_size=3, unique=True))
            w.core.set_capabilities(Capabilities(**{**_fields(CAPS), "tasks": tuple(tasks)}), w.now)
        else:
            w.core.join(address(draw(st.sampled_from(("seed", *PEERS)))), w.now)
        w.absorb()


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_membership_survives_hostile_peers(data: st.DataObject) -> None:
    with memory_cap():
        w = build()
        for _ in range(data.draw(st.integers(1, 6), label="steps")):
            step(data.draw, w)
        w.wind_down()


LIVE = build()
"""The starting state, for strategies that must know its numbers before a test runs."""
LIVE.pools_now = LIVE.pools()


@st.composite
def live_messages(draw: Draw) -> tuple[str, Wire]:
    if draw(st.booleans()):
        return targeted(draw, LIVE)
    return draw(SOURCES), draw(any_wire(LIVE.pools_now))


@settings(FUZZ, max_examples=250)
@given(live_messages())
@example(
    ("a", Gossip(updates=(Suspect(node=NodeId(ME), incarnation=MAX_COUNTER, by=NodeId("a")),)))
)
@example(("a", Digest(reply_to=address("a"), entries={NodeId(ME): (MAX_COUNTER, 0, 1)})))
def test_membership_survives_one_hostile_message(message: tuple[str, Wire]) -> None:
    with memory_cap():
        w = build()
        w.deliver(*message)
        w.wind_down()
