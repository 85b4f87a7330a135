"""Mesh: a peer-to-peer compute mesh for the local network.

The protocol library. It holds the wire format, the two sans-I/O protocol cores
(membership and contract net), the transports they run over, an asyncio driver, a
discrete-event simulator and the public client API. It starts no daemon and manages no
processes: that is the job of the ``node`` package.
"""

from mesh.errors import (
    LocalProtocolError,
    MeshError,
    NoCapablePeerError,
    RemoteProtocolError,
    TaskError,
)

__version__ = "0.1.0"

__all__ = [
    "LocalProtocolError",
    "MeshError",
    "NoCapablePeerError",
    "RemoteProtocolError",
    "TaskError",
    "__version__",
]
