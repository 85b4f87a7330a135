"""The asyncio driver: runs a node's sans-I/O core over a Transport in real time.

This is the only place where the cores meet a real clock. The driver reads the clock
(``clock``, ``time.monotonic`` unless a test passes another, for the core; ``time.time``
for the codec's timestamps), makes the core at its ``now``, decodes frames from the
transport with the node's ``Codec`` and hands each message to the core, encodes what the
core wants sent and queues it per destination, and keeps ONE timer armed at the core's
``next_timer()``. What the node's owner asks of the core (submit a task, join a seed)
goes through ``command``, which calls it with the same clock's ``now``.

It never blocks the event loop: decoding is cheap (arrays are views), sends go through
per-destination queues drained by sender tasks, and work triggered by local calls (a
submitted task, a finished task) is coalesced into one step per loop iteration with
``wake()``. A frame that cannot be accepted is counted by its ``RemoteProtocolError``
reason and dropped; nothing a peer sends can stop the driver.

It knows nothing about membership or contracts: the owner gives it a factory for the core
(``mesh.protocol.node_core.NodeCore`` in a node), an ``on_step`` hook in which it drains the core's
events, and a ``resolve`` function naming the node behind an address, so that every frame
names its receiver (see ``mesh.protocol.codec``). The core sends to addresses; ``resolve`` is called
once per frame and must be a lookup, not a search.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Generic, TypeVar

from mesh.errors import MeshError, RemoteProtocolError
from mesh.protocol.codec import BLANK_TO_TAGS, UNADDRESSED, Buffer, Chunks, Codec
from mesh.protocol.core import Core
from mesh.protocol.messages import Address, NodeId, Wire
from mesh.runtime.transport import Transport

log = logging.getLogger(__name__)

_MAX_STEP_ROUNDS = 16
"""Rounds of (local delivery, hook, flush) in one step before yielding to the loop, so that
a core talking to itself cannot starve the transport."""

C = TypeVar("C", bound=Core)


class Driver(Generic[C]):
    """Pumps a core over a transport. Start with ``await run()``; ``stop()`` ends it.

    ``on_step(now)`` is called after every batch of received frames, timer expiries and
    ``wake()`` calls; the owner drains core events there and may call core methods with
    that ``now``, whose output is flushed in the same step. Outside a step, the owner calls
    the core through ``command``.
    """

    def __init__(
        self,
        *,
        node: NodeId,
        transport: Transport,
        codec: Codec,
        core: Callable[[float], C],
        resolve: Callable[[Address], NodeId | None],
        on_step: Callable[[float], None] | None = None,
        authenticated: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_queued_per_peer: int = 100_000,
    ) -> None:
        """``core(now)`` makes the core, at the driver's ``clock()``; it is ``self.core``.
        ``resolve(address)``: the id of the node at ``address``, or None if unknown. A
        frame for an unknown node goes out unaddressed only if its type may (``Join``,
        ``PeerHello``); any other is dropped here as ``no-receiver``, since its receiver
        would refuse it.
        ``authenticated``: the transport already checked each frame's MAC (the
        websocket transport does, to drop forgers at the connection), so decoding skips it.
        ``max_queued_per_peer`` bounds the frames waiting for one destination; beyond it
        new frames are dropped and counted, which the protocols above tolerate as loss."""
        self.node = node
        self.transport = transport
        self.codec = codec
        self.resolve = resolve
        self.on_step = on_step
        self.authenticated = authenticated
        self.clock = clock
        self.wall_clock = wall_clock
        self.core: C = core(clock())
        self.max_queued_per_peer = max_queued_per_peer
        self.rejected: Counter[str] = Counter()
        """Frames dropped on arrival, by ``RemoteProtocolError.reason``."""
        self.received: Counter[str] = Counter()
        """Messages accepted by the core, by wire type name (local deliveries included)."""
        self.sent: Counter[str] = Counter()
        """Messages queued for sending, by wire type name (local deliveries included)."""
        self.dropped: Counter[str] = Counter()
        """Outgoing frames given up on, by cause (``overflow``, ``send-error``, ``encode``,
        ``no-receiver``)."""
        self._local: deque[Wire] = deque()
        self._queues: dict[Address, deque[Chunks]] = {}
        self._senders: dict[Address, asyncio.Task[None]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._wake_pending = False
        self._stop = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Receive, time and send until ``stop()`` or until the transport closes."""
        self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                receiver = tg.create_task(self._receive_loop())
                self.step()
                stopper = tg.create_task(self._stop.wait())
                await asyncio.wait({receiver, stopper}, return_when=asyncio.FIRST_COMPLETED)
                receiver.cancel()
                stopper.cancel()
                for task in list(self._senders.values()):
                    task.cancel()
        finally:
            self._tg = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def stop(self) -> None:
        """Make ``run()`` return; frames still queued for sending are abandoned."""
        self._stop.set()

    async def drain(self) -> None:
        """Wait until every queued frame was handed to the transport (bound it with
        ``asyncio.timeout``: a peer that stopped reading can hold it up)."""
        await self._idle.wait()

    # -- stepping -------------------------------------------------------------------------

    def command(self, fn: Callable[[float], None]) -> None:
        """Call ``fn(now)`` at once with the driver's clock (``fn`` calls the core: submit a
        task, join a seed), then step soon to send what it made. What ``fn`` raises is
        raised here."""
        try:
            fn(self.clock())
        finally:
            self.wake()

    def wake(self) -> None:
        """Ask for a step soon; calls within one loop iteration share one step."""
        if self._wake_pending or self._loop is None:
            return
        self._wake_pending = True
        self._loop.call_soon(self.step)

    def step(self) -> None:
        """Deliver local messages, run the hook, flush outgoing, re-arm the timer."""
        self._wake_pending = False
        for _ in range(_MAX_STEP_ROUNDS):
            now = self.clock()
            while self._local:
                self._deliver(self.node, self._local.popleft(), now)
            # A core that wants to act now (a batch to call for at once, say) does so in
            # this step, not one loop turn later through the timer.
            due = self.core.next_timer()
            if due is not None and due <= now:
                self.core.handle_timer(now)
            if self.on_step is not None:
                self.on_step(now)
            if not self._flush() and not self._local:
                break
        else:
            self.wake()
        self._rearm()

    def _deliver(self, src: NodeId, msg: Wire, now: float) -> None:
        try:
            self.core.receive(src, msg, now)
        except RemoteProtocolError as exc:
            self.rejected[exc.reason] += 1
            log.debug("dropped %s from %s: %s", type(msg).__name__, src, exc)
            return
        self.received[type(msg).__name__] += 1

    def _flush(self) -> bool:
        """Queue the core's outgoing messages; True if there were any."""
        out = self.core.take_outgoing()
        if not out:
            return False
        me = self.transport.address
        resolve = self.resolve
        wall = self.wall_clock()
        for dst, msg in out:
            self.sent[type(msg).__name__] += 1
            if dst == me:
                self._local.append(msg)
                continue
            to = resolve(dst)
            if to is None:
                if int(msg.TAG) not in BLANK_TO_TAGS:
                    self.dropped["no-receiver"] += 1
                    log.debug("no node known at %s for %s", dst, type(msg).__name__)
                    continue
                to = UNADDRESSED
            try:
                chunks, _ = self.codec.encode(msg, wall, to=to)
            except MeshError as exc:
                # Our own message cannot be framed (too big): a bug above, not a peer's.
                self.dropped["encode"] += 1
                log.error("cannot send %s to %s: %s", type(msg).__name__, dst, exc)
                continue
            self._enqueue(dst, chunks)
        return True

    def _enqueue(self, dst: Address, chunks: Chunks) -> None:
        queue = self._queues.get(dst)
        if queue is None:
            # Nothing waiting for this peer: hand the frame straight to the transport,
            # without a sender task and the loop turn it costs.
            try:
                if self.transport.try_send(dst, chunks):
                    return
            except (MeshError, ConnectionError, OSError) as exc:
                self.dropped["send-error"] += 1
                log.debug("send to %s failed: %s", dst, exc)
                return
            queue = self._queues[dst] = deque()
        if len(queue) >= self.max_queued_per_peer:
            self.dropped["overflow"] += 1
            return
        queue.append(chunks)
        self._idle.clear()
        if dst not in self._senders and self._tg is not None:
            self._senders[dst] = self._tg.create_task(self._sender(dst, queue))

    async def _sender(self, dst: Address, queue: deque[Chunks]) -> None:
        try:
            while queue:
                chunks = queue.popleft()
                try:
                    await self.transport.send(dst, chunks)
                except (MeshError, ConnectionError, OSError) as exc:
                    self.dropped["send-error"] += 1
                    log.debug("send to %s failed: %s", dst, exc)
        finally:
            self._senders.pop(dst, None)
            if not queue:
                self._queues.pop(dst, None)
            if not self._queues:
                self._idle.set()

    # -- time -----------------------------------------------------------------------------

    def _rearm(self) -> None:
        due = self.core.next_timer()
        if due == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = due
        if due is None or self._loop is None:
            return
        self._timer = self._loop.call_later(max(0.0, due - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.step()

    # -- receiving ------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        transport = self.transport
        while True:
            try:
                frame: Buffer | None = await transport.recv()
            except ConnectionError:
                return
            # Everything already received goes in, then one step answers it all: a burst
            # shares a step, and a lone frame is answered without another loop turn.
            while frame is not None:
                self._receive(frame)
                frame = transport.try_recv()
            self.step()

    def _receive(self, frame_bytes: Buffer) -> None:
        try:
            frame = self.codec.decode(
                frame_bytes, self.wall_clock(), authenticated=self.authenticated
            )
        except RemoteProtocolError as exc:
            self.rejected[exc.reason] += 1
            return
        if frame.sender == self.node:
            # Someone replaying our own frames at us; we never send to ourselves.
            self.rejected["self"] += 1
            return
        self._deliver(frame.sender, frame.msg, self.clock())
