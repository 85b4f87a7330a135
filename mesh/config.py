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
    """Membership, failure detection and state gossip (``mesh/protocol/membership.py``).

    SWIM probing with Lifeguard-style suspicion, infection-style dissemination of updates
    and a periodic digest-then-delta exchange. ``n`` below is the number of live members
    (alive or suspect, this node included). The defaults are the LAN preset, measured with
    ``benchmarks/sim_membership.py`` at N = 10, 100 and 1000 with 5% loss.
    """

    probe_interval_s: float = 0.4
    """One probe per period. A crashed node is probed by about ``n / n`` = one peer per
    period, so the wait for its first failed probe is ~Exp(period): 0.4 s keeps that tail
    under 2 s while a ping and an ack every 0.4 s cost well under 1 kB/s."""

    probe_timeout_s: float = 0.2
    """Wait for a direct ack before asking others; LAN round trips are under a millisecond,
    the rest is room for a busy Python event loop."""

    indirect_checks: int = 3
    """Peers asked to probe when the direct ack is missing (SWIM's k). With 5% loss a probe
    then fails falsely with probability ~1e-3, and each false suspicion gets refuted."""

    suspicion_mult: float = 3.5
    """Suspicion timeout floor = mult * max(log10(n), 2) * probe_interval (2.8 s up to
    n = 100, 4.2 s at n = 1000): long enough for a node whose loop stalled for 2 s to hear
    of it and spread its refutation, short enough to declare a crash dead everywhere
    within 7 s (n = 100) and 10 s (n = 1000). The log floor of 2 keeps small meshes, where
    many confirmations arrive at once, from convicting a 2 s stall."""

    suspicion_max_mult: float = 2.0
    """Lifeguard: a suspicion starts at max_mult times the floor and shrinks towards the
    floor as independent suspicions arrive (``indirect_checks`` of them reach the floor), so
    one confused prober alone convicts slowly."""

    gossip_interval_s: float = 0.15
    """Dissemination round. Push gossip to ``gossip_fanout`` peers needs ~log_4(n) + ln(n)/3
    rounds (about 6-7 at n = 1000 measured), so 0.15 s keeps record convergence under 1 s;
    shorter rounds buy little latency for many more (smaller) messages."""

    gossip_fanout: int = 3
    """Peers each round's updates go to; 3 reaches n = 1000 within 10 rounds under 5% loss."""

    retransmit_mult: float = 2.5
    """Each update is sent ceil(mult * ln(n + 1)) times by every node that learns it by
    gossip (12 at n = 100, 18 at n = 1000): the chance that a given node misses it is then
    about exp(-0.95 * count), ~1e-5 at n = 100, so under 1% of changes wait for
    anti-entropy to reach their last node; a smaller count shows up in the p99."""

    retransmit_min: int = 9
    """Floor of the retransmit count: in small meshes ln(n) is too small a margin
    against loss; 9 is three rounds at fanout 3."""

    max_updates_per_message: int = 8
    """Updates piggybacked per message, least-sent first; keeps gossip frames small."""

    anti_entropy_interval_s: float = 5.0
    """Floor of the period of the digest exchange with one random peer; see next field."""

    anti_entropy_s_per_member: float = 0.02
    """The digest grows with n (~20 bytes a member), so its period grows too:
    max(floor, n * this) is 20 s at n = 1000, ~2 kB/s per node."""

    reconnect_interval_s: float = 1.5
    """How often one dead or purged node is pinged with its own death claim: if it lives
    (a healed partition, a restart) it refutes and rejoins. Both sides of a healed
    partition do this, so the mesh is whole again within about this long plus a few gossip
    rounds; one small ping every 1.5 s costs nothing next to the gossip itself."""

    join_retry_s: float = 2.0
    """Seeds are contacted again this often while no other member is known alive."""

    dead_grace_s: float = 30.0
    """A dead or departed node stays listed this long (so every part sees it go) before
    it is purged."""

    tombstone_s: float = 300.0
    """After a purge, stale gossip about the node at its old incarnation is refused this
    long, so a laggard peer cannot resurrect a ghost; a refutation from the node itself
    is accepted at any time."""

    stall_threshold_s: float = 1.0
    """``now`` past the requested timer by more than this means this node's own loop
    stalled: suspicions it holds restart, its outstanding probe convicts nobody, and it
    refutes pre-emptively. LAN event loops hiccup for tens of milliseconds, not seconds."""

    record_min_interval_s: float = 1.0
    """Own record changes (load) are coalesced to at most one version per this interval."""

    record_updates_per_s: float = 1.5
    """Cluster-wide budget of record versions per second: each costs every node about
    retransmit count * record size (~250 B; ~4 kB at n = 1000), so a node publishes load
    at most every max(record_min_interval_s, n / budget) s (~67 s at n = 100, ~11 min at
    n = 1000). Load is coarse by design; 1.5/s keeps gossip under 50 kbps at n = 100
    and the total under 150 kbps at n = 1000."""

    max_members: int = 4096
    """Members (any state) and tombstones each kept at most: gossip naming more unknown
    nodes is refused and counted, so no peer can grow this node's memory without bound."""

    max_events: int = 10_000
    """Undrained events kept; older ones are dropped (and counted) if no one takes them."""

    max_relays: int = 256
    """Indirect probes relayed for others at once; more requests are refused."""

    @classmethod
    def lan(cls) -> Self:
        return cls()

    @classmethod
    def local(cls) -> Self:
        """Several nodes on one machine: loopback is fast, but the CPUs are shared."""
        return cls(probe_timeout_s=0.3, stall_threshold_s=1.5, record_min_interval_s=0.5)

    @classmethod
    def test(cls) -> Self:
        """Fast tests: everything ten times quicker, grace periods short."""
        return cls(
            probe_interval_s=0.1,
            probe_timeout_s=0.04,
            gossip_interval_s=0.02,
            anti_entropy_interval_s=0.5,
            anti_entropy_s_per_member=0.0,
            reconnect_interval_s=0.5,
            join_retry_s=0.2,
            dead_grace_s=2.0,
            tombstone_s=10.0,
            stall_threshold_s=0.3,
            record_min_interval_s=0.0,
            record_updates_per_s=1e9,
            max_members=256,
            max_events=1000,
            max_relays=32,
        )


@dataclass(frozen=True, kw_only=True)
class ContractConfig:
    """Contract-net task allocation (``mesh/protocol/contract.py``)."""

    candidates: int = 3
    """d, the candidates one call for proposals goes to (2..4). Two choices already cut the
    worst queue from log n / log log n to log log n; a third absorbs one silent or busy
    candidate without a second round. Messages per task grow as 3d + 2."""

    reply_timeout_s: float = 0.25
    """How long an initiator waits for bids before deciding with what it has. A LAN round
    trip is under 1 ms; a loaded node may take a few event-loop turns to answer a batch."""

    reservation_s: float = 1.0
    """How long a bidder holds the slots it offered. Several reply timeouts, so that an
    award that arrives late still finds its slots, yet short enough that a lost reject
    blocks nothing for long."""

    lease_s: float = 30.0
    """An award lapses if the winner sends no progress for this long; the task is then
    announced again. Membership notices a dead winner within seconds; the lease only covers
    a winner that lives but lost the task (restart, partition), so it can be long, and
    tasks shorter than a lease never cost a progress message."""

    progress_interval_s: float = 10.0
    """How often a winner renews the leases it holds that could lapse before its next round
    (one message per initiator). A third of the lease: one may be lost with a round to
    spare."""

    stall_s: float = 1.0
    """A timer of this core served later than this means the node itself stalled (a
    blocked loop, SIGSTOP, a suspended VM): tasks awarded here that have not started wait
    for their initiator to say they are still ours (``LeaseQuery``) before they run, and
    awards on bids made before the stall are declined. It must stay below the quickest way
    an initiator takes a task back from a silent winner, which is membership declaring it
    dead (about 3 s at the earliest on a LAN), not the lease. While tasks wait here the
    core asks for a timer every half of this, so no stall of over 1.5 times it goes unseen."""

    stall_reply_s: float = 1.0
    """How long a node that stalled waits for an initiator's ``LeaseReply`` before giving
    the tasks it asked about back (a ``Decline``): many round trips, and room to read the
    backlog a stall leaves. Nothing is lost if it gives them back needlessly: the initiator
    places them again at once, or when their lease lapses."""

    batch_delay_s: float = 0.002
    """How long a submitted task waits for others to share its call for proposals, while
    auctions of this initiator are open (with none open it goes at once: nothing else is
    coming that it could wait for). Batching is what throughput rides on; 2 ms is invisible
    next to any real task."""

    lazy_delay_s: float = 0.005
    """How long a message nothing waits for (a reject, a confirm) may wait to share a write
    with the next message to the same peer: a confirm goes with a short task's result, a
    reject with the next call for proposals. A write costs as much as the rest of a message
    (on loopback the sender's system call does the receiver's network work); 5 ms holds a
    rejected bidder's slot a little longer and delays nothing else."""

    max_batch: int = 256
    """Most tasks in one call for proposals: bounds a frame and the work of one bid."""

    max_auctions: int = 8
    """Auctions one initiator keeps open at once; more tasks wait in its queue. Several in
    flight keep placement going while bids travel, without flooding the mesh."""

    max_offer: int = 256
    """Most slots one bid offers, whatever the batch size: a whole batch of short tasks
    can land in one round."""

    queue_horizon_s: float = 0.5
    """Beyond ``queue_per_slot``, a bid also offers every slot that would complete within
    this many seconds: half a second of queued no-op tasks costs no visible latency, and
    lets one call for proposals place hundreds of them."""

    queue_per_slot: int = 2
    """Tasks a participant offers to queue per slot beyond those running. Some queue hides
    the award round trip; a deep one binds tasks early to a node that may turn out slow."""

    bind_ahead_s: float = 0.1
    """Late binding: an initiator binds to a pool worker only the tasks it would start
    within this long (at least one per lane), and gives it more as its results come back.
    Tasks shorter than this queue a little at their worker to hide the refill's round
    trip; longer ones are bound only when a lane frees, so a burst spreads in proportion
    to each node's real speed and no slow node holds work a fast one could finish first."""

    recruit_s: float = 0.05
    """A group whose pool would take longer than this to work through its queue calls for
    proposals from further capable nodes (those outside the pool), to add them."""

    recruit_parallel: int = 4
    """Calls for proposals one group keeps open at once while it recruits."""

    history_half_life_s: float = 120.0
    """How fast a node's runtime history for a task fades into its estimate-based prior:
    a measurement this old counts half. A node that was slow once wins work again."""

    widen_rounds: int = 2
    """Rounds of calls to further candidates when nobody bid, before the task fails."""

    silence_patience_s: float = 30.0
    """How long a task whose candidates only stayed silent (no bid, no refusal) keeps being
    offered to them again, each round waiting twice as long, before it fails. Silence from
    live peers means load or loss, not inability; membership removes the dead ones."""

    max_attempts: int = 5
    """Placements of one task (lease lapses, winner deaths) before it fails as lost."""

    default_runtime_s: float = 1.0
    """Runtime assumed for a task with no history and no estimate from its submitter."""

    runtime_alpha: float = 0.3
    """Weight of the newest measurement in the runtime average a bid is made from: adapts
    in a few runs, yet one outlier moves it by under a third."""

    bandwidth_bytes_per_s: float = 100e6
    """Transfer rate a bid assumes for inputs it lacks: gigabit Ethernet after overhead."""

    record_limit: int = 1000
    """Auction records kept for ``mesh-node why`` (the most recent tasks)."""

    done_limit: int = 65536
    """Finished task ids remembered to drop duplicate results; a duplicate older than this
    many tasks is rejected as unknown instead, so it is never delivered twice either way."""

    @classmethod
    def lan(cls) -> Self:
        return cls()

    @classmethod
    def local(cls) -> Self:
        """Loopback: replies in microseconds, transfers at memory speed."""
        return cls(
            reply_timeout_s=0.1,
            reservation_s=0.5,
            lease_s=10.0,
            progress_interval_s=3.0,
            stall_s=1.5,  # as membership's: shared CPUs make loops lag
            stall_reply_s=0.5,
            batch_delay_s=0.001,
            bandwidth_bytes_per_s=1e9,
        )

    @classmethod
    def test(cls) -> Self:
        """Short enough that a test of a lapse or an expiry runs in well under a second."""
        return cls(
            reply_timeout_s=0.05,
            reservation_s=0.2,
            lease_s=1.0,
            progress_interval_s=0.3,
            stall_s=0.2,
            stall_reply_s=0.2,
            batch_delay_s=0.0,
            lazy_delay_s=0.0,
            bandwidth_bytes_per_s=1e9,
            silence_patience_s=2.0,
            bind_ahead_s=0.02,
        )


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """The daemon: frames, transport queues, executor, object store (``node/``)."""

    max_frame_bytes: int = 272 * 1024 * 1024
    """Largest frame accepted from a peer: a 256 MiB array argument plus headroom for its
    envelope. Frames travel in chunks, so a big one never holds up control messages; the
    bound is what keeps a bad peer from making a node allocate without limit."""

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

    ws_unacked_timeout_s: float = 3.0
    """A peer connection whose sent data goes unacknowledged this long is aborted by the
    kernel (``TCP_USER_TIMEOUT``; a dial whose SYNs go unanswered fails after it too). A
    live peer's kernel acknowledges in milliseconds, even with its CPUs saturated. Without
    this bound, frames to a peer cut off for ten seconds wait in TCP's retransmission
    back-off (6.4 s between tries by then) and a healed partition stays split that long;
    with it, the next frame dials afresh and gets through as soon as the path is back."""

    ws_heartbeat_s: float = 10.0
    """Websocket ping interval; a connection whose pong does not come back within half of
    it is closed. Catches peers that vanished without closing (power loss, cable). Failure
    detection proper is gossip's job; this only frees the connection."""

    ws_close_timeout_s: float = 2.0
    """Bound on the websocket closing handshake, so shutting down never hangs on a peer."""

    wire_sealed: bool = True
    """Encrypt and authenticate every peer connection and every object body sent to another
    machine (AES-GCM under per-connection keys: ``mesh.protocol.sealing``), and refuse peers
    that do not. Sealing costs under a tenth of the CPU a transfer takes otherwise; False is
    for measuring that, on a network where every machine is trusted. Such a node talks only
    to others with sealing off."""

    peer_refused_retry_s: float = 60.0
    """After a peer's hello was refused (another protocol version, or not sealing when this
    node seals), frames for it are dropped without dialling it again for this long, so an
    incompatible node costs one log line and one connection a minute, not a stream of them;
    a peer upgraded meanwhile is reached once this has passed."""

    mdns_cooperating: bool = True
    """Register the mDNS service without probing for name conflicts. Instance names are
    derived from node ids, which are unique, so probing (three queries before announcing:
    peers see a new node after about 1.2 s instead of 0.2 s) buys nothing."""

    # --- executor and object store (node/executor.py, node/store.py) ---

    executor_prestart: bool = True
    """Start every worker process in the background as soon as the executor opens, so the
    first tasks do not wait for a Python start-up (about 0.2 s each); the daemon itself does
    not wait for them. False starts workers only when tasks arrive."""

    executor_idle_exit_s: float | None = 60.0
    """A worker process that has waited this long for a task exits (the next task starts a
    new one, about 0.2 s): an idle node then holds only the daemon, some 60 MB, instead of
    a Python with numpy and the task modules per slot. A minute keeps workers warm through
    the pauses of interactive use. None: workers stay until the node stops."""

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

    store_memory_target_bytes: int | None = None
    """Most bytes of objects the store keeps in memory (with the shared-memory segments it
    pools for reuse). Above it the least recently used objects are written to
    ``store_spill_dir`` and read back when next asked for; nothing still referenced is
    evicted. None: a quarter of this machine's memory, measured at start, which leaves room
    for the workers that produce the results."""

    store_spill_dir: str | None = None
    """Where objects above the memory target go, one file each, removed with its object
    and, for a node that died, when a node starts. None: ``$XDG_CACHE_HOME/mesh/spill``
    (by default ``~/.cache/mesh/spill``). Put it on a disk, not on a tmpfs, or spilling
    only moves the bytes from one memory to another."""

    store_spill_limit_bytes: int | None = None
    """Most bytes spilled at once. None: as much as the disk takes; a put fails
    (``ObjectStoreFullError``) only when the memory target is reached and the spill disk
    is full too. 0 turns spilling off: the memory target is then a limit."""

    store_pool_idle_s: float = 60.0
    """Segments of released objects are kept and written again for the next objects of
    about their size: fresh shared-memory pages cost the kernel a zeroing each, reused
    ones nothing. Those unused for this long are given back to the system (checked every
    ``orphan_sweep_interval_s``); the pool also yields to objects at the memory target."""

    store_segment_min_bytes: int = 1024 * 1024
    """Stored objects from this size on are handed to processes on the same machine as a
    shared-memory segment they map, instead of being copied through a socket. Below 1 MiB
    the socket's copies cost less than creating, mapping and removing a file."""

    orphan_sweep_interval_s: float = 30.0
    """How often the node removes shared-memory files that crashed processes left behind
    (a node killed with SIGKILL holds its objects' segments, which nothing else frees) and
    client uploads never submitted. A listing of ``/dev/shm`` costs well under a
    millisecond; every half minute keeps a dead node's memory from lingering."""

    host_id: str | None = None
    """Identity of this machine's shared memory (``mesh.runtime.shm.host_id``): peers with the
    same value map each other's object segments. None: derived from the kernel's boot id
    and ``/dev/shm``. A value of its own makes a node treat every peer as remote."""

    # --- daemon, HTTP API, client (node/daemon.py, node/api.py, mesh/client/) ---

    api_auth_skew_s: float = 60.0
    """A signed HTTP request whose timestamp is further than this from the node's clock is
    refused; it also bounds how long nonces are remembered against replays. Clocks on a LAN
    agree within milliseconds; a minute forgives a laptop without NTP."""

    api_nonce_cache: int = 100_000
    """Most request nonces remembered within the skew window. Past it the oldest are
    forgotten and requests older than the newest forgotten one are refused, so memory stays
    bounded at a few MB however fast clients sign."""

    api_max_body_bytes: int = 1024 * 1024 * 1024
    """Largest client websocket message (``/v1/session``): a batch of submissions with array
    arguments. 1 GiB admits any argument a single machine would sensibly ship; only a
    client that proved the key gets a session."""

    api_max_task_timeout_s: float = 7 * 24 * 3600.0
    """Largest run-time ``timeout`` a submission may ask for: a week. Longer is a mistake
    (or an attack on a timer) rather than a job; a task without a timeout may run forever."""

    api_max_wait_s: float = 300.0
    """Largest ``wait`` of ``POST /v1/tasks`` and ``GET /v1/tasks/{id}?wait=``: a long poll
    holds a connection, so it is bounded; a client wanting longer polls again (the CLI
    does). Five minutes stays under the idle timeouts of common proxies."""

    api_max_nesting: int = 32
    """Deepest nesting of lists and maps in submitted arguments (JSON or msgpack). Real
    arguments nest a few levels; the bound keeps a crafted body from exhausting the
    interpreter's recursion limit anywhere on the way."""

    http_submit_body_bytes: int = 64 * 1024 * 1024
    """Largest body of ``POST /v1/tasks`` (JSON arguments). JSON is a poor carrier for big
    arrays (the client's session sends those); 64 MiB is a large JSON document. A larger
    declared ``Content-Length`` is refused with 413 before a byte is read."""

    http_small_body_bytes: int = 64 * 1024
    """Largest body of every other request: none of them needs one."""

    http_body_timeout_s: float = 60.0
    """Bound on reading one request body after its headers were accepted: 64 MiB over a
    congested 10 Mbit link still fits; a body trickled slower than that is dropped (408)."""

    http_header_timeout_s: float = 10.0
    """A new connection that has not sent a complete request head within this long is
    closed (slowloris). A client sends its head at once; ten seconds forgives a stalled
    laptop. Later requests on a kept-alive connection are bounded by the keep-alive timeout."""

    http_keepalive_timeout_s: float = 75.0
    """An idle kept-alive connection (or one whose next request head is incomplete) is
    closed after this long. Longer than aiohttp's client-side 15 s, so a client never
    reuses a connection the node is closing at that moment."""

    http_max_connections_per_address: int = 256
    """Open connections one peer address may hold; more are closed at once (counted). Every
    node on a machine shares one address with the others, and each holds a websocket and a
    small pool for object fetches; 256 leaves room for many, while bounding what one
    address can make this node hold."""

    http_max_half_open: int = 1024
    """Connections from all addresses that have not yet sent a complete request head; more
    are closed at once (counted). Together with ``http_header_timeout_s`` it bounds the
    sockets a slowloris from many addresses can pin."""

    object_lease_s: float = 60.0
    """How long a stored result outlives the last renewal of its last lease
    (``node.refs``): the nodes that refer to an object renew every third of this, so two
    lost renewals in a row cost nothing, and the objects of a node that died are freed this
    long after."""

    session_ref_grace_s: float = 30.0
    """How long the references of a client session that ended are kept: a client that
    reconnects within it finds its objects."""

    api_ref_ttl_s: float = 600.0
    """How long a result handed out over JSON (``POST /v1/tasks``, ``GET /v1/tasks/{id}``)
    is kept when nobody releases it: time for a script or a person to use the reference."""

    lineage_max_objects: int = 100_000
    """Objects whose recipe (the task that made them) this node keeps, so that it can make
    them again when their holder dies (``node.lineage``); the oldest are forgotten first. A
    recipe is the task's call: its inline arguments are at most ``store_threshold_bytes``."""

    lineage_max_rebuilds: int = 3
    """How often one object is made again before its loss is final."""

    lineage_max_depth: int = 32
    """How long a chain of lost objects is made again (an object whose recipe's inputs are
    lost too, and so on)."""

    results_kept: int = 100_000
    """Finished tasks remembered for ``GET /v1/tasks/{id}`` and ``why``: a few hundred bytes
    each, so 100k (a busy hour) costs tens of MB at most."""

    load_gossip_interval_s: float = 0.5
    """How often a changed load is written into the node's gossiped record. Load changes
    with every task; gossiping each change would flood the mesh, and bids carry the exact
    queue anyway, so gossip only needs to steer which peers get asked."""

    shutdown_grace_s: float = 30.0
    """On SIGTERM, how long running tasks get to finish before the node leaves anyway;
    their initiators then place them again. Long enough for typical tasks, short enough
    for a service manager's stop timeout (systemd's default is 90 s)."""

    object_fetch_timeout_s: float = 300.0
    """Bound on fetching one referenced argument from its holder: 256 MiB over a congested
    100 Mbit link takes about 25 s, ten times that still means the holder is stuck."""

    @classmethod
    def lan(cls) -> Self:
        return cls()

    @classmethod
    def local(cls) -> Self:
        return cls()

    @classmethod
    def test(cls) -> Self:
        """Short HTTP timeouts and a small connection cap, so tests of slow or half-open
        connections finish in seconds; still generous for a loaded test machine."""
        return cls(
            http_body_timeout_s=2.0,
            http_header_timeout_s=2.0,
            http_max_connections_per_address=64,
            object_lease_s=3.0,
            session_ref_grace_s=1.0,
            store_memory_target_bytes=512 * 1024 * 1024,
        )


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
