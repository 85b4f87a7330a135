"""Every message and structure that crosses the wire.

A wire type is a frozen, slotted, keyword-only dataclass registered under a number from
``WireType``. Those numbers are on the wire: ``WireType`` is append-only. Never renumber,
never reuse a retired number; add new members at the end of their block.

Blocks:   1-31 membership and gossip   32-63 contract net   64-95 node (objects, API)
          96-127 structures shared by several parts

Field types are limited to what the codec carries: None, bool, int, float, str, bytes,
tuples and dicts of those, numpy arrays, torch tensors and other wire types. Sequences are
declared as ``tuple[...]`` so that decoded messages stay hashable and immutable.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from enum import IntEnum
from typing import Any, ClassVar, NewType, TypeVar, dataclass_transform

NodeId = NewType("NodeId", str)
"""A node's identity: chosen at start, unique in the mesh, stable across restarts."""

TaskId = NewType("TaskId", str)
"""A task's identity, chosen by its initiator; unique across the mesh."""

Address = NewType("Address", str)
"""Where a node listens: ``host:port`` on a real network, any name in the simulator."""


class WireType(IntEnum):
    """Type tags on the wire. APPEND-ONLY: these numbers are part of the protocol."""

    # --- 1-31: membership and gossip (mesh/protocol/membership.py) ---
    NODE_RECORD = 1
    SUSPECT = 2
    DEAD = 3
    LEFT = 4
    PING = 5
    PING_REQ = 6
    ACK = 7
    GOSSIP = 8
    JOIN = 9
    DIGEST = 10
    DELTA = 11
    # --- 32-63: contract net (mesh/protocol/contract.py) ---
    CALL_FOR_PROPOSALS = 32
    PROPOSE = 33
    REFUSE = 34
    ACCEPT = 35
    REJECT = 36
    CONFIRM = 37
    DECLINE = 38
    PROGRESS = 39
    RESULT = 40
    FAILURE = 41
    CANCEL = 42
    LEASE_QUERY = 43
    LEASE_REPLY = 44
    # --- 64-79: node: objects and the object store (node/store.py, node/executor.py) ---
    OBJECT_REF = 64
    # --- 80-95: node: peer hello, transfer, API (node/transport_ws.py, node/daemon.py) ---
    PEER_HELLO = 80
    TASK_CALL = 88
    SEGMENT = 89
    # --- 96-127: structures shared by several parts ---
    CAPABILITIES = 96
    LOAD = 97
    REQUIREMENTS = 98


class Wire:
    """Base of every wire type; ``TAG`` is its number on the wire."""

    __slots__ = ()
    TAG: ClassVar[WireType]


W = TypeVar("W", bound=Wire)

REGISTRY: dict[int, type[Wire]] = {}
"""Tag -> wire type. Filled once at import by ``@wire``; read-only afterwards."""


@dataclass_transform(frozen_default=True, kw_only_default=True)
def wire(tag: WireType) -> Callable[[type[W]], type[W]]:
    """Make ``cls`` a frozen, slotted, keyword-only, weakly referable dataclass and register
    it as ``tag``."""

    def register(cls: type[W]) -> type[W]:
        if int(tag) in REGISTRY:
            raise TypeError(f"wire tag {tag!r} registered twice")
        # Weak references let a client tell when the last copy of an ``ObjectRef`` is gone.
        made = dataclasses.dataclass(frozen=True, slots=True, kw_only=True, weakref_slot=True)(cls)
        made.TAG = tag
        REGISTRY[int(tag)] = made
        return made

    return register


def field_names(cls: type[Wire]) -> tuple[str, ...]:
    """Field names of a wire type in declaration order (the order on the wire)."""
    return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]


def field_types(cls: type[Wire]) -> dict[str, Any]:
    """Resolved annotations of a wire type's fields."""
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in field_names(cls)}


# ---------------------------------------------------------------------------------------
# Shared structures (96-127)
# ---------------------------------------------------------------------------------------


@wire(WireType.CAPABILITIES)
class Capabilities(Wire):
    """What a node can do; changes rarely (gossiped in its node record).

    ``resources`` holds amounts: ``cpu`` (task slots), ``gpu`` (devices), ``memory``
    (bytes), and any custom resource an operator declares (``fpga``: 1). ``libraries`` maps
    an importable distribution name to its installed version. ``tasks`` names the tasks
    installed on the node. ``labels`` are free-form operator tags.
    """

    resources: dict[str, float]
    libraries: dict[str, str]
    tasks: tuple[str, ...]
    labels: dict[str, str]


@wire(WireType.LOAD)
class Load(Wire):
    """How busy a node is; coarse on purpose, so that it changes (and is gossiped) rarely.

    ``running`` and ``queued`` count tasks; ``backlog_s`` estimates the seconds of work
    already committed per slot, the number a bid's queue wait comes from.
    """

    running: int
    queued: int
    backlog_s: float


@wire(WireType.REQUIREMENTS)
class Requirements(Wire):
    """What a task needs of the node that runs it.

    ``resources`` are amounts per running task (``cpu``: 1, ``gpu``: 1, ``memory``: bytes,
    custom names). ``libraries`` maps a distribution name to a version specifier such as
    ``">=2.2"`` (empty string: any version). ``labels`` must all match exactly.
    """

    task: str
    resources: dict[str, float]
    libraries: dict[str, str]
    labels: dict[str, str]


# ---------------------------------------------------------------------------------------
# Node: objects and the object store (64-79)
# ---------------------------------------------------------------------------------------


@wire(WireType.OBJECT_REF)
class ObjectRef(Wire):
    """A value that stayed in the object store of the node that made it.

    ``holder`` is the node to fetch it from; ``nbytes`` is its encoded size, what a bid
    counts as transfer. ``dtype`` and ``shape`` summarise an array value (``""`` and ``()``
    for anything else) so that a submitter can tell what it holds without fetching it.
    """

    id: str
    holder: NodeId
    nbytes: int
    dtype: str = ""
    shape: tuple[int, ...] = ()


# ---------------------------------------------------------------------------------------
# Node: peer websocket (80-95, node/transport_ws.py)
# ---------------------------------------------------------------------------------------


@wire(WireType.PEER_HELLO)
class PeerHello(Wire):
    """First frame each way on a peer websocket: who is on the other end.

    ``address`` is the sender's own listen address (``host:port``), the name its peers use
    to send to it; the frame's MAC proves the sender holds the mesh key, so an unkeyed
    client never gets past the hello. ``package`` is the sender's ``mesh-node`` version (its
    protocol version is the frame's). ``share`` is its X25519 public key for this connection
    (``mesh.protocol.sealing``), empty from a node that does not seal.

    These fields come first for good: a node reads the address and package of a hello of
    any frame version from 2 on, to say clearly why it refuses an incompatible peer, so a
    later version may append fields here but never change these.
    """

    address: str
    package: str
    share: bytes


# ---------------------------------------------------------------------------------------
# Contract net (32-63, mesh/protocol/contract.py)
#
# One auction is one call for proposals: ``cfp`` is its number, unique per initiator, and
# every answer names it. Task lists are parallel tuples rather than nested structs so that a
# batch of a thousand no-op tasks costs a thousand strings on the wire, not a thousand maps.
# ---------------------------------------------------------------------------------------


@wire(WireType.CALL_FOR_PROPOSALS)
class CallForProposals(Wire):
    """Initiator -> candidate: bid for these tasks, which all share ``requirements``.

    ``inputs`` maps a task id to the bytes of its reference arguments held by each node
    (only tasks that have any), so a bidder can count the transfer of what it lacks.
    ``est_runtime_s`` is the submitter's estimate, a seed for bidders with no history.
    """

    cfp: int
    requirements: Requirements
    tasks: tuple[TaskId, ...]
    est_runtime_s: float | None
    inputs: dict[TaskId, dict[NodeId, int]]


@wire(WireType.PROPOSE)
class Propose(Wire):
    """Candidate -> initiator: a bid of ``len(costs)`` slots, cheapest first.

    ``costs[i]`` is the estimated seconds until a task placed in slot ``i`` completes
    (queue wait plus runtime); ``lanes`` is how many such tasks the bidder runs at once and
    ``run_s`` its estimate of one task's runtime, from which the initiator keeps its own
    model of the bidder while it feeds it work. ``bandwidth`` is the transfer rate, in
    bytes per second, the bidder has measured from each holder of the call's inputs. The
    slots stay softly reserved until the reservation expires; further awards under the
    same call (refills, as results come back) are taken while the bidder has room.
    """

    cfp: int
    costs: tuple[float, ...]
    lanes: int
    run_s: float
    bandwidth: dict[NodeId, float]


@wire(WireType.REFUSE)
class Refuse(Wire):
    """Candidate -> initiator: it can never run these tasks; ``reason`` says what it lacks."""

    cfp: int
    reason: dict[str, str]


@wire(WireType.ACCEPT)
class Accept(Wire):
    """Initiator -> bidder: the award of ``tasks`` (a lease), with each task's payload."""

    cfp: int
    tasks: tuple[TaskId, ...]
    payloads: tuple[Any, ...]


@wire(WireType.REJECT)
class Reject(Wire):
    """Initiator -> bidder: nothing of this auction for you; release the reservation."""

    cfp: int


@wire(WireType.CONFIRM)
class Confirm(Wire):
    """Winner -> initiator: it holds ``tasks`` and will run them."""

    cfp: int
    tasks: tuple[TaskId, ...]


@wire(WireType.DECLINE)
class Decline(Wire):
    """Winner -> initiator: it gives ``tasks`` back (its state changed); place them again."""

    cfp: int
    tasks: tuple[TaskId, ...]
    reason: str


@wire(WireType.PROGRESS)
class Progress(Wire):
    """Winner -> initiator: it still holds ``tasks`` (queued or running); renews their lease."""

    tasks: tuple[TaskId, ...]


@wire(WireType.RESULT)
class Result(Wire):
    """Winner -> initiator: ``tasks`` completed with ``values`` (same order), each after
    running ``run_s`` seconds (same order): what the initiator's model of the winner and
    ``mesh-node why`` learn from."""

    tasks: tuple[TaskId, ...]
    values: tuple[Any, ...]
    run_s: tuple[float, ...]


@wire(WireType.FAILURE)
class Failure(Wire):
    """Winner -> initiator: ``tasks`` raised; ``errors`` (same order) describe each error."""

    tasks: tuple[TaskId, ...]
    errors: tuple[Any, ...]


@wire(WireType.CANCEL)
class Cancel(Wire):
    """Initiator -> winner: stop ``tasks`` and drop their results."""

    tasks: tuple[TaskId, ...]


@wire(WireType.LEASE_QUERY)
class LeaseQuery(Wire):
    """Winner -> initiator, after the winner stalled: are ``tasks`` (held here, not
    started) still bound to me? Nothing of them starts until the ``LeaseReply``.

    ``query`` numbers the question, so that an answer given before a later stall cannot
    start tasks whose lease may have lapsed since.
    """

    query: int
    tasks: tuple[TaskId, ...]


@wire(WireType.LEASE_REPLY)
class LeaseReply(Wire):
    """Initiator -> winner: of the tasks asked about in ``query``, ``keep`` are still bound
    to the winner (their lease is renewed); the winner drops the rest unrun."""

    query: int
    keep: tuple[TaskId, ...]


# ---------------------------------------------------------------------------------------
# Membership and gossip (1-31, mesh/protocol/membership.py)
# ---------------------------------------------------------------------------------------


@wire(WireType.NODE_RECORD)
class NodeRecord(Wire):
    """A node's own record, written only by that node and gossiped by everyone.

    Records of one node are ordered by ``(incarnation, version)``: ``version`` rises with
    every change of address, capabilities or load, ``incarnation`` rises when the node
    refutes a suspicion or a death claim (which resets nothing else).
    """

    node: NodeId
    address: Address
    incarnation: int
    version: int
    capabilities: Capabilities
    load: Load


@wire(WireType.SUSPECT)
class Suspect(Wire):
    """``by`` could not reach ``node`` at ``incarnation``, directly or through others."""

    node: NodeId
    incarnation: int
    by: NodeId


@wire(WireType.DEAD)
class Dead(Wire):
    """``by`` declared ``node`` dead at ``incarnation`` after its suspicion ran out."""

    node: NodeId
    incarnation: int
    by: NodeId


@wire(WireType.LEFT)
class Left(Wire):
    """``node`` left the mesh on purpose at ``incarnation``."""

    node: NodeId
    incarnation: int


MembershipUpdate = NodeRecord | Suspect | Dead | Left
"""What gossip disseminates: a record, or a claim about a node's state."""


@wire(WireType.PING)
class Ping(Wire):
    """A probe; answered with an ``Ack`` of the same ``seq`` sent to ``reply_to``."""

    seq: int
    reply_to: Address
    updates: tuple[MembershipUpdate, ...]


@wire(WireType.PING_REQ)
class PingReq(Wire):
    """Ask the receiver to probe ``target`` and forward its ``Ack`` (with ``seq``) to us."""

    seq: int
    target: NodeId
    target_address: Address
    reply_to: Address
    updates: tuple[MembershipUpdate, ...]


@wire(WireType.ACK)
class Ack(Wire):
    """The answer to a ``Ping`` (or a relayed one) with the probe's ``seq``."""

    seq: int
    updates: tuple[MembershipUpdate, ...]


@wire(WireType.GOSSIP)
class Gossip(Wire):
    """A regular dissemination round: updates the sender has not yet spread enough."""

    updates: tuple[MembershipUpdate, ...]


@wire(WireType.JOIN)
class Join(Wire):
    """A node contacting a seed it knows only by address; answered with ``Delta``s."""

    record: NodeRecord


@wire(WireType.DIGEST)
class Digest(Wire):
    """Anti-entropy: what the sender knows, ``node -> (incarnation, version, state rank)``.

    The state rank is 0 alive, 1 suspect, 2 dead, 3 left. The receiver answers with a
    ``Delta`` holding what it knows better and naming what it wants.
    """

    reply_to: Address
    entries: dict[NodeId, tuple[int, int, int]]


@wire(WireType.DELTA)
class Delta(Wire):
    """Anti-entropy answer: newer records and claims, and the nodes whose records to send back."""

    reply_to: Address
    updates: tuple[MembershipUpdate, ...]
    want: tuple[NodeId, ...]


# ---------------------------------------------------------------------------------------
# Node: daemon (88-95, node/daemon.py)
# ---------------------------------------------------------------------------------------


@wire(WireType.TASK_CALL)
class TaskCall(Wire):
    """What a task's winner runs: the registered task ``name`` with its arguments.

    The contract core carries it opaquely from the initiator to the winner with the award.
    ``args`` may hold ``ObjectRef``s, which the winner fetches from their holders first.
    ``timeout_s`` bounds the run on the winner (None: no bound).
    """

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    timeout_s: float | None


@wire(WireType.SEGMENT)
class Segment(Wire):
    """A ``mesh.protocol.codec`` body of ``nbytes`` in the shared-memory file ``name`` (under
    ``mesh.runtime.shm.SHM_DIR``): how a body passes between processes of one machine unsent.

    A client on the node's machine uploads a large argument as one (the node's store takes
    it over as a segment of its own); a holder answers a fetch from its own machine with the
    segment of the object; the executor names the object segments a worker maps. It never
    crosses the network: loopback sockets would copy the bytes several times more.
    """

    name: str
    nbytes: int
