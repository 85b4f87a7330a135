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
