"""What both roles of the contract net share: the values a driver sees, the bounds on
numbers taken from peers, and the ``Context`` through which both roles of one node send.

The initiator (``mesh/protocol/initiator.py``) and the participant
(``mesh/protocol/participant.py``) never touch each other's state: they meet here, in the
outbox, the events, the counters and the ``accepting`` flag of their node, and in what they
send each other (to itself, a node's messages go round through ``Context.loop``).
``mesh/protocol/contract.py`` puts the two together as one core.

This module may not import asyncio, aiohttp, zeroconf, socket or time, and may not read a
clock: ``now`` is always an argument.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Final

from mesh.config import ContractConfig
from mesh.protocol.core import PeerView
from mesh.protocol.messages import Address, NodeId, Requirements, TaskId, Wire

INF: Final = math.inf
MAX_CFP_TASKS: Final = 4096
"""Hard bound on tasks in a received call for proposals, whatever the sender's config."""

EPS: Final = 1e-9
MAX_ESTIMATE_S: Final = 1e6
"""Longest runtime, bid or estimate taken from a peer (about 11 days): beyond it a number
is not an estimate but an attack on the sums bids are made of."""
MIN_ESTIMATE_S: Final = 1e-6
"""Shortest runtime an estimate is taken as when learning from it: a ratio against 1 ns
would scale every later bid by a billion."""
MAX_LANES: Final = 1024
"""Most tasks of one kind a node is modelled to run at once, whatever it declares."""

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


def plausible(seconds: float) -> bool:
    """A duration from a peer that sums can take: finite, >= 0, at most MAX_ESTIMATE_S."""
    return 0.0 <= seconds <= MAX_ESTIMATE_S


# ---------------------------------------------------------------------------------------
# What the two roles of one node share
# ---------------------------------------------------------------------------------------


class Context:
    """One node as both its roles see it: who it is, its config and view of the mesh, the
    latest ``now`` it was given, whether it takes work, and the way out: messages to send
    (at once, lazily, or to itself through ``loop``), events for the driver, counters.

    The roles reach ``events``, ``now`` and ``accepting`` through it, never through
    copies: the events are handed over and started anew, the others change."""

    __slots__ = (
        "_lazy",
        "_out",
        "accepting",
        "config",
        "events",
        "lazy_at",
        "loop",
        "node",
        "now",
        "peers",
        "stats",
    )

    def __init__(self, node: NodeId, config: ContractConfig, peers: PeerView) -> None:
        self.node = node
        self.config = config
        self.peers = peers
        self.accepting = True  # set_accepting(False): no bids, and not a candidate of its own
        self.now = -INF  # the latest ``now`` any entry point was given
        self._out: list[tuple[Address, Wire]] = []
        self.events: list[ContractEvent] = []
        self.loop: deque[tuple[NodeId, Wire]] = deque()  # what this node sent itself
        self.stats: Counter[str] = Counter()
        self._lazy: dict[NodeId, list[Wire]] = {}  # what waits to ride with the next message
        self.lazy_at = INF  # when what waits goes alone

    def take_out(self) -> list[tuple[Address, Wire]]:
        out, self._out = self._out, []
        return out

    def take_events(self) -> list[ContractEvent]:
        events, self.events = self.events, []
        return events

    def send(self, dst: NodeId, msg: Wire) -> None:
        if dst == self.node:
            self.loop.append((dst, msg))
        else:
            self.send_remote(dst, msg)

    def send_lazy(self, dst: NodeId, msg: Wire, now: float) -> None:
        """Send ``msg``, which nothing waits for (a reject, a confirm), with the next message
        to ``dst`` or after ``lazy_delay_s``, whichever comes first: the two share a write."""
        if dst == self.node or self.config.lazy_delay_s <= 0:
            self.send(dst, msg)
            return
        self._lazy.setdefault(dst, []).append(msg)
        self.lazy_at = min(self.lazy_at, now + self.config.lazy_delay_s)

    def send_remote(self, dst: NodeId, msg: Wire) -> None:
        member = self.peers.member(dst)
        if member is None:
            self.stats["unroutable"] += 1
            return
        waiting = self._lazy.pop(dst, None) if self._lazy else None
        if waiting:
            for m in waiting:
                self._out.append((member.address, m))
                self.stats[f"sent.{type(m).__name__}"] += 1
        self._out.append((member.address, msg))
        self.stats[f"sent.{type(msg).__name__}"] += 1

    def flush_lazy(self, now: float) -> None:
        """Send what waits lazily, if its delay is up."""
        if self.lazy_at > now:
            return
        self.lazy_at = INF
        lazy, self._lazy = self._lazy, {}
        for dst, msgs in lazy.items():
            member = self.peers.member(dst)
            if member is None:
                self.stats["unroutable"] += len(msgs)
                continue
            for m in msgs:
                self._out.append((member.address, m))
                self.stats[f"sent.{type(m).__name__}"] += 1
