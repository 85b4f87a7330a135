"""Mesh: a peer-to-peer compute mesh for the local network.

The protocol library. It holds the wire format, the two sans-I/O protocol cores
(membership and contract net), the transports they run over, an asyncio driver, a
discrete-event simulator and the public client API. It runs no daemon itself: the ``node``
package is the daemon, and ``LocalMesh`` (``mesh/local.py``) starts it as ``mesh-node``
processes on this machine for tests, benchmarks and examples.
"""

from mesh.errors import (
    LocalProtocolError,
    MeshError,
    NoCapablePeerError,
    RemoteProtocolError,
    TaskError,
)
from mesh.local import LocalMesh

__version__ = "0.1.0"

__all__ = [
    "LocalMesh",
    "LocalProtocolError",
    "MeshError",
    "NoCapablePeerError",
    "RemoteProtocolError",
    "TaskError",
    "__version__",
]
