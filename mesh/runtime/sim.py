"""A discrete-event simulator that runs many sans-I/O cores on one virtual clock.

The simulator is a second driver for the cores (``mesh.runtime.driver`` is the real-time one): it
keeps one heap of events (message deliveries, core timers, scheduled actions), pops them
in time order, feeds each to the node it is for with ``now`` set to the event's time,
and turns what the node's core wants sent into future deliveries through an
``InMemoryNetwork`` (the same latency, loss and partition model the in-memory transport
uses). No event loop, no threads, no wall clock: a run is a pure function of its seed, and
a thousand nodes fit in one process.

Each node runs one core, made by a factory: a ``mesh.protocol.node_core.NodeCore`` (membership and
contract net, joined as in a real node), or a single protocol core when that is what a
run studies. Nodes can crash (their state is lost), restart (the factory makes a fresh
core), and stall (they process nothing for a while, then see ``now`` jump, as a node whose
event loop blocked).
Every message is measured with its real encoded size (``wire_size``, equal to
``len(mesh.protocol.codec.dumps(msg))``) and can be observed by hooks.

It may not touch the network, the clock or any global state.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgpack

from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.protocol.codec import dumps
from mesh.protocol.core import Core
from mesh.protocol.messages import Address, NodeId, Wire, field_names
from mesh.runtime.transport import InMemoryNetwork

# ---------------------------------------------------------------------------------------
# Message sizes
# ---------------------------------------------------------------------------------------

_EXT_STRUCT = 1  # mesh.protocol.codec.EXT_STRUCT: a wire type is an ext of [tag, [fields...]]
_FIXEXT = {1: 2, 2: 2, 4: 2, 8: 2, 16: 2}
_PLAIN = (str, int, float, bool, bytes, type(None), dict)


def _ext_len(payload: int) -> int:
    head = _FIXEXT.get(payload)
    if head is None:
        head = 3 if payload < 256 else 4 if payload < 65536 else 6
    return head + payload


def _array_head(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65536 else 5


class WireSizer:
    """``len(mesh.protocol.codec.dumps(msg))`` for wire messages, computed with caching.

    A wire value is a msgpack ext whose payload is ``[tag, [fields]]``, so the size of a
    message is the sum of the sizes of its parts plus headers of known length. The packed
    size of every nested wire object (node records, capabilities) is cached by identity,
    with the object held so that its id cannot be reused: the simulator passes the same
    record objects through thousands of messages. Values the fast path does not know
    (arrays, tensors, enums) are measured with the codec itself.
    """

    __slots__ = ("_body_extra", "_cache", "_max_cache", "_names")

    def __init__(self, max_cache: int = 200_000) -> None:
        self._cache: dict[int, tuple[object, int]] = {}
        self._max_cache = max_cache
        self._names: dict[type[Wire], tuple[str, ...]] = {}
        # What a body adds around the msgpack header (length table, no buffers).
        self._body_extra = len(dumps(None)) - 1

    def __call__(self, msg: Wire) -> int:
        return self._body_extra + self._packed(msg)

    def _packed(self, value: Any) -> int:
        # msgpack's own size rules for the common scalars; anything else is packed.
        t = type(value)
        if t is int:
            if 0 <= value < 128 or -32 <= value < 0:
                return 1
            if -128 <= value < 256:
                return 2
            if -32768 <= value < 65536:
                return 3
            if -(2**31) <= value < 2**32:
                return 5
            return 9
        if t is str:
            n = len(value) if value.isascii() else len(value.encode())
            return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5)
        if t is float:
            return 9
        if isinstance(value, Wire):
            return _ext_len(self._payload(value))
        if isinstance(value, tuple | list):
            total = _array_head(len(value))
            for v in value:
                total += self._packed(v)
            return total
        if isinstance(value, _PLAIN):
            try:
                # Plain data packs the same with or without the codec's hooks.
                return len(msgpack.packb(value, use_bin_type=True))
            except TypeError:
                pass
        return len(dumps(value)) - self._body_extra

    def _payload(self, w: Wire) -> int:
        hit = self._cache.get(id(w))
        if hit is not None and hit[0] is w:
            return hit[1]
        cls = type(w)
        names = self._names.get(cls)
        if names is None:
            names = self._names[cls] = field_names(cls)
        n = 1 + len(msgpack.packb(int(w.TAG))) + _array_head(len(names))
        for name in names:
            n += self._packed(getattr(w, name))
        if len(self._cache) >= self._max_cache:
            self._cache.clear()
        self._cache[id(w)] = (w, n)
        return n


# ---------------------------------------------------------------------------------------
# The simulator
# ---------------------------------------------------------------------------------------

C = TypeVar("C", bound=Core)

NodeFactory = Callable[[NodeId, Address, float, random.Random], C]
"""Makes a node's core at boot (and again at each restart): (node, address, now, rng)."""

SendHook = Callable[[float, NodeId, Address, Wire, int], None]
"""Called for every message sent: (now, src, dst address, message, encoded size)."""

DeliverHook = Callable[[float, NodeId, NodeId, Wire, int], None]
"""Called for every message delivered: (now, src, dst, message, encoded size)."""

StepHook = Callable[[float, NodeId], None]
"""Called after a node handled a message, a timer or an action (drain events here)."""

_DELIVER = 0
_TIMER = 1
_ACTION = 2


@dataclass(slots=True)
class _Node(Generic[C]):
    node: NodeId
    address: Address
    index: int
    factory: NodeFactory[C]
    core: C | None = None
    """None while the node is down."""
    timer: float | None = None
    boots: int = 0
    stalled_until: float = 0.0


@dataclass(slots=True)
class SimStats:
    """Totals over a run."""

    sent: int = 0
    bytes_sent: int = 0
    delivered: int = 0
    dropped: int = 0
    """Lost, partitioned away, or arrived at a crashed or unknown node."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Messages a core refused (``RemoteProtocolError``), by reason."""


class Simulation(Generic[C]):
    """Many nodes, one virtual clock. Build with ``add_node``, then ``run_until``."""

    def __init__(
        self,
        *,
        seed: int,
        latency: tuple[float, float] = (0.0002, 0.002),
        loss: float = 0.0,
        sizer: Callable[[Wire], int] | None = None,
    ) -> None:
        self.seed = seed
        self.now = 0.0
        self.network = InMemoryNetwork(random.Random(f"net/{seed}"), latency=latency, loss=loss)
        self.stats = SimStats()
        self.on_send: list[SendHook] = []
        self.on_deliver: list[DeliverHook] = []
        self.on_step: list[StepHook] = []
        self._size = sizer if sizer is not None else WireSizer()
        self._heap: list[tuple[float, int, int, Any, Any, Any]] = []
        self._seq = 0
        self._nodes: list[_Node[C]] = []
        self._by_id: dict[NodeId, _Node[C]] = {}
        self._by_address: dict[Address, _Node[C]] = {}

    # ----------------------------------------------------------------- building

    def add_node(
        self, node: NodeId, address: Address, factory: NodeFactory[C], *, at: float | None = None
    ) -> None:
        """Add a node that boots at ``at`` (default: now) with the core ``factory`` makes."""
        if node in self._by_id or address in self._by_address:
            raise LocalProtocolError(f"{node} or {address} is already in the simulation")
        n = _Node(node=node, address=address, index=len(self._nodes), factory=factory)
        self._nodes.append(n)
        self._by_id[node] = n
        self._by_address[address] = n
        self._schedule(self.now if at is None else at, lambda now: self._boot(n, now))

    def nodes(self) -> list[NodeId]:
        return [n.node for n in self._nodes]

    def is_up(self, node: NodeId) -> bool:
        return self._get(node).core is not None

    def is_stalled(self, node: NodeId) -> bool:
        return self._get(node).stalled_until > self.now

    def core(self, node: NodeId) -> C:
        """The core of a running node; ``LocalProtocolError`` while it is crashed."""
        core = self._get(node).core
        if core is None:
            raise LocalProtocolError(f"{node} is not running")
        return core

    # ----------------------------------------------------------------- faults and actions

    def crash(self, node: NodeId, at: float) -> None:
        """At ``at`` the node stops and loses its state; frames to it are dropped."""
        n = self._get(node)

        def crash(now: float) -> None:
            n.core = None
            n.timer = None

        self._schedule(at, crash)

    def restart(self, node: NodeId, at: float) -> None:
        """At ``at`` a crashed node boots again with a fresh core from its factory."""
        n = self._get(node)
        self._schedule(at, lambda now: None if n.core is not None else self._boot(n, now))

    def stall(self, node: NodeId, at: float, duration: float) -> None:
        """From ``at`` for ``duration`` the node handles nothing; then it sees ``now`` jump.

        Frames that arrive meanwhile wait, in order, as in a socket buffer."""
        n = self._get(node)

        def stall(now: float) -> None:
            n.stalled_until = max(n.stalled_until, now + duration)

        self._schedule(at, stall)

    def partition(self, groups: Iterable[Iterable[NodeId]], at: float | None = None) -> None:
        """Split the network into groups of nodes (unnamed nodes form one more group)."""
        addresses = [[self._get(x).address for x in g] for g in groups]
        self._schedule(
            self.now if at is None else at, lambda now: self.network.partition(addresses)
        )

    def heal(self, at: float | None = None) -> None:
        self._schedule(self.now if at is None else at, lambda now: self.network.heal())

    def set_loss(self, loss: float, at: float | None = None) -> None:
        def set_loss(now: float) -> None:
            self.network.loss = loss

        self._schedule(self.now if at is None else at, set_loss)

    def act(self, node: NodeId, at: float, fn: Callable[[C, float], None]) -> None:
        """At ``at`` call ``fn(core, now)`` on a running node (a command such as ``join`` or
        ``submit``), then send what its core wants sent."""
        n = self._get(node)

        def act(now: float) -> None:
            if n.core is None:
                return
            if n.stalled_until > now:
                self._schedule(n.stalled_until, act)
                return
            fn(n.core, now)
            self._after_step(n, n.core, now)

        self._schedule(at, act)

    def call_at(self, at: float, fn: Callable[[float], None]) -> None:
        """At ``at`` call ``fn(now)`` (measurements, checks); it must not send."""
        self._schedule(at, fn)

    # ----------------------------------------------------------------- running

    def run_until(self, t: float, stop: Callable[[], bool] | None = None) -> bool:
        """Process every event up to time ``t``; returns True if ``stop()`` became true
        first (checked after each event), with ``now`` at that event's time."""
        heap = self._heap
        nodes = self._nodes
        while heap and heap[0][0] <= t:
            at, _, kind, a, b, c = heapq.heappop(heap)
            self.now = at
            if kind == _DELIVER:
                self._deliver(nodes[a], b, c, at)
            elif kind == _TIMER:
                self._timer(nodes[a], b, at)
            else:
                a(at)
            if stop is not None and stop():
                return True
        self.now = max(self.now, t)
        return False

    def run_for(self, duration: float, stop: Callable[[], bool] | None = None) -> bool:
        return self.run_until(self.now + duration, stop)

    # ----------------------------------------------------------------- internals

    def _get(self, node: NodeId) -> _Node[C]:
        n = self._by_id.get(node)
        if n is None:
            raise LocalProtocolError(f"unknown node {node}")
        return n

    def _push(self, at: float, kind: int, a: Any, b: Any, c: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, a, b, c))

    def _schedule(self, at: float, fn: Callable[[float], None]) -> None:
        self._push(max(at, self.now), _ACTION, fn, None, None)

    def _boot(self, n: _Node[C], now: float) -> None:
        rng = random.Random(f"node/{self.seed}/{n.node}/{n.boots}")
        core = n.core = n.factory(n.node, n.address, now, rng)
        n.boots += 1
        n.timer = None
        n.stalled_until = 0.0
        self._after_step(n, core, now)

    def _deliver(self, n: _Node[C], src: NodeId, msg: Wire, now: float) -> None:
        core = n.core
        if core is None:
            self.stats.dropped += 1
            return
        if n.stalled_until > now:
            self._push(n.stalled_until, _DELIVER, n.index, src, msg)
            return
        stats = self.stats
        if self.on_deliver:
            size = self._size(msg)
            for hook in self.on_deliver:
                hook(now, src, n.node, msg, size)
        stats.delivered += 1
        try:
            core.receive(src, msg, now)
        except RemoteProtocolError as exc:
            stats.rejected[exc.reason] = stats.rejected.get(exc.reason, 0) + 1
        self._after_step(n, core, now)

    def _timer(self, n: _Node[C], due: float, now: float) -> None:
        core = n.core
        if core is None or n.timer != due:
            return  # the node crashed, or its core asked for another time since
        if n.stalled_until > now:
            self._push(n.stalled_until, _TIMER, n.index, due, None)
            return
        n.timer = None
        core.handle_timer(now)
        self._after_step(n, core, now)

    def _after_step(self, n: _Node[C], core: C, now: float) -> None:
        for hook in self.on_step:
            hook(now, n.node)
        network = self.network
        stats = self.stats
        by_address = self._by_address
        size_of = self._size
        send_hooks = self.on_send
        last_msg: Wire | None = None
        size = 0
        for dst, msg in core.take_outgoing():
            if msg is not last_msg:
                size = size_of(msg)
                last_msg = msg
            stats.sent += 1
            stats.bytes_sent += size
            for send_hook in send_hooks:
                send_hook(now, n.node, dst, msg, size)
            peer = by_address.get(dst)
            delay = network.decide(n.address, dst)
            if peer is None or delay is None:
                stats.dropped += 1
                continue
            self._push(now + delay, _DELIVER, peer.index, n.node, msg)
        due = core.next_timer()
        if due != n.timer:
            n.timer = due
            if due is not None:
                self._push(max(due, now), _TIMER, n.index, due, None)
