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

    # --- 1-31: membership and gossip (mesh/membership.py) ---
    # --- 32-63: contract net (mesh/contract.py) ---
    # --- 64-79: node: objects and the object store (node/store.py, node/executor.py) ---
    OBJECT_REF = 64
    # --- 80-95: node: peer hello, transfer, API (node/transport_ws.py, node/daemon.py) ---
    PEER_HELLO = 80
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
    """Make ``cls`` a frozen, slotted, keyword-only dataclass and register it as ``tag``."""

    def register(cls: type[W]) -> type[W]:
        if int(tag) in REGISTRY:
            raise TypeError(f"wire tag {tag!r} registered twice")
        made = dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)
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
    client never gets past the hello.
    """

    address: str
