"""The initiator role of the contract net: the tasks submitted to this node, from the
call for proposals that recruits workers for them to the one result each delivers.

A task's states and their legal transitions are the data in ``TRANSITIONS``; ``_Task.move``
raises ``LocalProtocolError`` on any other, which is a bug here. Peer input that cannot be
accepted raises ``RemoteProtocolError`` and leaves the state unchanged.

Binding is late. Tasks with the same requirements queue in one ``_Group``; a call for
proposals recruits bidders into the group's pool of ``_Worker``s, and the pool works
through the queue: a worker is given a task (an award, ``Accept``) when one of its lanes
is within ``bind_ahead_s`` of freeing (its bid says when, other initiators' work
included), or at once for a task whose inputs it holds unless it has just declined one as
busy, and refilled as its results come back. Nothing else waits on a node that another
could start sooner, so several initiators sharing nodes do not queue behind each other.
Each award is a lease that the winner's progress renews; a lapsed or declined one, or a
winner gone, puts the task back in the queue. A worker that declines because another
initiator's (or another group's) task took the lane stays in the pool and is tried again
after about a run there.

This module may not import asyncio, aiohttp, zeroconf, socket or time, and may not read a
clock: ``now`` is always an argument, and randomness comes from the ``rng`` passed in.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict, deque
from collections.abc import Iterable
from enum import StrEnum
from typing import Any, Final

from mesh.errors import LocalProtocolError, NoCapablePeerError, RemoteProtocolError
from mesh.protocol.contract_shared import (
    EPS,
    FAILED_LOST,
    FAILED_NO_BIDS,
    FAILED_NO_PEER,
    FAILED_TASK,
    INF,
    MAX_CFP_TASKS,
    MAX_ESTIMATE_S,
    MAX_LANES,
    MIN_ESTIMATE_S,
    AuctionRecord,
    Completed,
    Context,
    Failed,
    RoundRecord,
    TaskSpec,
    plausible,
)
from mesh.protocol.core import MemberState, MemberView
from mesh.protocol.messages import (
    Accept,
    CallForProposals,
    Cancel,
    Capabilities,
    Confirm,
    Decline,
    Failure,
    LeaseQuery,
    LeaseReply,
    NodeId,
    Progress,
    Propose,
    Refuse,
    Reject,
    Requirements,
    Result,
    TaskId,
)
from mesh.protocol.resources import (
    CPU_POOL_LABEL,
    check,
    invalid,
    merge_reasons,
    shared_cores,
)

_CANDIDATE_STATES: Final = frozenset({MemberState.ALIVE, MemberState.SUSPECT})
"""Members that may be asked to bid: a suspect is not dead until membership says so."""

LOCALITY_SCAN: Final = 16
"""Queued tasks a worker with room looks through for the one whose inputs it holds."""
LOCALITY_MARGIN: Final = 0.25
"""A worker takes a task whose inputs another pool worker holds only if it would finish it
sooner by this share of a run there (beyond the transfer): estimates that differ by noise
do not move data, a holder busy for longer than that does not hold its tasks back."""
POOL: Final = 16
"""Candidates drawn uniformly per wanted candidate before the load-weighted choice."""

# ---------------------------------------------------------------------------------------
# Task states, and the initiator's model of queues, workers and auctions
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

    @property
    def waiting(self) -> bool:
        """In its group's queue for a pool worker (entries that ended or moved on are
        dropped from the queue lazily)."""
        return self.state is TaskState.QUEUED and not self.ended


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

    def rate(self) -> float:
        """Tasks per second the pool completes with every lane busy, by its models."""
        return sum(w.lanes / max(w.run_s, MIN_ESTIMATE_S) for w in self.pool.values())


class _Worker:
    """The initiator's model of one pool worker, for one group: how many tasks it runs at
    once, how long one takes there (its bid, then what its results measured), when each
    of its lanes frees, and the tasks it holds now (at most ``window``)."""

    __slots__ = (
        "bandwidth",
        "bind_ahead",
        "busy_until",
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
        self.busy_until = -INF  # declined as busy: its own tasks wait for a lane till then
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
        "group",
        "opened",
        "refusals",
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


def _req_key(req: Requirements, est: float | None) -> _Key:
    return (
        req.task,
        tuple(sorted(req.resources.items())),
        tuple(sorted(req.libraries.items())),
        tuple(sorted(req.labels.items())),
        est,
    )


class Initiator:
    """The initiator role of one node (``mesh.protocol.contract.Contract`` drives it)."""

    def __init__(self, ctx: Context, rng: random.Random, cfp_base: int) -> None:
        self._ctx = ctx
        self._node = ctx.node
        self._cfg = ctx.config
        self._peers = ctx.peers
        self._rng = rng
        self._tasks: dict[TaskId, _Task] = {}
        self._groups: dict[_Key, _Group] = {}
        self._auctions: dict[int, _Auction] = {}
        self._deadlines: list[tuple[float, int]] = []
        # Calls are numbered from a random base: a restarted node never reuses the numbers
        # of its previous life, and a late answer is told from one to a call never made.
        self._cfp_base = cfp_base
        self._next_cfp = cfp_base
        self._flush_at = INF
        self._sweep_at = INF
        self._done: OrderedDict[TaskId, frozenset[NodeId]] = OrderedDict()
        self._records: OrderedDict[TaskId, _Task] = OrderedDict()
        self._checked: dict[_Key, dict[NodeId, tuple[Capabilities, dict[str, object]]]] = {}
        self._match_cache: dict[_Key, tuple[list[MemberView], list[MemberView], bool]] = {}

    # -----------------------------------------------------------------------------------
    # What the core asks of it
    # -----------------------------------------------------------------------------------

    def submit(self, spec: TaskSpec, payload: Any, now: float) -> None:
        """Auction ``spec``; ``payload`` goes, opaque, to the winner only, with the award."""
        if spec.task_id in self._tasks or spec.task_id in self._done:
            raise LocalProtocolError(f"task id {spec.task_id} was already submitted")
        why = invalid(spec.requirements)
        if why is not None:
            raise LocalProtocolError(f"task {spec.task_id}: {why}")
        if spec.est_runtime_s is not None and not plausible(spec.est_runtime_s):
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
        self._ctx.stats["submitted"] += 1
        if len(group.queue) >= self._cfg.max_batch or not self._auctions:
            # Nothing in flight: no batch can form behind an auction, so waiting would only
            # add latency. While auctions are open, tasks gather for the next call (group
            # commit): a burst still shares calls, a lone task goes at once.
            self._flush_at = now
        else:
            self._flush_at = min(self._flush_at, now + self._cfg.batch_delay_s)

    def cancel(self, task_id: TaskId) -> None:
        """Stop caring about ``task_id``: no event will be delivered for it."""
        task = self._tasks.get(task_id)
        if task is None:
            return
        if task.state in (TaskState.AWARDED, TaskState.HELD) and task.winner is not None:
            self._ctx.send(task.winner, Cancel(tasks=(task_id,)))
        self._end(task, "cancelled")
        self._ctx.stats["cancelled"] += 1

    def peer_down(self, node: NodeId, now: float) -> None:
        """Membership saw ``node`` (not this one) die or leave: place its tasks again."""
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

    def next_timer(self) -> float:
        """When ``close_auctions``, ``sweep_leases`` or ``flush`` next has work; INF: never."""
        t = min(self._flush_at, self._sweep_at)
        if self._deadlines:
            t = min(t, self._deadlines[0][0])
        return t

    def close_auctions(self, now: float) -> None:
        """Decide the auctions whose reply deadline has come."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, cfp = heapq.heappop(self._deadlines)
            auction = self._auctions.get(cfp)
            if auction is not None:
                self._decide(auction, now)

    # -----------------------------------------------------------------------------------
    # Candidates, calls for proposals, decisions
    # -----------------------------------------------------------------------------------

    def _match(self, group: _Group) -> list[MemberView]:
        """Live members whose gossiped capabilities meet the group's requirements.

        Cached per requirements while the view hands back the same member list (a view
        builds a new list whenever a member changes), so a burst of auctions costs one
        pass over the mesh."""
        members = self._peers.members()
        key = _req_key(group.requirements, None)
        hit = self._match_cache.get(key)
        if hit is not None and hit[0] is members and hit[2] == self._ctx.accepting:
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
            if m.node == self._node and not self._ctx.accepting:
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
        self._match_cache[key] = (members, capable, self._ctx.accepting)
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
            keyed.append((math.log(rng() or EPS) * score, m.node))
        return [n for _, n in heapq.nlargest(d, keyed)]

    def flush(self, now: float) -> None:
        """Feed every group's pool, and recruit workers where the queue needs more (when
        the batch delay or a back-off that ``submit`` and the rest set has come)."""
        if self._flush_at > now:
            return
        self._flush_at = INF
        for key, group in list(self._groups.items()):
            self._refill(group, now)
            queue = group.queue
            while queue and not queue[0].waiting:
                queue.popleft()
            if not queue:
                if not group.pool and not group.recruiting:
                    del self._groups[key]
                continue
            if len(self._auctions) < self._cfg.max_auctions and self._short_handed(group, now):
                self._recruit(group, now)
            elif now < group.quiet_until:
                self._flush_at = min(self._flush_at, group.quiet_until)

    def _short_handed(self, group: _Group, now: float) -> bool:
        """Whether more workers could help: there is no pool, or the last queued task
        would wait longer than ``recruit_s`` for a lane of the pool. A call whose bidders
        all stayed idle (the pool finishes sooner than any of them would) keeps the group
        from calling again for ``recruit_s`` plus one task on its fastest worker."""
        if group.recruiting >= self._cfg.recruit_parallel:
            return False
        if now < group.quiet_until:
            return False
        pool = group.pool
        if not pool:
            return not group.recruiting
        free = [f for w in pool.values() for f in w.lane_free]
        backlog = len(group.queue) - sum(1 for f in free if f <= now)
        if backlog <= 0:
            return False
        rate = group.rate()
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
        batch = [t for t in batch if t.waiting]
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
                self._ctx.stats["no_capable"] += len(tasks)
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
        self._ctx.stats["auctions"] += 1
        for n in chosen:
            self._ctx.send(n, msg)

    def _auction_for(self, src: NodeId, cfp: int) -> _Auction | None:
        """The open auction ``cfp`` that asked ``src``; None for a late answer."""
        auction = self._auctions.get(cfp)
        if auction is None:
            if self._cfp_base <= cfp < self._next_cfp:
                self._ctx.stats["late_answers"] += 1
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

    def on_propose(self, src: NodeId, msg: Propose, now: float) -> None:
        auction = self._auction_for(src, msg.cfp)
        if auction is None:
            return
        if not msg.costs or len(msg.costs) > MAX_CFP_TASKS:
            raise RemoteProtocolError("a bid must offer at least one slot", reason="bad-cost")
        if not all(plausible(c) for c in msg.costs) or not plausible(msg.run_s):
            raise RemoteProtocolError(
                f"bid costs must be finite, >= 0 and <= {MAX_ESTIMATE_S:g} s", reason="bad-cost"
            )
        if msg.lanes < 1:
            raise RemoteProtocolError("a bid runs at least one task at once", reason="bad-cost")
        if not all(math.isfinite(x) and x > 0 for x in msg.bandwidth.values()):
            raise RemoteProtocolError("bandwidth must be finite and > 0", reason="bad-cost")
        auction.bids[src] = msg
        self._ctx.stats["bids_received"] += 1
        if self._all_answered(auction):
            self._decide(auction, now)
        elif self._decisive(auction, msg, now):
            self._ctx.stats["early_awards"] += 1
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

    def on_refuse(self, src: NodeId, msg: Refuse, now: float) -> None:
        auction = self._auction_for(src, msg.cfp)
        if auction is None:
            return
        auction.refusals[src] = dict(msg.reason)
        self._ctx.stats["refusals_received"] += 1
        if self._all_answered(auction):
            self._decide(auction, now)

    def _decide(self, auction: _Auction, now: float) -> None:
        """The bidders join the group's pool; the tasks go back to its queue, which the
        pool works through (``_refill``); bidders given nothing are released."""
        del self._auctions[auction.cfp]
        group = auction.group
        group.recruiting -= 1
        self._flush_at = min(self._flush_at, now)
        tasks = [t for t in auction.tasks if not t.ended and t.state is TaskState.AUCTION]
        bids = auction.bids
        record = RoundRecord(
            cfp=auction.cfp,
            at=now,
            asked=tuple(auction.asked),
            bids={n: p.costs[0] for n, p in bids.items()},
            slots={n: len(p.costs) for n, p in bids.items()},
            refusals=dict(auction.refusals),
            silent=tuple(n for n in auction.asked if n not in bids and n not in auction.refusals),
        )
        for t in tasks:
            t.rounds.append(record)
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
                self._ctx.send_lazy(n, Reject(cfp=auction.cfp), now)
                if w is not None and not w.inflight:
                    del pool[n]
            else:
                useful = True
        if useful:
            group.backoff = 0.0
        else:
            self._back_off(group, now)
        if now < auction.deadline:
            # Decided before every answer came: those still to come are bids already made,
            # whose slots are held until the reject (the stream keeps it after the call).
            for n in record.silent:
                self._ctx.send_lazy(n, Reject(cfp=auction.cfp), now)

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
        # A worker that holds tasks beyond its lanes (short ones) is refilled once half of
        # those are done, not after every result: one award then carries many tasks, and
        # what it still holds (half of ``bind_ahead_s``) covers the award's round trip.
        room = [
            w
            for w in pool.values()
            if w.window - len(w.inflight) >= max(1, (w.window - w.lanes) // 2)
        ]
        if not room:
            return
        room.sort(key=lambda w: w.start_at(now) + w.run_s)
        rate = group.rate()
        lanes = sum(w.lanes for w in pool.values())
        for w in room:
            won: list[_Task] = []
            while len(w.inflight) < w.window and queue:
                i = self._pick(w, group, now)
                if i is None:
                    break
                t = queue[i]
                # A task whose inputs ``w`` holds is its own: it waits there, and ``_pick``
                # gives it to another worker only if that one finishes it clearly sooner
                # (else neither would ever take it). Any other task is bound only when a
                # lane is about to free (the bid says when: other initiators' work too),
                # and only while the rest of the pool would not finish it first. After a
                # busy decline (work of another initiator or group took the lane) its own
                # tasks wait for the lane too, or the two would send them back and forth
                # as fast as they can until the lane frees.
                if t.home != w.node or w.busy_until > now:
                    due = w.start_at(now) - w.bind_ahead
                    if due > now:
                        self._flush_at = min(self._flush_at, due)
                        break
                if t.home != w.node and not self._worth(w, group, now, rate, lanes):
                    break
                del queue[i]
                t.move("award")
                t.worker = w
                t.awarded_at = now
                t.est_s = w.run_s
                t.expected_end = w.take(t, now)
                # From the parts, so that rounding never makes the whole less than a part.
                t.wait_s = max(0.0, t.expected_end - w.run_s - now)
                t.transfer_s = self._transfer(t, w.bandwidth, w.node)
                t.cost = t.wait_s + w.run_s + t.transfer_s
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
                capacity += max(0, int(ahead - EPS))
            if capacity >= queued:
                self._ctx.stats["held_back"] += 1
                return False
        return True

    def _pick(self, w: _Worker, group: _Group, now: float) -> int | None:
        """Where in the queue the task ``w`` should take is: among the first few, one whose
        inputs it holds, else one that no pool worker holds, else one it finishes (transfer
        included) clearly sooner (``LOCALITY_MARGIN``) than the worker holding its inputs,
        unless the two share cores that are all busy (``_no_spare_core``)."""
        queue = group.queue
        pool = group.pool
        done_by = w.start_at(now) + w.run_s
        fallback: int | None = None
        i = 0
        while i < len(queue) and i < LOCALITY_SCAN:
            t = queue[i]
            if not t.waiting:
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
                    < holder.start_at(now) + (1.0 - LOCALITY_MARGIN) * holder.run_s
                    and not self._no_spare_core(w.node, home)
                ):
                    fallback = i
            i += 1
        return fallback

    def _no_spare_core(self, node: NodeId, holder: NodeId) -> bool:
        """Whether ``node`` and ``holder`` draw on one pool of cores (their labels say so)
        that is busy on every core: a task moved from the holder's queue to ``node`` would
        then only share the cores it was waiting for, and finish no sooner as a whole.

        A pool member's busy lanes are the tasks this initiator has bound there (at most
        its slots) or the tasks its gossiped load says run there, whichever is more."""
        a, b = self._peers.member(node), self._peers.member(holder)
        if a is None or b is None:
            return False
        cores = shared_cores(a.capabilities, b.capabilities)
        if cores is None:
            return False
        pool = a.capabilities.labels[CPU_POOL_LABEL]
        busy = 0.0
        for m in self._peers.members():
            if m.state not in _CANDIDATE_STATES:
                continue
            if m.capabilities.labels.get(CPU_POOL_LABEL) != pool:
                continue
            ours = 0
            for group in self._groups.values():
                w = group.pool.get(m.node)
                if w is not None:
                    ours += min(w.lanes, len(w.inflight))
            slots = m.capabilities.resources.get("cpu", 0.0)
            busy += max(min(ours, slots), m.load.running)
            if busy >= cores:
                return True
        return False

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
        self._ctx.stats["awards"] += len(tasks)
        if lease != INF and self._sweep_at == INF:
            self._sweep_at = now + self._cfg.lease_s / 4
        self._ctx.send(
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
        fastest = min((w.run_s for w in group.pool.values()), default=0.0)
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
        self._ctx.stats["widened"] += len(tasks)
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
            self._ctx.stats["no_capable"] += len(tasks)
            for t in tasks:
                self._fail(
                    t,
                    FAILED_NO_PEER,
                    str(NoCapablePeerError(name, missing)),
                    {"task": name, "missing": missing, "asked": sorted(asked)},
                    None,
                )
        else:
            self._ctx.stats["no_bids"] += len(tasks)
            waited = now - tasks[0].submitted_at
            message = f"no bid for {name} from {len(asked)} candidates in {waited:.1f}s"
            for t in tasks:
                self._fail(t, FAILED_NO_BIDS, message, {"task": name, "asked": sorted(asked)}, None)

    # -----------------------------------------------------------------------------------
    # Leases: the winners' answers, placing again, outcomes
    # -----------------------------------------------------------------------------------

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
        else:
            self._flush_at = min(self._flush_at, now)  # room freed: refill

    def _again(
        self,
        task: _Task,
        reason: str,
        now: float,
        *,
        cancel: bool,
        count: bool,
        dismiss: bool = True,
    ) -> None:
        """Announce ``task`` again (its winner declined, lapsed or died); with ``dismiss``
        its worker leaves the pool."""
        winner = task.winner
        if cancel and winner is not None:
            self._ctx.send(winner, Cancel(tasks=(task.spec.task_id,)))
        if dismiss:
            self._unbind(task, now, dismiss=True)
        self._ctx.stats["reannounces"] += 1
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
        self._unbind(task, now, dismiss=False)  # after the requeue: the pool has work left
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

    def on_confirm(self, src: NodeId, msg: Confirm, now: float) -> None:
        for t in self._owned(src, msg.tasks):
            if t.state is TaskState.AWARDED:
                t.move("confirm")
            if t.lease_until != INF:
                t.lease_until = now + self._cfg.lease_s
        self._ctx.stats["confirms_received"] += 1

    def on_decline(self, src: NodeId, msg: Decline, now: float) -> None:
        if len(set(msg.tasks)) != len(msg.tasks):
            raise RemoteProtocolError("a task appears twice in one decline", reason="bad-batch")
        tasks = [
            t for t in self._owned(src, msg.tasks) if t.state in (TaskState.AWARDED, TaskState.HELD)
        ]
        self._ctx.stats["declines_received"] += len(tasks)
        # Busy: another initiator's task took the lane this one was bound for. The worker
        # stays in the pool, its lanes taken for about a run; dismissing it would leave
        # the initiators that lose such races with ever fewer workers and the longest
        # queues at the end of a burst, finished on whatever slow nodes they recruit.
        busy = msg.reason == "busy"
        for t in tasks:
            w = t.worker
            reason = f"{src} gave it back ({msg.reason})"
            self._again(t, reason, now, cancel=False, count=False, dismiss=not busy)
            if busy and w is not None:
                w.lane_free = [max(f, now + w.run_s) for f in w.lane_free]
                w.busy_until = now + w.run_s - w.bind_ahead

    def on_progress(self, src: NodeId, msg: Progress, now: float) -> None:
        lease = now + self._cfg.lease_s
        for tid in msg.tasks:
            t = self._tasks.get(tid)
            if t is not None and t.winner == src:
                if t.state is TaskState.AWARDED:
                    t.move("progress")
                t.lease_until = lease
        self._ctx.stats["progress_received"] += 1

    def on_outcome(self, src: NodeId, msg: Result | Failure, now: float) -> None:
        values = msg.values if isinstance(msg, Result) else msg.errors
        if len(values) != len(msg.tasks):
            raise RemoteProtocolError("tasks and values differ in length", reason="malformed")
        runs = msg.run_s if isinstance(msg, Result) else (None,) * len(msg.tasks)
        if len(runs) != len(msg.tasks):
            raise RemoteProtocolError("tasks and run times differ in length", reason="malformed")
        if not all(r is None or plausible(r) for r in runs):
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
        self._ctx.stats["duplicates"] += duplicates
        ok = isinstance(msg, Result)
        for task, value, run in live:
            if task.winner is not None and task.winner != src:
                # Executed twice (a lapse or a lost confirm); the other run is now waste.
                self._ctx.send(task.winner, Cancel(tasks=(task.spec.task_id,)))
            elif run is not None and task.worker is not None:
                task.run_s = run
                task.worker.learn(run, self._cfg.runtime_alpha)

            task.winner = src
            if ok:
                self._ctx.events.append(Completed(task_id=task.spec.task_id, node=src, value=value))
                self._end(task, "completed")
                self._ctx.stats["completed"] += 1
            else:
                message, details = _error_info(value)
                self._fail(task, FAILED_TASK, message, details, src)

    def _fail(
        self, task: _Task, kind: str, message: str, details: dict[str, Any], node: NodeId | None
    ) -> None:
        self._ctx.events.append(
            Failed(
                task_id=task.spec.task_id, node=node, kind=kind, message=message, details=details
            )
        )
        task.why = message if kind != FAILED_TASK else task.why
        self._end(task, "failed")
        self._ctx.stats["failed"] += 1

    def _end(self, task: _Task, how: str) -> None:
        tid = task.spec.task_id
        self._unbind(task, self._ctx.now, dismiss=False)
        task.ended = how
        task.lease_until = INF
        del self._tasks[tid]
        self._done[tid] = frozenset(task.winners)
        if len(self._done) > self._cfg.done_limit:
            self._done.popitem(last=False)
        self._records[tid] = task
        if len(self._records) > self._cfg.record_limit:
            self._records.popitem(last=False)

    def sweep_leases(self, now: float) -> None:
        """Place again the tasks whose winner is gone or whose lease lapsed (when due)."""
        if self._sweep_at > now:
            return
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
                self._ctx.stats["leases_lapsed"] += 1
                self._again(task, f"lease at {winner} lapsed", now, cancel=True, count=True)
            else:
                pending = True
        if pending:
            self._sweep_at = now + self._cfg.lease_s / 4

    # -----------------------------------------------------------------------------------
    # A participant back from a stall asks what is still its own
    # -----------------------------------------------------------------------------------

    def on_lease_query(self, src: NodeId, msg: LeaseQuery, now: float) -> None:
        """After a stall, ``src`` asks which of ``msg.tasks`` are still its own: answer
        from this node's state, renewing the lease of those it names."""
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
        self._ctx.stats["lease_queries_received"] += 1
        self._ctx.send(src, LeaseReply(query=msg.query, keep=tuple(t.spec.task_id for t in keep)))


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
