"""Every timing and limit of Mesh, in one place, with the reason for each default.

``MeshConfig.lan()`` is for real networks, ``.local()`` for several nodes on one machine,
``.test()`` for fast tests. Each part owns a section (a frozen dataclass) with the same
three presets; ``MeshConfig`` bundles them. Times are seconds, sizes bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Self


@dataclass(frozen=True, kw_only=True)
class MembershipConfig:
    """Membership, failure detection and state gossip (``mesh/membership.py``)."""

    # fields: owned by the membership core

    @classmethod
    def lan(cls) -> Self:
        return cls()

    @classmethod
    def local(cls) -> Self:
        return cls()

    @classmethod
    def test(cls) -> Self:
        return cls()


@dataclass(frozen=True, kw_only=True)
class ContractConfig:
    """Contract-net task allocation (``mesh/contract.py``)."""

    # fields: owned by the contract core

    @classmethod
    def lan(cls) -> Self:
        return cls()

    @classmethod
    def local(cls) -> Self:
        return cls()

    @classmethod
    def test(cls) -> Self:
        return cls()


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """The daemon: frames, transport queues, executor, object store (``node/``)."""

    max_frame_bytes: int = 64 * 1024 * 1024
    """Largest frame accepted from a peer. Larger payloads are chunked; a bound is what
    keeps a bad peer from making a node allocate without limit."""

    max_clock_skew_s: float = 120.0
    """Frames whose timestamp is further than this from the local wall clock are refused;
    it also bounds how long replay state must be kept. LAN clocks under NTP agree to ms."""

    # --- transport and discovery (node/transport_ws.py, node/discovery.py) ---

    ws_chunk_bytes: int = 1024 * 1024
    """Frames above ``ws_small_frame_bytes`` travel in pieces of at most this size, and small
    frames go between the pieces, so a control message waits behind at most one piece (about
    1 ms on a 1 GB/s link). Big enough that the per-message cost stays under 1% of a piece."""

    ws_small_frame_bytes: int = 64 * 1024
    """Frames up to this size are control traffic: they overtake big frames and are coalesced,
    several to one websocket message, up to this size. Gossip and contract messages are a few
    hundred bytes; 64 KiB still coalesces hundreds of them per message."""

    ws_send_queue_frames: int = 4096
    """Small frames queued per peer before ``send`` waits: about a second of the heaviest
    control traffic, so a peer that stops reading pushes back on the producer quickly."""

    ws_send_queue_bytes: int = 256 * 1024 * 1024
    """Bytes of big frames queued per peer before ``send`` waits (one frame is always let
    in, whatever its size). Four 64 MiB arrays keep a gigabit link busy without letting a
    producer fill the memory."""

    ws_recv_queue_frames: int = 8192
    """Received frames waiting for ``recv`` before the readers stop reading, which pushes
    back on the senders through TCP."""

    ws_recv_queue_bytes: int = 512 * 1024 * 1024
    """Received bytes waiting for ``recv`` before the readers stop reading (one frame is
    always let in). Bounds what fast senders can make this node hold."""

    ws_reassembly_bytes: int = 256 * 1024 * 1024
    """Bytes of half-received big frames held at once, over all connections; a connection
    that would exceed it waits before starting its next big frame. At least
    ``max_frame_bytes`` is always allowed, so any legal frame gets through."""

    ws_connect_timeout_s: float = 5.0
    """Bound on opening a peer websocket and exchanging hellos. A LAN answers in
    milliseconds; 5 s covers a peer busy with a CPU-heavy task or an ARP retry."""

    ws_dial_attempts: int = 3
    """Dials to an unreachable peer before the frames queued for it are dropped (and
    counted). The protocols above tolerate loss; holding frames longer only delays them."""

    ws_redial_backoff_s: float = 0.2
    """Wait after a failed dial, doubled after each further failure. Short enough that a
    restarting peer is reached again within a second, long enough not to spin."""

    ws_send_timeout_s: float = 30.0
    """Longest ``send`` waits for room in a full queue before the frame is dropped and
    counted: a 256 MiB queue drains in about 2 s at gigabit speed, so 30 s means the peer
    has stopped reading, and the producer must not hang on it."""

    ws_heartbeat_s: float = 10.0
    """Websocket ping interval; a connection whose pong does not come back within half of
    it is closed. Catches peers that vanished without closing (power loss, cable). Failure
    detection proper is gossip's job; this only frees the connection."""

    ws_close_timeout_s: float = 2.0
    """Bound on the websocket closing handshake, so shutting down never hangs on a peer."""

    mdns_cooperating: bool = True
    """Register the mDNS service without probing for name conflicts. Instance names are
    derived from node ids, which are unique, so probing (three queries 250 ms apart, about
    1.2 s before peers see the node) buys nothing."""

    # --- executor and object store (node/executor.py, node/store.py) ---

    executor_prestart: bool = True
    """Start every worker process in the background as soon as the executor opens, so the
    first tasks do not wait for a Python start-up (about 0.2 s each); the daemon itself does
    not wait for them. False starts workers only when tasks arrive."""

    executor_shm_threshold_bytes: int = 1024 * 1024
    """Messages to and from a worker larger than this travel through a shared-memory segment
    instead of the pipe: one copy into the segment, none out of it. Below 1 MiB the pipe's
    copies cost less than creating and mapping a segment."""

    executor_stop_grace_s: float = 2.0
    """How long workers get to exit after being asked to stop before they are killed. A
    worker finishes the task it is running only if that fits; stopping must stay prompt."""

    executor_worker_start_timeout_s: float = 60.0
    """A worker that has not said it is ready after this long is killed and replaced. Start
    imports the task modules, which is slow on a loaded machine or a cold disk."""

    store_threshold_bytes: int = 64 * 1024
    """Results larger than this stay in the object store of the node that made them and the
    submitter gets an ``ObjectRef``; smaller ones travel with the result message, where a
    reference and a second round trip would cost more than the bytes."""

    store_limit_bytes: int | None = None
    """Most bytes the object store holds; a put beyond it fails rather than evicting
    anything still referenced. None: a quarter of this machine's memory, measured at start,
    which leaves room for the workers that produce the results."""

    # --- daemon, HTTP API, client (node/daemon.py, node/api.py, mesh/client.py) ---

    @classmethod
    def lan(cls) -> Self:
        return cls()

    @classmethod
    def local(cls) -> Self:
        return cls()

    @classmethod
    def test(cls) -> Self:
        return cls()


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """All of a node's settings."""

    membership: MembershipConfig = field(default_factory=MembershipConfig.lan)
    contract: ContractConfig = field(default_factory=ContractConfig.lan)
    node: NodeConfig = field(default_factory=NodeConfig.lan)

    @classmethod
    def lan(cls) -> Self:
        """Real networks: tolerant of jitter and loss."""
        return cls(
            membership=MembershipConfig.lan(), contract=ContractConfig.lan(), node=NodeConfig.lan()
        )

    @classmethod
    def local(cls) -> Self:
        """Several nodes on one machine: loopback latency, shared CPUs."""
        return cls(
            membership=MembershipConfig.local(),
            contract=ContractConfig.local(),
            node=NodeConfig.local(),
        )

    @classmethod
    def test(cls) -> Self:
        """Fast tests: short timeouts, small limits."""
        return cls(
            membership=MembershipConfig.test(),
            contract=ContractConfig.test(),
            node=NodeConfig.test(),
        )
