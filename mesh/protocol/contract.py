"""Contract-net task allocation: a sans-I/O core playing initiator and participant.

The node a task is submitted to is its *initiator*. It calls for proposals from d capable
candidates (sampled with a bias to low gossiped load and to the holders of the task's
inputs); every node is also a *participant*, which bids its estimated seconds to
completion for tasks it can run (queue wait plus runtime, with its lanes, its runtime
estimate and its measured transfer rates), refuses with a structured reason those it
cannot, and runs what it is awarded without ever exceeding its resources.

Binding is late. The bidders of a call join a *pool* that works through the initiator's
queue of tasks of that kind; a worker is awarded only what it would start within
``bind_ahead_s`` (one task per lane for long tasks, many for short ones), and refilled as
its results come back. Near the end of a queue a worker takes a task only if the rest of
the pool would not finish it sooner. While the queue would wait for a lane, further calls
recruit nodes outside the pool; a participant takes a refill only while it could start
it soon, and declines the rest as busy. Why this mechanism, and not binding a burst at
award time, or winners handing back queued work, or idle nodes asking busy initiators
for theirs: a result already travels to the initiator, so a refill costs no message of
its own (the award rides on what the result triggers), placement follows the speed each
node really shows rather than any estimate, the initiator stays the one place that
decides (exactly-once delivery stays simple: it binds each task to one worker at a time
under a lease), and messages per task stay bounded by the calls of the pool, whatever
the size of the mesh. Handing back queued work would need that work bound first, and
pulling from idle nodes would have every idle node poll initiators it may not know.

Estimates generalise: a participant's runtime for a task it never ran is the submitter's
``est_runtime_s`` times its speed factor (seeded by the driver from the node's share of
its cores, corrected by every measured run), and its own history for the name counts
more while it is fresh (``history_half_life_s``). The initiator's model of a worker
starts from its bid and follows the run times its results report.

Throughput comes from batching: tasks with the same requirements queued in one initiator
share one call for proposals, a bid offers several slots, an award names several tasks, and
results and failures to one initiator leave as one message per ``take_outgoing``.

The roles live apart: ``mesh/protocol/initiator.py`` places the tasks submitted here,
``mesh/protocol/participant.py`` bids for and runs those awarded here, and
``mesh/protocol/contract_shared.py`` holds what both see (the values a driver gets, bounds
on peer numbers, and the ``Context`` they send through). ``Contract`` is the one core a
driver sees: it routes each message to its role, runs both roles' timers and notices stalls.
Neither role touches the other's state; they talk in messages, as they would between two
nodes.

Each role's states and their legal transitions are data: ``TRANSITIONS`` for a task in
its initiator, ``HELD_TRANSITIONS`` for a task awarded to a participant. An illegal
transition is a bug here and raises ``LocalProtocolError``. Peer input that cannot be
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

import random
from typing import Any

from mesh.config import ContractConfig
from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.protocol.contract_shared import (
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
    CancelExecution,
    Completed,
    Context,
    ContractEvent,
    Execute,
    Failed,
    RoundRecord,
    TaskSpec,
)
from mesh.protocol.core import PeerView
from mesh.protocol.initiator import LOCALITY_SCAN, POOL, TRANSITIONS, Initiator, TaskState
from mesh.protocol.messages import (
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
    Result,
    TaskId,
    Wire,
)
from mesh.protocol.participant import HELD_TRANSITIONS, HeldState, Participant

__all__ = [
    "FAILED_LOST",
    "FAILED_NO_BIDS",
    "FAILED_NO_PEER",
    "FAILED_TASK",
    "HELD_TRANSITIONS",
    "INF",
    "LOCALITY_SCAN",
    "MAX_CFP_TASKS",
    "MAX_ESTIMATE_S",
    "MAX_LANES",
    "MIN_ESTIMATE_S",
    "POOL",
    "TRANSITIONS",
    "AuctionRecord",
    "CancelExecution",
    "Completed",
    "Contract",
    "ContractEvent",
    "Execute",
    "Failed",
    "HeldState",
    "RoundRecord",
    "TaskSpec",
    "TaskState",
]


class Contract:
    """The contract-net core of one node (``mesh.protocol.core.Core``): an ``Initiator`` and a
    ``Participant`` sharing one ``Context``. It routes each message to its role, runs
    their timers, notices stalls, and delivers what a node sends itself."""

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
        self._ctx = Context(node, config, peers)
        # Random: a restarted node never reuses the call or query numbers of its previous
        # life. One draw serves both roles, so that the rng is where it always was.
        base = rng.randrange(1 << 40)
        self._initiator = Initiator(self._ctx, rng, cfp_base=base)
        self._participant = Participant(self._ctx, capabilities, speed, query_base=base)

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
            self._ctx.stats[f"rejected.{exc.reason}"] += 1
            raise
        self._drain(now)

    def handle_timer(self, now: float) -> None:
        self._tick(now)
        initiator, participant = self._initiator, self._participant
        # In this order: messages leave in the order they are made, and a driver (the
        # simulator) may draw their fates in that order.
        initiator.close_auctions(now)
        participant.expire_reservations(now)
        initiator.sweep_leases(now)
        participant.send_progress(now)
        initiator.flush(now)
        self._ctx.flush_lazy(now)
        participant.expire_queries(now)
        participant.watched(now)
        self._drain(now)

    def next_timer(self) -> float | None:
        t = min(self._initiator.next_timer(), self._participant.next_timer(), self._ctx.lazy_at)
        return None if t == INF else t

    def take_outgoing(self) -> list[tuple[Address, Wire]]:
        self._participant.send_outcomes()
        return self._ctx.take_out()

    def take_events(self) -> list[ContractEvent]:
        """What the driver must do (participant) or deliver (initiator); clears them."""
        return self._ctx.take_events()

    # -----------------------------------------------------------------------------------
    # Initiator API
    # -----------------------------------------------------------------------------------

    def submit(self, spec: TaskSpec, payload: Any, now: float) -> None:
        """Auction ``spec``; ``payload`` goes, opaque, to the winner only, with the award."""
        self._tick(now)
        self._initiator.submit(spec, payload, now)

    def cancel(self, task_id: TaskId, now: float) -> None:
        """Stop caring about ``task_id``: no event will be delivered for it."""
        self._tick(now)
        self._initiator.cancel(task_id)
        self._drain(now)

    def peer_down(self, node: NodeId, now: float) -> None:
        """Membership saw ``node`` die or leave: place its tasks again, drop its work here."""
        self._tick(now)
        if node == self._node:
            return
        self._ctx.stats["peers_down"] += 1
        self._initiator.peer_down(node, now)
        self._participant.peer_down(node)
        self._drain(now)

    # -----------------------------------------------------------------------------------
    # Participant API
    # -----------------------------------------------------------------------------------

    def task_finished(self, task_id: TaskId, ok: bool, value: Any, now: float) -> None:
        """The driver ran (or stopped) ``task_id``: free its slot and report the outcome."""
        self._tick(now)
        self._participant.task_finished(task_id, ok, value, now)
        self._drain(now)

    def set_capabilities(self, capabilities: Capabilities, now: float) -> None:
        """The node's capabilities changed: give back queued tasks it can no longer run."""
        self._tick(now)
        self._participant.set_capabilities(capabilities, now)
        self._drain(now)

    def set_accepting(self, accepting: bool, now: float) -> None:
        """Graceful shutdown: stop bidding and give back tasks that have not started."""
        self._tick(now)
        self._participant.set_accepting(accepting)
        self._drain(now)

    def waiting(self) -> int:
        """Tasks awarded here that have not started."""
        return self._participant.waiting()

    def set_bandwidth(self, node: NodeId, bytes_per_s: float) -> None:
        """The driver measured the transfer rate from ``node``: bids count inputs held
        there at this rate (``bandwidth_bytes_per_s`` until measured)."""
        self._participant.set_bandwidth(node, bytes_per_s)

    def load(self) -> Load:
        """Running, queued and backlog (committed seconds per slot), for gossip."""
        return self._participant.load()

    # -----------------------------------------------------------------------------------
    # Introspection
    # -----------------------------------------------------------------------------------

    def record(self, task_id: TaskId) -> AuctionRecord | None:
        """How ``task_id`` was (or is being) placed; kept for the most recent tasks."""
        return self._initiator.record(task_id)

    def stats(self) -> dict[str, int]:
        """Counters: messages by kind, awards, declines, reannounces, rejections by reason."""
        return dict(self._ctx.stats)

    @property
    def node(self) -> NodeId:
        return self._node

    # -----------------------------------------------------------------------------------
    # Messages, and stalls
    # -----------------------------------------------------------------------------------

    def _drain(self, now: float) -> None:
        """Deliver what this node sent itself, and what that made it send itself."""
        loop = self._ctx.loop
        while loop:
            src, msg = loop.popleft()
            try:
                self._dispatch(src, msg, now)
            except RemoteProtocolError as exc:
                raise LocalProtocolError(f"own message rejected: {exc}") from exc
        self._participant.watch(now)

    def _dispatch(self, src: NodeId, msg: Wire, now: float) -> None:
        initiator, participant = self._initiator, self._participant
        if isinstance(msg, CallForProposals):
            participant.on_cfp(src, msg, now)
        elif isinstance(msg, Propose):
            initiator.on_propose(src, msg, now)
        elif isinstance(msg, Refuse):
            initiator.on_refuse(src, msg, now)
        elif isinstance(msg, Accept):
            participant.on_accept(src, msg, now)
        elif isinstance(msg, Reject):
            participant.on_reject(src, msg)
        elif isinstance(msg, Confirm):
            initiator.on_confirm(src, msg, now)
        elif isinstance(msg, Decline):
            initiator.on_decline(src, msg, now)
        elif isinstance(msg, Progress):
            initiator.on_progress(src, msg, now)
        elif isinstance(msg, Result | Failure):
            initiator.on_outcome(src, msg, now)
        elif isinstance(msg, Cancel):
            participant.on_cancel(src, msg)
        elif isinstance(msg, LeaseQuery):
            initiator.on_lease_query(src, msg, now)
        elif isinstance(msg, LeaseReply):
            participant.on_lease_reply(src, msg, now)
        else:
            raise RemoteProtocolError(
                f"{type(msg).__name__} is not a contract message", reason="unexpected"
            )

    def _tick(self, now: float) -> None:
        """Notice that this node stalled: ``now`` came much later than the timer it asked
        for, and not merely while catching up with calls queued behind a stall already
        seen (as membership's ``_check_stall`` does). The participant then asks before
        running what may have been placed again elsewhere."""
        due = self.next_timer()
        ctx = self._ctx
        prev = ctx.now
        ctx.now = max(prev, now)
        if due is None or now <= max(due, prev) + self._cfg.stall_s:
            return
        ctx.stats["stalls"] += 1
        self._participant.stalled(now)
