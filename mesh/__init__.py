"""Mesh: a peer-to-peer compute mesh for the local network.

The protocol library, in three layers:

- ``mesh.protocol``: the wire format and the sans-I/O protocol cores (membership and
  contract net); pure code that never touches the world.
- ``mesh.runtime``: what drives the cores and touches the world: the asyncio driver, the
  transports, a discrete-event simulator, shared memory, HTTP and request signing.
- ``mesh.client``: the public client API, and ``LocalMesh`` (``mesh.client.local``).

It runs no daemon itself: the ``node`` package is the daemon, and ``LocalMesh`` starts it as
``mesh-node`` processes on this machine for tests, benchmarks and examples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mesh.errors import (
    LocalProtocolError,
    MeshError,
    NoCapablePeerError,
    RemoteProtocolError,
    TaskError,
)

if TYPE_CHECKING:
    from mesh.client.local import LocalMesh

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ``LocalMesh`` brings the HTTP client (aiohttp) with it: loaded on first use, so that
    # what imports only the protocol (a task's worker process) does not pay for it.
    if name == "LocalMesh":
        from mesh.client.local import LocalMesh

        return LocalMesh
    raise AttributeError(f"module 'mesh' has no attribute {name!r}")


__all__ = [
    "LocalMesh",
    "LocalProtocolError",
    "MeshError",
    "NoCapablePeerError",
    "RemoteProtocolError",
    "TaskError",
    "__version__",
]
