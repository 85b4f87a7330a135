"""What drives the protocol cores and touches the world, shared by nodes and clients.

The asyncio driver, transports, simulator, shared memory, HTTP and request signing. It may
import ``mesh.protocol``; it may not import ``mesh.client`` or ``node``.
"""
