"""The event loop Mesh's processes run on: a node, the CLI and the sync client's thread."""

from __future__ import annotations

import asyncio


def event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when it is installed (the ``fast`` extra), which takes a
    good part off the cost of every message; asyncio's own otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
