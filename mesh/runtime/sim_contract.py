"""Contract-net allocation in the discrete-event simulator, and the baseline it is judged by.

``AllocationSim`` runs one ``NodeCore`` per node in ``mesh.runtime.sim.Simulation``, as a real node
does, and plays its owner's part: it submits tasks at their arrival times, "executes" what
the contract says (a task takes its base runtime times the node's slowness), and checks
what a daemon would see (results delivered once, resources never oversubscribed, tasks
only on capable nodes). Membership is modelled, not run (``ModelMembership``): every node
sees the same view, where a node's load lands as soon as it publishes it (every
``gossip_s`` at most), and a crashed node is declared dead everywhere ``detect_s`` after it
stopped (a stalled one too, if it stalls longer than that; it is alive again when it
resumes). What a node does with that (place the dead node's tasks again, publish its
load) is the real node's glue.

``workload`` draws a heterogeneous mesh and a mixed task stream from a seed;
``greedy_makespan`` is the omniscient list-scheduling baseline. No event loop, no clock,
no global state: a run is a function of its arguments.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from mesh.config import ContractConfig
from mesh.errors import RemoteProtocolError
from mesh.protocol.contract import (
    CancelExecution,
    Completed,
    Contract,
    Execute,
    Failed,
    TaskSpec,
)
from mesh.protocol.core import MemberState, MemberView
from mesh.protocol.membership import MemberDown, MembershipEvent
from mesh.protocol.messages import Address, Capabilities, Load, NodeId, Requirements, TaskId, Wire
from mesh.protocol.node_core import NodeCore
from mesh.protocol.resources import check, demand
from mesh.runtime.sim import Simulation


@dataclass(frozen=True, slots=True, kw_only=True)
class SimNode:
    """A simulated machine: what it gossips, and how slow it really is (1 = fastest)."""

    node: NodeId
    capabilities: Capabilities
    slowness: float
    speed: float = 1.0
    """What the node believes its speed factor to be at start (its calibration)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SimTask:
    """A task, when and where it is submitted, and what it really costs."""

    task_id: TaskId
    initiator: NodeId
    at: float
    requirements: Requirements
    base_s: float
    """Runtime on a node of slowness 1; also the submitter's estimate."""
    noise: float
    """This task's deviation from its kind's runtime (the same on every node)."""
    input_bytes: dict[NodeId, int] = field(default_factory=dict)

    def runtime_on(self, node: SimNode) -> float:
        return self.base_s * self.noise * node.slowness


@dataclass(slots=True)
class Outcome:
    """What one run measured."""

    tasks: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    duplicate_results: int = 0
    capacity_violations: int = 0
    misplaced: int = 0
    """Executions on a node whose capabilities do not meet the task's requirements."""
    executions: int = 0
    runs: dict[TaskId, int] = field(default_factory=dict)
    """Executions started per task (more than one: it ran twice)."""
    messages: int = 0
    first_submit: float = math.inf
    last_completion: float = 0.0
    placements: list[float] = field(default_factory=list)
    failures: dict[TaskId, Failed] = field(default_factory=dict)
    failed_at: dict[TaskId, float] = field(default_factory=dict)
    messages_by_kind: dict[str, int] = field(default_factory=dict)
    ran_on: dict[NodeId, int] = field(default_factory=dict)
    """Executions started per node."""
    most_waiting: dict[NodeId, int] = field(default_factory=dict)
    """Most tasks ever awarded to a node and not yet started there."""

    @property
    def makespan(self) -> float:
        return self.last_completion - self.first_submit

    def p50_placement(self) -> float:
        return float(np.median(self.placements)) if self.placements else math.nan


class SharedView:
    """The membership view every simulated node shares (a ``mesh.protocol.core.PeerView``)."""

    def __init__(self, nodes: Sequence[SimNode]) -> None:
        idle = Load(running=0, queued=0, backlog_s=0.0)
        self._views: dict[NodeId, MemberView] = {
            n.node: MemberView(
                node=n.node,
                address=Address(n.node),
                state=MemberState.ALIVE,
                incarnation=1,
                capabilities=n.capabilities,
                load=idle,
            )
            for n in nodes
        }
        self._list = list(self._views.values())

    def members(self) -> list[MemberView]:
        return self._list

    def member(self, node: NodeId) -> MemberView | None:
        return self._views.get(node)

    def update(
        self, node: NodeId, *, load: Load | None = None, state: MemberState | None = None
    ) -> None:
        old = self._views[node]
        self._views[node] = replace(
            old,
            load=old.load if load is None else load,
            state=old.state if state is None else state,
        )
        self._list = list(self._views.values())


class ModelMembership:
    """One node's membership in the model (``mesh.protocol.node_core.MembershipCore``): the shared
    view, its own load written there at once, and the deaths the simulation declares. It
    sends nothing; every node is known from the start, so joining asks nothing."""

    def __init__(self, view: SharedView, node: NodeId) -> None:
        self._view = view
        self._node = node
        self._events: list[MembershipEvent] = []
        self._due: float | None = None

    def members(self) -> list[MemberView]:
        return self._view.members()

    def member(self, node: NodeId) -> MemberView | None:
        return self._view.member(node)

    def declare_dead(self, node: NodeId, now: float) -> None:
        """Report ``node`` dead to this node at its next step, which is ``now``."""
        self._events.append(MemberDown(node=node, state=MemberState.DEAD))
        self._due = now

    def join(self, address: Address, now: float) -> None:
        """Every node is known from the start: there is nobody to ask."""

    def leave(self, now: float) -> None:
        self._view.update(self._node, state=MemberState.LEFT)

    def set_load(self, load: Load, now: float) -> None:
        self._view.update(self._node, load=load)

    def take_events(self) -> list[MembershipEvent]:
        out, self._events = self._events, []
        return out

    def gone(self, address: Address, now: float) -> None:
        """Deaths are the simulation's to declare (``declare_dead``); nothing dials here."""

    def receive(self, src: NodeId, msg: Wire, now: float) -> None:
        raise RemoteProtocolError("the model takes no membership messages", reason="unexpected")

    def handle_timer(self, now: float) -> None:
        self._due = None

    def next_timer(self) -> float | None:
        return self._due

    def take_outgoing(self) -> list[tuple[Address, Wire]]:
        return []


ModelNode = NodeCore[ModelMembership]
"""A simulated node: the real node's glue around a contract core and modelled membership."""


class AllocationSim:
    """One contract-net run over ``nodes`` and ``tasks``."""

    def __init__(
        self,
        *,
        nodes: Sequence[SimNode],
        tasks: Sequence[SimTask],
        config: ContractConfig,
        seed: int,
        latency: tuple[float, float] = (0.0002, 0.001),
        loss: float = 0.0,
        gossip_s: float = 0.5,
        detect_s: float = 1.0,
    ) -> None:
        self.config = config
        self.nodes = {n.node: n for n in nodes}
        self.tasks = {t.task_id: t for t in tasks}
        self.view = SharedView(nodes)
        self.gossip_s = gossip_s
        self.detect_s = detect_s
        self.sim: Simulation[ModelNode] = Simulation(
            seed=seed, latency=latency, loss=loss, sizer=lambda m: 0
        )
        self.out = Outcome(tasks=len(tasks))
        self._delivered: dict[TaskId, int] = {}
        self._used: dict[NodeId, dict[str, float]] = {n: {} for n in self.nodes}
        self._runs: dict[tuple[NodeId, TaskId], int] = {}
        self._run_seq = 0
        self._crashed: set[NodeId] = set()
        self.running_at_stall: dict[NodeId, frozenset[TaskId]] = {}
        """What each stalled node was running when its (latest) stall began."""
        self.sim.on_step.append(self._on_step)
        self.sim.on_send.append(self._on_send)
        for n in nodes:
            self.sim.add_node(n.node, Address(n.node), self._factory, at=0.0)
        for t in tasks:
            self.sim.act(t.initiator, t.at, self._submitter(t))
            self.out.first_submit = min(self.out.first_submit, t.at)

    # ----------------------------------------------------------------- building

    def _factory(self, node: NodeId, address: Address, now: float, rng: random.Random) -> ModelNode:
        membership = ModelMembership(self.view, node)
        contract = Contract(
            node=node,
            config=self.config,
            rng=rng,
            peers=membership,
            capabilities=self.nodes[node].capabilities,
            speed=self.nodes[node].speed,
        )
        return NodeCore(
            membership=membership, contract=contract, load_interval_s=self.gossip_s, now=now
        )

    def contract(self, node: NodeId) -> Contract:
        """The contract core of a running node."""
        return self.sim.core(node).contract

    def _submitter(self, task: SimTask) -> _Act:
        spec = TaskSpec(
            task_id=task.task_id,
            requirements=task.requirements,
            input_bytes=task.input_bytes,
            est_runtime_s=task.base_s,
        )

        def submit(core: ModelNode, now: float) -> None:
            core.submit(spec, {"task": task.requirements.task}, now)

        return submit

    def crash(self, node: NodeId, at: float) -> None:
        """``node`` stops at ``at``; membership declares it dead ``detect_s`` later."""
        self.sim.crash(node, at)

        def stopped(now: float) -> None:
            self._crashed.add(node)
            self._used[node] = {}

        self.sim.call_at(at, stopped)
        self.sim.call_at(at + self.detect_s, lambda now: self._declare_dead(node, now))

    def stall(self, node: NodeId, at: float, duration: float) -> None:
        """``node`` handles nothing from ``at`` for ``duration`` (a blocked loop, SIGSTOP),
        then sees ``now`` jump; what it ran at ``at`` is kept in ``running_at_stall``.
        Membership declares it dead ``detect_s`` into a longer stall, alive once it resumes."""
        self.sim.stall(node, at, duration)

        def began(now: float) -> None:
            self.running_at_stall[node] = frozenset(t for n, t in self._runs if n == node)

        self.sim.call_at(at, began)
        if duration <= self.detect_s:
            return

        def refuted(now: float) -> None:
            self.view.update(node, state=MemberState.ALIVE)

        self.sim.call_at(at + self.detect_s, lambda now: self._declare_dead(node, now))
        self.sim.call_at(at + duration, refuted)

    def _declare_dead(self, node: NodeId, now: float) -> None:
        """What membership would do ``detect_s`` after ``node`` went silent: mark it dead
        in the view and tell every other running node."""
        self.view.update(node, state=MemberState.DEAD)
        for other in self.nodes:
            if other != node and other not in self._crashed:
                self.sim.act(other, now, lambda core, t: core.membership.declare_dead(node, t))

    # ----------------------------------------------------------------- running

    def done(self) -> bool:
        return self.out.completed + self.out.failed >= self.out.tasks

    def run(self, limit_s: float) -> Outcome:
        """Run until every task has an outcome or ``limit_s`` of virtual time passed."""
        self.sim.run_until(limit_s, self.done)
        out = self.out
        out.lost = sum(1 for t in self.tasks if t not in self._delivered)
        out.messages = self.sim.stats.sent
        return out

    def _on_send(self, now: float, src: NodeId, dst: Address, msg: Wire, size: int) -> None:
        kind = type(msg).__name__
        self.out.messages_by_kind[kind] = self.out.messages_by_kind.get(kind, 0) + 1

    def _on_step(self, now: float, node: NodeId) -> None:
        if not self.sim.is_up(node):
            return
        core = self.sim.core(node)
        waiting = core.contract.waiting()
        if waiting > self.out.most_waiting.get(node, 0):
            self.out.most_waiting[node] = waiting
        for ev in core.take_events():
            if isinstance(ev, MembershipEvent):
                continue
            if isinstance(ev, Execute):
                self._execute(node, ev, now)
            elif isinstance(ev, CancelExecution):
                self._stop(node, ev.task_id)
            elif isinstance(ev, Completed):
                self._deliver(ev.task_id, now)
                self.out.completed += 1
                self.out.last_completion = max(self.out.last_completion, now)
                rec = core.contract.record(ev.task_id)
                if rec is not None and rec.rounds:
                    self.out.placements.append(rec.rounds[-1].at - rec.submitted_at)
            else:
                self._deliver(ev.task_id, now)
                self.out.failed += 1
                self.out.failures[ev.task_id] = ev
                self.out.failed_at[ev.task_id] = now

    def _deliver(self, task_id: TaskId, now: float) -> None:
        seen = self._delivered.get(task_id, 0)
        if seen:
            self.out.duplicate_results += 1
        self._delivered[task_id] = seen + 1

    def _execute(self, node: NodeId, ev: Execute, now: float) -> None:
        task = self.tasks[ev.task_id]
        machine = self.nodes[node]
        need = demand(task.requirements)
        used = self._used[node]
        have = machine.capabilities.resources
        for k, v in need.items():
            used[k] = used.get(k, 0.0) + v
            if used[k] > have.get(k, 0.0) + 1e-9:
                self.out.capacity_violations += 1
        if check(task.requirements, machine.capabilities):
            self.out.misplaced += 1
        self.out.executions += 1
        self.out.ran_on[node] = self.out.ran_on.get(node, 0) + 1
        self.out.runs[ev.task_id] = self.out.runs.get(ev.task_id, 0) + 1
        self._run_seq += 1
        token = self._run_seq
        self._runs[(node, ev.task_id)] = token

        def finish(core: ModelNode, t: float) -> None:
            if self._runs.get((node, ev.task_id)) != token:
                return
            del self._runs[(node, ev.task_id)]
            self._release(node, need)
            core.task_finished(ev.task_id, True, {"ran_on": node}, t)

        self.sim.act(node, now + task.runtime_on(machine), finish)

    def _stop(self, node: NodeId, task_id: TaskId) -> None:
        need = demand(self.tasks[task_id].requirements)

        def stop(core: ModelNode, t: float) -> None:
            if self._runs.pop((node, task_id), None) is None:
                return
            self._release(node, need)
            core.task_finished(task_id, False, {"message": "cancelled"}, t)

        self.sim.act(node, self.sim.now, stop)

    def _release(self, node: NodeId, need: dict[str, float]) -> None:
        used = self._used[node]
        for k, v in need.items():
            used[k] = used.get(k, 0.0) - v


_Act = Callable[[ModelNode, float], None]


# ---------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------

KINDS: dict[str, tuple[float, dict[str, float], dict[str, str], float]] = {
    # name: (base runtime s, resources, libraries, share of tasks)
    "preprocess": (0.5, {"cpu": 1.0}, {}, 0.40),
    "infer": (0.2, {"cpu": 1.0}, {"numpy": ">=1.26"}, 0.30),
    "features": (2.0, {"cpu": 1.0, "gpu": 1.0}, {"torch": ">=2.2"}, 0.15),
    "train": (4.0, {"cpu": 2.0}, {"scikit-learn": ">=1.3"}, 0.15),
}


def workload(
    *,
    n: int,
    initiators: int,
    tasks: int,
    seed: int,
    load: float = 0.9,
    burst: bool = False,
    slowness: tuple[float, float] = (1.0, 4.0),
) -> tuple[list[SimNode], list[SimTask]]:
    """A heterogeneous mesh and a mixed task stream, drawn from ``seed``.

    A quarter of the nodes have GPUs; slowness is uniform in ``slowness``; a fifth of the
    nodes lack scikit-learn. Initiators submit Poisson streams whose total work is
    ``load`` times what the mesh can do over the submission window, or with ``burst``
    every task at t=0.
    """
    rng = random.Random(f"workload/{seed}/{n}")
    nodes: list[SimNode] = []
    for i in range(n):
        gpu = i % 4 == 0
        resources = {"cpu": float(rng.choice((2, 4, 8))), "memory": 16e9}
        libraries = {"numpy": "1.26.4"}
        if gpu:
            resources["gpu"] = float(rng.choice((1, 2)))
            libraries["torch"] = "2.13.0"
        if i % 5 != 1:
            libraries["scikit-learn"] = "1.5.2"
        caps = Capabilities(resources=resources, libraries=libraries, tasks=tuple(KINDS), labels={})
        nodes.append(
            SimNode(node=NodeId(f"n{i:03d}"), capabilities=caps, slowness=rng.uniform(*slowness))
        )
    names = list(KINDS)
    shares = [KINDS[k][3] for k in names]
    drawn = rng.choices(names, weights=shares, k=tasks)
    mean_slowness = sum(slowness) / 2
    cpu_work = sum(KINDS[k][0] * KINDS[k][1]["cpu"] for k in drawn) * mean_slowness
    gpu_work = sum(KINDS[k][0] for k in drawn if "gpu" in KINDS[k][1]) * mean_slowness
    cpu_cap = sum(x.capabilities.resources["cpu"] for x in nodes)
    gpu_cap = sum(x.capabilities.resources.get("gpu", 0.0) for x in nodes)
    window = max(cpu_work / cpu_cap, gpu_work / max(gpu_cap, 1.0)) / load
    starters = [nodes[(i * n) // initiators].node for i in range(initiators)]
    out: list[SimTask] = []
    for j, kind in enumerate(drawn):
        base, resources, libraries, _ = KINDS[kind]
        out.append(
            SimTask(
                task_id=TaskId(f"t{j:05d}"),
                initiator=starters[j % initiators],
                at=0.0 if burst else rng.uniform(0.0, window),
                requirements=Requirements(
                    task=kind, resources=dict(resources), libraries=dict(libraries), labels={}
                ),
                base_s=base,
                noise=rng.lognormvariate(0.0, 0.1),
            )
        )
    out.sort(key=lambda t: t.at)
    return nodes, out


def greedy_makespan(nodes: Sequence[SimNode], tasks: Sequence[SimTask]) -> float:
    """Omniscient list scheduling: in arrival order, each task starts on the capable node
    where it would finish first, knowing every true runtime and every lane's free time."""
    n = len(nodes)
    max_cpu = int(max(x.capabilities.resources.get("cpu", 0.0) for x in nodes))
    max_gpu = max(1, int(max(x.capabilities.resources.get("gpu", 0.0) for x in nodes)))
    cpu = np.full((n, max_cpu), np.inf)
    gpu = np.full((n, max_gpu), np.inf)
    for i, x in enumerate(nodes):
        cpu[i, : int(x.capabilities.resources.get("cpu", 0.0))] = 0.0
        gpu[i, : int(x.capabilities.resources.get("gpu", 0.0))] = 0.0
    slowness = np.array([x.slowness for x in nodes])
    masks: dict[str, np.ndarray] = {}
    first = min(t.at for t in tasks)
    end = first
    for t in tasks:
        mask = masks.get(t.requirements.task)
        if mask is None:
            mask = np.array([not check(t.requirements, x.capabilities) for x in nodes])
            masks[t.requirements.task] = mask
        need = demand(t.requirements)
        c = int(need.get("cpu", 0.0))
        g = int(need.get("gpu", 0.0))
        start = np.full(n, t.at)
        if c:
            start = np.maximum(start, cpu[:, c - 1])
        if g:
            start = np.maximum(start, gpu[:, g - 1])
        finish = start + t.base_s * t.noise * slowness
        finish = np.where(mask, finish, np.inf)
        k = int(np.argmin(finish))
        if c:
            cpu[k, :c] = finish[k]
            cpu[k].sort()
        if g:
            gpu[k, :g] = finish[k]
            gpu[k].sort()
        end = max(end, float(finish[k]))
    return end - first
