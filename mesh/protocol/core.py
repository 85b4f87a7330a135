"""The shape every sans-I/O protocol core has, and what a driver may rely on.

A core never opens a socket, never sleeps and never reads a clock. A driver (``mesh.runtime.driver``
with real time, ``mesh.runtime.sim`` with virtual time) feeds it received messages and timer
expiries together with ``now`` (monotonic seconds, a float), then takes what it wants sent
and re-arms a single timer at ``next_timer()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from mesh.protocol.messages import Address, Capabilities, Load, NodeId, Wire


class Core(Protocol):
    """A protocol state machine driven by the four entry points of aioquic's design."""

    def receive(self, src: NodeId, msg: Wire, now: float) -> None:
        """Handle ``msg`` from the authenticated peer ``src``.

        Raises ``RemoteProtocolError`` (and nothing else) when the message is unacceptable;
        the state is then unchanged.
        """

    def handle_timer(self, now: float) -> None:
        """Do whatever was due at or before ``now``."""

    def next_timer(self) -> float | None:
        """When ``handle_timer`` must next be called, or None if nothing is pending."""

    def take_outgoing(self) -> list[tuple[Address, Wire]]:
        """Messages to send, in order, with the address of each recipient; clears them."""


class MemberState(StrEnum):
    """A peer's state as this node sees it."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberView:
    """A read-only snapshot of one node as the membership core knows it (itself included)."""

    node: NodeId
    address: Address
    state: MemberState
    incarnation: int
    capabilities: Capabilities
    load: Load


class PeerView(Protocol):
    """What the contract core needs to know of the mesh; the membership core provides it."""

    def members(self) -> list[MemberView]:
        """Every node known, itself included, in any state."""

    def member(self, node: NodeId) -> MemberView | None:
        """One node, or None if it is unknown or purged."""
