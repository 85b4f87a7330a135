"""The node daemon: wires config, discovery, transport, cores, executor, store and API.

One ``Daemon`` is one running ``mesh-node``. It binds the node's single port (peer
websocket, HTTP API and client sessions share it), runs the node's protocol core
(``mesh.protocol.node_core.NodeCore``: membership, contract, the load it gossips) with
``mesh.runtime.driver.Driver`` over the websocket transport, gives it seeds (``--join``) and mDNS
finds, turns its events into work for the executor, keeps large results in the object
store, and fetches referenced arguments from their holders. Every call into the core goes
through the driver (``Driver.command``), which supplies ``now``: the daemon reads no
clock for the core.

Shutdown (SIGTERM/SIGINT, see ``run_node``) is graceful: stop bidding, give back queued
tasks, let running tasks finish within the grace period, leave the mesh, unregister from
mDNS, close everything.

What it may not do: decide placement (the contract core does), interpret frames (the
codec and cores do), or block the event loop (probing runs in a thread, tasks in worker
processes).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import random
import secrets
import signal
import socket
import sys
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Final

import aiohttp
import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mesh import __version__
from mesh.client.local import ReadyRecord
from mesh.config import MeshConfig, NodeConfig
from mesh.errors import ErrorInfo, FailureKind, LocalProtocolError, MeshError, ObjectLostError
from mesh.protocol.args import find_in_call, walk_call_async
from mesh.protocol.codec import VERSION as FRAME_VERSION
from mesh.protocol.codec import Buffer, Chunks, Codec, key_fingerprint, loads
from mesh.protocol.contract import (
    CancelExecution,
    Completed,
    Contract,
    Execute,
    Failed,
    TaskSpec,
)
from mesh.protocol.core import MemberState
from mesh.protocol.membership import (
    MemberDown,
    MemberPurged,
    Membership,
    MembershipEvent,
    MemberSuspect,
    MemberUp,
)
from mesh.protocol.messages import (
    Address,
    NodeId,
    ObjectRef,
    Requirements,
    Segment,
    TaskCall,
    TaskId,
)
from mesh.protocol.node_core import NodeCore
from mesh.protocol.session import Outcome
from mesh.runtime.auth import key_bytes
from mesh.runtime.driver import Driver
from mesh.runtime.http import (
    DEFAULT_PORT,
    fetch_body,
    fetch_bytes,
    fetch_object,
    normalise_url,
    request_json,
)
from mesh.runtime.shm import check_object
from mesh.runtime.shm import host_id as machine_host_id
from node.api import INTERNAL_ERROR, LEASES_PATH, Api, Deliver, jsonable, result_json
from node.capabilities import probe
from node.cores import HostSlots, local_pool, slot_speed
from node.dashboard.events import EventLog, clip
from node.dashboard.web import SLOW_READER
from node.executor import Executor
from node.http_guard import GuardedSite
from node.join import Invites
from node.lineage import Lineage, Recipe, Retry, Runs
from node.refs import Holds, Leases, refs_in
from node.store import (
    LEND_S,
    ObjectStore,
    OwnedSegment,
    nbytes_of,
    remove_orphan_segments,
    remove_orphan_spill,
)
from node.transport_ws import WS_PATH, WsTransport
from tasks import DEFAULT_MAX_RETRIES, Registry

log = logging.getLogger(__name__)

BANDWIDTH_SAMPLE_BYTES: Final = 1 << 20
"""Fetched bodies from this size up tell the contract core the rate from their holder."""

SHARED_MEMORY_BYTES_PER_S: Final = 1e11
"""The rate bids count for an object held on this machine: it is mapped, not copied."""

_PREPARED: Final = (OwnedSegment, ObjectRef, np.ndarray)
"""Arguments a submission treats specially: uploads, references and arrays (``_prepare``)."""


LEASE_BATCH: Final = 1000
"""Object ids per lease message: well inside ``http_small_body_bytes``."""


def _error_event(error: ErrorInfo) -> dict[str, str]:
    """A task's failure as its ``end`` event carries it (long texts cut)."""
    return {
        "kind": str(error.kind),
        "exc_type": error.exc_type,
        "message": clip(error.message),
        "traceback": clip(error.traceback),
    }


def _task_error(exc_type: str, message: str) -> ErrorInfo:
    """A failure of a task's run that the node names itself."""
    return ErrorInfo(kind=FailureKind.TASK, message=message, exc_type=exc_type)


class StartError(MeshError):
    """The node cannot start (port in use, address not on this machine); one line for the
    operator."""


@dataclass(frozen=True, kw_only=True)
class NodeOptions:
    """How to run one node; what ``mesh-node start`` parses."""

    key: str
    host: str | None = None
    """Address to listen on and advertise; None: all interfaces, advertising the primary one."""
    port: int = DEFAULT_PORT
    name: str | None = None
    joins: tuple[str, ...] = ()
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] = ()
    slots: int | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    task_modules: tuple[str, ...] = ()
    without: tuple[str, ...] = ()
    config: MeshConfig = field(default_factory=MeshConfig.lan)
    grace_s: float | None = None
    """Overrides ``NodeConfig.shutdown_grace_s``."""
    seed: int | None = None
    """Seeds the cores' random generator (reproducible runs); None: from the OS."""
    ready_file: str | None = None
    """Where to write the ``ReadyRecord`` (one JSON object) once the node serves."""


@dataclass(slots=True, eq=False)
class _Pending:
    """A task this node initiated and has not delivered yet (see ``node.lineage``)."""

    task_id: TaskId
    """Its id as its submitter knows it; each run has an id of its own (``runs.current``)."""
    name: str
    deliver: Deliver
    temp_objects: list[str]
    call: TaskCall
    spec: TaskSpec
    retry: Retry
    runs: Runs
    group: str
    """The submissions that came with it (for the dashboards)."""
    deterministic: bool = True
    chain: tuple[str, ...] = ()
    """The lost objects this run makes again, outermost first (a rebuild's own chain)."""
    placed: bool = False
    """A run is in the contract net (else it waits for a lost input to be made again)."""
    done: asyncio.Event | None = None


def primary_address() -> str:
    """The address other machines most likely reach this one at (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            addr: str = s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
    return addr


def bind_socket(host: str | None, port: int) -> socket.socket:
    """Listen on ``host:port``; a ``StartError`` with a one-line reason if impossible."""
    where = host or "0.0.0.0"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((where, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartError(f"port {port} is already in use on {where}") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise StartError(f"cannot listen on {where}: not an address of this machine") from None
        if isinstance(exc, socket.gaierror):
            raise StartError(f"cannot listen on {where}: unknown host") from None
        raise StartError(f"cannot listen on {where}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class Daemon:
    """One node. ``await run(stop)`` serves until ``stop`` is set, then shuts down."""

    def __init__(self, options: NodeOptions, *, out: Callable[[str], None] = print) -> None:
        self.options = options
        self.mesh_config = options.config
        self.config: NodeConfig = options.config.node
        self._out = out
        self._key = key_bytes(options.key)
        self._rng = random.Random(options.seed if options.seed is not None else os.urandom(16))
        self._id_prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._pending: dict[TaskId, _Pending] = {}
        """By the id its submitter knows."""
        self._runs: dict[TaskId, TaskId] = {}
        """The id of a run in the contract net -> the id its submitter knows."""
        self._history: OrderedDict[TaskId, Runs] = OrderedDict()
        """Tasks that ran more than once, or made a lost object again: what ``why`` adds."""
        self._rebuilding: dict[str, list[Callable[[ObjectRef | ErrorInfo], None]]] = {}
        self.holds = Holds()
        self.leases = Leases()
        self._lease_news: defaultdict[NodeId, list[str]] = defaultdict(list)
        """Objects held or let go of since the last lease round, by holder."""
        self._giving_up: set[str] = set()
        """Lost object id -> what waits for its copy."""
        self.retried = 0
        self._finished: OrderedDict[TaskId, dict[str, Any]] = OrderedDict()
        self._jobs: dict[TaskId, asyncio.Task[None]] = {}
        self._jobs_idle = asyncio.Event()
        self._jobs_idle.set()
        self.outcomes: Counter[str] = Counter()
        """Tasks this node initiated, by how they ended (completed, task-error, ...)."""
        self.executed: Counter[str] = Counter()
        """Tasks this node ran, by outcome (ok, error, cancelled, lost-input)."""
        self.fetched_bytes = 0
        self.fetched_from: Counter[str] = Counter()
        """Object bytes fetched from each holder over the network."""
        self.events = EventLog()
        self.host_id = ""
        """This machine's shared-memory identity; peers with the same one map our objects."""
        self._started = time.monotonic()
        self._accepting = True
        self._tg: asyncio.TaskGroup | None = None
        self._http: aiohttp.ClientSession | None = None
        self._discovery: Any = None
        self._metrics_registry = CollectorRegistry(auto_describe=False)
        self._metrics_registry.register(_Collector(self))
        # Built in run(): they need the bound address.
        self.node_id: NodeId = NodeId("")
        self.address: Address = Address("")
        self.registry: Registry
        self.store: ObjectStore
        self.lineage = Lineage(
            max_objects=self.config.lineage_max_objects,
            max_rebuilds=self.config.lineage_max_rebuilds,
            max_depth=self.config.lineage_max_depth,
        )
        self.node_core: NodeCore[Membership]
        self.membership: Membership
        self._host_slots: HostSlots
        self.contract: Contract
        self.transport: WsTransport
        self.driver: Driver[NodeCore[Membership]]
        self.executor: Executor

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Start, serve until ``stop`` is set, shut down gracefully."""
        opts = self.options
        sock = bind_socket(opts.host, opts.port)
        port = sock.getsockname()[1]
        advertised = opts.host if opts.host and opts.host != "0.0.0.0" else primary_address()
        self.address = Address(f"{advertised}:{port}")
        self.node_id = NodeId(opts.name or f"{socket.gethostname()}-{port}")
        self.events.node = self.node_id
        runner: web.AppRunner | None = None
        try:
            self.registry = await asyncio.to_thread(Registry.load, opts.task_modules)
            capabilities = await asyncio.to_thread(
                probe,
                slots=opts.slots,
                resources=dict(opts.resources),
                labels=dict(opts.labels),
                task_names=self.registry.names(),
                libraries_wanted=sorted(self.registry.libraries()),
                without=opts.without,
            )
            slots = max(1, int(capabilities.resources.get("cpu", 1)))
            codec = Codec(
                self._key,
                self.node_id,
                max_frame_bytes=self.config.max_frame_bytes,
                max_skew_s=self.config.max_clock_skew_s,
            )
            # Segments and spill files of a node that crashed on this machine are nobody's.
            remove_orphan_segments()
            configured_host = self.config.host_id
            self.host_id = machine_host_id() if configured_host is None else configured_host
            self.store = ObjectStore.from_config(self.node_id, self.config)
            remove_orphan_spill(self.store.spill_dir)
            self.transport = WsTransport(
                codec=codec,
                config=self.config,
                wall_clock=time.time,
                resolve=self._node_at,
                on_gone=self._gone,
            )
            self.driver = Driver(
                node=self.node_id,
                transport=self.transport,
                codec=codec,
                core=lambda now: NodeCore.build(
                    node=self.node_id,
                    address=self.address,
                    config=self.mesh_config,
                    rng=self._rng,
                    now=now,
                    capabilities=capabilities,
                    speed=slot_speed(slots, local_pool()),
                ),
                resolve=self._node_at,
                on_step=self._on_step,
            )
            self.node_core = self.driver.core
            self.membership, self.contract = self.node_core.membership, self.node_core.contract
            self._host_slots = HostSlots(self.membership, self.node_id)
            app = web.Application(client_max_size=self.config.http_submit_body_bytes)
            invites = Invites(
                secret=self.options.key,
                rng=random.Random(secrets.token_bytes(16)),
                refused=Counter(),
            )
            self.api = Api(
                self,
                self._key,
                exempt=frozenset({WS_PATH}),
                invites=invites,
                instance=self._id_prefix,
            )
            self.transport.add_routes(app)
            self.api.add_routes(app)
            runner = web.AppRunner(
                app,
                access_log=None,
                handle_signals=False,
                shutdown_timeout=1.0,
                keepalive_timeout=self.config.http_keepalive_timeout_s,
                # A refused body is not drained: its connection is closed instead.
                lingering_time=0,
            )
            await runner.setup()
            await GuardedSite(runner, sock, guard=self.api.guard).start()
            await self.transport.start(self.address)
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.object_fetch_timeout_s)
            )
            async with (
                Executor(
                    node_id=self.node_id,
                    slots=slots,
                    registry_modules=opts.task_modules,
                    config=self.config,
                    without=opts.without,
                ) as self.executor,
                asyncio.TaskGroup() as tg,
            ):
                self._tg = tg
                driving = tg.create_task(self.driver.run())
                sweeping = tg.create_task(self._sweep_orphans())
                leasing = tg.create_task(self._keep_leases())
                for seed in opts.joins:
                    self.driver.command(partial(self.node_core.join, Address(seed)))
                await self._start_discovery()
                self._announce(slots)
                await stop.wait()
                await self._shutdown()
                sweeping.cancel()
                leasing.cancel()
                self.driver.stop()
                await driving
                for job in list(self._jobs.values()):
                    job.cancel()
        finally:
            self._tg = None
            await self._close_discovery()
            if hasattr(self, "transport"):
                await self.transport.close()
            if self._http is not None:
                await self._http.close()
            if hasattr(self, "api"):
                await self.api.close()
            if runner is not None:
                await runner.cleanup()
            else:
                sock.close()
            if hasattr(self, "store"):
                self.store.close()

    def _announce(self, slots: int) -> None:
        mdns = "on" if self._discovery is not None else "off"
        self._out(f"mesh-node {self.node_id} listening on {self.address}")
        self._out(
            f"  {slots} slots, {len(self.registry)} tasks, mDNS {mdns}, "
            f"mesh {key_fingerprint(self._key)}"
        )
        self._out(
            f"  another machine joins with: mesh-node start --join {self.address} --key KEY"
            "  (or just the same key, found by mDNS)"
        )
        self._out(
            f"  or with no key to copy: mesh-node invite --node {self.address} here,"
            " then mesh-node start --code CODE there"
        )
        if self.options.ready_file is not None:
            ReadyRecord(
                id=self.node_id,
                address=self.address,
                pid=os.getpid(),
                host_id=self.host_id,
                mesh=key_fingerprint(self._key),
                slots=slots,
            ).write(self.options.ready_file)

    async def _start_discovery(self) -> None:
        if not self.options.mdns:
            return
        try:
            from node.discovery import Discovery
        except ImportError as exc:
            log.warning("mDNS discovery is not available (%s); use --join", exc)
            return

        host, _, port = self.address.rpartition(":")
        interfaces = list(self.options.mdns_interfaces) or (
            [self.options.host] if self.options.host and self.options.host != "0.0.0.0" else None
        )
        discovery = Discovery(
            node=self.node_id,
            host=host,
            port=int(port),
            key_fingerprint=key_fingerprint(self._key),
            on_found=self._on_found,
            interfaces=interfaces,
            cooperating_responders=self.config.mdns_cooperating,
        )
        try:
            await discovery.start()
        except (OSError, MeshError) as exc:
            log.warning("mDNS is unavailable (%s); peers must be given with --join", exc)
            return
        self._discovery = discovery

    async def _close_discovery(self) -> None:
        discovery, self._discovery = self._discovery, None
        if discovery is not None:
            try:
                async with asyncio.timeout(3.0):
                    await discovery.close()
            except (TimeoutError, OSError) as exc:
                log.warning("mDNS did not close cleanly: %s", exc)

    def _node_at(self, address: Address) -> NodeId | None:
        """The node a frame to ``address`` is for: membership's view first (the node a core
        means), then the id a hello proved there. Two dict lookups: called per frame."""
        node = self.membership.node_at(address)
        return node if node is not None else self.transport.node_at(address)

    def _gone(self, address: Address) -> None:
        if hasattr(self, "driver"):
            self.driver.command(partial(self.node_core.gone, address))

    def _on_found(self, node: NodeId, address: Address) -> None:
        if node == self.node_id or not hasattr(self, "driver"):
            return
        self.driver.command(partial(self.node_core.join, address))

    async def _shutdown(self) -> None:
        """Stop bidding, let running tasks finish (within the grace), leave, unregister."""
        self._accepting = False
        self.driver.command(partial(self.node_core.set_accepting, False))
        grace = self.options.grace_s
        if grace is None:
            grace = self.config.shutdown_grace_s
        if self._jobs:
            self._out(f"mesh-node {self.node_id}: finishing {len(self._jobs)} running tasks")
            try:
                async with asyncio.timeout(grace):
                    await self._jobs_idle.wait()
            except TimeoutError:
                self._out(f"mesh-node {self.node_id}: grace over, handing back the rest")
        self.driver.command(self.node_core.leave)
        await asyncio.gather(self._close_discovery(), self._drain(1.0))
        gone = ErrorInfo(kind=FailureKind.LOST, message="the node it was submitted to shut down")
        for pending in list(self._pending.values()):
            self._finish(pending, Outcome(task_id=pending.task_id, error=gone))

    async def _drain(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self.driver.drain()
        except TimeoutError:
            log.info("leaving without every goodbye sent")

    async def _sweep_orphans(self) -> None:
        """Remove shared memory that crashed processes left behind, on a timer: a node
        killed with SIGKILL cannot free its objects' segments, and none may wait for some
        node to start again."""
        while True:
            await asyncio.sleep(self.config.orphan_sweep_interval_s)
            removed = await asyncio.to_thread(remove_orphan_segments)
            removed += await asyncio.to_thread(remove_orphan_spill, self.store.spill_dir)
            if removed:
                log.info("removed %d shared-memory and spill files of dead processes", removed)
            self.store.trim_pool(self.config.store_pool_idle_s)

    # -- the cores' events ----------------------------------------------------------------

    def _on_step(self, now: float) -> None:
        while events := self.node_core.take_events():
            members = [ev.node for ev in events if isinstance(ev, MembershipEvent)]
            if members:  # nodes on this host came, went or changed: share its cores anew
                self.executor.set_host_slots(self._host_slots.observe(members))
            for ev in events:
                if isinstance(ev, MembershipEvent):
                    self._publish_member(ev)
                elif isinstance(ev, Execute):
                    self._on_execute(ev)
                elif isinstance(ev, CancelExecution):
                    job = self._jobs.get(ev.task_id)
                    if job is not None:
                        job.cancel()
                elif isinstance(ev, Completed):
                    self.outcomes["completed"] += 1
                    self._on_completed(ev)
                elif isinstance(ev, Failed):
                    self.outcomes[ev.kind] += 1
                    self._on_failed(ev)

    def _publish_member(self, ev: MembershipEvent) -> None:
        if isinstance(ev, MemberUp):
            state = "alive"
        elif isinstance(ev, MemberSuspect):
            state = "suspect"
        elif isinstance(ev, MemberDown):
            state = str(ev.state)
        elif isinstance(ev, MemberPurged):
            state = "purged"
        else:
            return  # a changed record (load, capabilities): the hub reads those itself
        self.events.publish("member", peer=ev.node, state=state)

    def _run_ended(self, run_id: TaskId) -> _Pending | None:
        submitted = self._runs.pop(run_id, None)
        pending = None if submitted is None else self._pending.get(submitted)
        if pending is not None:
            pending.placed = False
        return pending

    def _on_completed(self, ev: Completed) -> None:
        pending = self._run_ended(ev.task_id)
        if pending is None:
            return
        if isinstance(ev.value, ObjectRef) and not pending.runs.rebuilds:
            # Made again anywhere it can run: labels given at submission (often one node's
            # name) are left out, the task's own kept.
            req = pending.spec.requirements
            own_labels = self.registry.requirements(pending.name).labels
            recipe = Recipe(
                name=pending.name,
                call=pending.call,
                requirements=Requirements(
                    task=req.task,
                    resources=req.resources,
                    libraries=req.libraries,
                    labels=dict(own_labels),
                ),
                est_runtime_s=pending.spec.est_runtime_s,
                deterministic=pending.deterministic,
                uploads=bool(pending.temp_objects),
                made_by=pending.task_id,
            )
            self.lineage.record(ev.value, recipe)
        self._finish(pending, Outcome(task_id=pending.task_id, node=ev.node, value=ev.value))

    def _on_failed(self, ev: Failed) -> None:
        pending = self._run_ended(ev.task_id)
        if pending is None:
            return
        error = ErrorInfo.reported(ev.kind, ev.message, {"task": pending.name, **ev.details})
        if self._accepting:
            again = self._recover(ev.task_id, pending, error)
            if again is None:
                return
            error = again
        self._finish(pending, Outcome(task_id=pending.task_id, node=ev.node or "", error=error))

    def _recover(self, run_id: TaskId, pending: _Pending, error: ErrorInfo) -> ErrorInfo | None:
        """Run ``pending`` again if its run failed with ``error`` for a cause that allows it
        (None), or the error to deliver."""
        lost = error.object_id
        if lost:
            refusal = self.lineage.refusal(lost, pending.chain)
            if refusal is not None:
                return replace(error, message=f"{error.message}; {refusal}")
            reason = f"input {lost} was lost"
            self._rebuild(lost, pending.chain, partial(self._rerun, pending, run_id, reason, lost))
            return None
        if not pending.retry.allows(error):
            return error
        self.retried += 1
        limit = pending.retry.max_retries
        self._rerun(pending, run_id, f"retry {pending.retry.used} of {limit}: {error.message}")
        return None

    def _rerun(
        self,
        pending: _Pending,
        run_id: TaskId,
        reason: str,
        lost: str = "",
        copy: ObjectRef | ErrorInfo | None = None,
    ) -> None:
        """Run ``pending`` again after its run ``run_id`` failed for ``reason`` (once its
        lost input ``lost`` is made again, as ``copy``, if it was that)."""
        if self._pending.get(pending.task_id) is not pending:
            return  # cancelled meanwhile
        if isinstance(copy, ErrorInfo):
            error = ErrorInfo(
                kind=FailureKind.TASK,
                message=f"{reason}, and making it again failed: {copy.message}",
                exc_type="ObjectLostError",
                task=pending.name,
                object_id=lost,
            )
            self._finish(pending, Outcome(task_id=pending.task_id, error=error))
            return
        if copy is not None:
            reason += f"; made again by task {self._made_again_by(copy)} on {copy.holder}"
        pending.runs.reruns.append({"task_id": run_id, "reason": reason})
        self._remember(pending)
        pending.call = self.lineage.rewrite(pending.call)
        self._place(pending, self._new_task_id())

    def _made_again_by(self, copy: ObjectRef) -> str:
        recipe = self.lineage.recipe(copy.id)
        return "" if recipe is None else recipe.made_by

    def _remember(self, pending: _Pending) -> None:
        self._history[pending.task_id] = pending.runs
        self._history.move_to_end(pending.task_id)
        while len(self._history) > self.config.results_kept:
            self._history.popitem(last=False)

    def _rebuild(
        self, object_id: str, chain: tuple[str, ...], then: Callable[[ObjectRef | ErrorInfo], None]
    ) -> None:
        """Make the lost object ``object_id`` again (``Lineage.refusal`` said it may be),
        then call ``then`` with its copy or the error that stopped it."""
        waiting = self._rebuilding.get(object_id)
        if waiting is not None:
            waiting.append(then)
            return
        self._rebuilding[object_id] = [then]
        recipe = self.lineage.rebuilding(object_id)
        run_id = self._new_task_id()
        tdef = self.registry.get(recipe.name)
        pending = _Pending(
            task_id=run_id,
            name=recipe.name,
            deliver=partial(self._rebuilt, object_id),
            temp_objects=[],
            call=self.lineage.rewrite(recipe.call),
            spec=TaskSpec(
                task_id=run_id,
                requirements=recipe.requirements,
                est_runtime_s=recipe.est_runtime_s,
            ),
            retry=Retry(tdef.max_retries if tdef else DEFAULT_MAX_RETRIES, False),
            runs=Runs(current=run_id, rebuilds=object_id),
            group=run_id,
            chain=(*chain, object_id),
        )
        self._remember(pending)
        self._place(pending, run_id)

    def _rebuilt(self, object_id: str, outcome: Outcome) -> None:
        if outcome.error is not None or isinstance(outcome.value, ObjectRef):
            self._rebuilt_as(object_id, outcome, outcome.error or outcome.value)
        elif self._tg is None:
            stopped = ErrorInfo.of(LocalProtocolError("the node is not running"))
            self._rebuilt_as(object_id, outcome, stopped)
        else:
            self._tg.create_task(self._keep_rebuilt(object_id, outcome))

    async def _keep_rebuilt(self, object_id: str, outcome: Outcome) -> None:
        result: ObjectRef | ErrorInfo
        try:
            result = await self.store.put(outcome.value)
        except MeshError as exc:
            result = ErrorInfo.of(exc)
        except Exception as exc:  # a bug must fail this rebuild, not the node
            log.exception("internal error while storing the copy of %s", object_id)
            message = f"internal error on {self.node_id}: {type(exc).__name__}: {exc}"
            result = _task_error(INTERNAL_ERROR, message)
        self._rebuilt_as(object_id, outcome, result)

    def _rebuilt_as(self, object_id: str, outcome: Outcome, result: ObjectRef | ErrorInfo) -> None:
        if isinstance(result, ObjectRef):
            self.lineage.rebuilt_as(object_id, result, outcome.task_id)
            if object_id in self.holds:
                self._hold(("copy", object_id), [result])
        for then in self._rebuilding.pop(object_id, []):
            then(result)

    def _deliver(self, outcome: Outcome) -> None:
        pending = self._pending.get(TaskId(outcome.task_id))
        if pending is not None:
            self._finish(pending, outcome)

    def _finish(self, pending: _Pending, outcome: Outcome) -> None:
        """Deliver ``outcome`` as the one outcome of the task ``pending``."""
        if self._pending.pop(pending.task_id, None) is not pending:
            return
        if pending.placed:
            self._runs.pop(TaskId(pending.runs.current), None)
        for oid in pending.temp_objects:
            self.store.release(oid)
        record = result_json(outcome)
        record["state"] = "done" if outcome.ok else "failed"
        record["task"] = pending.name
        self._finished[TaskId(outcome.task_id)] = record
        while len(self._finished) > self.config.results_kept:
            self._finished.popitem(last=False)
        if pending.done is not None:
            pending.done.set()
        auction = self.contract.record(TaskId(pending.runs.current))
        self.events.publish(
            "done",
            task_id=outcome.task_id,
            task=pending.name,
            group=pending.group,
            ok=outcome.ok,
            ran_on=outcome.node or None,
            attempts=(auction.attempts if auction is not None else 0) + len(pending.runs.reruns),
            error=None if outcome.error is None else clip(outcome.error.message),
        )
        pending.deliver(outcome)
        # Whoever the outcome went to holds what it refers to now (a client session, the
        # task that waited for a lost input); what nobody took is let go.
        self._let_go(self.holds.drop(("task", pending.task_id)))
        self._let_go([r for r in refs_in(outcome.value) if r.id not in self.holds])

    # -- references (node.refs) ---------------------------------------------------------

    def hold(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """``key`` (a client session, a JSON result) holds the references in ``value``;
        with ``ttl``, for that long."""
        self._hold(key, refs_in(value))
        if ttl is not None:
            self.holds.release_at(key, time.monotonic() + ttl)

    def forget(self, key: Hashable, ids: Iterable[str] | None = None) -> None:
        """``key`` lets go of ``ids`` (None: of everything)."""
        self._let_go(self.holds.drop(key, ids))

    def session_ended(self, key: Hashable) -> None:
        self.holds.release_at(key, time.monotonic() + self.config.session_ref_grace_s)

    def _hold(self, key: Hashable, refs: Iterable[ObjectRef]) -> None:
        for ref in self.holds.hold(key, refs):
            self._lease_news[ref.holder].append(ref.id)

    def _let_go(self, refs: Iterable[ObjectRef]) -> None:
        for ref in refs:
            self._lease_news[ref.holder].append(ref.id)
            self._giving_up.add(ref.id)
            # A copy made of a lost object is held while the lost one is.
            self._let_go(self.holds.drop(("copy", ref.id)))

    def lease(self, node: NodeId, renew: Iterable[str], give_up: Iterable[str]) -> int:
        """Node ``node`` keeps ``renew`` and lets go of ``give_up`` (objects stored here);
        how many of ``renew`` are here."""
        kept = self.leases.renew(node, renew, time.monotonic() + self.config.object_lease_s)
        for oid in self.leases.give_up(node, give_up):
            self.store.release(oid)
        return kept

    async def _keep_leases(self) -> None:
        """Renew this node's leases, give up those it no longer needs, free what lapsed."""
        lease_s = self.config.object_lease_s
        tick = min(1.0, lease_s / 6)
        renew_at = 0.0
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            self._let_go(self.holds.expire(now))
            for oid in self.leases.lapsed(now):
                self.store.release(oid)
            news, self._lease_news = self._lease_news, defaultdict(list)
            giving_up, self._giving_up = self._giving_up, set()
            if now >= renew_at:
                renew_at = now + lease_s / 3
                batches = self.holds.by_holder()
            else:
                batches = {h: [i for i in ids if i in self.holds] for h, ids in news.items()}
            dropped: dict[NodeId, list[str]] = defaultdict(list)
            for holder, ids in news.items():
                dropped[holder] += [i for i in ids if i in giving_up and i not in self.holds]
            async with asyncio.TaskGroup() as tg:
                for holder in set(batches) | set(dropped):
                    renew, drop = batches.get(holder, []), dropped.get(holder, [])
                    # In messages that fit a small request body (object ids are short).
                    for i in range(0, max(len(renew), len(drop)), LEASE_BATCH):
                        part = renew[i : i + LEASE_BATCH], drop[i : i + LEASE_BATCH]
                        tg.create_task(self._send_lease(holder, *part))

    async def _send_lease(self, holder: NodeId, renew: list[str], drop: list[str]) -> None:
        if holder == self.node_id:
            self.lease(holder, renew, drop)
            return
        member = self.membership.member(holder)
        if member is None or not self._alive(holder) or self._http is None:
            return
        payload = {"node": self.node_id, "renew": renew, "drop": drop}
        try:
            async with asyncio.timeout(self.config.object_lease_s / 3):
                await request_json(
                    self._http,
                    self._key,
                    normalise_url(member.address),
                    "POST",
                    LEASES_PATH,
                    payload,
                    to=holder,
                )
        except (MeshError, TimeoutError) as exc:
            # The next renewal makes it good; a lease nobody renews lapses by itself.
            log.debug("lease message to %s lost: %s", holder, exc)

    # -- submitting (initiator) -------------------------------------------------------------

    async def submit(
        self,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        options: Mapping[str, Any],
        deliver: Deliver,
        group: str = "",
    ) -> TaskId:
        """Auction task ``name``; ``deliver`` gets its outcome once. ``group`` names the
        submissions that came with it (for the dashboards)."""
        if not self._accepting:
            raise LocalProtocolError("the node is shutting down")
        task_id = self._new_task_id()
        temp: list[str] = []
        try:
            await self._submit(task_id, name, args, kwargs, options, deliver, temp, group)
        except BaseException:
            # A second upload that does not fit must not leave the first one stored.
            self._pending.pop(task_id, None)
            for oid in temp:
                self.store.release(oid)
            raise
        return task_id

    async def _submit(
        self,
        task_id: TaskId,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        options: Mapping[str, Any],
        deliver: Deliver,
        temp: list[str],
        group: str,
    ) -> None:
        prepare = partial(self._prepare, temp=temp)
        call_args, call_kwargs = await walk_call_async(args, kwargs, _PREPARED, prepare)
        if not self._accepting:  # stopped while the arguments were stored
            raise LocalProtocolError("the node is shutting down")
        req = self.registry.requirements(name)
        if options.get("labels") or options.get("resources") or options.get("libraries"):
            req = Requirements(
                task=req.task,
                resources={**req.resources, **options.get("resources", {})},
                libraries={**req.libraries, **options.get("libraries", {})},
                labels={**req.labels, **options.get("labels", {})},
            )
        tdef = self.registry.get(name)
        spec = TaskSpec(
            task_id=task_id,
            requirements=req,
            est_runtime_s=tdef.est_runtime_s if tdef is not None else None,
        )
        call = TaskCall(
            name=name,
            args=tuple(call_args),
            kwargs=call_kwargs,
            timeout_s=options.get("timeout"),
        )
        retry = Retry(
            options.get("max_retries", tdef.max_retries if tdef else DEFAULT_MAX_RETRIES),
            options.get("retry_exceptions", tdef.retry_exceptions if tdef else False),
        )
        pending = _Pending(
            task_id=task_id,
            name=name,
            deliver=deliver,
            temp_objects=temp,
            call=call,
            spec=spec,
            retry=retry,
            runs=Runs(current=task_id),
            group=group or task_id,
            deterministic=tdef.deterministic if tdef is not None else True,
        )
        self.events.publish("submit", task_id=task_id, task=name, group=pending.group)
        self._place(pending, task_id)

    def _new_task_id(self) -> TaskId:
        return TaskId(f"{self._id_prefix}-{next(self._ids)}")

    def _place(self, pending: _Pending, run_id: TaskId) -> None:
        """Put a run of ``pending``, with the id ``run_id``, into the contract net."""
        refs: list[ObjectRef] = find_in_call(pending.call.args, pending.call.kwargs, ObjectRef)
        holders: Counter[NodeId] = Counter()
        for ref in refs:
            holders[ref.holder] += ref.nbytes
        pending.spec = replace(pending.spec, task_id=run_id, input_bytes=dict(holders))
        self._hold(("task", pending.task_id), refs)
        pending.runs.current = run_id
        pending.placed = True
        self._pending[pending.task_id] = pending
        self._runs[run_id] = pending.task_id
        self.driver.command(partial(self.node_core.submit, pending.spec, pending.call))

    async def _prepare(self, value: Any, temp: list[str]) -> Any:
        """Large arrays become references to this node's store; refs are counted by holder.

        A client's shared-memory upload of a large array is adopted as the object's segment
        (no copy); any other upload gives up its file and is prepared as its value.
        """
        if isinstance(value, OwnedSegment):
            inner = value.value
            if isinstance(inner, np.ndarray) and inner.nbytes > self.config.store_threshold_bytes:
                ref = await self.store.adopt(value)
                temp.append(ref.id)
                return ref
            value.remove()
            inside, _ = await walk_call_async(
                [inner], {}, _PREPARED, partial(self._prepare, temp=temp)
            )
            return inside[0]
        if isinstance(value, ObjectRef):
            return self.lineage.current(value)
        if value.nbytes > self.config.store_threshold_bytes:  # an array
            ref = await self.store.put(value)
            temp.append(ref.id)
            return ref
        return value

    def cancel(self, task_id: str) -> bool:
        pending = self._pending.get(TaskId(task_id))
        if pending is None:
            return False
        if pending.placed:
            self.driver.command(partial(self.node_core.cancel, TaskId(pending.runs.current)))
        else:  # waiting for a lost input to be made again
            cancelled = _task_error("Cancelled", "cancelled")
            self._finish(pending, Outcome(task_id=pending.task_id, error=cancelled))
        return True

    # -- running (participant) --------------------------------------------------------------

    def _on_execute(self, ev: Execute) -> None:
        if self._tg is None:
            return
        task = self._tg.create_task(self._execute(ev.task_id, ev.initiator, ev.payload))
        self._jobs[ev.task_id] = task
        self._jobs_idle.clear()

    async def _execute(self, task_id: TaskId, initiator: NodeId, call: Any) -> None:
        outcome = "error"
        value: Any = None
        error: ErrorInfo | None = None
        run_s = 0.0
        name = call.name if isinstance(call, TaskCall) else ""
        self.events.publish("start", task_id=task_id, task=name, initiator=initiator)
        # Objects of this store whose segment the worker maps: they stay in memory (do not
        # spill) until the task is over.
        pinned: list[str] = []
        try:
            if not isinstance(call, TaskCall):
                error = _task_error("BadPayload", "the award carried no task call")
                return
            # The segments the worker maps: held until the task is over, so that those
            # fetched into this node's store stay.
            shared: list[Segment | OwnedSegment] = []
            try:
                args, kwargs = await walk_call_async(
                    call.args,
                    call.kwargs,
                    ObjectRef,
                    lambda ref: self._shared_arg(ref, shared, pinned),
                )
            except MeshError as exc:
                outcome = "lost-input"
                error = ErrorInfo.of(exc)
                return
            try:
                done = await self.executor.run(
                    task_id,
                    call.name,
                    args,
                    kwargs,
                    shared=[s.name for s in shared],
                    timeout=call.timeout_s,
                )
            except MeshError as exc:
                # A shared input released before the worker mapped it is a lost input too.
                if isinstance(exc, ObjectLostError):
                    outcome = "lost-input"
                error = ErrorInfo.of(exc)
                return
            run_s = done.runtime_s
            if done.error is not None:
                error = done.error
                return
            value, outcome = done.value, "ok"
            if nbytes_of(value) > self.config.store_threshold_bytes:
                try:
                    value = await self.store.put(value)
                    # Kept while its submitter's node (or any other) renews a lease on it.
                    until = time.monotonic() + self.config.object_lease_s
                    self.leases.start(value.id, initiator, until)
                except MeshError as exc:
                    outcome = "error"
                    error = ErrorInfo.of(exc)
        except asyncio.CancelledError:
            outcome = "cancelled"
            error = _task_error("Cancelled", "cancelled")
            raise
        except Exception as exc:
            # A bug on this node's side of one task (or input nothing above caught): that
            # task fails with a named internal error; the node and its other tasks go on.
            log.exception("internal error while running task %s", task_id)
            outcome = "error"
            message = f"internal error on {self.node_id}: {type(exc).__name__}: {exc}"
            error = _task_error(INTERNAL_ERROR, message)
        finally:
            for oid in pinned:
                self.store.unpin(oid)
            self.executed[outcome] += 1
            self.events.publish(
                "end",
                task_id=task_id,
                task=name,
                initiator=initiator,
                ok=error is None,
                outcome=outcome,
                run_s=round(run_s, 6),
                error=None if error is None else _error_event(error),
            )
            self._jobs.pop(task_id, None)
            if not self._jobs:
                self._jobs_idle.set()
            report = value if error is None else error.encode()
            try:
                self.driver.command(
                    partial(self.node_core.task_finished, task_id, error is None, report)
                )
            except LocalProtocolError as exc:
                log.debug("finished task %s unknown to the contract core: %s", task_id, exc)

    async def _shared_arg(
        self, ref: ObjectRef, shared: list[Segment | OwnedSegment], pinned: list[str]
    ) -> Any:
        """``_task_arg`` as the worker gets it: a segment it maps is kept in ``shared`` and
        named by its ``Segment`` in the call, and one of this store is pinned (``pinned``)
        so that it does not spill before the worker maps it. (A stored value is never a
        bare ``Segment``: the store keeps values over its threshold, and a ``Segment`` is a
        few bytes.)"""
        arg = await self._task_arg(ref)
        if isinstance(arg, Segment | OwnedSegment):
            shared.append(arg)
            if ref.holder == self.node_id and self.store.pin(ref.id):
                pinned.append(ref.id)
        return arg.segment if isinstance(arg, OwnedSegment) else arg

    def _holder(self, ref: ObjectRef) -> tuple[aiohttp.ClientSession, str]:
        """The HTTP session to fetch ``ref`` with, and its holder's address."""
        member = self.membership.member(ref.holder)
        if member is None or not self._alive(ref.holder):
            raise ObjectLostError(ref.id, ref.holder)
        if self._http is None:
            raise LocalProtocolError("the node is not running")
        return self._http, member.address

    async def fetch(self, ref: ObjectRef) -> Any:
        """A referenced object: from this store, or fetched from its holder (mapped from
        the holder's segment when it runs on this machine)."""
        if ref.holder == self.node_id:
            return await self.store.get(ref)
        http, address = self._holder(ref)
        value = await fetch_object(
            http, self._key, address, ref, host=self.host_id, sealed=self.config.wire_sealed
        )
        self.fetched_bytes += ref.nbytes
        self.fetched_from[ref.holder] += ref.nbytes
        return value

    async def _task_arg(self, ref: ObjectRef) -> Any:
        """A referenced argument of a task to run here.

        A large object reaches the worker as a segment it maps, never copied on the way:
        the holder's own segment when the holder is on this machine (this node included),
        a ``Segment``; else an ``OwnedSegment`` of this node's store that the body is read
        into straight from the socket, removed once it is dropped. Small objects come as
        values.
        """
        if ref.holder == self.node_id:
            shared = await self.store.share(ref)
            return await self.store.get(ref) if shared is None else shared
        http, address = self._holder(ref)
        received: list[OwnedSegment] = []
        started = time.monotonic()

        def allocate(nbytes: int) -> Buffer:
            if nbytes < self.config.store_segment_min_bytes:
                return bytearray(nbytes)
            segment = self.store.new_segment(nbytes)
            received.append(segment)
            return segment.buffer

        sealed = self.config.wire_sealed
        body = await fetch_body(
            http, self._key, address, ref, host=self.host_id, allocate=allocate, sealed=sealed
        )
        if isinstance(body, Segment):
            try:
                check_object(body.name, body.nbytes)
            except (FileNotFoundError, PermissionError):
                # Spilled or released since it was lent, or another user's (private): take
                # the bytes instead, as ``fetch_object`` does.
                body = await fetch_bytes(
                    http, self._key, address, ref, allocate=allocate, sealed=sealed
                )
            except OSError:
                raise ObjectLostError(ref.id, ref.holder) from None
            else:
                self.contract.set_bandwidth(ref.holder, SHARED_MEMORY_BYTES_PER_S)
                return body
        self.fetched_bytes += ref.nbytes
        self.fetched_from[ref.holder] += ref.nbytes
        if ref.nbytes >= BANDWIDTH_SAMPLE_BYTES:
            # Large bodies only: a small one measures the round trip, not the link.
            elapsed = max(time.monotonic() - started, 1e-6)
            self.contract.set_bandwidth(ref.holder, ref.nbytes / elapsed)
        if not received:
            return loads(body)
        del body
        segment = received[0]
        segment.seal()
        return segment

    # -- what the API shows -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        states = Counter(str(m.state) for m in self.membership.members() if m.node != self.node_id)
        load = self.contract.load()
        return {
            "id": self.node_id,
            "address": self.address,
            "mesh": key_fingerprint(self._key),
            "peers": states.get("alive", 0) + states.get("suspect", 0),
            "peers_by_state": dict(states),
            "running": len(self._jobs),
            "queued": load.queued + self.executor.queued,
            "completed": self.executed["ok"],
            "failed": self.executed["error"] + self.executed["lost-input"],
            "submitted_pending": len(self._pending),
            "outcomes": dict(self.outcomes),
            "replaced": self.contract.stats().get("reannounces", 0),
            "retries": self.retried,
            "rebuilt_objects": self.lineage.rebuilt,
            "rebuilt_bytes": self.lineage.rebuilt_bytes,
            "slots": self.executor.slots,
            "accepting": self._accepting,
            "mdns": self._discovery is not None,
            "mdns_found": int(getattr(self._discovery, "found_count", 0) or 0),
            "mdns_seen": sorted(getattr(self._discovery, "found", ()))[:256],
            "objects": len(self.store),
            "object_bytes": self.store.used_bytes,
            "spilled_objects": self.store.spilled_objects,
            "spilled_bytes": self.store.spilled_bytes,
            "pooled_bytes": self.store.pool.nbytes,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "protocol": FRAME_VERSION,
            "package": __version__,
            "sealed": self.config.wire_sealed,
            "refused_peers": self.transport.refusals(),
        }

    def node_stats(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "slots": self.executor.slots,
            "objects": len(self.store),
            "object_bytes": self.store.used_bytes,
            "spilled_bytes": self.store.spilled_bytes,
            "fetched_from": dict(self.fetched_from),
            "executed": dict(self.executed),
        }

    def peers(self) -> list[dict[str, Any]]:
        out = []
        for m in sorted(self.membership.members(), key=lambda m: m.node):
            caps = m.capabilities
            out.append(
                {
                    "id": m.node,
                    "address": m.address,
                    "state": str(m.state),
                    "self": m.node == self.node_id,
                    "incarnation": m.incarnation,
                    "load": {
                        "running": m.load.running,
                        "queued": m.load.queued,
                        "backlog_s": m.load.backlog_s,
                    },
                    "capabilities": {
                        "resources": dict(caps.resources),
                        "libraries": dict(caps.libraries),
                        "tasks": list(caps.tasks),
                        "labels": dict(caps.labels),
                    },
                }
            )
        return out

    def why(self, task_id: str) -> dict[str, Any] | None:
        """The auction record of ``task_id``'s last run; ``reruns`` lists the runs before it
        and why each ended, ``rebuilds`` the lost object a run made again."""
        runs = self._history.get(TaskId(task_id))
        record = self.contract.record(TaskId(runs.current if runs else task_id))
        if record is None:
            return None
        return {
            "reruns": list(runs.reruns) if runs else [],
            "rebuilds": runs.rebuilds if runs else "",
            "task_id": record.task_id,
            "task": record.task,
            "state": record.state,
            "winner": record.winner,
            "cost_s": record.cost_s,
            "wait_s": record.wait_s,
            "est_s": record.est_s,
            "transfer_s": record.transfer_s,
            "run_s": record.run_s,
            "why": record.why,
            "attempts": record.attempts,
            "rounds": [
                {
                    "cfp": r.cfp,
                    "asked": list(r.asked),
                    "bids": dict(r.bids),
                    "slots": dict(r.slots),
                    "refusals": jsonable(r.refusals),
                    "silent": list(r.silent),
                }
                for r in record.rounds
            ],
        }

    def task_info(self, task_id: str) -> dict[str, Any] | None:
        tid = TaskId(task_id)
        pending = self._pending.get(tid)
        if pending is not None:
            return {"task_id": tid, "task": pending.name, "state": "pending"}
        return self._finished.get(tid)

    def wait_task(self, task_id: str) -> Any:
        pending = self._pending.get(TaskId(task_id))
        if pending is None:
            return None
        if pending.done is None:
            pending.done = asyncio.Event()
        return pending.done.wait()

    async def object_body(self, object_id: str) -> tuple[Chunks, int] | None:
        if object_id not in self.store:
            return None
        return await self.store.encoded(object_id)

    async def object_segment(self, object_id: str) -> Segment | None:
        return await self.store.share(object_id, lend_s=LEND_S)

    def release_object(self, object_id: str) -> bool:
        self.leases.forget(object_id)
        return self.store.release(object_id)

    async def rebuild_object(self, object_id: str) -> ObjectRef:
        copy = self.lineage.copy_of(object_id)
        if copy is not None and self._alive(copy.holder):
            return copy
        lost = copy.id if copy is not None else object_id
        refusal = self.lineage.refusal(lost, ())
        if refusal is not None or not self._accepting:
            why = refusal or "this node is shutting down"
            raise ObjectLostError(object_id, "", f"object {object_id} cannot be made again: {why}")
        made: asyncio.Future[ObjectRef | ErrorInfo] = asyncio.get_running_loop().create_future()

        def then(result: ObjectRef | ErrorInfo) -> None:
            if not made.done():
                made.set_result(result)

        self._rebuild(lost, (), then)
        result = await made
        if isinstance(result, ErrorInfo):
            message = f"object {object_id} is lost and making it again failed: {result.message}"
            raise ObjectLostError(object_id, "", message)
        return result

    def _alive(self, node: NodeId) -> bool:
        if node == self.node_id:
            return True
        member = self.membership.member(node)
        return member is not None and member.state not in (MemberState.DEAD, MemberState.LEFT)

    async def take_upload(self, upload: Segment) -> OwnedSegment:
        return await asyncio.to_thread(self.store.take_upload, upload)

    def metrics(self) -> bytes:
        data: bytes = generate_latest(self._metrics_registry)
        return data


class _Collector:
    """Reads the node's counters at scrape time (one registry per node, no globals)."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def collect(self) -> list[Metric]:
        d = self.d
        if not hasattr(d, "driver"):
            return []
        peers = GaugeMetricFamily("mesh_peers", "Known nodes by state", labels=["state"])
        states = Counter(str(m.state) for m in d.membership.members() if m.node != d.node_id)
        for state in MemberState:
            peers.add_metric([str(state)], states.get(str(state), 0))
        tasks = CounterMetricFamily(
            "mesh_tasks", "Tasks this node initiated, by outcome", labels=["outcome"]
        )
        for outcome, n in sorted(d.outcomes.items()):
            tasks.add_metric([outcome], n)
        executed = CounterMetricFamily(
            "mesh_executed", "Tasks this node ran, by outcome", labels=["outcome"]
        )
        for outcome, n in sorted(d.executed.items()):
            executed.add_metric([outcome], n)
        stats = d.contract.stats()
        bids = CounterMetricFamily("mesh_bids", "Bids (proposals) this node sent")
        bids.add_metric([], stats.get("sent.Propose", 0))
        contract = CounterMetricFamily(
            "mesh_contract_events", "Contract-net counters", labels=["event"]
        )
        for name, n in sorted(stats.items()):
            contract.add_metric([name], n)
        counters = d.transport.counters()
        sent = CounterMetricFamily("mesh_bytes_sent", "Bytes sent to peers")
        sent.add_metric([], counters.get("bytes_sent", 0))
        received = CounterMetricFamily("mesh_bytes_received", "Bytes received from peers")
        received.add_metric([], counters.get("bytes_received", 0))
        frames = CounterMetricFamily(
            "mesh_frames", "Protocol frames exchanged with peers", labels=["direction"]
        )
        frames.add_metric(["sent"], counters.get("frames_sent", 0))
        frames.add_metric(["received"], counters.get("frames_received", 0))
        rejected = CounterMetricFamily(
            "mesh_rejected_frames", "Frames and requests rejected, by reason", labels=["reason"]
        )
        reasons: Counter[str] = Counter(d.transport.rejected)
        reasons.update(d.driver.rejected)
        reasons.update(d.api.rejected)
        reasons["http-internal-error"] += d.api.internal_errors
        if d.api.dashboard.hub.dropped:
            reasons[SLOW_READER] += d.api.dashboard.hub.dropped
        for reason, n in sorted(reasons.items()):
            rejected.add_metric([reason], n)
        running = GaugeMetricFamily("mesh_running_tasks", "Tasks running on this node")
        running.add_metric([], len(d._jobs))
        store = GaugeMetricFamily(
            "mesh_object_store_bytes",
            "Bytes held in the object store: in memory, spilled to disk, pooled segments",
            labels=["where"],
        )
        store.add_metric(["memory"], d.store.used_bytes)
        store.add_metric(["spilled"], d.store.spilled_bytes)
        store.add_metric(["pooled"], d.store.pool.nbytes)
        reruns = CounterMetricFamily(
            "mesh_task_reruns",
            "Runs again of tasks this node initiated: retries, and lost objects made again",
            labels=["cause"],
        )
        reruns.add_metric(["retry"], d.retried)
        reruns.add_metric(["rebuild"], d.lineage.rebuilt)
        declared = CounterMetricFamily(
            "mesh_declared_dead",
            "Peers this node declared dead itself, by evidence: a suspicion that ran out, or a"
            " connection refused at the peer's address",
            labels=["evidence"],
        )
        ms = d.membership.stats()
        declared.add_metric(["suspicion"], ms.deaths)
        declared.add_metric(["refused"], ms.gone)
        return [
            *(peers, tasks, executed, bids, contract, sent, received, frames, rejected, running),
            *(store, reruns, declared),
        ]


async def run_node(options: NodeOptions, *, out: Callable[[str], None] = print) -> int:
    """Run a node until SIGTERM or SIGINT; the process exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The store takes a lease on an upload for a moment (``shm.held_by_none_else``); an open
    # of that file meanwhile would send SIGIO, which ends a process by default.
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    try:
        await Daemon(options, out=out).run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def configure_logging(verbose: bool) -> None:
    """Log to stderr; quiet by default (the node prints its own start-up lines)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


__all__ = [
    "Daemon",
    "NodeOptions",
    "StartError",
    "bind_socket",
    "configure_logging",
    "primary_address",
    "run_node",
]
