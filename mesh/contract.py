"""Contract-net task allocation: a sans-I/O core playing initiator and participant.

The node a task is submitted to is its *initiator*: it calls for proposals from d capable
candidates (sampled with a bias to low gossiped load and to the holders of the task's
inputs), awards each task to the lowest bid, releases the other bidders, and holds the
award as a lease that progress messages renew. Every node is also a *participant*: it bids
its estimated seconds to completion for the tasks it can ever run, refuses with a
structured reason those it cannot, reserves the slots it offered for a short while, and
runs what it was awarded without ever exceeding its resources.

Throughput comes from batching: tasks with the same requirements queued in one initiator
share one call for proposals, a bid offers several slots, an award names several tasks, and
results and failures to one initiator leave as one message per ``take_outgoing``.

The initiator's task states and their legal transitions are the data in ``TRANSITIONS``;
an illegal one is a bug here and raises ``LocalProtocolError``. Peer input that cannot be
accepted raises ``RemoteProtocolError`` (counted in ``stats()`` under ``rejected.<reason>``)
and leaves the state unchanged.

Stalls. A node whose own clock jumped (a timer it asked for served more than
``stall_s`` late: a blocked loop, SIGSTOP) may have lost, meanwhile, the tasks awarded to
it: their leases lapsed, or membership declared it dead, and their initiators placed them
again without it. Tasks already running when it stalled go on (a second result is dropped
by the initiator). Those not yet started wait: one ``LeaseQuery`` per initiator asks
whether they are still bound here, and the initiator answers from its own state with a
``LeaseReply`` naming those it still binds to this node (renewing their lease); the rest
are dropped unrun. Without an answer within ``stall_reply_s`` the tasks are given back
with a ``Decline``; should that be lost too, the initiator's lease sweep places them
again, since nothing renews their lease any more. An award on a bid made before the
stall is declined outright. While tasks wait to start, the core asks for a timer every
``stall_s / 2``, so that every stall long enough to matter is seen.

This module may not import asyncio, aiohttp, zeroconf, socket or time, and may not read a
clock: ``now`` is always an argument, and randomness comes from the ``rng`` passed in.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from mesh.config import ContractConfig
from mesh.core import MemberState, MemberView, PeerView
from mesh.errors import (
    LocalProtocolError,
    MeshError,
    NoCapablePeerError,
    RemoteProtocolError,
    TaskError,
    TaskLostError,
)
from mesh.messages import (
    Accept,
    Address,
    CallForProposals,
    Cancel,
    Capabilities,
    Confirm,
    Decline,
    Failure,
    LeaseQuery,
    LeaseReply,
    Load,
    NodeId,
    Progress,
    Propose,
    Refuse,
    Reject,
    Requirements,
    Result,
    TaskId,
    Wire,
)
from mesh.resources import check, demand, invalid, merge_reasons

INF: Final = math.inf
MAX_CFP_TASKS: Final = 4096
"""Hard bound on tasks in a received call for proposals, whatever the sender's config."""

_CANDIDATE_STATES: Final = frozenset({MemberState.ALIVE, MemberState.SUSPECT})
"""Members that may be asked to bid: a suspect is not dead until membership says so."""

_EPS: Final = 1e-9
MAX_ESTIMATE_S: Final = 1e6
"""Longest runtime, bid or estimate taken from a peer (about 11 days): beyond it a number
is not an estimate but an attack on the sums bids are made of."""
MIN_ESTIMATE_S: Final = 1e-6
"""Shortest runtime an estimate is taken as when learning from it: a ratio against 1 ns
would scale every later bid by a billion."""
MAX_LANES: Final = 1024
"""Most tasks of one kind a node is modelled to run at once, whatever it declares."""
LOCALITY_SCAN: Final = 16
"""Queued tasks a worker with room looks through for the one whose inputs it holds."""
POOL: Final = 16
"""Candidates drawn uniformly per wanted candidate before the load-weighted choice."""

# ---------------------------------------------------------------------------------------
# Public value types
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSpec:
    """What an initiator auctions: the task's identity, needs and where its inputs live."""

    task_id: TaskId
    requirements: Requirements
    input_bytes: dict[NodeId, int] = field(default_factory=dict)
    """Bytes of reference arguments held by each node: bids count the transfer of the rest."""
    est_runtime_s: float | None = None
    """The submitter's runtime estimate; seeds bidders that have no history for the task."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Execute:
    """Participant: run ``task_id`` with ``payload``, then call ``task_finished``."""

    task_id: TaskId
    initiator: NodeId
    payload: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelExecution:
    """Participant: stop ``task_id``; still call ``task_finished`` once it has stopped."""

    task_id: TaskId


@dataclass(frozen=True, slots=True, kw_only=True)
class Completed:
    """Initiator: ``task_id`` finished on ``node`` with ``value``; delivered once per task."""

    task_id: TaskId
    node: NodeId
    value: Any


FAILED_TASK: Final = "task-error"
FAILED_NO_PEER: Final = "no-capable-peer"
FAILED_NO_BIDS: Final = "no-bids"
FAILED_LOST: Final = "lost"


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed:
    """Initiator: ``task_id`` ended without a result; delivered once per task.

    ``kind`` is ``task-error`` (it raised on ``node``; ``details`` is what that node
    reported), ``no-capable-peer`` (``details["missing"]`` names what every candidate
    lacked), ``no-bids`` (candidates exist but none answered) or ``lost`` (every placement
    failed).
    """

    task_id: TaskId
    node: NodeId | None
    kind: str
    message: str
    details: dict[str, Any]

    def error(self) -> MeshError:
        """The exception a submitter should see for this failure."""
        if self.kind == FAILED_TASK:
            return TaskError(
                self.message,
                task_id=self.task_id,
                node=self.node or "",
                exc_type=str(self.details.get("exc_type", "")),
                remote_traceback=str(self.details.get("traceback", "")),
            )
        if self.kind == FAILED_NO_PEER:
            missing = self.details.get("missing", {})
            return NoCapablePeerError(
                str(self.details.get("task", "")), missing if isinstance(missing, dict) else {}
            )
        return TaskLostError(f"task {self.task_id}: {self.message}")


ContractEvent = Execute | CancelExecution | Completed | Failed


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundRecord:
    """One call for proposals as its initiator saw it."""

    cfp: int
    at: float
    asked: tuple[NodeId, ...]
    bids: dict[NodeId, float]
    """Each bidder's cheapest slot (seconds to completion, before transfer)."""
    slots: dict[NodeId, int]
    refusals: dict[NodeId, dict[str, str]]
    silent: tuple[NodeId, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class AuctionRecord:
    """How one task was placed, for ``mesh-node why``."""

    task_id: TaskId
    task: str
    submitted_at: float
    state: str
    rounds: tuple[RoundRecord, ...]
    winner: NodeId | None
    cost_s: float | None
    """Expected seconds to completion when bound: ``wait_s + est_s + transfer_s``."""
    why: str
    attempts: int
    wait_s: float | None = None
    """Queue wait expected at the winner when bound (the initiator's model of it)."""
    est_s: float | None = None
    """Runtime expected at the winner when bound (its bid, then its measured runs)."""
    transfer_s: float | None = None
    """Time expected to bring the task's inputs to the winner, at its measured rates."""
    run_s: float | None = None
    """Runtime the winner measured, once the result is in."""


# ---------------------------------------------------------------------------------------
# Initiator state machine
# ---------------------------------------------------------------------------------------


class TaskState(StrEnum):
    """Where a task is in its initiator."""

    QUEUED = "queued"  # waiting for a call for proposals
    AUCTION = "auction"  # in an open call for proposals
    AWARDED = "awarded"  # accept sent, winner has not confirmed
    HELD = "held"  # winner confirmed (or reported progress); lease running


TRANSITIONS: Final[dict[tuple[TaskState, str], TaskState]] = {
    (TaskState.QUEUED, "call"): TaskState.AUCTION,
    (TaskState.AUCTION, "decided"): TaskState.QUEUED,  # back to the queue the pool works
    (TaskState.AUCTION, "unplaced"): TaskState.QUEUED,  # widening, or the pool takes it
    (TaskState.QUEUED, "award"): TaskState.AWARDED,  # a pool worker had room
    (TaskState.AWARDED, "confirm"): TaskState.HELD,
    (TaskState.AWARDED, "progress"): TaskState.HELD,  # the confirm was lost
    (TaskState.HELD, "progress"): TaskState.HELD,
    (TaskState.AWARDED, "again"): TaskState.QUEUED,  # declined, lapsed, or winner died
    (TaskState.HELD, "again"): TaskState.QUEUED,
}
"""(state, event) -> next state. Anything missing is illegal. Every state may also end
(result, failure, cancel): the task then leaves the table."""


class _Task:
    __slots__ = (
        "attempts",
        "auction",
        "awarded_at",
        "cost",
        "ended",
        "est_s",
        "exclude",
        "expected_end",
        "home",
        "key",
        "lease_until",
        "payload",
        "rounds",
        "run_s",
        "spec",
        "state",
        "submitted_at",
        "transfer_s",
        "wait_s",
        "why",
        "widened",
        "winner",
        "winner_incarnation",
        "winners",
        "worker",
    )

    def __init__(self, spec: TaskSpec, payload: Any, key: _Key, now: float) -> None:
        self.spec = spec
        self.payload = payload
        self.key = key
        self.state = TaskState.QUEUED
        self.submitted_at = now
        self.winner: NodeId | None = None
        self.winner_incarnation = 0
        self.winners: set[NodeId] = set()
        self.lease_until = INF
        self.attempts = 0
        self.auction: _Auction | None = None
        self.rounds: list[RoundRecord] = []
        self.cost: float | None = None
        self.why = "waiting for a call for proposals"
        self.exclude: frozenset[NodeId] = frozenset()
        self.widened = 0
        self.ended = ""
        self.worker: _Worker | None = None  # the pool worker it is awarded to
        self.awarded_at = 0.0
        self.est_s: float | None = None  # the winner's expected runtime when awarded
        self.wait_s: float | None = None
        self.transfer_s: float | None = None
        self.expected_end = 0.0
        self.run_s: float | None = None  # measured by the winner
        self.home: NodeId | None = None  # the node holding most of its input bytes
        if spec.input_bytes:
            self.home = max(spec.input_bytes.items(), key=lambda kv: (kv[1], kv[0]))[0]

    def move(self, event: str) -> None:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise LocalProtocolError(f"task {self.spec.task_id}: no {event!r} from {self.state}")
        self.state = nxt


_Key = tuple[Any, ...]


class _Group:
    """Tasks with the same requirements and estimate: one queue, and the pool of workers
    (bidders recruited by calls for proposals) that works through it."""

    __slots__ = (
        "backoff",
        "est",
        "pool",
        "queue",
        "quiet_until",
        "recruiting",
        "requirements",
    )

    def __init__(self, requirements: Requirements, est: float | None) -> None:
        self.requirements = requirements
        self.est = est
        self.queue: deque[_Task] = deque()
        self.pool: dict[NodeId, _Worker] = {}
        self.recruiting = 0  # open calls for proposals of this group
        self.quiet_until = -INF  # no recruiting before: the last call added nobody useful
        self.backoff = 0.0  # the latest quiet period, doubled by each call that added nobody


class _Worker:
    """The initiator's model of one pool worker, for one group: how many tasks it runs at
    once, how long one takes there (its bid, then what its results measured), when each
    of its lanes frees, and the tasks it holds now (at most ``window``)."""

    __slots__ = (
        "bandwidth",
        "bind_ahead",
        "cfp",
        "idle_since",
        "inflight",
        "lane_free",
        "lanes",
        "node",
        "offered",
        "run_s",
        "samples",
        "window",
    )

    def __init__(
        self, node: NodeId, cfp: int, bid: Propose, now: float, bind_ahead_s: float
    ) -> None:
        self.node = node
        self.bind_ahead = bind_ahead_s
        self.inflight: dict[TaskId, _Task] = {}
        self.idle_since = now
        self.samples = 0
        self.run_s = bid.run_s
        self.cfp = cfp
        self.window = 1
        self.bandwidth = dict(bid.bandwidth)
        self.offered = len(bid.costs)
        self.lanes = max(1, min(bid.lanes, MAX_LANES, len(bid.costs)))
        # Lane i frees when the bid says its slot i would start: its cost less one run.
        self.lane_free = [now + max(0.0, c - bid.run_s) for c in bid.costs[: self.lanes]]
        self.resize()

    def resize(self) -> None:
        """Hold what starts within ``bind_ahead`` of now per lane, and never less than
        one task per lane: short tasks queue here to hide the round trip of a refill,
        long ones are bound only when a lane is about to free."""
        ahead = int(self.bind_ahead / max(self.run_s, MIN_ESTIMATE_S))
        self.window = max(1, min(self.offered, self.lanes * (1 + ahead)))

    def start_at(self, now: float) -> float:
        return max(now, min(self.lane_free))

    def take(self, task: _Task, now: float) -> float:
        """Book ``task`` on the lane that frees first; its expected end."""
        i = min(range(len(self.lane_free)), key=self.lane_free.__getitem__)
        end = max(now, self.lane_free[i]) + self.run_s
        self.lane_free[i] = end
        self.inflight[task.spec.task_id] = task
        self.idle_since = INF
        return end

    def release(self, task: _Task, now: float) -> None:
        """``task`` left this worker (result, decline, lapse): its lane frees now."""
        if self.inflight.pop(task.spec.task_id, None) is None:
            return
        if not self.inflight:
            self.idle_since = now
        lanes = self.lane_free
        for i, t in enumerate(lanes):
            if t == task.expected_end:
                lanes[i] = now
                return
        if not self.inflight:
            self.lane_free = [now] * self.lanes

    def learn(self, run_s: float, alpha: float) -> None:
        """A result's measured runtime: the first replaces the bid's guess, later ones
        move the average."""
        self.samples += 1
        self.run_s = run_s if self.samples == 1 else self.run_s + alpha * (run_s - self.run_s)
        self.resize()


class _Auction:
    __slots__ = (
        "asked",
        "bids",
        "cfp",
        "deadline",
        "decided",
        "decliners",
        "group",
        "next_slot",
        "opened",
        "refusals",
        "round",
        "tasks",
    )

    def __init__(
        self,
        cfp: int,
        group: _Group,
        tasks: list[_Task],
        asked: list[NodeId],
        opened: float,
        deadline: float,
    ) -> None:
        self.cfp = cfp
        self.opened = opened
        self.group = group
        self.tasks = tasks
        self.asked = asked
        self.deadline = deadline
        self.bids: dict[NodeId, Propose] = {}
        self.refusals: dict[NodeId, dict[str, str]] = {}
        self.next_slot: dict[NodeId, int] = {}
        self.decliners: set[NodeId] = set()
        self.decided = False
        self.round: RoundRecord | None = None


# ---------------------------------------------------------------------------------------
# Participant state
# ---------------------------------------------------------------------------------------


class _Held:
    __slots__ = (
        "cancelled",
        "cfp",
        "est",
        "initiator",
        "need",
        "payload",
        "query",
        "renewed",
        "req",
        "res",
        "seed",
        "started",
        "task_id",
    )

    def __init__(self, task_id: TaskId, res: _Reservation, payload: Any, now: float) -> None:
        self.task_id = task_id
        self.res: _Reservation | None = res  # None once it no longer counts there
        res.holding += 1
        self.initiator = res.initiator
        self.cfp = res.cfp
        self.req = res.requirements
        self.need = res.need
        self.est = res.est
        self.seed = res.seed
        self.payload = payload
        self.started: float | None = None
        self.renewed = now  # when the initiator last renewed the lease (the confirm)
        self.cancelled = False
        self.query = 0  # the LeaseQuery it waits for before it may start (0: none)


class _Query:
    """A ``LeaseQuery`` this participant sent after a stall, waiting for its reply."""

    __slots__ = ("deadline", "initiator", "tasks")

    def __init__(self, initiator: NodeId, tasks: tuple[TaskId, ...], deadline: float) -> None:
        self.initiator = initiator
        self.tasks = tasks
        self.deadline = deadline


class _Reservation:
    __slots__ = (
        "cfp",
        "est",
        "expires",
        "forget_at",
        "holding",
        "initiator",
        "made",
        "need",
        "offered",
        "requirements",
        "reserved",
        "seed",
        "tasks",
    )

    def __init__(
        self,
        initiator: NodeId,
        cfp: int,
        msg: CallForProposals,
        need: dict[str, float],
        est: float,
        offered: int,
        now: float,
        config: ContractConfig,
    ) -> None:
        self.initiator = initiator
        self.cfp = cfp
        self.requirements = msg.requirements
        self.tasks = len(msg.tasks)
        self.need = need
        self.est = est
        self.seed = msg.est_runtime_s
        self.offered = offered
        self.reserved = offered
        self.holding = 0  # tasks awarded under it and not yet finished or dropped here
        self.made = now
        self.expires = now + config.reservation_s
        # Long enough to tell a late award (decline it) from one never solicited (reject it).
        self.forget_at = now + 4 * config.reservation_s


def _plausible(seconds: float) -> bool:
    """A duration from a peer that sums can take: finite, >= 0, at most MAX_ESTIMATE_S."""
    return 0.0 <= seconds <= MAX_ESTIMATE_S


def _limiting(need: dict[str, float], have: dict[str, float]) -> tuple[str, int]:
    """The resource that bounds how many such tasks run at once, and that bound."""
    best_key, best = "cpu", MAX_LANES
    for k, v in need.items():
        if v <= 0:
            continue
        # A demand of 5e-324 divides to inf: bound before int().
        lanes = int(min(have.get(k, 0.0) / v + _EPS, MAX_LANES))
        if lanes < best:
            best_key, best = k, lanes
    return best_key, best


def _req_key(req: Requirements, est: float | None) -> _Key:
    return (
        req.task,
        tuple(sorted(req.resources.items())),
        tuple(sorted(req.libraries.items())),
        tuple(sorted(req.labels.items())),
        est,
    )


class Contract:
    """The contract-net core of one node (``mesh.core.Core``)."""

    def __init__(
        self,
        *,
        node: NodeId,
        config: ContractConfig,
        rng: random.Random,
        peers: PeerView,
        capabilities: Capabilities,
        speed: float = 1.0,
    ) -> None:
        if config.candidates < 1:
            raise LocalProtocolError("ContractConfig.candidates must be at least 1")
        if not 1e-3 <= speed <= 1e3:
            raise LocalProtocolError(f"speed factor {speed} is outside [0.001, 1000]")
        self._node = node
        self._cfg = config
        self._rng = rng
        self._peers = peers
        self._caps = capabilities
        self._accepting = True
        self._out: list[tuple[Address, Wire]] = []
        self._events: list[ContractEvent] = []
        self._loop: deque[tuple[NodeId, Wire]] = deque()
        self._stats: Counter[str] = Counter()
        # initiator
        self._tasks: dict[TaskId, _Task] = {}
        self._groups: dict[_Key, _Group] = {}
        self._auctions: dict[int, _Auction] = {}
        self._deadlines: list[tuple[float, int]] = []
        # Random base: a restarted initiator never reuses the numbers of its previous life.
        self._cfp_base = rng.randrange(1 << 40)
        self._next_cfp = self._cfp_base
        self._flush_at = INF
        self._sweep_at = INF
        self._lazy: dict[NodeId, list[Wire]] = {}
        self._lazy_at = INF
        self._done: OrderedDict[TaskId, frozenset[NodeId]] = OrderedDict()
        self._records: OrderedDict[TaskId, _Task] = OrderedDict()
        self._checked: dict[_Key, dict[NodeId, tuple[Capabilities, dict[str, object]]]] = {}
        self._match_cache: dict[_Key, tuple[list[MemberView], list[MemberView], bool]] = {}
        # participant
        self._reservations: dict[tuple[NodeId, int], _Reservation] = {}
        self._res_expiry: deque[_Reservation] = deque()
        # Reservations still holding slots: what bids and load are computed from.
        self._active: dict[tuple[NodeId, int], _Reservation] = {}
        # Work queued or reserved here, per resource it needs: what a bid's wait is made of,
        # kept as running sums so that a bid costs O(slots), not O(queue).
        self._pending_work: dict[str, float] = {}
        self._pending_count: dict[str, int] = {}
        self._res_forget: deque[_Reservation] = deque()
        self._queue: deque[_Held] = deque()
        self._running: dict[TaskId, _Held] = {}
        self._held: dict[TaskId, _Held] = {}
        self._used: dict[str, float] = {}
        self._history: dict[str, tuple[float, float]] = {}  # name -> (runtime, measured at)
        # measured / estimated runtime, over every task with an estimate; seeded by the
        # driver's calibration (``speed``), replaced by the first real measurements
        self._speed = speed
        self._bandwidth: dict[NodeId, float] = {}  # measured from each peer, bytes/s
        self._speed_samples = 0
        self._progress_at = INF
        self._results: dict[NodeId, tuple[list[TaskId], list[Any], list[float]]] = {}
        self._failures: dict[NodeId, tuple[list[TaskId], list[Any]]] = {}
        # stalls
        self._now = -INF  # the latest ``now`` any entry point was given
        self._stalled_at = -INF  # when the latest stall was noticed
        self._watch_at = INF  # a timer that only lets a stall be seen while tasks wait
        self._queries: dict[int, _Query] = {}  # in the order sent, so by deadline
        self._query_base = self._cfp_base  # random already: no draw that shifts the rng
        self._next_query = self._query_base + 1

    # -----------------------------------------------------------------------------------
    # Core protocol
    # -----------------------------------------------------------------------------------

    def receive(self, src: NodeId, msg: Wire, now: float) -> None:
        self._tick(now)
        try:
            if src == self._node:
                # What this node sends itself never leaves it: this came from outside.
                raise RemoteProtocolError("a peer frame in this node's name", reason="self")
            self._dispatch(src, msg, now)
        except RemoteProtocolError as exc:
            self._stats[f"rejected.{exc.reason}"] += 1
            raise
        self._drain(now)

    def handle_timer(self, now: float) -> None:
        self._tick(now)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, cfp = heapq.heappop(self._deadlines)
            auction = self._auctions.get(cfp)
            if auction is not None:
                self._decide(auction, now)
        self._expire_reservations(now)
        if self._sweep_at <= now:
            self._sweep_leases(now)
        if self._progress_at <= now:
            self._send_progress(now)
        if self._flush_at <= now:
            self._flush(now)
        if self._lazy_at <= now:
            self._flush_lazy()
        if self._queries:
            self._expire_queries(now)
        if self._watch_at <= now:
            self._watch_at = INF  # re-armed by ``_drain`` while tasks still wait
        self._drain(now)

    def next_timer(self) -> float | None:
        t = min(self._flush_at, self._sweep_at, self._progress_at, self._lazy_at, self._watch_at)
        if self._queries:
            t = min(t, next(iter(self._queries.values())).deadline)
        if self._deadlines:
            t = min(t, self._deadlines[0][0])
        if self._res_expiry:
            t = min(t, self._res_expiry[0].expires)
        if self._res_forget:
            t = min(t, self._res_forget[0].forget_at)
        return None if t == INF else t

    def take_outgoing(self) -> list[tuple[Address, Wire]]:
        for dst, (ids, values, runs) in self._results.items():
            self._send_remote(
                dst, Result(tasks=tuple(ids), values=tuple(values), run_s=tuple(runs))
            )
        for dst, (ids, errors) in self._failures.items():
            self._send_remote(dst, Failure(tasks=tuple(ids), errors=tuple(errors)))
        self._results.clear()
        self._failures.clear()
        out, self._out = self._out, []
        return out

    def take_events(self) -> list[ContractEvent]:
        """What the driver must do (participant) or deliver (initiator); clears them."""
        events, self._events = self._events, []
        return events

    # -----------------------------------------------------------------------------------
    # Initiator API
    # -----------------------------------------------------------------------------------

    def submit(self, spec: TaskSpec, payload: Any, now: float) -> None:
        """Auction ``spec``; ``payload`` goes, opaque, to the winner only, with the award."""
        self._tick(now)
        if spec.task_id in self._tasks or spec.task_id in self._done:
            raise LocalProtocolError(f"task id {spec.task_id} was already submitted")
        why = invalid(spec.requirements)
        if why is not None:
            raise LocalProtocolError(f"task {spec.task_id}: {why}")
        if spec.est_runtime_s is not None and not _plausible(spec.est_runtime_s):
            # Its call would be refused by every bidder, this node included (``bad-cost``).
            raise LocalProtocolError(f"task {spec.task_id}: bad runtime estimate")
        if any(b < 0 for b in spec.input_bytes.values()):
            raise LocalProtocolError(f"task {spec.task_id}: negative input size")
        key = _req_key(spec.requirements, spec.est_runtime_s)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(spec.requirements, spec.est_runtime_s)
        task = _Task(spec, payload, key, now)
        self._tasks[spec.task_id] = task
        group.queue.append(task)
        self._stats["submitted"] += 1
        if len(group.queue) >= self._cfg.max_batch or not self._auctions:
            # Nothing in flight: no batch can form behind an auction, so waiting would only
            # add latency. While auctions are open, tasks gather for the next call (group
            # commit): a burst still shares calls, a lone task goes at once.
            self._flush_at = now
        else:
            self._flush_at = min(self._flush_at, now + self._cfg.batch_delay_s)

    def cancel(self, task_id: TaskId, now: float) -> None:
        """Stop caring about ``task_id``: no event will be delivered for it."""
        self._tick(now)
        task = self._tasks.get(task_id)
        if task is None:
            return
        if task.state in (TaskState.AWARDED, TaskState.HELD) and task.winner is not None:
            self._send(task.winner, Cancel(tasks=(task_id,)))
        self._end(task, "cancelled")
        self._stats["cancelled"] += 1
        self._drain(now)

    def peer_down(self, node: NodeId, now: float) -> None:
        """Membership saw ``node`` die or leave: place its tasks again, drop its work here."""
        self._tick(now)
        if node == self._node:
            return
        self._stats["peers_down"] += 1
        again = [
            t
            for t in self._tasks.values()
            if t.winner == node and t.state in (TaskState.AWARDED, TaskState.HELD)
        ]
        for task in again:
            self._again(task, f"winner {node} went down", now, cancel=False, count=True)
        for auction in list(self._auctions.values()):
            if node in auction.asked and node not in auction.bids:
                auction.refusals.setdefault(node, {})
                if self._all_answered(auction):
                    self._decide(auction, now)
        # Its submitters are gone with it: nobody wants these results.
        for key in [k for k in self._reservations if k[0] == node]:
            self._release(self._reservations[key])
        for held in list(self._held.values()):
            if held.initiator == node:
                self._drop_held(held)
        self._drain(now)

    # -----------------------------------------------------------------------------------
    # Participant API
    # -----------------------------------------------------------------------------------

    def task_finished(self, task_id: TaskId, ok: bool, value: Any, now: float) -> None:
        """The driver ran (or stopped) ``task_id``: free its slot and report the outcome."""
        self._tick(now)
        held = self._running.pop(task_id, None)
        if held is None:
            raise LocalProtocolError(f"task {task_id} is not running here")
        self._held.pop(task_id, None)
        for k, v in held.need.items():
            self._used[k] = self._used.get(k, 0.0) - v
        if held.started is not None and ok and not held.cancelled:
            self._learn(held, now - held.started, now)
        self._unhold(held, now)
        # Capped at what the initiator accepts: beyond it the whole result would be refused.
        run = 0.0 if held.started is None else min(max(0.0, now - held.started), MAX_ESTIMATE_S)
        if held.cancelled:
            self._stats["cancelled_runs"] += 1
        elif held.initiator == self._node:
            msg: Wire = (
                Result(tasks=(task_id,), values=(value,), run_s=(run,))
                if ok
                else Failure(tasks=(task_id,), errors=(value,))
            )
            self._loop.append((self._node, msg))
        elif ok:
            ids, values, runs = self._results.setdefault(held.initiator, ([], [], []))
            ids.append(task_id)
            values.append(value)
            runs.append(run)
        else:
            ids, errors = self._failures.setdefault(held.initiator, ([], []))
            ids.append(task_id)
            errors.append(value)
        self._stats["finished_ok" if ok else "finished_error"] += 1
        self._start_ready(now)
        self._drain(now)

    def set_capabilities(self, capabilities: Capabilities, now: float) -> None:
        """The node's capabilities changed: give back queued tasks it can no longer run."""
        self._tick(now)
        self._caps = capabilities
        back = [
            h
            for h in self._queue
            if not h.cancelled and h.task_id not in self._running and self._cannot_run(h)
        ]
        self._give_back(back, "incapable")
        self._start_ready(now)
        self._drain(now)

    def set_accepting(self, accepting: bool, now: float) -> None:
        """Graceful shutdown: stop bidding and give back tasks that have not started."""
        self._tick(now)
        self._accepting = accepting
        if not accepting:
            self._give_back(
                [h for h in self._queue if not h.cancelled and h.task_id not in self._running],
                "leaving",
            )
        self._drain(now)

    def waiting(self) -> int:
        """Tasks awarded here that have not started."""
        return len(self._held) - len(self._running)

    def set_bandwidth(self, node: NodeId, bytes_per_s: float) -> None:
        """The driver measured the transfer rate from ``node``: bids count inputs held
        there at this rate (``bandwidth_bytes_per_s`` until measured)."""
        if math.isfinite(bytes_per_s) and bytes_per_s > 0:
            old = self._bandwidth.get(node)
            alpha = self._cfg.runtime_alpha
            self._bandwidth[node] = (
                bytes_per_s if old is None else old + alpha * (bytes_per_s - old)
            )

    def load(self) -> Load:
        """Running, queued and backlog (committed seconds per slot), for gossip."""
        slots = max(1.0, self._caps.resources.get("cpu", 1.0))
        queued = sum(1 for h in self._queue if not h.cancelled and h.started is None)
        reserved = sum(r.reserved for r in self._active.values())
        work = sum(h.est for h in self._held.values())
        work += sum(r.reserved * r.est for r in self._active.values())
        return Load(running=len(self._running), queued=queued + reserved, backlog_s=work / slots)

    # -----------------------------------------------------------------------------------
    # Introspection
    # -----------------------------------------------------------------------------------

    def record(self, task_id: TaskId) -> AuctionRecord | None:
        """How ``task_id`` was (or is being) placed; kept for the most recent tasks."""
        task = self._tasks.get(task_id) or self._records.get(task_id)
        if task is None:
            return None
        return AuctionRecord(
            task_id=task.spec.task_id,
            task=task.spec.requirements.task,
            submitted_at=task.submitted_at,
            state=task.ended or str(task.state),
            rounds=tuple(task.rounds),
            winner=task.winner,
            cost_s=task.cost,
            why=task.why,
            attempts=task.attempts,
            wait_s=task.wait_s,
            est_s=task.est_s,
            transfer_s=task.transfer_s,
            run_s=task.run_s,
        )

    def stats(self) -> dict[str, int]:
        """Counters: messages by kind, awards, declines, reannounces, rejections by reason."""
        return dict(self._stats)

    @property
    def node(self) -> NodeId:
        return self._node

    # -----------------------------------------------------------------------------------
    # Sending
    # -----------------------------------------------------------------------------------

    def _send(self, dst: NodeId, msg: Wire) -> None:
        if dst == self._node:
            self._loop.append((dst, msg))
        else:
            self._send_remote(dst, msg)

    def _send_lazy(self, dst: NodeId, msg: Wire, now: float) -> None:
        """Send ``msg``, which nothing waits for (a reject, a confirm), with the next message
        to ``dst`` or after ``lazy_delay_s``, whichever comes first: the two share a write."""
        if dst == self._node or self._cfg.lazy_delay_s <= 0:
            self._send(dst, msg)
            return
        self._lazy.setdefault(dst, []).append(msg)
        self._lazy_at = min(self._lazy_at, now + self._cfg.lazy_delay_s)

    def _send_remote(self, dst: NodeId, msg: Wire) -> None:
        member = self._peers.member(dst)
        if member is None:
            self._stats["unroutable"] += 1
            return
        waiting = self._lazy.pop(dst, None) if self._lazy else None
        if waiting:
            for m in waiting:
                self._out.append((member.address, m))
                self._stats[f"sent.{type(m).__name__}"] += 1
        self._out.append((member.address, msg))
        self._stats[f"sent.{type(msg).__name__}"] += 1

    def _flush_lazy(self) -> None:
        self._lazy_at = INF
        lazy, self._lazy = self._lazy, {}
        for dst, msgs in lazy.items():
            member = self._peers.member(dst)
            if member is None:
                self._stats["unroutable"] += len(msgs)
                continue
            for m in msgs:
                self._out.append((member.address, m))
                self._stats[f"sent.{type(m).__name__}"] += 1

    def _drain(self, now: float) -> None:
        while self._loop:
            src, msg = self._loop.popleft()
            try:
                self._dispatch(src, msg, now)
            except RemoteProtocolError as exc:
                raise LocalProtocolError(f"own message rejected: {exc}") from exc
        if self._watch_at == INF and len(self._held) > len(self._running):
            # Tasks wait to start: keep a timer close, so that a stall is seen by its lateness.
            self._watch_at = now + self._cfg.stall_s / 2

    def _dispatch(self, src: NodeId, msg: Wire, now: float) -> None:
        if isinstance(msg, CallForProposals):
            self._on_cfp(src, msg, now)
        elif isinstance(msg, Propose):
            self._on_propose(src, msg, now)
        elif isinstance(msg, Refuse):
            self._on_refuse(src, msg, now)
        elif isinstance(msg, Accept):
            self._on_accept(src, msg, now)
        elif isinstance(msg, Reject):
            self._on_reject(src, msg)
        elif isinstance(msg, Confirm):
            self._on_confirm(src, msg, now)
        elif isinstance(msg, Decline):
            self._on_decline(src, msg, now)
        elif isinstance(msg, Progress):
            self._on_progress(src, msg, now)
        elif isinstance(msg, Result | Failure):
            self._on_outcome(src, msg, now)
        elif isinstance(msg, Cancel):
            self._on_cancel(src, msg)
        elif isinstance(msg, LeaseQuery):
            self._on_lease_query(src, msg, now)
        elif isinstance(msg, LeaseReply):
            self._on_lease_reply(src, msg, now)
        else:
            raise RemoteProtocolError(
                f"{type(msg).__name__} is not a contract message", reason="unexpected"
            )

    # -----------------------------------------------------------------------------------
    # Initiator: candidates, calls for proposals, decisions
    # -----------------------------------------------------------------------------------

    def _match(self, group: _Group) -> list[MemberView]:
        """Live members whose gossiped capabilities meet the group's requirements.

        Cached per requirements while the view hands back the same member list (a view
        builds a new list whenever a member changes), so a burst of auctions costs one
        pass over the mesh."""
        members = self._peers.members()
        key = _req_key(group.requirements, None)
        hit = self._match_cache.get(key)
        if hit is not None and hit[0] is members and hit[2] == self._accepting:
            return hit[1]
        checked = self._checked.get(key)
        if checked is None:
            if len(self._checked) > 1024:
                self._checked.clear()
                self._match_cache.clear()
            checked = self._checked[key] = {}
        capable: list[MemberView] = []
        suspects: list[MemberView] = []
        for m in members:
            if m.state not in _CANDIDATE_STATES:
                continue
            if m.node == self._node and not self._accepting:
                continue
            seen = checked.get(m.node)
            if seen is None or seen[0] is not m.capabilities:
                seen = (m.capabilities, check(group.requirements, m.capabilities))
                checked[m.node] = seen
            if not seen[1]:
                (capable if m.state == MemberState.ALIVE else suspects).append(m)
        # A suspect is still a member until it is declared dead (it may be busy or briefly
        # cut off); it is asked only when the alive candidates do not fill a call.
        if len(capable) < self._cfg.candidates:
            capable += suspects
        self._match_cache[key] = (members, capable, self._accepting)
        return capable

    def _lacking(self, group: _Group) -> dict[str, object]:
        """What the live members lack for the group's requirements, merged."""
        return merge_reasons(
            lack
            for m in self._peers.members()
            if m.state in _CANDIDATE_STATES
            for lack in [check(group.requirements, m.capabilities)]
            if lack
        )

    def _sample(self, candidates: list[MemberView], tasks: list[_Task], est: float) -> list[NodeId]:
        """d candidates, weighted to low backlog and to holders of the batch's inputs.

        The weighted draw runs over a uniform pool of ``POOL * d`` candidates plus every
        input holder, so its cost does not grow with the mesh: among 48 random peers the
        least loaded few are as good as the least loaded few of all, and herds of
        initiators chasing one stale "idle" node are avoided."""
        d = self._cfg.candidates
        if len(candidates) <= d:
            return [m.node for m in candidates]
        held: dict[NodeId, int] = {}
        total = 0
        for t in tasks:
            for n, b in t.spec.input_bytes.items():
                held[n] = held.get(n, 0) + b
                total += b
        pool = candidates
        if len(candidates) > POOL * d:
            pool = self._rng.sample(candidates, POOL * d)
            if held:
                inside = {m.node for m in pool}
                pool += [m for m in candidates if m.node in held and m.node not in inside]
        per_task = 1.0 / (len(tasks) * self._cfg.bandwidth_bytes_per_s)
        rng = self._rng.random
        keyed: list[tuple[float, NodeId]] = []
        for m in pool:
            score = est + m.load.backlog_s
            if total:
                score += (total - held.get(m.node, 0)) * per_task
            # Efraimidis-Spirakis: the d largest u ** (1 / weight), weight = 1 / score.
            keyed.append((math.log(rng() or _EPS) * score, m.node))
        return [n for _, n in heapq.nlargest(d, keyed)]

    def _flush(self, now: float) -> None:
        """Feed every group's pool, and recruit workers where the queue needs more."""
        self._flush_at = INF
        for key, group in list(self._groups.items()):
            self._refill(group, now)
            queue = group.queue
            while queue and (queue[0].ended or queue[0].state is not TaskState.QUEUED):
                queue.popleft()
            if not queue:
                if not group.pool and not group.recruiting:
                    del self._groups[key]
                continue
            if len(self._auctions) < self._cfg.max_auctions and self._short_handed(group, now):
                self._recruit(group, now)
            elif group.pool and now < group.quiet_until:
                self._flush_at = min(self._flush_at, group.quiet_until)

    def _short_handed(self, group: _Group, now: float) -> bool:
        """Whether more workers could help: there is no pool, or the last queued task
        would wait longer than ``recruit_s`` for a lane of the pool. A call whose bidders
        all stayed idle (the pool finishes sooner than any of them would) keeps the group
        from calling again for ``recruit_s`` plus one task on its fastest worker."""
        if group.recruiting >= self._cfg.recruit_parallel:
            return False
        pool = group.pool
        if not pool:
            return not group.recruiting
        if now < group.quiet_until:
            return False
        free = [f for w in pool.values() for f in w.lane_free]
        backlog = len(group.queue) - sum(1 for f in free if f <= now)
        if backlog <= 0:
            return False
        rate = sum(w.lanes / max(w.run_s, MIN_ESTIMATE_S) for w in pool.values())
        wait = max(0.0, min(free) - now) + (backlog - 1) / rate
        return wait > self._cfg.recruit_s

    def _recruit(self, group: _Group, now: float) -> None:
        """Call for proposals for part of the queue, among capable nodes outside the pool.

        The first call of a group takes a whole batch: its bidders form the pool. Later
        calls take tasks from the back of the queue (the pool goes on with the front) and
        only add workers: a call nobody answers puts its tasks back, and fails nothing
        while the pool works."""
        queue = group.queue
        if not group.pool:
            batch = [queue.popleft() for _ in range(min(self._cfg.max_batch, len(queue)))]
            exclude: frozenset[NodeId] = frozenset()
        else:
            exclude = frozenset(group.pool)
            if not any(m.node not in exclude for m in self._match(group)):
                return
            n = min(self._cfg.max_batch, max(1, len(queue) // 2))
            batch = [queue.pop() for _ in range(n)]
            batch.reverse()
        batch = [t for t in batch if t.state is TaskState.QUEUED and not t.ended]
        if batch:
            self._call(group, batch, batch[0].exclude | exclude, now)

    def _call(
        self, group: _Group, tasks: list[_Task], exclude: frozenset[NodeId], now: float
    ) -> None:
        """Open one auction for ``tasks`` among capable candidates outside ``exclude``."""
        candidates = self._match(group)
        if exclude:
            candidates = [m for m in candidates if m.node not in exclude]
        if not candidates:
            lacking = self._lacking(group)
            if exclude:
                self._fail_unplaced(tasks, lacking, now)
            else:
                self._stats["no_capable"] += len(tasks)
                name = group.requirements.task
                for t in tasks:
                    self._fail(
                        t,
                        FAILED_NO_PEER,
                        str(NoCapablePeerError(name, lacking)),
                        {"task": name, "missing": lacking},
                        None,
                    )
            return
        est = group.est if group.est is not None else self._cfg.default_runtime_s
        chosen = self._sample(candidates, tasks, est)
        cfp = self._next_cfp
        self._next_cfp += 1
        # Each round that went unanswered doubles the wait: silent candidates are loaded.
        deadline = now + self._cfg.reply_timeout_s * 2 ** min(tasks[0].widened, 5)
        auction = _Auction(cfp, group, tasks, chosen, now, deadline)
        for t in tasks:
            t.move("call")
            t.auction = auction
        msg = CallForProposals(
            cfp=cfp,
            requirements=group.requirements,
            tasks=tuple(t.spec.task_id for t in tasks),
            est_runtime_s=group.est,
            inputs={t.spec.task_id: t.spec.input_bytes for t in tasks if t.spec.input_bytes},
        )
        self._auctions[cfp] = auction
        group.recruiting += 1
        heapq.heappush(self._deadlines, (deadline, cfp))
        self._stats["auctions"] += 1
        for n in chosen:
            self._send(n, msg)

    def _auction_for(self, src: NodeId, cfp: int) -> _Auction | None:
        """The open auction ``cfp`` that asked ``src``; None for a late answer."""
        auction = self._auctions.get(cfp)
        if auction is None:
            if self._cfp_base <= cfp < self._next_cfp:
                self._stats["late_answers"] += 1
                return None
            raise RemoteProtocolError(f"no call for proposals {cfp}", reason="unknown-cfp")
        if src not in auction.asked:
            raise RemoteProtocolError(f"{src} was not asked in {cfp}", reason="not-asked")
        if src in auction.bids or src in auction.refusals:
            raise RemoteProtocolError(f"{src} answered {cfp} twice", reason="duplicate")
        return auction

    @staticmethod
    def _all_answered(auction: _Auction) -> bool:
        return len(auction.bids) + len(auction.refusals) >= len(auction.asked)

    def _on_propose(self, src: NodeId, msg: Propose, now: float) -> None:
        auction = self._auction_for(src, msg.cfp)
        if auction is None:
            return
        if not msg.costs or len(msg.costs) > MAX_CFP_TASKS:
            raise RemoteProtocolError("a bid must offer at least one slot", reason="bad-cost")
        if not all(_plausible(c) for c in msg.costs) or not _plausible(msg.run_s):
            raise RemoteProtocolError(
                f"bid costs must be finite, >= 0 and <= {MAX_ESTIMATE_S:g} s", reason="bad-cost"
            )
        if msg.lanes < 1:
            raise RemoteProtocolError("a bid runs at least one task at once", reason="bad-cost")
        if not all(math.isfinite(x) and x > 0 for x in msg.bandwidth.values()):
            raise RemoteProtocolError("bandwidth must be finite and > 0", reason="bad-cost")
        auction.bids[src] = msg
        self._stats["bids_received"] += 1
        if self._all_answered(auction):
            self._decide(auction, now)
        elif self._decisive(auction, msg, now):
            self._stats["early_awards"] += 1
            self._decide(auction, now)

    def _decisive(self, auction: _Auction, bid: Propose, now: float) -> bool:
        """Whether ``bid`` alone settles the auction: it completes every task sooner than
        this answer took to come back. Any other bidder could finish at best that much
        sooner, and its answer, sent at the same time, is already later than this one: on
        a loaded machine much later. Short tasks (no-ops, lookups) then cost one round
        trip less; anything longer waits for every answer, as a batch must to spread."""
        n = len(auction.tasks)
        if len(bid.costs) < n:
            return False
        transfer = max(
            (self._transfer(t, bid.bandwidth, NodeId("")) for t in auction.tasks), default=0.0
        )
        return bid.costs[n - 1] + transfer < now - auction.opened

    def _transfer(self, task: _Task, bandwidth: dict[NodeId, float], node: NodeId) -> float:
        """Seconds to bring ``task``'s inputs to ``node``, at its measured rates."""
        if not task.spec.input_bytes:
            return 0.0
        default = self._cfg.bandwidth_bytes_per_s
        return sum(
            b / bandwidth.get(h, default) for h, b in task.spec.input_bytes.items() if h != node
        )

    def _on_refuse(self, src: NodeId, msg: Refuse, now: float) -> None:
        auction = self._auction_for(src, msg.cfp)
        if auction is None:
            return
        auction.refusals[src] = dict(msg.reason)
        self._stats["refusals_received"] += 1
        if self._all_answered(auction):
            self._decide(auction, now)

    def _decide(self, auction: _Auction, now: float) -> None:
        """The bidders join the group's pool; the tasks go back to its queue, which the
        pool works through (``_refill``); bidders given nothing are released."""
        del self._auctions[auction.cfp]
        auction.decided = True
        group = auction.group
        group.recruiting -= 1
        self._flush_at = min(self._flush_at, now)
        tasks = [t for t in auction.tasks if not t.ended and t.state is TaskState.AUCTION]
        bids = auction.bids
        auction.round = RoundRecord(
            cfp=auction.cfp,
            at=now,
            asked=tuple(auction.asked),
            bids={n: p.costs[0] for n, p in bids.items()},
            slots={n: len(p.costs) for n, p in bids.items()},
            refusals=dict(auction.refusals),
            silent=tuple(n for n in auction.asked if n not in bids and n not in auction.refusals),
        )
        for t in tasks:
            t.rounds.append(auction.round)
        if not bids:
            self._widen(auction, tasks, now)
            return
        pool = group.pool
        joined = [
            n for n in bids if n not in pool and self._peers.member(n) is not None
        ]  # a pool member keeps the reservation it works under; one gone since is skipped
        for n in joined:
            pool[n] = _Worker(n, auction.cfp, bids[n], now, self._cfg.bind_ahead_s)
        for t in reversed(tasks):
            t.move("decided")
            self._requeue(t)
        self._refill(group, now)
        useful = False
        for n in bids:
            w = pool.get(n)
            if n not in joined or w is None or not w.inflight:
                self._send_lazy(n, Reject(cfp=auction.cfp), now)
                if w is not None and not w.inflight:
                    del pool[n]
            else:
                useful = True
        if useful:
            group.backoff = 0.0
        elif pool:
            self._back_off(group, now)
        if now < auction.deadline:
            # Decided before every answer came: those still to come are bids already made,
            # whose slots are held until the reject (the stream keeps it after the call).
            for n in auction.round.silent:
                self._send_lazy(n, Reject(cfp=auction.cfp), now)

    def _refill(self, group: _Group, now: float) -> None:
        """Late binding: give queued tasks to pool workers that have room, each worker
        taking while it would finish a task no later than the rest of the pool could."""
        pool, queue = group.pool, group.queue
        if not pool or not queue:
            return
        # A worker idle for a while may have forgotten the reservation it works under
        # (``reservation_s`` after its last task): it is recruited again if needed.
        stale = now - 2 * self._cfg.reservation_s
        for n in [n for n, w in pool.items() if w.idle_since < stale]:
            del pool[n]
        room = [w for w in pool.values() if len(w.inflight) < w.window]
        if not room:
            return
        room.sort(key=lambda w: w.start_at(now) + w.run_s)
        rate = sum(w.lanes / max(w.run_s, MIN_ESTIMATE_S) for w in pool.values())
        lanes = sum(w.lanes for w in pool.values())
        for w in room:
            won: list[_Task] = []
            while len(w.inflight) < w.window and queue:
                if not self._worth(w, group, now, rate, lanes):
                    break
                t = self._pick(w, group, now)
                if t is None:
                    break
                t.move("award")
                t.worker = w
                t.awarded_at = now
                t.est_s = w.run_s
                t.expected_end = w.take(t, now)
                t.wait_s = t.expected_end - w.run_s - now
                t.transfer_s = self._transfer(t, w.bandwidth, w.node)
                t.cost = t.expected_end - now + t.transfer_s
                won.append(t)
            if won:
                self._award(w, won, now)

    def _worth(self, w: _Worker, group: _Group, now: float, rate: float, lanes: int) -> bool:
        """Whether ``w`` should take another task: the queue holds more tasks than the
        rest of the pool completes before ``w`` would complete one. Near the end of a
        queue this keeps a slow node from taking the last tasks, which a fast one would
        finish sooner even after the task it is running."""
        queued = len(group.queue)
        done_by = w.start_at(now) + w.run_s
        if queued > (done_by - now) * rate + lanes:
            return True  # a long queue: the whole pool together cannot drain it by then
        capacity = 0
        for v in group.pool.values():
            if v is w:
                continue
            for free in v.lane_free:
                # Tasks it completes strictly before ``w`` would: on a tie ``w`` takes the
                # task, else identical workers all hold back and nobody ever gets it.
                ahead = (done_by - max(now, free)) / max(v.run_s, MIN_ESTIMATE_S)
                capacity += max(0, int(ahead - _EPS))
            if capacity >= queued:
                self._stats["held_back"] += 1
                return False
        return True

    def _pick(self, w: _Worker, group: _Group, now: float) -> _Task | None:
        """The queued task ``w`` should take: among the first few, one whose inputs it
        holds, else one that no pool worker holds, else one it finishes (transfer
        included) before the worker that holds its inputs would start it."""
        queue = group.queue
        pool = group.pool
        done_by = w.start_at(now) + w.run_s
        fallback: int | None = None
        i = 0
        while i < len(queue) and i < LOCALITY_SCAN:
            t = queue[i]
            if t.ended or t.state is not TaskState.QUEUED:
                del queue[i]
                continue
            home = t.home
            if home is None or home == w.node:
                if home == w.node or fallback is None:
                    fallback = i
                if home == w.node:
                    break
            elif fallback is None:
                holder = pool.get(home)
                if holder is None or (
                    done_by + self._transfer(t, w.bandwidth, w.node)
                    < holder.start_at(now) + holder.run_s
                ):
                    fallback = i
            i += 1
        if fallback is None:
            return None
        t = queue[fallback]
        del queue[fallback]
        return t

    def _award(self, w: _Worker, tasks: list[_Task], now: float) -> None:
        node = w.node
        member = self._peers.member(node)
        incarnation = member.incarnation if member is not None else 0
        lease = INF if node == self._node else now + self._cfg.lease_s
        for t in tasks:
            t.winner = node
            t.winner_incarnation = incarnation
            t.winners.add(node)
            t.lease_until = lease
            t.why = "finishes first among the pool's workers"
        self._stats["awards"] += len(tasks)
        if lease != INF and self._sweep_at == INF:
            self._sweep_at = now + self._cfg.lease_s / 4
        self._send(
            node,
            Accept(
                cfp=w.cfp,
                tasks=tuple(t.spec.task_id for t in tasks),
                payloads=tuple(t.payload for t in tasks),
            ),
        )

    def _back_off(self, group: _Group, now: float) -> None:
        """A recruiting call added nobody: no further call for a while, doubling from two
        reply timeouts up to one task on the pool's fastest worker. Calls that add nobody
        cost messages and help no task; a pool that stays short-handed still recruits."""
        fastest = min(w.run_s for w in group.pool.values())
        floor = 2 * self._cfg.reply_timeout_s
        group.backoff = min(
            max(2 * group.backoff, floor), max(self._cfg.recruit_s + fastest, floor)
        )
        group.quiet_until = now + group.backoff
        if group.queue:
            self._flush_at = min(self._flush_at, group.quiet_until)

    def _widen(self, auction: _Auction, tasks: list[_Task], now: float) -> None:
        """Nobody bid: ask candidates not yet asked, or fail once the rounds are spent."""
        if not tasks:
            return
        group = auction.group
        if group.pool:
            # Recruiting found nobody: the pool goes on with these. Quiet for a while, as
            # after a call that added nobody useful (``_decide``): else a refuser is called
            # again at once, a call per round trip for as long as the pool is busy.
            for t in reversed(tasks):
                t.move("unplaced")
                self._requeue(t)
            self._back_off(group, now)
            return
        first = tasks[0]
        exclude = first.exclude | frozenset(auction.asked)
        spent = first.widened >= self._cfg.widen_rounds or not any(
            m.node not in exclude for m in self._match(auction.group)
        )
        if spent:
            # Silence is not refusal: candidates that are alive but slow to answer (a loaded
            # node, a lost frame) are asked again, with longer waits, until patience runs out.
            silent_only = not any(rnd.refusals for rnd in first.rounds)
            if not silent_only or now - first.submitted_at >= self._cfg.silence_patience_s:
                self._fail_unplaced(tasks, self._lacking(auction.group), now)
                return
            exclude = frozenset()
        self._stats["widened"] += len(tasks)
        for t in tasks:
            t.move("unplaced")
            t.exclude = exclude
            t.widened = first.widened + 1
        self._call(auction.group, tasks, exclude, now)

    def _fail_unplaced(self, tasks: list[_Task], lacking: dict[str, object], now: float) -> None:
        """No bid in any round: name what refusers lacked, or say that nobody answered."""
        if not tasks:
            return
        reasons = [r for rnd in tasks[0].rounds for r in rnd.refusals.values() if r]
        asked = {n for rnd in tasks[0].rounds for n in rnd.asked}
        name = tasks[0].spec.requirements.task
        for t in tasks:
            if t.state is TaskState.AUCTION:
                t.move("unplaced")
        if reasons:
            missing = merge_reasons([*reasons, lacking] if lacking else reasons)
            self._stats["no_capable"] += len(tasks)
            for t in tasks:
                self._fail(
                    t,
                    FAILED_NO_PEER,
                    str(NoCapablePeerError(name, missing)),
                    {"task": name, "missing": missing, "asked": sorted(asked)},
                    None,
                )
        else:
            self._stats["no_bids"] += len(tasks)
            waited = now - tasks[0].submitted_at
            message = f"no bid for {name} from {len(asked)} candidates in {waited:.1f}s"
            for t in tasks:
                self._fail(t, FAILED_NO_BIDS, message, {"task": name, "asked": sorted(asked)}, None)

    def _requeue(self, task: _Task) -> None:
        group = self._groups.get(task.key)
        if group is None:
            spec = task.spec
            group = self._groups[task.key] = _Group(spec.requirements, spec.est_runtime_s)
        group.queue.appendleft(task)

    def _unbind(self, task: _Task, now: float, *, dismiss: bool) -> None:
        """``task`` leaves its pool worker; with ``dismiss`` the worker leaves the pool (it
        declined, lapsed or died: it is recruited again only by a new call)."""
        w = task.worker
        if w is None:
            return
        task.worker = None
        w.release(task, now)
        group = self._groups.get(task.key)
        if group is None or group.pool.get(w.node) is not w:
            return
        if dismiss or (not w.inflight and not group.queue):
            del group.pool[w.node]
        elif not dismiss:
            self._flush_at = min(self._flush_at, now)  # room freed: refill

    def _again(self, task: _Task, reason: str, now: float, *, cancel: bool, count: bool) -> None:
        """Announce ``task`` again (its winner declined, lapsed or died)."""
        winner = task.winner
        if cancel and winner is not None:
            self._send(winner, Cancel(tasks=(task.spec.task_id,)))
        self._unbind(task, now, dismiss=True)
        self._stats["reannounces"] += 1
        if count:
            task.attempts += 1
            if task.attempts >= self._cfg.max_attempts:
                self._fail(
                    task,
                    FAILED_LOST,
                    f"gave up after {task.attempts} placements; last: {reason}",
                    {"task": task.spec.requirements.task, "reason": reason},
                    winner,
                )
                return
        task.move("again")
        task.winner = None
        task.lease_until = INF
        task.exclude = frozenset()
        task.widened = 0
        task.why = f"announced again: {reason}"
        self._requeue(task)
        self._flush_at = now

    def _owned(self, src: NodeId, ids: Iterable[TaskId]) -> list[_Task]:
        """Tasks among ``ids`` whose current winner is ``src``; raise if ``src`` never won."""
        out: list[_Task] = []
        for tid in ids:
            task = self._tasks.get(tid)
            if task is None:
                winners = self._done.get(tid)
                if winners is None:
                    raise RemoteProtocolError(f"unknown task {tid}", reason="unknown-task")
                if src not in winners:
                    raise RemoteProtocolError(f"{src} never won {tid}", reason="not-winner")
                continue
            if src not in task.winners:
                raise RemoteProtocolError(f"{src} never won {tid}", reason="not-winner")
            if task.winner == src:
                out.append(task)
        return out

    def _on_confirm(self, src: NodeId, msg: Confirm, now: float) -> None:
        for t in self._owned(src, msg.tasks):
            if t.state is TaskState.AWARDED:
                t.move("confirm")
            if t.lease_until != INF:
                t.lease_until = now + self._cfg.lease_s
        self._stats["confirms_received"] += 1

    def _on_decline(self, src: NodeId, msg: Decline, now: float) -> None:
        if len(set(msg.tasks)) != len(msg.tasks):
            raise RemoteProtocolError("a task appears twice in one decline", reason="bad-batch")
        tasks = [
            t for t in self._owned(src, msg.tasks) if t.state in (TaskState.AWARDED, TaskState.HELD)
        ]
        self._stats["declines_received"] += len(tasks)
        for t in tasks:
            self._again(t, f"{src} gave it back ({msg.reason})", now, cancel=False, count=False)

    def _on_progress(self, src: NodeId, msg: Progress, now: float) -> None:
        lease = now + self._cfg.lease_s
        for tid in msg.tasks:
            t = self._tasks.get(tid)
            if t is not None and t.winner == src:
                if t.state is TaskState.AWARDED:
                    t.move("progress")
                t.lease_until = lease
        self._stats["progress_received"] += 1

    def _on_outcome(self, src: NodeId, msg: Result | Failure, now: float) -> None:
        values = msg.values if isinstance(msg, Result) else msg.errors
        if len(values) != len(msg.tasks):
            raise RemoteProtocolError("tasks and values differ in length", reason="malformed")
        runs = msg.run_s if isinstance(msg, Result) else (None,) * len(msg.tasks)
        if len(runs) != len(msg.tasks):
            raise RemoteProtocolError("tasks and run times differ in length", reason="malformed")
        if not all(r is None or _plausible(r) for r in runs):
            raise RemoteProtocolError("run times must be finite and >= 0", reason="bad-cost")
        live: list[tuple[_Task, Any, float | None]] = []
        duplicates = 0
        for tid, value, run in zip(msg.tasks, values, runs, strict=True):
            task = self._tasks.get(tid)
            if task is None:
                winners = self._done.get(tid)
                if winners is None:
                    raise RemoteProtocolError(f"unknown task {tid}", reason="unknown-task")
                if src not in winners:
                    raise RemoteProtocolError(f"{src} never won {tid}", reason="not-winner")
                duplicates += 1
            elif src not in task.winners:
                raise RemoteProtocolError(f"{src} never won {tid}", reason="not-winner")
            else:
                live.append((task, value, run))
        if len({id(t) for t, _, _ in live}) != len(live):
            raise RemoteProtocolError("a task appears twice in one result", reason="malformed")
        self._stats["duplicates"] += duplicates
        ok = isinstance(msg, Result)
        for task, value, run in live:
            if task.winner is not None and task.winner != src:
                # Executed twice (a lapse or a lost confirm); the other run is now waste.
                self._send(task.winner, Cancel(tasks=(task.spec.task_id,)))
            elif run is not None and task.worker is not None:
                task.run_s = run
                task.worker.learn(run, self._cfg.runtime_alpha)

            task.winner = src
            if ok:
                self._events.append(Completed(task_id=task.spec.task_id, node=src, value=value))
                self._end(task, "completed")
                self._stats["completed"] += 1
            else:
                message, details = _error_info(value)
                self._fail(task, FAILED_TASK, message, details, src)

    def _fail(
        self, task: _Task, kind: str, message: str, details: dict[str, Any], node: NodeId | None
    ) -> None:
        self._events.append(
            Failed(
                task_id=task.spec.task_id, node=node, kind=kind, message=message, details=details
            )
        )
        task.why = message if kind != FAILED_TASK else task.why
        self._end(task, "failed")
        self._stats["failed"] += 1

    def _end(self, task: _Task, how: str) -> None:
        tid = task.spec.task_id
        self._unbind(task, self._now, dismiss=False)
        task.ended = how
        task.lease_until = INF
        task.auction = None
        del self._tasks[tid]
        self._done[tid] = frozenset(task.winners)
        if len(self._done) > self._cfg.done_limit:
            self._done.popitem(last=False)
        self._records[tid] = task
        if len(self._records) > self._cfg.record_limit:
            self._records.popitem(last=False)

    def _sweep_leases(self, now: float) -> None:
        self._sweep_at = INF
        pending = False
        for task in list(self._tasks.values()):
            if task.state not in (TaskState.AWARDED, TaskState.HELD):
                continue
            winner = task.winner
            if winner is None or winner == self._node:
                continue
            member = self._peers.member(winner)
            if member is None or member.state in (MemberState.DEAD, MemberState.LEFT):
                self._again(task, f"winner {winner} is gone", now, cancel=False, count=True)
            elif task.lease_until <= now:
                self._stats["leases_lapsed"] += 1
                self._again(task, f"lease at {winner} lapsed", now, cancel=True, count=True)
            else:
                pending = True
        if pending:
            self._sweep_at = now + self._cfg.lease_s / 4

    # -----------------------------------------------------------------------------------
    # Participant: bids, reservations, execution
    # -----------------------------------------------------------------------------------

    def _runtime(self, name: str, seed: float | None, now: float) -> float:
        """Expected runtime here. The prior is the submitter's estimate (or the default)
        times this node's speed factor, which calibration at start seeds and every run
        with an estimate corrects. This node's own history for the name outweighs the
        prior while it is fresh and fades into it with age (``history_half_life_s``):
        one slow run long ago does not price a node out of every later auction."""
        prior = (seed if seed is not None else self._cfg.default_runtime_s) * self._speed
        known = self._history.get(name)
        if known is None:
            return min(prior, MAX_ESTIMATE_S)
        value, at = known
        trust: float = 0.5 ** (max(0.0, now - at) / self._cfg.history_half_life_s)
        return min(trust * value + (1.0 - trust) * prior, MAX_ESTIMATE_S)

    def _learn(self, held: _Held, measured: float, now: float) -> None:
        alpha = self._cfg.runtime_alpha
        name = held.req.task
        old = self._history.get(name)
        value = measured if old is None else old[0] + alpha * (measured - old[0])
        self._history[name] = (value, now)
        if held.seed is not None and held.seed >= MIN_ESTIMATE_S:
            # A plain mean over the first few runs, then the moving average: the first
            # measurements are what tells a slow node from a fast one, so they count fully.
            # One ratio moves the factor by at most 1000x either way.
            ratio = min(max(measured / held.seed, 1e-3), 1e3)
            self._speed_samples += 1
            weight = max(alpha, 1.0 / self._speed_samples)
            self._speed += weight * (ratio - self._speed)

    def _account(self, need: dict[str, float], est: float, n: int) -> None:
        work, count = self._pending_work, self._pending_count
        for k, v in need.items():
            if v > 0:
                work[k] = work.get(k, 0.0) + est * n
                count[k] = count.get(k, 0) + n

    def _room(self, need: dict[str, float], est: float, now: float) -> int:
        """Tasks of this kind that could start here within ``bind_ahead_s`` beyond those
        already running, waiting or reserved: a refill beyond it is declined as busy, and
        its initiator places it elsewhere. Several initiators each refilling this node as
        if its lanes were theirs alone would otherwise queue work here that idle nodes
        could start at once."""
        key, lanes = _limiting(need, self._caps.resources)
        lanes = max(1, lanes)
        ahead = int(self._cfg.bind_ahead_s / max(est, MIN_ESTIMATE_S))
        busy = sum(1 for h in self._running.values() if h.need.get(key, 0.0) > 0)
        busy += self._pending_count.get(key, 0)
        return max(0, min(lanes * (1 + ahead), self._cfg.max_offer) - busy)

    def _bid(self, need: dict[str, float], est: float, n: int, now: float) -> list[float]:
        """Completion times of up to ``n`` more tasks on this node: running tasks by their
        remaining time, queued and reserved work spread evenly over the lanes."""
        key, lanes = _limiting(need, self._caps.resources)
        lanes = max(1, lanes)
        free_at = [0.0] * lanes
        running = 0
        for h in self._running.values():
            if h.need.get(key, 0.0) > 0:
                elapsed = now - (h.started if h.started is not None else now)
                # A task past its estimate has shown that it is longer than thought; task
                # durations are heavy-tailed, so expect it to go on about as long as it has
                # overrun, not to end now (which would make a busy node bid as if idle).
                left = h.est - elapsed if elapsed < h.est else elapsed - h.est
                heapq.heapreplace(free_at, free_at[0] + left)
                running += 1
        pending = max(0.0, self._pending_work.get(key, 0.0))
        if pending:
            share = pending / lanes
            free_at = [t + share for t in free_at]
            heapq.heapify(free_at)
        room = lanes * (1 + self._cfg.queue_per_slot) - running - self._pending_count.get(key, 0)
        horizon = self._cfg.queue_horizon_s
        limit = min(n, self._cfg.max_offer)
        costs: list[float] = []
        while len(costs) < limit:
            c = free_at[0] + est
            # Always one slot (busy is not a refusal), the queue depth, and beyond it
            # whatever still completes within the horizon (short tasks come in thousands).
            if costs and len(costs) >= room and c > horizon:
                break
            heapq.heapreplace(free_at, c)
            costs.append(c)
        return costs

    def _on_cfp(self, src: NodeId, msg: CallForProposals, now: float) -> None:
        key = (src, msg.cfp)
        if key in self._reservations:
            raise RemoteProtocolError(f"call {msg.cfp} from {src} repeated", reason="duplicate")
        ids = set(msg.tasks)
        if not msg.tasks or len(msg.tasks) > MAX_CFP_TASKS or len(ids) != len(msg.tasks):
            raise RemoteProtocolError("empty, oversized or repeating batch", reason="bad-batch")
        why = invalid(msg.requirements)
        if why is not None:
            raise RemoteProtocolError(why, reason="bad-requirements")
        if msg.est_runtime_s is not None and not _plausible(msg.est_runtime_s):
            raise RemoteProtocolError(
                f"runtime estimate must be >= 0 and <= {MAX_ESTIMATE_S:g} s", reason="bad-cost"
            )
        for tid, holders in msg.inputs.items():
            if tid not in ids:
                raise RemoteProtocolError(
                    f"inputs for task {tid} not called", reason="unknown-task"
                )
            if any(b < 0 for b in holders.values()):
                raise RemoteProtocolError("negative input size", reason="bad-field")
        if not self._accepting:
            self._send(src, Refuse(cfp=msg.cfp, reason={"state": "leaving"}))
            self._stats["refusals_sent"] += 1
            return
        lacking = check(msg.requirements, self._caps)
        if lacking:
            self._send(src, Refuse(cfp=msg.cfp, reason={k: str(v) for k, v in lacking.items()}))
            self._stats["refusals_sent"] += 1
            return
        need = demand(msg.requirements)
        est = self._runtime(msg.requirements.task, msg.est_runtime_s, now)
        # Queued behind long work a slot may end past MAX_ESTIMATE_S: bid the cap, which
        # the initiator accepts, rather than a number it refuses (``bad-cost``).
        costs = [min(c, MAX_ESTIMATE_S) for c in self._bid(need, est, len(msg.tasks), now)]
        default = self._cfg.bandwidth_bytes_per_s
        bandwidth = {
            h: self._bandwidth.get(h, default)
            for holders in msg.inputs.values()
            for h in holders
            if h != self._node
        }
        res = _Reservation(src, msg.cfp, msg, need, est, len(costs), now, self._cfg)
        self._reservations[key] = res
        self._res_expiry.append(res)
        self._active[key] = res
        self._account(need, est, res.offered)
        self._res_forget.append(res)
        self._stats["bids_sent"] += 1
        lanes = max(1, _limiting(need, self._caps.resources)[1])
        self._send(
            src,
            Propose(cfp=msg.cfp, costs=tuple(costs), lanes=lanes, run_s=est, bandwidth=bandwidth),
        )

    def _on_accept(self, src: NodeId, msg: Accept, now: float) -> None:
        res = self._reservations.get((src, msg.cfp))
        if res is None:
            raise RemoteProtocolError(f"award for {msg.cfp} never called", reason="unsolicited")
        if len(msg.payloads) != len(msg.tasks) or len(set(msg.tasks)) != len(msg.tasks):
            raise RemoteProtocolError("tasks and payloads do not match", reason="malformed")
        if not msg.tasks or len(msg.tasks) > MAX_CFP_TASKS:
            raise RemoteProtocolError("empty or oversized award", reason="bad-batch")
        # Awards under one call keep coming while the initiator refills this node as its
        # results go back (late binding): any task of the call's kind, taken while there
        # is room (``_bid``), the rest declined as busy.
        fresh = [
            (tid, p)
            for tid, p in zip(msg.tasks, msg.payloads, strict=True)
            if tid not in self._held
        ]
        again = [tid for tid in msg.tasks if tid in self._held]
        res.forget_at = max(res.forget_at, now + 4 * self._cfg.reservation_s)
        # A bid made before this node stalled may have been awarded long ago, and the task
        # placed again elsewhere since: give it back rather than run it a second time.
        stale = res.made < self._stalled_at
        if not self._accepting or stale or check(res.requirements, self._caps):
            reason = "leaving" if not self._accepting else "stale" if stale else "incapable"
            if fresh:
                ids = tuple(t for t, _ in fresh)
                self._send(src, Decline(cfp=msg.cfp, tasks=ids, reason=reason))
                self._stats["declines_sent"] += 1
                if stale:
                    self._stats["stale_declined"] += len(ids)
            self._release(res)
            return
        for tid in again:
            h = self._held[tid]
            if h.query and h.initiator == src:
                # Awarded here again since the stall: the initiator's answer already.
                h.query = 0
                h.renewed = now
                self._stats["stale_confirmed"] += 1
        # The reservation is soft: an award after it expired (or after a reject, when the
        # initiator falls back to this bid) is taken only if there is room now.
        room = res.reserved
        if room < len(fresh):
            room += self._room(res.need, res.est, now)
        take, back = fresh[:room], fresh[room:]
        self._release(res)
        for tid, payload in take:
            held = _Held(tid, res, payload, now)
            self._held[tid] = held
            self._queue.append(held)
            self._account(held.need, held.est, 1)
        confirmed = tuple(again) + tuple(tid for tid, _ in take)
        if confirmed:
            self._send_lazy(src, Confirm(cfp=msg.cfp, tasks=confirmed), now)
            self._stats["confirms_sent"] += 1
        if back:
            self._send(src, Decline(cfp=msg.cfp, tasks=tuple(t for t, _ in back), reason="busy"))
            self._stats["declines_sent"] += 1
        if take and src != self._node and self._progress_at == INF:
            self._progress_at = now + self._cfg.progress_interval_s
        self._start_ready(now)

    def _on_reject(self, src: NodeId, msg: Reject) -> None:
        res = self._reservations.get((src, msg.cfp))
        if res is None:
            raise RemoteProtocolError(f"reject for {msg.cfp} never called", reason="unsolicited")
        self._release(res)
        self._stats["rejects_received"] += 1

    def _on_cancel(self, src: NodeId, msg: Cancel) -> None:
        helds = [self._held[tid] for tid in msg.tasks if tid in self._held]
        for h in helds:
            if h.initiator != src:
                raise RemoteProtocolError(
                    f"{src} did not award {h.task_id}", reason="not-initiator"
                )
        for h in helds:
            self._drop_held(h)
        self._stats["cancels_received"] += 1

    def _unhold(self, held: _Held, now: float) -> None:
        """``held`` no longer counts under its reservation, which stays known (for further
        awards under it) for a while after its last task."""
        res = held.res
        if res is not None:
            held.res = None
            res.holding -= 1
            res.forget_at = max(res.forget_at, now + 4 * self._cfg.reservation_s)

    def _drop_held(self, held: _Held) -> None:
        if held.task_id in self._running:
            if not held.cancelled:
                held.cancelled = True
                self._events.append(CancelExecution(task_id=held.task_id))
        else:
            if not held.cancelled:
                self._account(held.need, held.est, -1)
            held.cancelled = True
            self._held.pop(held.task_id, None)
            self._unhold(held, self._now)

    def _release(self, res: _Reservation) -> None:
        if res.reserved:
            self._account(res.need, res.est, -res.reserved)
        res.reserved = 0
        self._active.pop((res.initiator, res.cfp), None)

    def _cannot_run(self, held: _Held) -> bool:
        return bool(check(held.req, self._caps))

    def _give_back(self, helds: list[_Held], reason: str) -> None:
        by: dict[tuple[NodeId, int], list[TaskId]] = {}
        for h in helds:
            if not h.cancelled:
                self._account(h.need, h.est, -1)
            h.cancelled = True
            self._held.pop(h.task_id, None)
            self._unhold(h, self._now)
            by.setdefault((h.initiator, h.cfp), []).append(h.task_id)
        for (initiator, cfp), ids in by.items():
            self._send(initiator, Decline(cfp=cfp, tasks=tuple(ids), reason=reason))
            self._stats["declines_sent"] += 1

    def _start_ready(self, now: float) -> None:
        """Start queued tasks in order while they fit. A task that does not fit blocks the
        resources it is short of: later tasks may pass it only if they need none of them,
        so a two-slot task is not starved by a stream of one-slot tasks."""
        queue = self._queue
        have = self._caps.resources
        used = self._used
        blocked: set[str] = set()
        i = 0
        while i < len(queue) and i < 64:
            held = queue[i]
            if held.cancelled:
                del queue[i]
                continue
            if held.query:  # waits for its initiator's word after a stall
                i += 1
                continue
            short = [
                k
                for k, v in held.need.items()
                if v > 0 and (k in blocked or used.get(k, 0.0) + v > have.get(k, 0.0) + _EPS)
            ]
            if short:
                blocked.update(short)
                if "cpu" in blocked:
                    break  # every task needs a slot: nothing further can start
                i += 1
                continue
            del queue[i]
            self._account(held.need, held.est, -1)
            held.started = now
            self._running[held.task_id] = held
            for k, v in held.need.items():
                used[k] = used.get(k, 0.0) + v
            payload, held.payload = held.payload, None
            self._events.append(
                Execute(task_id=held.task_id, initiator=held.initiator, payload=payload)
            )
            self._stats["executions"] += 1

    def _send_progress(self, now: float) -> None:
        self._progress_at = INF
        interval = self._cfg.progress_interval_s
        # Renew only leases that could lapse before the round after next: a task that
        # finishes within a lease never costs a progress message.
        due = now - (self._cfg.lease_s - 2 * interval)
        by: dict[NodeId, list[TaskId]] = {}
        remote = False
        for h in self._held.values():
            if not h.cancelled and h.initiator != self._node:
                remote = True
                if h.renewed <= due:
                    h.renewed = now
                    by.setdefault(h.initiator, []).append(h.task_id)
        for initiator, ids in by.items():
            self._send(initiator, Progress(tasks=tuple(ids)))
        if remote:
            self._progress_at = now + interval

    # -----------------------------------------------------------------------------------
    # Stalls: ask before running what may have been placed again elsewhere
    # -----------------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        """Notice that this node stalled: ``now`` came much later than the timer it asked
        for, and not merely while catching up with calls queued behind a stall already
        seen (as membership's ``_check_stall`` does)."""
        due = self.next_timer()
        prev = self._now
        self._now = max(prev, now)
        if due is None or now <= max(due, prev) + self._cfg.stall_s:
            return
        self._stats["stalls"] += 1
        self._stalled_at = now
        by: dict[NodeId, list[_Held]] = {}
        for h in self._held.values():
            if not h.cancelled and h.task_id not in self._running and h.initiator != self._node:
                by.setdefault(h.initiator, []).append(h)
        deadline = now + self._cfg.stall_reply_s
        for initiator, helds in by.items():
            for i in range(0, len(helds), MAX_CFP_TASKS):
                part = helds[i : i + MAX_CFP_TASKS]
                q = self._next_query
                self._next_query += 1
                for h in part:
                    h.query = q
                ids = tuple(h.task_id for h in part)
                self._queries[q] = _Query(initiator, ids, deadline)
                self._send(initiator, LeaseQuery(query=q, tasks=ids))
                self._stats["stale_checked"] += len(ids)

    def _on_lease_query(self, src: NodeId, msg: LeaseQuery, now: float) -> None:
        """Initiator: answer from its own state which of ``msg.tasks`` are still ``src``'s."""
        if not msg.tasks or len(msg.tasks) > MAX_CFP_TASKS or len(set(msg.tasks)) != len(msg.tasks):
            raise RemoteProtocolError("empty, oversized or repeating batch", reason="bad-batch")
        keep = [
            t for t in self._owned(src, msg.tasks) if t.state in (TaskState.AWARDED, TaskState.HELD)
        ]
        lease = now + self._cfg.lease_s
        for t in keep:
            if t.state is TaskState.AWARDED:
                t.move("progress")  # it holds the task: as good as its confirm
            if t.lease_until != INF:
                t.lease_until = lease
        self._stats["lease_queries_received"] += 1
        self._send(src, LeaseReply(query=msg.query, keep=tuple(t.spec.task_id for t in keep)))

    def _on_lease_reply(self, src: NodeId, msg: LeaseReply, now: float) -> None:
        """Participant: start the tasks the initiator still binds here, drop the rest."""
        query = self._queries.get(msg.query)
        if query is None:
            if self._query_base < msg.query < self._next_query:
                self._stats["late_answers"] += 1  # after the deadline: already given back
                return
            raise RemoteProtocolError(f"no lease query {msg.query}", reason="unsolicited")
        if query.initiator != src:
            raise RemoteProtocolError(
                f"{src} was not asked in query {msg.query}", reason="not-initiator"
            )
        keep = set(msg.keep)
        if len(keep) != len(msg.keep):
            raise RemoteProtocolError("a task appears twice in one reply", reason="malformed")
        if not keep.issubset(query.tasks):
            raise RemoteProtocolError("reply names a task not asked about", reason="unknown-task")
        del self._queries[msg.query]
        for tid in query.tasks:
            h = self._held.get(tid)
            if h is None or h.query != msg.query:
                continue  # cancelled, given back, or asked about again since
            h.query = 0
            if tid in keep:
                h.renewed = now
                self._stats["stale_confirmed"] += 1
            else:
                self._drop_held(h)
                self._stats["stale_dropped"] += 1
        self._start_ready(now)

    def _expire_queries(self, now: float) -> None:
        """Give back what no reply came for: the initiator places it again."""
        while self._queries:
            q, query = next(iter(self._queries.items()))
            if query.deadline > now:
                return
            del self._queries[q]
            waiting = [
                h for tid in query.tasks if (h := self._held.get(tid)) is not None and h.query == q
            ]
            if waiting:
                self._stats["stale_unanswered"] += len(waiting)
                self._give_back(waiting, "stale")

    def _expire_reservations(self, now: float) -> None:
        while self._res_expiry and self._res_expiry[0].expires <= now:
            self._release(self._res_expiry.popleft())
        forget = self._res_forget
        for _ in range(len(forget)):
            if forget[0].forget_at > now:
                break
            r = forget.popleft()
            if r.holding > 0 or r.forget_at > now:
                # Still working for its initiator, or awarded since: look again later.
                r.forget_at = max(r.forget_at, now + 4 * self._cfg.reservation_s)
                forget.append(r)
            else:
                self._reservations.pop((r.initiator, r.cfp), None)


def _error_info(value: Any) -> tuple[str, dict[str, Any]]:
    """A task error as reported by the node that ran it: a message and its details.

    Only flat fields are kept (strings, numbers, booleans, None under string keys): an
    error is read by people and by ``mesh.errors``, and a peer may send any nesting."""
    if isinstance(value, dict):
        details = {
            k: v
            for k, v in value.items()
            if isinstance(k, str) and (v is None or isinstance(v, str | int | float | bool))
        }
        message = details.get("message")
        return (message if isinstance(message, str) else "task failed"), details
    if isinstance(value, str):
        return value, {}
    return "task failed", {}
