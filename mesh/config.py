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
