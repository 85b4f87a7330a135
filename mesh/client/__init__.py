"""The public Python API for submitting work to a mesh, async and sync.

::

    from mesh.client import connect

    c = connect()                       # the local node, key from MESH_KEY or the key file
    f = c.submit("echo", 42)            # a future
    print(f.result())                   # 42
    print(c.gather(c.map("echo", range(1000))))
    ref = c.submit("make_array", 1 << 20).result()   # an ObjectRef: the array stayed there
    print(c.submit("array_sum", ref).result())       # the runner fetches it peer to peer
    arr = c.result(ref)                              # fetch it here

``AsyncClient`` (``mesh.client.aio``) is the same API for asyncio code
(``await AsyncClient.connect(...)``); ``Client`` (``mesh.client.sync``) runs one on a loop
of its own. A future among a task's arguments is waited for, and its value sent.

Both start no node and keep no global state. The key lookup and request proofs they use
are ``mesh.runtime.auth``'s, the HTTP requests and object transfer ``mesh.runtime.http``'s,
the session messages ``mesh.protocol.session``'s.
"""

from mesh.client.aio import AsyncClient, AsyncTaskFuture
from mesh.client.sync import Client, TaskFuture, connect
from mesh.runtime.auth import KEY_ENV, key_bytes, key_file, resolve_key, sign_request
from mesh.runtime.http import DEFAULT_PORT, DEFAULT_URL, normalise_url

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_URL",
    "KEY_ENV",
    "AsyncClient",
    "AsyncTaskFuture",
    "Client",
    "TaskFuture",
    "connect",
    "key_bytes",
    "key_file",
    "normalise_url",
    "resolve_key",
    "sign_request",
]
