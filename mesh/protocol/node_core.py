"""One node's protocol state: membership, the contract net, and what joins them.

``NodeCore`` is the one core a driver runs for a node (``mesh.runtime.driver`` in real time,
``mesh.runtime.sim`` in virtual time); it has the entry points of every core
(``mesh.protocol.core.Core``) and the commands a node's owner gives (submit, cancel, task
finished, join, leave, set accepting), each taking ``now``. Inside, it routes each message
to membership or to the contract by its wire tag, and does what a node does between the two:

* membership's view of the mesh is the contract's (``Contract(peers=membership)``);
* a peer membership declares dead or departed is a peer the contract gives up on
  (``peer_down``), in the same step;
* the contract's load is written into the node's gossiped record when it changed, at
  most every ``load_interval_s`` (membership coalesces further, see
  ``MembershipConfig.record_min_interval_s``); a node whose contract did nothing since
  the last look asks for no timer.

Membership's events are passed on with the contract's (``take_events``): the owner may
follow who is on its host from them. This module may not import asyncio, aiohttp, socket
or time, and may not read a clock: ``now`` is always an argument.
"""

from __future__ import annotations

import math
import random
from typing import Any, Generic, Protocol, TypeVar

from mesh.config import MeshConfig
from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.protocol.contract import Contract, ContractEvent, TaskSpec
from mesh.protocol.core import Core, PeerView
from mesh.protocol.membership import MemberDown, Membership, MembershipEvent
from mesh.protocol.messages import Address, Capabilities, Load, NodeId, TaskId, Wire

MEMBERSHIP_TAGS = range(1, 32)
"""Wire tags of membership's messages."""

CONTRACT_TAGS = range(32, 64)
"""Wire tags of the contract net's messages."""

NodeEvent = MembershipEvent | ContractEvent


class MembershipCore(Core, PeerView, Protocol):
    """What a node needs of its membership: ``mesh.protocol.membership.Membership``, or a model of
    it in a simulation that studies something else."""

    def join(self, address: Address, now: float) -> None:
        """Contact a node known only by its address."""

    def leave(self, now: float) -> None:
        """Leave the mesh for good."""

    def set_load(self, load: Load, now: float) -> None:
        """Publish this node's load in its record."""

    def take_events(self) -> list[MembershipEvent]:
        """What changed in the mesh since the last call; clears it."""

    def gone(self, address: Address, now: float) -> None:
        """Nothing listens at ``address``: a connection to it was refused."""


M = TypeVar("M", bound=MembershipCore)


class NodeCore(Generic[M]):
    """A node's membership and contract cores, run as one core (``mesh.protocol.core.Core``).

    ``NodeCore.build`` makes a node as ``mesh-node`` runs it."""

    def __init__(
        self, *, membership: M, contract: Contract, load_interval_s: float, now: float
    ) -> None:
        """``contract`` must have been made with ``peers=membership``."""
        if not load_interval_s > 0:
            raise LocalProtocolError(f"load interval {load_interval_s} s is not positive")
        self.membership = membership
        self.contract = contract
        self._load_interval_s = load_interval_s
        self._load = contract.load()
        """The load last written into membership."""
        self._load_at = now + load_interval_s
        """The next time the load may be looked at; they are ``load_interval_s`` apart."""
        self._load_stale = False
        """The contract did something since the load was last looked at."""
        self._left = False
        self._events: list[NodeEvent] = []

    @staticmethod
    def build(
        *,
        node: NodeId,
        address: Address,
        config: MeshConfig,
        rng: random.Random,
        now: float,
        capabilities: Capabilities,
        speed: float = 1.0,
    ) -> NodeCore[Membership]:
        """An idle node: ``Membership``, and a ``Contract`` that sees the mesh through it;
        ``speed`` is the contract's first speed factor."""
        membership = Membership(
            node=node,
            address=address,
            config=config.membership,
            rng=rng,
            now=now,
            capabilities=capabilities,
            load=Load(running=0, queued=0, backlog_s=0.0),
        )
        contract = Contract(
            node=node,
            config=config.contract,
            rng=rng,
            peers=membership,
            capabilities=capabilities,
            speed=speed,
        )
        return NodeCore(
            membership=membership,
            contract=contract,
            load_interval_s=config.node.load_gossip_interval_s,
            now=now,
        )

    # -- Core -----------------------------------------------------------------------------

    def receive(self, src: NodeId, msg: Wire, now: float) -> None:
        tag = int(msg.TAG)
        if tag in MEMBERSHIP_TAGS:
            self.membership.receive(src, msg, now)
        elif tag in CONTRACT_TAGS:
            self.contract.receive(src, msg, now)
            self._contract_moved(now)
        else:
            raise RemoteProtocolError(f"no core takes {type(msg).__name__}", reason="unroutable")
        self._settle(now)

    def handle_timer(self, now: float) -> None:
        due = self.membership.next_timer()
        if due is not None and due <= now:
            self.membership.handle_timer(now)
        due = self.contract.next_timer()
        if due is not None and due <= now:
            self.contract.handle_timer(now)
            self._contract_moved(now)
        if self._load_stale and self._load_at <= now:
            self._load_stale = False
            self._load_at = now + self._load_interval_s
            load = self.contract.load()
            if load != self._load:
                self._load = load
                self.membership.set_load(load, now)
        self._settle(now)

    def next_timer(self) -> float | None:
        due = self.membership.next_timer()
        for t in (self.contract.next_timer(), self._load_at if self._load_stale else None):
            if t is not None and (due is None or t < due):
                due = t
        return due

    def take_outgoing(self) -> list[tuple[Address, Wire]]:
        return self.membership.take_outgoing() + self.contract.take_outgoing()

    def take_events(self) -> list[NodeEvent]:
        """Membership's and the contract's events since the last call, in that order."""
        out = self._events
        out.extend(self.contract.take_events())
        self._events = []
        return out

    # -- commands -------------------------------------------------------------------------

    def submit(self, spec: TaskSpec, payload: Any, now: float) -> None:
        """Place a task (``Contract.submit``)."""
        self.contract.submit(spec, payload, now)
        self._contract_moved(now)
        self._settle(now)

    def cancel(self, task_id: TaskId, now: float) -> None:
        """Stop caring about a task submitted here (``Contract.cancel``)."""
        self.contract.cancel(task_id, now)
        self._contract_moved(now)
        self._settle(now)

    def task_finished(self, task_id: TaskId, ok: bool, value: Any, now: float) -> None:
        """A task this node ran (or stopped) ended (``Contract.task_finished``)."""
        self.contract.task_finished(task_id, ok, value, now)
        self._contract_moved(now)
        self._settle(now)

    def set_accepting(self, accepting: bool, now: float) -> None:
        """Bid for tasks, or stop bidding and give back those not started."""
        self.contract.set_accepting(accepting, now)
        self._contract_moved(now)
        self._settle(now)

    def join(self, address: Address, now: float) -> None:
        """Contact a node known only by its address (a seed, an mDNS find)."""
        self.membership.join(address, now)
        self._settle(now)

    def gone(self, address: Address, now: float) -> None:
        """Nothing listens at ``address`` (a connection to it was refused): its member is
        declared dead without the wait of a suspicion."""
        self.membership.gone(address, now)
        self._settle(now)

    def leave(self, now: float) -> None:
        """Leave the mesh; the node's load is no longer published."""
        self.membership.leave(now)
        self._left = True
        self._load_stale = False
        self._settle(now)

    # -- glue -----------------------------------------------------------------------------

    def _settle(self, now: float) -> None:
        """Hand the contract what membership saw, before anything else happens."""
        events = self.membership.take_events()
        for ev in events:
            if isinstance(ev, MemberDown):
                self.contract.peer_down(ev.node, now)
                self._contract_moved(now)
        self._events.extend(events)

    def _contract_moved(self, now: float) -> None:
        """The contract's load may have changed: look at it at the next ``_load_at``,
        which keeps its phase through idle spells."""
        if self._load_stale or self._left:
            return
        self._load_stale = True
        if self._load_at < now:
            self._load_at += self._load_interval_s * math.ceil(
                (now - self._load_at) / self._load_interval_s
            )
