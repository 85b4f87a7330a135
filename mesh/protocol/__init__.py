"""The protocol: pure, sans-I/O state machines and wire types (membership, contract net, codec).

Code here takes ``now`` as an argument and returns what to send. It may import only the
standard library's pure modules, ``mesh.errors``, ``mesh.config`` and itself: no asyncio,
sockets, files or clock, nothing from ``mesh.runtime``, ``mesh.client`` or ``node``.
"""
