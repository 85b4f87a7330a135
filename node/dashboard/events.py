"""A node's recent events, numbered, for the dashboards of the mesh.

The daemon publishes what the dashboard shows as it happens (``EventLog.publish``): a member
changed state, a task was submitted here, started or ended here, or was delivered to its
submitter. The log is a bounded ring (``capacity`` events; older ones are forgotten), so a
node keeps it always, whether or not a page is open anywhere: appending a small dict is the
whole cost, and an idle node publishes nothing.

Each event is a JSON-ready dict with ``seq`` (1, 2, ... within this process), ``t`` (wall
clock, seconds), ``node`` (the publisher) and ``kind``:

- ``member``: ``peer`` became ``state`` (alive, suspect, dead, left, purged) in this node's view;
- ``submit``: task ``task_id`` (``task``) was submitted here, in ``group`` (one client batch);
- ``start``: it began here (inputs fetched, queued for a slot), for ``initiator``;
- ``end``: it ended here after ``run_s`` seconds in a worker, ``ok`` or with ``error``;
- ``done``: its submitter (this node) delivered it: ``ok``, where it ran (``ran_on``),
  ``attempts`` (placements that failed, so it was announced again), ``error``.

Readers ask for the events after a ``seq`` (``since``, or ``wait`` to block until there are
some); ``epoch`` changes when the process restarts, so a reader knows to start over.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

Event = dict[str, Any]

CAPACITY: Final = 4096
"""Events a node keeps: a few minutes of a busy node, the history a new page starts with."""

COALESCE_S: Final = 0.1
"""A waiting reader woken by one event waits this long for more: one answer per burst."""

TEXT_LIMIT: Final = 8192
"""Longest error message or traceback an event carries (the rest is cut)."""


def clip(text: str, limit: int = TEXT_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying so."""
    cut = " [... cut]"
    return text if len(text) <= limit else text[: limit - len(cut)] + cut


class EventLog:
    """The ring of one node's recent events (module docstring)."""

    def __init__(self, *, capacity: int = CAPACITY, clock: Callable[[], float] = time.time) -> None:
        self.node = ""
        """The publisher's id, set once the node knows it."""
        self.epoch = secrets.token_hex(6)
        self._clock = clock
        self._events: deque[Event] = deque(maxlen=capacity)
        self._seq = 0
        self._wake: asyncio.Event | None = None
        self.since_by_peer: dict[str, float] = {}
        """When each member last changed state, as this node saw it (wall clock)."""

    @property
    def seq(self) -> int:
        """The number of the latest event (0: none yet)."""
        return self._seq

    def publish(self, kind: str, **fields: Any) -> None:
        self._seq += 1
        now = round(self._clock(), 4)
        fields.update(seq=self._seq, t=now, node=self.node, kind=kind)
        if kind == "member":
            self.since_by_peer[str(fields["peer"])] = now
        self._events.append(fields)
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.set()

    def since(self, after: int) -> list[Event]:
        """The events numbered above ``after`` that are still kept, oldest first."""
        if after >= self._seq or not self._events:
            return []
        first = self._events[0]["seq"]
        return list(itertools.islice(self._events, max(0, after + 1 - first), None))

    async def wait(self, after: int, seconds: float) -> list[Event]:
        """``since(after)``, waiting up to ``seconds`` for the first event (and
        ``COALESCE_S`` more for the rest of its burst); empty if none came."""
        if after >= self._seq:
            if self._wake is None:
                self._wake = asyncio.Event()
            wake = self._wake
            try:
                async with asyncio.timeout(seconds):
                    await wake.wait()
            except TimeoutError:
                return []
            await asyncio.sleep(COALESCE_S)
        return self.since(after)
