"""How frames move between nodes: the ``Transport`` protocol and an in-memory network.

A transport moves opaque frames (already encoded and authenticated by ``mesh.codec``)
between addresses. It does not decode them and does not know about cores. Two
implementations share one test suite: the in-memory network here (seeded latency, loss
and partitions, for tests and the simulator) and ``node.transport_ws`` (aiohttp websockets).
"""

from __future__ import annotations

from typing import Protocol

from mesh.codec import Buffer, Chunks
from mesh.messages import Address


class Transport(Protocol):
    """A node's connection to the rest of the mesh."""

    @property
    def address(self) -> Address:
        """Where this node can be reached."""

    async def send(self, dst: Address, frame: Chunks) -> None:
        """Queue one frame (chunks written back to back) for ``dst``.

        Waits while the queue towards ``dst`` is full: the producer is pushed back, nothing
        is dropped silently. A frame for an unreachable peer is dropped and counted; the
        protocol above already tolerates loss.
        """

    async def recv(self) -> Buffer:
        """The next frame received from any peer."""

    async def close(self) -> None:
        """Close every connection; pending ``recv`` calls raise ``ConnectionError``."""
