"""The membership core: who is in the mesh, what each node offers, and who has failed.

A sans-I/O state machine (``mesh.protocol.core.Core``): it never opens a socket, never sleeps and
never reads a clock. It must not import asyncio, aiohttp, zeroconf, socket or time; a
driver passes ``now`` (monotonic seconds) into every call and sends what
``take_outgoing`` returns.

The protocol is SWIM with Lifeguard-style suspicion:

* Failure detection. Every ``probe_interval_s`` the node pings the next member of a
  shuffled round-robin order. Without an ack after ``probe_timeout_s`` it asks
  ``indirect_checks`` other members to ping for it (``PingReq``); still without an ack at
  the end of the period it suspects the target. A suspicion lasts a timeout that starts
  high and shrinks as independent suspicions of the same incarnation arrive; when it
  runs out the node is declared dead. A dial the driver finds refused (``gone``: the
  host answers but nothing listens at the address, so the process has gone) skips the
  suspicion and declares the node dead at once. A node that hears it is suspected or
  dead refutes by raising its incarnation. Dead and departed nodes stay listed
  ``dead_grace_s``, are then purged and remembered as tombstones, so stale gossip cannot
  resurrect them while the node itself can always come back with a higher incarnation.
* State gossip. Each node owns one versioned ``NodeRecord`` (address, incarnation,
  capabilities, load). New records and claims (suspect, dead, left) spread by infection:
  each round a node sends what it has not yet sent ``ceil(retransmit_mult * ln(n + 1))``
  times to ``gossip_fanout`` random members, and piggybacks it on probes. Every
  anti-entropy period a ``Digest`` of ``(incarnation, version, state)`` per node goes to
  one random member, which answers with a ``Delta`` of what it knows better and the
  names of what it wants, so only newer records travel (Scuttlebutt-style).
* Stalls. If ``now`` arrives much later than the timer this node asked for, its own
  loop stalled: it convicts nobody for the silence it caused, restarts the suspicions it
  holds, and refutes in advance the suspicion it has likely drawn on itself.

Which transition a claim causes is decided by one order, written down here: a node's
state is known as ``(incarnation, rank)`` with rank alive 0 < suspect 1 < dead 2 < left 3,
and a claim replaces the current state only if its pair is greater. Records are ordered by
``(incarnation, version)``; a record with a higher incarnation than the current state
makes the node alive again.

Every input from a peer is validated in full before anything changes; anything
unacceptable raises ``RemoteProtocolError`` and leaves the state as it was. Every table is
bounded by ``MembershipConfig`` limits.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter

from mesh.config import MembershipConfig
from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.protocol.core import MemberState, MemberView
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

MAX_ID_LEN = 128
"""Longest node id accepted from a peer."""
MAX_ADDRESS_LEN = 256
"""Longest address accepted from a peer."""
MAX_ENTRIES = 256
"""Most entries in one capabilities map or tuple accepted from a peer."""
MAX_STR_LEN = 256
"""Longest key or value in capabilities accepted from a peer."""
MAX_COUNTER = 2**62
"""Incarnations, versions and sequence numbers above this are refused: no honest node
gets there, and it keeps ``+ 1`` well inside the wire's 64-bit integers."""
DELTA_CHUNK = 128
"""Updates per ``Delta`` message when a join or anti-entropy answer is large."""

RANK = {MemberState.ALIVE: 0, MemberState.SUSPECT: 1, MemberState.DEAD: 2, MemberState.LEFT: 3}
"""State precedence at equal incarnation (see the module docstring)."""
_STATE_OF_RANK = (MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT)


# ---------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberUp:
    """``node`` became alive: newly known, or back from suspect, dead or left."""

    node: NodeId


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberChanged:
    """The record of a live ``node`` changed (address, capabilities or load)."""

    node: NodeId


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberSuspect:
    """``node`` is suspected: it may be down; it stays a candidate until it is dead."""

    node: NodeId


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberDown:
    """``node`` is gone: ``state`` is DEAD (failed) or LEFT (departed on purpose)."""

    node: NodeId
    state: MemberState


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberPurged:
    """``node`` was dead or departed for the grace period and is no longer listed."""

    node: NodeId


MembershipEvent = MemberUp | MemberChanged | MemberSuspect | MemberDown | MemberPurged


@dataclass(frozen=True, slots=True, kw_only=True)
class MembershipStats:
    """Counters of what the core did; message and byte counts are the driver's."""

    rejected: dict[str, int]
    """Refused peer input by reason (``RemoteProtocolError.reason``, ``capacity``, ...)."""
    refutations: int
    suspicions: int
    """Suspicions this node raised itself after failed probes."""
    deaths: int
    """Nodes this node declared dead itself when a suspicion ran out."""
    gone: int
    """Nodes this node declared dead itself when nothing listened at their address."""
    stalls: int
    events_dropped: int
    members: int
    tombstones: int


# ---------------------------------------------------------------------------------------
# Internal state
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Member:
    record: NodeRecord
    state: MemberState
    state_inc: int
    since: float
    suspect_deadline: float = 0.0
    suspect_start: float = 0.0
    confirmers: set[NodeId] = field(default_factory=set)
    view: MemberView | None = None

    @property
    def incarnation(self) -> int:
        return max(self.record.incarnation, self.state_inc)


@dataclass(slots=True)
class _Probe:
    target: NodeId
    address: Address
    seq: int
    ack_deadline: float
    indirect_sent: bool = False
    acked: bool = False


@dataclass(slots=True)
class _Tombstone:
    incarnation: int
    address: Address
    until: float
    died: bool
    """False for a node that left on purpose: those are not pinged back to life."""


# ---------------------------------------------------------------------------------------
# Validation of peer input: pure functions, nothing changes until all of a message passed
# ---------------------------------------------------------------------------------------


def _bad(what: str, reason: str = "bad-field") -> RemoteProtocolError:
    return RemoteProtocolError(what, reason=reason)


def _check_id(node: object) -> None:
    if type(node) is not str or not 0 < len(node) <= MAX_ID_LEN:
        raise _bad("bad node id", "bad-node")


def _check_address(address: object) -> None:
    if type(address) is not str or not 0 < len(address) <= MAX_ADDRESS_LEN:
        raise _bad("bad address", "bad-address")


def _check_counter(value: object, what: str) -> None:
    if type(value) is not int or not 0 <= value <= MAX_COUNTER:
        raise _bad(f"bad {what}", "bad-counter")


def _check_str_map(m: object, what: str) -> None:
    if not isinstance(m, dict) or len(m) > MAX_ENTRIES:
        raise _bad(f"bad {what}", "bad-capabilities")
    for k, v in m.items():
        if type(k) is not str or len(k) > MAX_STR_LEN or type(v) is not str:
            raise _bad(f"bad {what}", "bad-capabilities")
        if len(v) > MAX_STR_LEN:
            raise _bad(f"bad {what}", "bad-capabilities")


def _check_capabilities(c: object) -> None:
    if not isinstance(c, Capabilities):
        raise _bad("capabilities expected", "bad-capabilities")
    res = c.resources
    if not isinstance(res, dict) or len(res) > MAX_ENTRIES:
        raise _bad("bad resources", "bad-capabilities")
    for k, v in res.items():
        if type(k) is not str or len(k) > MAX_STR_LEN or type(v) not in (int, float):
            raise _bad("bad resources", "bad-capabilities")
        if not (math.isfinite(v) and v >= 0):
            raise _bad("bad resources", "bad-capabilities")
    _check_str_map(c.libraries, "libraries")
    _check_str_map(c.labels, "labels")
    tasks = c.tasks
    if not isinstance(tasks, tuple) or len(tasks) > MAX_ENTRIES:
        raise _bad("bad tasks", "bad-capabilities")
    for t in tasks:
        if type(t) is not str or len(t) > MAX_STR_LEN:
            raise _bad("bad tasks", "bad-capabilities")


def _check_load(load: object) -> None:
    if not isinstance(load, Load):
        raise _bad("load expected", "bad-load")
    if type(load.running) is not int or type(load.queued) is not int:
        raise _bad("bad load", "bad-load")
    if not (0 <= load.running <= MAX_COUNTER and 0 <= load.queued <= MAX_COUNTER):
        raise _bad("bad load", "bad-load")
    b = load.backlog_s
    if type(b) not in (int, float) or not (math.isfinite(b) and b >= 0):
        raise _bad("bad load", "bad-load")


class _Validator:
    """Checks records and updates, remembering capability objects already checked.

    Records are immutable and, inside one process, shared: the simulator passes the same
    objects through many nodes, so rechecking the same capabilities would be waste. The
    cache holds the objects themselves, so their ids cannot be reused while cached.
    """

    __slots__ = ("_records", "_seen")

    def __init__(self) -> None:
        self._seen: dict[int, Capabilities] = {}
        self._records: dict[int, NodeRecord] = {}

    def record(self, r: object) -> None:
        if not isinstance(r, NodeRecord):
            raise _bad("record expected", "unexpected-type")
        if self._records.get(id(r)) is r:
            return
        _check_id(r.node)
        _check_address(r.address)
        _check_counter(r.incarnation, "incarnation")
        _check_counter(r.version, "version")
        c = r.capabilities
        if self._seen.get(id(c)) is not c:
            _check_capabilities(c)
            if len(self._seen) >= 1024:
                self._seen.clear()
            self._seen[id(c)] = c
        _check_load(r.load)
        if len(self._records) >= 4096:
            self._records.clear()
        self._records[id(r)] = r

    def update(self, u: object) -> None:
        if isinstance(u, NodeRecord):
            self.record(u)
        elif isinstance(u, Suspect | Dead):
            _check_id(u.node)
            _check_counter(u.incarnation, "incarnation")
            _check_id(u.by)
        elif isinstance(u, Left):
            _check_id(u.node)
            _check_counter(u.incarnation, "incarnation")
        else:
            raise _bad("membership update expected", "unexpected-type")

    def updates(self, us: object, limit: int) -> None:
        if not isinstance(us, tuple) or len(us) > limit:
            raise _bad("bad update list", "oversized")
        for u in us:
            self.update(u)


# ---------------------------------------------------------------------------------------
# The core
# ---------------------------------------------------------------------------------------


class Membership:
    """The membership core of one node (implements ``Core`` and ``PeerView``)."""

    def __init__(
        self,
        *,
        node: NodeId,
        address: Address,
        config: MembershipConfig,
        rng: random.Random,
        now: float,
        capabilities: Capabilities,
        load: Load,
    ) -> None:
        self.node = node
        self.address = address
        self.config = config
        self._rng = rng
        self._own = NodeRecord(
            node=node,
            address=address,
            incarnation=0,
            version=1,
            capabilities=capabilities,
            load=load,
        )
        self._left = False
        self._members: dict[NodeId, _Member] = {}
        # node -> (incarnation, version, rank) of every member, kept in step with
        # _members so that a digest costs a dict copy, not a walk over the table.
        self._digest: dict[NodeId, tuple[int, int, int]] = {}
        self._tombstones: OrderedDict[NodeId, _Tombstone] = OrderedDict()
        # address -> node, for members and tombstones, kept in step with them so that the
        # driver names each frame's receiver with a lookup (``node_at``). The rare nodes
        # that share an address with the one named wait in _also, latest demoted last.
        self._at: dict[Address, NodeId] = {}
        self._also: dict[Address, list[NodeId]] = {}
        self._live: list[NodeId] = []
        self._live_dirty = False
        self._probe_order: list[NodeId] = []
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._relays: OrderedDict[int, tuple[Address, int, float]] = OrderedDict()
        self._seq = 0
        # (node, is_record) -> [update, times sent]. A newer record replaces an older one
        # and a newer claim an older claim, but a claim never stops a record's spread.
        self._queue: dict[tuple[NodeId, bool], list[object]] = {}
        self._suspicions: list[tuple[float, NodeId]] = []
        self._purges: list[tuple[float, NodeId]] = []
        self._seeds: dict[Address, None] = {}
        self._outgoing: list[tuple[Address, Wire]] = []
        self._events: list[MembershipEvent] = []
        self._validator = _Validator()
        self._pending_load: Load | None = None
        self._last_publish = -math.inf  # the first change goes out at once
        self._next_publish: float | None = None
        # Random phases so that nodes started together do not probe and gossip in lockstep.
        self._next_probe = now + rng.random() * config.probe_interval_s
        self._next_gossip = now + rng.random() * config.gossip_interval_s
        self._next_anti_entropy = now + rng.random() * config.anti_entropy_interval_s
        self._next_reconnect = now + rng.random() * config.reconnect_interval_s
        self._next_join: float | None = None
        self._rejected: dict[str, int] = {}
        self._refutations = 0
        self._suspicions_raised = 0
        self._deaths = 0
        self._gone = 0
        self._stalls = 0
        self._events_dropped = 0
        self._due: float | None = None
        self._now = now
        self._update_due()

    # ----------------------------------------------------------------- PeerView

    def members(self) -> list[MemberView]:
        """Every known node, this one included, in any state (purged nodes excluded)."""
        out = [self._own_view()]
        for m in self._members.values():
            out.append(self._view(m))
        return out

    def member(self, node: NodeId) -> MemberView | None:
        """One node as known here, or None if it is unknown or purged."""
        if node == self.node:
            return self._own_view()
        m = self._members.get(node)
        return None if m is None else self._view(m)

    def record_of(self, node: NodeId) -> NodeRecord | None:
        """The newest record known of ``node`` (its version tells how fresh it is)."""
        if node == self.node:
            return self._own
        m = self._members.get(node)
        return None if m is None else m.record

    def node_at(self, address: Address) -> NodeId | None:
        """The other node known at ``address`` (a member in any state, or one purged but
        still remembered), or None. Where records disagree, the latest one applied wins."""
        return self._at.get(address)

    def live_members(self) -> list[NodeId]:
        """Other nodes that are alive or suspect (the ones probed and gossiped to)."""
        return list(self._live_nodes())

    @property
    def record(self) -> NodeRecord:
        """This node's own current record."""
        return self._own

    @property
    def incarnation(self) -> int:
        return self._own.incarnation

    def stats(self) -> MembershipStats:
        return MembershipStats(
            rejected=dict(self._rejected),
            refutations=self._refutations,
            suspicions=self._suspicions_raised,
            deaths=self._deaths,
            gone=self._gone,
            stalls=self._stalls,
            events_dropped=self._events_dropped,
            members=len(self._members) + 1,
            tombstones=len(self._tombstones),
        )

    # ----------------------------------------------------------------- driver-facing

    def join(self, address: Address, now: float) -> None:
        """Contact a seed known only by address (``--join`` or mDNS). Idempotent.

        The seed is asked again every ``join_retry_s`` while no other member is alive.
        """
        if self._left or address == self.address:
            return
        if address in self._seeds and self._live_nodes():
            return
        self._check_stall(now)
        if address not in self._seeds:
            if len(self._seeds) >= self.config.max_members:
                self._seeds.pop(next(iter(self._seeds)))
            self._seeds[address] = None
        self._outgoing.append((address, Join(record=self._own)))
        if self._next_join is None:
            self._next_join = now + self.config.join_retry_s
        self._update_due()

    def learn(self, records: Iterable[NodeRecord], now: float) -> None:
        """Add records known out of band (a saved peer table, a simulator's bootstrap).

        They are merged like anti-entropy results: accepted if newer, not gossiped on.
        Raises ``LocalProtocolError`` if a record is malformed.
        """
        records = tuple(records)
        try:
            for r in records:
                self._validator.record(r)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"bad record: {exc}") from None
        self._check_stall(now)
        for r in records:
            self._apply_record(r, now, spread=False)
        self._update_due()

    def set_load(self, load: Load, now: float) -> None:
        """Change this node's load; published at once or coalesced (``record_*`` fields)."""
        if self._left:
            return
        self._check_stall(now)
        if load == self._own.load and self._pending_load is None:
            return
        self._pending_load = load
        earliest = self._last_publish + self._publish_interval()
        if now >= earliest:
            self._publish(now)
        elif self._next_publish is None:
            self._next_publish = earliest
        self._update_due()

    def set_capabilities(self, capabilities: Capabilities, now: float) -> None:
        """Change this node's capabilities; published at once (they change rarely)."""
        if self._left or capabilities == self._own.capabilities:
            return
        self._check_stall(now)
        self._own = _replace_record(self._own, capabilities=capabilities)
        self._publish(now)
        self._update_due()

    def leave(self, now: float) -> None:
        """Leave gracefully: every live member is told at once, then the core goes quiet."""
        if self._left:
            return
        self._left = True
        msg = Gossip(updates=(Left(node=self.node, incarnation=self._own.incarnation),))
        for node in self._live_nodes():
            self._outgoing.append((self._members[node].record.address, msg))
        self._probe = None
        self._update_due()

    def take_events(self) -> list[MembershipEvent]:
        """Membership events since the last call, oldest first; clears them."""
        out = self._events
        self._events = []
        return out

    # ----------------------------------------------------------------- Core

    def take_outgoing(self) -> list[tuple[Address, Wire]]:
        out = self._outgoing
        self._outgoing = []
        return out

    def next_timer(self) -> float | None:
        return self._due

    def receive(self, src: NodeId, msg: Wire, now: float) -> None:
        """Handle ``msg`` from the authenticated ``src``; ``RemoteProtocolError`` if bad."""
        limit = self.config.max_members
        v = self._validator
        _check_id(src)
        if isinstance(msg, Gossip):
            v.updates(msg.updates, limit)
        elif isinstance(msg, Ping):
            _check_counter(msg.seq, "seq")
            _check_address(msg.reply_to)
            v.updates(msg.updates, limit)
        elif isinstance(msg, Ack):
            _check_counter(msg.seq, "seq")
            v.updates(msg.updates, limit)
        elif isinstance(msg, PingReq):
            _check_counter(msg.seq, "seq")
            _check_id(msg.target)
            _check_address(msg.target_address)
            _check_address(msg.reply_to)
            v.updates(msg.updates, limit)
        elif isinstance(msg, Join):
            v.record(msg.record)
            if msg.record.node != src:
                raise _bad("join for another node", "impersonation")
        elif isinstance(msg, Digest):
            _check_address(msg.reply_to)
            _check_digest(msg.entries, limit)
        elif isinstance(msg, Delta):
            _check_address(msg.reply_to)
            v.updates(msg.updates, limit)
            if not isinstance(msg.want, tuple) or len(msg.want) > limit:
                raise _bad("bad want list", "oversized")
            for w in msg.want:
                _check_id(w)
        else:
            raise _bad(f"{type(msg).__name__} is not a membership message", "unexpected-type")
        if src == self.node:
            raise _bad("message claims to come from this node", "bad-node")
        if self._left:
            return
        self._check_stall(now)
        if isinstance(msg, Gossip):
            self._apply_all(msg.updates, now, spread=True)
        elif isinstance(msg, Ping):
            self._on_ping(src, msg, now)
        elif isinstance(msg, Ack):
            self._on_ack(msg, now)
        elif isinstance(msg, PingReq):
            self._on_ping_req(src, msg, now)
        elif isinstance(msg, Join):
            self._on_join(src, msg, now)
        elif isinstance(msg, Digest):
            self._on_digest(src, msg, now)
        elif isinstance(msg, Delta):
            self._on_delta(msg, now)
        self._update_due()

    def gone(self, address: Address, now: float) -> None:
        """Nothing listens at ``address`` any more: a connection to it was refused.

        The live member at that address is declared dead at once. A probe that goes
        unanswered may be loss, a partition or a stalled loop, hence the suspicion's wait;
        a refusal comes from the member's own host after its process has gone, so waiting
        would only delay the work placed on it. A member still running (its listener closed
        for a moment) refutes the claim as it would a suspicion.
        """
        if self._left:
            return
        node = self._at.get(address)
        m = self._members.get(node) if node is not None else None
        if m is None or not (m.state is MemberState.ALIVE or m.state is MemberState.SUSPECT):
            return
        self._gone += 1
        claim = Dead(node=m.record.node, incarnation=m.state_inc, by=self.node)
        self._apply_claim(claim, now, spread=True)
        self._update_due()

    def handle_timer(self, now: float) -> None:
        if self._left:
            return
        self._check_stall(now)
        cfg = self.config
        probe = self._probe
        if (
            probe is not None
            and not probe.acked
            and not probe.indirect_sent
            and now >= probe.ack_deadline
        ):
            self._send_indirect(probe)
        if now >= self._next_probe:
            self._probe_tick(now)
        if now >= self._next_gossip:
            # Rounds keep their phase while idle: no timer runs for an empty queue.
            interval = cfg.gossip_interval_s
            self._next_gossip += interval * (1 + (now - self._next_gossip) // interval)
            self._gossip_round()
        self._expire_suspicions(now)
        self._expire_dead(now)
        while self._relays:
            seq, (_, _, until) = next(iter(self._relays.items()))
            if until > now:
                break
            del self._relays[seq]
        if now >= self._next_anti_entropy:
            self._next_anti_entropy = now + self._anti_entropy_interval()
            self._anti_entropy()
        if now >= self._next_reconnect:
            self._next_reconnect = now + cfg.reconnect_interval_s
            self._reconnect()
        if self._next_join is not None and now >= self._next_join:
            if self._live_nodes() or not self._seeds:
                self._next_join = None
            else:
                self._next_join = now + cfg.join_retry_s
                for address in self._seeds:
                    self._outgoing.append((address, Join(record=self._own)))
        if self._next_publish is not None and now >= self._next_publish:
            self._next_publish = None
            if self._pending_load is not None:
                self._publish(now)
        self._update_due()

    # ----------------------------------------------------------------- timing helpers

    def _n(self) -> int:
        return len(self._live_nodes()) + 1

    def _retransmit_limit(self) -> int:
        cfg = self.config
        return max(cfg.retransmit_min, math.ceil(cfg.retransmit_mult * math.log(self._n() + 1)))

    def _suspicion_bounds(self) -> tuple[float, float]:
        cfg = self.config
        floor = cfg.suspicion_mult * max(2.0, math.log10(self._n())) * cfg.probe_interval_s
        return floor, floor * max(1.0, cfg.suspicion_max_mult)

    def _suspicion_timeout(self, confirmations: int) -> float:
        lo, hi = self._suspicion_bounds()
        k = max(1, self.config.indirect_checks)
        frac = math.log(confirmations + 1) / math.log(k + 1)
        return max(lo, hi - (hi - lo) * frac)

    def _anti_entropy_interval(self) -> float:
        cfg = self.config
        return max(cfg.anti_entropy_interval_s, self._n() * cfg.anti_entropy_s_per_member)

    def _publish_interval(self) -> float:
        cfg = self.config
        return max(cfg.record_min_interval_s, self._n() / cfg.record_updates_per_s)

    def _update_due(self) -> None:
        if self._left:
            self._due = None
            return
        due = min(self._next_probe, self._next_anti_entropy)
        if self._queue:
            gossip = self._next_gossip
            if gossip < self._now:
                interval = self.config.gossip_interval_s
                gossip += interval * math.ceil((self._now - gossip) / interval)
                self._next_gossip = gossip
            due = min(due, gossip)
        due = min(due, self._next_reconnect)
        probe = self._probe
        if probe is not None and not probe.acked and not probe.indirect_sent:
            due = min(due, probe.ack_deadline)
        if self._suspicions:
            due = min(due, self._suspicions[0][0])
        if self._purges:
            due = min(due, self._purges[0][0])
        if self._relays:
            due = min(due, next(iter(self._relays.values()))[2])
        if self._tombstones:
            due = min(due, next(iter(self._tombstones.values())).until)
        if self._next_join is not None:
            due = min(due, self._next_join)
        if self._next_publish is not None:
            due = min(due, self._next_publish)
        self._due = due

    def _check_stall(self, now: float) -> None:
        # Late for the timer we asked for, and not merely still catching up with the
        # calls that followed a stall already seen at the previous ``now``.
        prev = self._now
        self._now = now
        due = self._due
        if due is None or now <= max(due, prev) + self.config.stall_threshold_s:
            return
        # Our own loop did not run for a while: silence we observed was ours. Restart
        # every suspicion we hold, drop the probe in flight and refute in advance, since
        # peers probably suspect us for the same silence.
        self._stalls += 1
        self._probe = None
        self._relays.clear()
        self._suspicions = []
        for node, m in self._members.items():
            if m.state is MemberState.SUSPECT:
                m.suspect_start = now
                m.suspect_deadline = now + self._suspicion_timeout(len(m.confirmers) - 1)
                self._suspicions.append((m.suspect_deadline, node))
        heapq.heapify(self._suspicions)
        self._next_probe = min(self._next_probe, now)
        self._next_gossip = min(self._next_gossip, now)
        self._refute(self._own.incarnation)

    # ----------------------------------------------------------------- views and events

    def _own_view(self) -> MemberView:
        r = self._own
        return MemberView(
            node=r.node,
            address=r.address,
            state=MemberState.LEFT if self._left else MemberState.ALIVE,
            incarnation=r.incarnation,
            capabilities=r.capabilities,
            load=r.load,
        )

    def _view(self, m: _Member) -> MemberView:
        view = m.view
        if view is None:
            r = m.record
            view = MemberView(
                node=r.node,
                address=r.address,
                state=m.state,
                incarnation=m.incarnation,
                capabilities=r.capabilities,
                load=r.load,
            )
            m.view = view
        return view

    def _event(self, event: MembershipEvent) -> None:
        events = self._events
        if len(events) >= self.config.max_events:
            # Nobody drains them: keep the newest, count the loss.
            drop = len(events) // 2
            del events[:drop]
            self._events_dropped += drop
        events.append(event)

    def _live_nodes(self) -> list[NodeId]:
        if self._live_dirty:
            self._live = [
                n
                for n, m in self._members.items()
                if m.state is MemberState.ALIVE or m.state is MemberState.SUSPECT
            ]
            self._live_dirty = False
        return self._live

    def _reject(self, reason: str) -> None:
        self._rejected[reason] = self._rejected.get(reason, 0) + 1

    # ----------------------------------------------------------------- own record

    def _publish(self, now: float) -> None:
        load = self._pending_load
        self._pending_load = None
        self._own = _replace_record(
            self._own,
            version=self._own.version + 1,
            load=self._own.load if load is None else load,
        )
        self._last_publish = now
        self._enqueue(self._own)

    def _refute(self, claimed: int) -> None:
        if self._left:
            return
        incarnation = max(self._own.incarnation, claimed) + 1
        if incarnation > MAX_COUNTER:
            # Only a key holder making things up names this node at the top of the range:
            # a refutation above it would be refused by every honest peer, so none is sent.
            self._reject("unrefutable-claim")
            return
        self._refutations += 1
        self._own = _replace_record(
            self._own,
            incarnation=incarnation,
            version=self._own.version + 1,
        )
        self._enqueue(self._own)

    # ----------------------------------------------------------------- dissemination

    def _enqueue(self, update: MembershipUpdate) -> None:
        self._queue[update.node, isinstance(update, NodeRecord)] = [update, 0]

    def _piggyback(self, copies: int) -> tuple[MembershipUpdate, ...]:
        queue = self._queue
        if not queue or copies <= 0:
            return ()
        limit = self._retransmit_limit()
        items = list(queue.values())
        if len(items) > self.config.max_updates_per_message:
            items.sort(key=itemgetter(1))
            items = items[: self.config.max_updates_per_message]
        out: list[MembershipUpdate] = []
        for item in items:
            update: MembershipUpdate = item[0]  # type: ignore[assignment]
            out.append(update)
            sent: int = item[1]  # type: ignore[assignment]
            sent += copies
            if sent >= limit:
                del queue[update.node, isinstance(update, NodeRecord)]
            else:
                item[1] = sent
        return tuple(out)

    def _gossip_round(self) -> None:
        if not self._queue:
            return
        live = self._live_nodes()
        if not live:
            return
        fanout = min(self.config.gossip_fanout, len(live))
        targets = self._rng.sample(live, fanout)
        msg = Gossip(updates=self._piggyback(fanout))
        members = self._members
        for node in targets:
            self._outgoing.append((members[node].record.address, msg))

    # ----------------------------------------------------------------- applying updates

    def _apply_all(self, updates: Iterable[MembershipUpdate], now: float, *, spread: bool) -> None:
        for u in updates:
            if isinstance(u, NodeRecord):
                self._apply_record(u, now, spread=spread)
            else:
                self._apply_claim(u, now, spread=spread)

    def _apply_record(self, r: NodeRecord, now: float, *, spread: bool) -> None:
        node = r.node
        if node == self.node:
            own = self._own
            key = (r.incarnation, r.version)
            mine = (own.incarnation, own.version)
            if key > mine or (key == mine and r != own):
                # A record of ours we did not write: from a previous run of this node.
                self._refute(r.incarnation)
            return
        m = self._members.get(node)
        if m is None:
            tomb = self._tombstones.get(node)
            if tomb is not None:
                if r.incarnation <= tomb.incarnation:
                    return
                del self._tombstones[node]
                self._unindex(node, tomb.address)
            if len(self._members) >= self.config.max_members - 1:
                self._reject("capacity")
                return
            self._members[node] = _Member(
                record=r, state=MemberState.ALIVE, state_inc=r.incarnation, since=now
            )
            self._index(node, r.address)
            self._live_dirty = True
            # A random place among those not yet probed in this pass (as SWIM does), so
            # that nodes which learned the same list do not probe in the same order.
            order = self._probe_order
            if len(order) > 2 * self.config.max_members:
                # Churn within one pass: drop entries of nodes that have gone since.
                order[:] = [x for x in order if x in self._members]
                self._probe_index = min(self._probe_index, len(order))
            order.append(node)
            start = min(self._probe_index, len(order) - 1)
            j = start + int(self._rng.random() * (len(order) - start))
            order[j], order[-1] = order[-1], order[j]
            self._digest[node] = (r.incarnation, r.version, 0)
            self._event(MemberUp(node=node))
            if spread:
                self._enqueue(r)
            return
        old = m.record
        if (r.incarnation, r.version) <= (old.incarnation, old.version):
            return
        m.record = r
        m.view = None
        if r.address != old.address:
            self._unindex(node, old.address)
        self._index(node, r.address)
        self._digest[node] = (r.incarnation, r.version, RANK[m.state])
        if r.incarnation > m.state_inc:
            was = m.state
            m.state = MemberState.ALIVE
            m.state_inc = r.incarnation
            m.confirmers.clear()
            self._digest[node] = (r.incarnation, r.version, 0)
            if was is not MemberState.ALIVE:
                m.since = now
                if was is not MemberState.SUSPECT:
                    self._live_dirty = True
                self._event(MemberUp(node=node))
            else:
                self._event(MemberChanged(node=node))
        elif m.state is MemberState.ALIVE or m.state is MemberState.SUSPECT:
            self._event(MemberChanged(node=node))
        if spread:
            self._enqueue(r)

    def _apply_claim(self, c: Suspect | Dead | Left, now: float, *, spread: bool) -> None:
        node = c.node
        if node == self.node:
            if c.incarnation >= self._own.incarnation:
                self._refute(c.incarnation)
            return
        m = self._members.get(node)
        if m is None:
            return  # claims never add nodes: nothing unknown grows the table
        if isinstance(c, Suspect):
            new_state = MemberState.SUSPECT
        elif isinstance(c, Dead):
            new_state = MemberState.DEAD
        else:
            new_state = MemberState.LEFT
        current = (m.state_inc, RANK[m.state])
        claim = (c.incarnation, RANK[new_state])
        if claim <= current:
            if (
                isinstance(c, Suspect)
                and claim == current
                and c.by not in m.confirmers
                and len(m.confirmers) <= self.config.indirect_checks
            ):
                # Lifeguard: an independent suspicion of the same incarnation shortens it.
                m.confirmers.add(c.by)
                deadline = m.suspect_start + self._suspicion_timeout(len(m.confirmers) - 1)
                if deadline < m.suspect_deadline:
                    m.suspect_deadline = deadline
                    heapq.heappush(self._suspicions, (deadline, node))
                if spread:
                    self._enqueue(c)
            return
        self._set_state(
            m, new_state, c.incarnation, now, by=c.by if isinstance(c, Suspect) else None
        )
        if spread:
            self._enqueue(c)

    def _set_state(
        self, m: _Member, state: MemberState, incarnation: int, now: float, *, by: NodeId | None
    ) -> None:
        node = m.record.node
        was_live = m.state is MemberState.ALIVE or m.state is MemberState.SUSPECT
        m.state = state
        m.state_inc = incarnation
        m.since = now
        m.view = None
        self._digest[node] = (m.record.incarnation, m.record.version, RANK[state])
        m.confirmers.clear()
        if state is MemberState.SUSPECT:
            if by is not None:
                m.confirmers.add(by)
            m.suspect_start = now
            m.suspect_deadline = now + self._suspicion_timeout(0)
            heapq.heappush(self._suspicions, (m.suspect_deadline, node))
            if not was_live:
                self._live_dirty = True
            self._event(MemberSuspect(node=node))
        else:
            if was_live:
                self._live_dirty = True
            heapq.heappush(self._purges, (now + self.config.dead_grace_s, node))
            self._event(MemberDown(node=node, state=state))
            if self._probe is not None and self._probe.target == node:
                self._probe = None

    def _notice_for(self, src: NodeId) -> MembershipUpdate | None:
        """What a peer should hear about itself when it contacts us directly."""
        m = self._members.get(src)
        if m is not None:
            if m.state is MemberState.SUSPECT:
                return Suspect(node=src, incarnation=m.state_inc, by=self.node)
            if m.state is MemberState.DEAD or m.state is MemberState.LEFT:
                return Dead(node=src, incarnation=m.incarnation, by=self.node)
            return None
        tomb = self._tombstones.get(src)
        if tomb is not None:
            return Dead(node=src, incarnation=tomb.incarnation, by=self.node)
        return None

    # ----------------------------------------------------------------- probing

    def _probe_tick(self, now: float) -> None:
        cfg = self.config
        self._next_probe = now + cfg.probe_interval_s
        probe = self._probe
        self._probe = None
        if probe is not None and not probe.acked:
            m = self._members.get(probe.target)
            if m is not None and m.state is MemberState.ALIVE:
                self._suspicions_raised += 1
                claim = Suspect(node=probe.target, incarnation=m.state_inc, by=self.node)
                self._apply_claim(claim, now, spread=True)
            elif m is not None and m.state is MemberState.SUSPECT and self.node not in m.confirmers:
                claim = Suspect(node=probe.target, incarnation=m.state_inc, by=self.node)
                self._apply_claim(claim, now, spread=True)
        target = self._next_target()
        if target is None:
            return
        m = self._members[target]
        self._seq += 1
        self._probe = _Probe(
            target=target,
            address=m.record.address,
            seq=self._seq,
            ack_deadline=now + cfg.probe_timeout_s,
        )
        updates = self._piggyback(1)
        if m.state is MemberState.SUSPECT:
            # Tell the suspect directly, so that it can refute without waiting for gossip.
            updates = (Suspect(node=target, incarnation=m.state_inc, by=self.node), *updates)
        self._outgoing.append(
            (m.record.address, Ping(seq=self._seq, reply_to=self.address, updates=updates))
        )

    def _next_target(self) -> NodeId | None:
        order = self._probe_order
        members = self._members
        for _ in range(2):
            while self._probe_index < len(order):
                node = order[self._probe_index]
                self._probe_index += 1
                m = members.get(node)
                if m is not None and (
                    m.state is MemberState.ALIVE or m.state is MemberState.SUSPECT
                ):
                    return node
            # One pass is over: start a fresh shuffled pass over who is live now.
            order[:] = self._live_nodes()
            self._rng.shuffle(order)
            self._probe_index = 0
            if not order:
                return None
        return None

    def _send_indirect(self, probe: _Probe) -> None:
        probe.indirect_sent = True
        # A second direct ping alongside the indirect ones: under random loss this makes a
        # false suspicion ~10x rarer for one more small message.
        self._outgoing.append(
            (probe.address, Ping(seq=probe.seq, reply_to=self.address, updates=()))
        )
        helpers = [n for n in self._live_nodes() if n != probe.target]
        k = min(self.config.indirect_checks, len(helpers))
        if k == 0:
            return
        msg = PingReq(
            seq=probe.seq,
            target=probe.target,
            target_address=probe.address,
            reply_to=self.address,
            updates=self._piggyback(k),
        )
        for node in self._rng.sample(helpers, k):
            self._outgoing.append((self._members[node].record.address, msg))

    def _on_ping(self, src: NodeId, msg: Ping, now: float) -> None:
        self._apply_all(msg.updates, now, spread=True)
        updates = self._piggyback(1)
        notice = self._notice_for(src)
        if notice is not None:
            updates = (notice, *updates)
        self._outgoing.append((msg.reply_to, Ack(seq=msg.seq, updates=updates)))

    def _on_ack(self, msg: Ack, now: float) -> None:
        self._apply_all(msg.updates, now, spread=True)
        probe = self._probe
        if probe is not None and probe.seq == msg.seq:
            probe.acked = True
            return
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            reply_to, seq, _ = relay
            self._outgoing.append((reply_to, Ack(seq=seq, updates=self._piggyback(1))))

    def _on_ping_req(self, src: NodeId, msg: PingReq, now: float) -> None:
        self._apply_all(msg.updates, now, spread=True)
        if len(self._relays) >= self.config.max_relays:
            self._reject("relay-capacity")
            return
        if msg.target == self.node:
            self._outgoing.append((msg.reply_to, Ack(seq=msg.seq, updates=())))
            return
        self._seq += 1
        self._relays[self._seq] = (msg.reply_to, msg.seq, now + self.config.probe_interval_s)
        self._outgoing.append(
            (msg.target_address, Ping(seq=self._seq, reply_to=self.address, updates=()))
        )

    # ----------------------------------------------------------------- timeouts

    def _expire_suspicions(self, now: float) -> None:
        heap = self._suspicions
        members = self._members
        while heap and heap[0][0] <= now:
            deadline, node = heapq.heappop(heap)
            m = members.get(node)
            if m is None or m.state is not MemberState.SUSPECT or m.suspect_deadline != deadline:
                continue  # refuted, superseded or shortened since
            self._deaths += 1
            self._apply_claim(
                Dead(node=node, incarnation=m.state_inc, by=self.node), now, spread=True
            )

    def _expire_dead(self, now: float) -> None:
        heap = self._purges
        members = self._members
        grace = self.config.dead_grace_s
        while heap and heap[0][0] <= now:
            _, node = heapq.heappop(heap)
            m = members.get(node)
            if m is None or m.state is MemberState.ALIVE or m.state is MemberState.SUSPECT:
                continue
            if m.since + grace > now:
                continue  # died again later; a later heap entry covers it
            del members[node]
            del self._digest[node]
            self._queue.pop((node, True), None)
            self._queue.pop((node, False), None)
            tombs = self._tombstones
            stale = tombs.pop(node, None)
            if stale is not None:
                self._unindex(node, stale.address)
            if len(tombs) >= self.config.max_members:
                evicted, gone = tombs.popitem(last=False)
                self._unindex(evicted, gone.address)
            tombs[node] = _Tombstone(
                incarnation=m.incarnation,
                address=m.record.address,
                until=now + self.config.tombstone_s,
                died=m.state is MemberState.DEAD,
            )
            # The member's entry stands for its tombstone (re-added if a stale one took it).
            self._index(node, m.record.address, prefer=False)
            self._event(MemberPurged(node=node))
        tombs = self._tombstones
        while tombs:
            node, tomb = next(iter(tombs.items()))
            if tomb.until > now:
                break
            del tombs[node]
            self._unindex(node, tomb.address)

    def _index(self, node: NodeId, address: Address, *, prefer: bool = True) -> None:
        """Enter ``node`` at ``address``; with ``prefer``, as the one ``node_at`` names."""
        current = self._at.get(address)
        if current is None:
            self._at[address] = node
            return
        if current == node:
            return
        others = self._also.setdefault(address, [])
        if prefer:
            if node in others:
                others.remove(node)
            others.append(current)
            self._at[address] = node
        elif node not in others:
            others.append(node)

    def _unindex(self, node: NodeId, address: Address) -> None:
        others = self._also.get(address)
        if self._at.get(address) == node:
            if others:
                self._at[address] = others.pop()
            else:
                del self._at[address]
        elif others and node in others:
            others.remove(node)
        if others is not None and not others:
            del self._also[address]

    # ----------------------------------------------------------------- anti-entropy

    def _digest_entries(self) -> dict[NodeId, tuple[int, int, int]]:
        own = self._own
        entries = dict(self._digest)
        entries[self.node] = (own.incarnation, own.version, 0)
        return entries

    def _anti_entropy(self) -> None:
        live = self._live_nodes()
        if not live:
            return
        node = self._rng.choice(live)
        msg = Digest(reply_to=self.address, entries=self._digest_entries())
        self._outgoing.append((self._members[node].record.address, msg))

    def _knowledge(self, node: NodeId) -> list[MembershipUpdate]:
        """The record and, for a node not alive, the claim this node holds about it."""
        if node == self.node:
            return [self._own]
        m = self._members.get(node)
        if m is None:
            return []
        out: list[MembershipUpdate] = [m.record]
        claim = _claim_of(m, self.node)
        if claim is not None:
            out.append(claim)
        return out

    def _send_delta(
        self, address: Address, updates: list[MembershipUpdate], want: tuple[NodeId, ...]
    ) -> None:
        if not updates and not want:
            return
        first = True
        for i in range(0, max(1, len(updates)), DELTA_CHUNK):
            chunk = tuple(updates[i : i + DELTA_CHUNK])
            self._outgoing.append(
                (address, Delta(reply_to=self.address, updates=chunk, want=want if first else ()))
            )
            first = False

    def _on_digest(self, src: NodeId, msg: Digest, now: float) -> None:
        entries = msg.entries
        updates: list[MembershipUpdate] = []
        want: list[NodeId] = []
        notice = self._notice_for(src)
        if notice is not None:
            updates.append(notice)
        theirs = entries.get(self.node)
        if theirs is not None and theirs[2] > 0 and theirs[0] >= self._own.incarnation:
            self._refute(theirs[0])
        own = self._own
        if theirs is None or (own.incarnation, own.version) > theirs[:2]:
            updates.append(own)
        members = self._members
        for node, mine in self._digest.items():
            e = entries.get(node)
            if e == mine:
                continue
            m = members[node]
            r = m.record
            rank = RANK[m.state]
            if e is None:
                if rank <= 1:
                    updates.append(r)
                continue
            inc, ver, their_rank = e
            if (r.incarnation, r.version) > (inc, ver):
                updates.append(r)
            elif (inc, ver) > (r.incarnation, r.version):
                want.append(node)
                continue
            if rank > their_rank and m.state_inc >= inc:
                claim = _claim_of(m, self.node)
                if claim is not None:
                    updates.append(claim)
            elif their_rank > rank and inc >= m.state_inc:
                want.append(node)
        room = self.config.max_members - 1 - len(members)
        for node, (inc, _ver, rank) in entries.items():
            if room <= 0:
                break
            if rank > 1 or node == self.node or node in members:
                continue
            tomb = self._tombstones.get(node)
            if tomb is not None and inc <= tomb.incarnation:
                continue
            want.append(node)
            room -= 1
        self._send_delta(msg.reply_to, updates, tuple(want))

    def _on_delta(self, msg: Delta, now: float) -> None:
        # Anti-entropy repairs this node only: what it learns here is not gossiped on.
        self._apply_all(msg.updates, now, spread=False)
        if msg.want:
            updates: list[MembershipUpdate] = []
            for node in msg.want:
                updates.extend(self._knowledge(node))
            if updates:
                self._send_delta(msg.reply_to, updates, ())

    def _on_join(self, src: NodeId, msg: Join, now: float) -> None:
        notice = self._notice_for(src)
        self._apply_record(msg.record, now, spread=True)
        updates: list[MembershipUpdate] = [self._own]
        if notice is not None:
            updates.append(notice)
        for node, m in self._members.items():
            if node == src:
                # Its own record as we hold it: a restarted node refutes an older life.
                updates.append(m.record)
            elif m.state is MemberState.ALIVE or m.state is MemberState.SUSPECT:
                updates.append(m.record)
        self._send_delta(msg.record.address, updates, ())

    def _reconnect(self) -> None:
        # A dead node that is in fact alive (a healed partition, a restart) refutes when
        # told of its own death, and its refutation comes back on the ack.
        members = self._members
        candidates: list[tuple[NodeId, int, Address]] = []
        for n, (_, _, rank) in self._digest.items():
            if rank == 2:
                m = members[n]
                candidates.append((n, m.incarnation, m.record.address))
        candidates.extend(
            (n, t.incarnation, t.address) for n, t in self._tombstones.items() if t.died
        )
        if not candidates:
            return
        node, inc, address = self._rng.choice(candidates)
        self._seq += 1
        claim = Dead(node=node, incarnation=inc, by=self.node)
        self._outgoing.append(
            (address, Ping(seq=self._seq, reply_to=self.address, updates=(claim, self._own)))
        )


def _claim_of(m: _Member, by: NodeId) -> Suspect | Dead | Left | None:
    node = m.record.node
    if m.state is MemberState.SUSPECT:
        return Suspect(node=node, incarnation=m.state_inc, by=by)
    if m.state is MemberState.DEAD:
        return Dead(node=node, incarnation=m.state_inc, by=by)
    if m.state is MemberState.LEFT:
        return Left(node=node, incarnation=m.state_inc)
    return None


def _check_digest(entries: object, limit: int) -> None:
    if not isinstance(entries, dict) or len(entries) > limit:
        raise _bad("bad digest", "oversized")
    top = MAX_COUNTER
    for node, e in entries.items():
        if type(node) is not str or not 0 < len(node) <= MAX_ID_LEN:
            raise _bad("bad node id", "bad-node")
        if type(e) is not tuple or len(e) != 3:
            raise _bad("bad digest entry")
        inc, ver, rank = e
        if type(inc) is not int or type(ver) is not int or type(rank) is not int:
            raise _bad("bad digest entry", "bad-counter")
        if not (0 <= inc <= top and 0 <= ver <= top and 0 <= rank <= 3):
            raise _bad("bad digest entry", "bad-counter")


def _replace_record(
    r: NodeRecord,
    *,
    incarnation: int | None = None,
    version: int | None = None,
    capabilities: Capabilities | None = None,
    load: Load | None = None,
) -> NodeRecord:
    return NodeRecord(
        node=r.node,
        address=r.address,
        incarnation=r.incarnation if incarnation is None else incarnation,
        version=r.version if version is None else version,
        capabilities=r.capabilities if capabilities is None else capabilities,
        load=r.load if load is None else load,
    )
