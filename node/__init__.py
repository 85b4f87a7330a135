"""The daemon behind ``mesh-node``: transport, discovery, executor, object store, HTTP API.

Importing this package imports nothing else; each part is a module of its own, so that a
worker process loads only the pieces it uses.
"""
