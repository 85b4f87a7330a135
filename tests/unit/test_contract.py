"""Hand-stepped tests of the contract-net core: every transition, bad input, batching.

No event loop and no sleeps: the clock is a float the test moves, and messages go from one
core to another only when the test says so.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TypeVar

import pytest

from mesh.config import ContractConfig
from mesh.errors import (
    ErrorInfo,
    LocalProtocolError,
    NoCapablePeerError,
    RemoteProtocolError,
    TaskError,
)
from mesh.protocol.codec import dumps, loads
from mesh.protocol.contract import (
    FAILED_NO_BIDS,
    FAILED_NO_PEER,
    FAILED_TASK,
    MAX_ESTIMATE_S,
    CancelExecution,
    Completed,
    Contract,
    ContractEvent,
    Execute,
    Failed,
    TaskSpec,
)
from mesh.protocol.core import MemberState, MemberView
from mesh.protocol.messages import (
    Accept,
    Address,
    CallForProposals,
    Cancel,
    Capabilities,
    Confirm,
    Decline,
    Failure,
    Load,
    NodeId,
    Progress,
    Propose,
    Refuse,
    Reject,
    Requirements,
    Result,
    TaskId,
    Wire,
)
from mesh.protocol.resources import CPU_CORES_LABEL, CPU_POOL_LABEL, shared_cores

CFG = ContractConfig.test()


def caps(cpu: float = 2, gpu: float = 0, tasks: tuple[str, ...] = ("t",)) -> Capabilities:
    res = {"cpu": float(cpu), "memory": 8e9}
    if gpu:
        res["gpu"] = float(gpu)
    return Capabilities(resources=res, libraries={"numpy": "1.26.4"}, tasks=tasks, labels={})


def req(task: str = "t", **resources: float) -> Requirements:
    return Requirements(task=task, resources=dict(resources), libraries={}, labels={})


def spec(i: int | str, r: Requirements | None = None, **kw: object) -> TaskSpec:
    return TaskSpec(task_id=TaskId(f"task-{i}"), requirements=r or req(), **kw)  # type: ignore[arg-type]


class Peers:
    """A PeerView the test edits by hand."""

    def __init__(self) -> None:
        self.views: dict[NodeId, MemberView] = {}

    def add(self, node: str, capabilities: Capabilities) -> None:
        self.views[NodeId(node)] = MemberView(
            node=NodeId(node),
            address=Address(f"addr:{node}"),
            state=MemberState.ALIVE,
            incarnation=1,
            capabilities=capabilities,
            load=Load(running=0, queued=0, backlog_s=0.0),
        )

    def set_state(self, node: str, state: MemberState) -> None:
        self.views[NodeId(node)] = replace(self.views[NodeId(node)], state=state)

    def members(self) -> list[MemberView]:
        return list(self.views.values())

    def member(self, node: NodeId) -> MemberView | None:
        return self.views.get(node)


Sent = list[tuple[str, str, Wire]]
W = TypeVar("W", bound=Wire)


class Mesh:
    """Several cores sharing one PeerView; the test moves messages and time."""

    def __init__(
        self,
        nodes: dict[str, Capabilities],
        config: ContractConfig = CFG,
        seed: int = 7,
        speeds: Mapping[str, float] | None = None,
    ) -> None:
        self.peers = Peers()
        self.cores: dict[str, Contract] = {}
        for name, c in nodes.items():
            self.peers.add(name, c)
        for i, (name, c) in enumerate(nodes.items()):
            self.cores[name] = Contract(
                node=NodeId(name),
                config=config,
                rng=random.Random(seed + i),
                peers=self.peers,
                capabilities=c,
                speed=(speeds or {}).get(name, 1.0),
            )
        self.events: dict[str, list[ContractEvent]] = {n: [] for n in nodes}

    def out(self, node: str) -> Sent:
        return [(node, addr.split(":", 1)[1], m) for addr, m in self.cores[node].take_outgoing()]

    def collect(self) -> None:
        for n, core in self.cores.items():
            self.events[n].extend(core.take_events())

    def pump(
        self, now: float, drop: Callable[[str, str, Wire], bool] = lambda s, d, m: False
    ) -> Sent:
        """Deliver everything until nobody has anything to send; returns what was sent."""
        log: Sent = []
        while True:
            batch = [x for n in self.cores for x in self.out(n)]
            if not batch:
                break
            for src, dst, msg in batch:
                log.append((src, dst, msg))
                if not drop(src, dst, msg):
                    self.cores[dst].receive(NodeId(src), msg, now)
        self.collect()
        return log

    def timers(self, now: float) -> None:
        for core in self.cores.values():
            t = core.next_timer()
            if t is not None and t <= now:
                core.handle_timer(now)

    def run(self, node: str, now: float, ok: bool = True) -> list[TaskId]:
        """Finish every task ``node`` was told to execute; returns their ids."""
        done = []
        for ev in list(self.events[node]):
            if isinstance(ev, Execute):
                self.cores[node].task_finished(ev.task_id, ok, f"v-{ev.task_id}", now)
                done.append(ev.task_id)
                self.events[node].remove(ev)
        return done


def of(sent: Sent, kind: type[W]) -> list[tuple[str, str, W]]:
    return [(s, d, m) for s, d, m in sent if isinstance(m, kind)]


def last(sent: Sent, kind: type[W]) -> W:
    msg = sent[-1][2]
    assert isinstance(msg, kind)
    return msg


def initiator_mesh() -> Mesh:
    """``i`` cannot run ``t`` itself; ``a``, ``b``, ``c`` can."""
    return Mesh({"i": caps(tasks=()), "a": caps(), "b": caps(), "c": caps()})


def open_auction(mesh: Mesh, n: int = 1, now: float = 0.0) -> CallForProposals:
    for k in range(n):
        mesh.cores["i"].submit(spec(k), {"k": k}, now)
    mesh.cores["i"].handle_timer(now)
    sent = mesh.out("i")
    assert sorted(d for _, d, _ in sent) == ["a", "b", "c"]
    msg = sent[0][2]
    assert isinstance(msg, CallForProposals)
    return msg


def proposal(
    cfp: int,
    *costs: float,
    run_s: float | None = None,
    lanes: int = 1,
    bandwidth: dict[NodeId, float] | None = None,
) -> Propose:
    """A bid; one task's runtime is the first slot's cost unless said (an idle bidder)."""
    return Propose(
        cfp=cfp,
        costs=costs,
        lanes=lanes,
        run_s=costs[0] if run_s is None else run_s,
        bandwidth=bandwidth or {},
    )


def bid(
    mesh: Mesh,
    node: str,
    cfp: int,
    *costs: float,
    now: float = 0.0,
    run_s: float | None = None,
    lanes: int = 1,
) -> Sent:
    mesh.cores["i"].receive(NodeId(node), proposal(cfp, *costs, run_s=run_s, lanes=lanes), now)
    return mesh.out("i")


def result(tid: str, value: object, run_s: float = 0.1) -> Result:
    return Result(tasks=(TaskId(tid),), values=(value,), run_s=(run_s,))


# ---------------------------------------------------------------------------------------
# Awarding
# ---------------------------------------------------------------------------------------


def test_award_goes_to_the_cheapest_bid_and_releases_the_others() -> None:
    mesh = initiator_mesh()
    cfp = open_auction(mesh).cfp
    assert bid(mesh, "a", cfp, 5.0) == []
    assert bid(mesh, "b", cfp, 2.0) == []
    sent = bid(mesh, "c", cfp, 3.0)
    accepts = of(sent, Accept)
    assert [(d, m.tasks, m.payloads) for _, d, m in accepts] == [("b", ("task-0",), ({"k": 0},))]
    assert sorted(d for _, d, _ in of(sent, Reject)) == ["a", "c"]
    rec = mesh.cores["i"].record(TaskId("task-0"))
    assert rec is not None
    assert rec.winner == "b"
    assert rec.cost_s == 2.0
    assert rec.rounds[0].bids == {"a": 5.0, "b": 2.0, "c": 3.0}


def two_runners() -> Mesh:
    """``i`` cannot run ``t``; only ``a`` and ``b`` can: nobody is left to recruit."""
    return Mesh({"i": caps(tasks=()), "a": caps(), "b": caps()})


def call_out(mesh: Mesh, n: int, now: float = 0.0) -> tuple[int, set[str]]:
    """Submit ``n`` tasks to ``i``: the one call for proposals they share, and whom it asked."""
    for k in range(n):
        mesh.cores["i"].submit(spec(k), {"k": k}, now)
    mesh.cores["i"].handle_timer(now)
    calls = of(mesh.out("i"), CallForProposals)
    assert {len(m.tasks) for _, _, m in calls} == {n}  # one call, not one per task
    (cfp,) = {m.cfp for _, _, m in calls}
    return cfp, {d for _, d, _ in calls}


def states(core: Contract, n: int) -> list[str]:
    recs = [core.record(TaskId(f"task-{k}")) for k in range(n)]
    return [r.state if r is not None else "?" for r in recs]


def advance(core: Contract, until: float) -> None:
    """Serve every timer of ``core`` due by ``until``, each at its own time."""
    while (t := core.next_timer()) is not None and t <= until:
        core.handle_timer(t)


def test_a_burst_is_bound_a_window_at_a_time_and_refilled_as_results_come_back() -> None:
    """Late binding: each pool worker holds what it would start soon (one task here, as
    tasks are longer than ``bind_ahead_s``); the rest wait at the initiator and go, under
    the call each worker bid on, to whichever worker a result frees. Work spreads as the
    workers' speeds do."""
    mesh = two_runners()
    core = mesh.cores["i"]
    cfp, _ = call_out(mesh, 6)
    runtime = {"a": 0.1, "b": 0.2}  # b is half as fast
    assert bid(mesh, "a", cfp, 0.1, 0.2, 0.3, run_s=0.1) == []
    sent = bid(mesh, "b", cfp, 0.2, 0.4, run_s=0.2)
    assert {d: m.tasks for _, d, m in of(sent, Accept)} == {"a": ("task-0",), "b": ("task-1",)}
    assert of(sent, Reject) == []  # both stay in the pool
    advance(core, 0.0)
    assert of(mesh.out("i"), CallForProposals) == []  # nobody outside the pool to recruit
    assert states(core, 6) == ["awarded"] * 2 + ["queued"] * 4

    held = {"a": TaskId("task-0"), "b": TaskId("task-1")}
    ends = dict(runtime)
    ran: dict[str, list[str]] = {"a": ["task-0"], "b": ["task-1"]}
    while ends:
        node = min(ends, key=lambda n: (ends[n], n))
        now = ends.pop(node)
        advance(core, now)
        core.receive(NodeId(node), result(held.pop(node), node, runtime[node]), now)
        advance(core, now)
        for _, dst, acc in of(mesh.out("i"), Accept):
            assert acc.cfp == cfp  # a refill, under the call the worker bid on
            assert len(acc.tasks) == 1  # never more than its window
            assert dst not in held
            core.receive(NodeId(dst), Confirm(cfp=cfp, tasks=acc.tasks), now)
            held[dst] = acc.tasks[0]
            ends[dst] = now + runtime[dst]
            ran[dst].append(acc.tasks[0])
    completed = [e.task_id for e in core.take_events() if isinstance(e, Completed)]
    assert sorted(completed) == [f"task-{k}" for k in range(6)]  # each exactly once
    assert (len(ran["a"]), len(ran["b"])) == (4, 2)  # 2:1, as their speeds
    assert core.stats()["awards"] == 6
    assert "reannounces" not in core.stats()
    rec = core.record(TaskId(ran["a"][-1]))
    assert rec is not None
    assert (rec.winner, rec.est_s, rec.run_s) == ("a", 0.1, 0.1)


def test_short_tasks_bind_a_window_of_several_per_lane() -> None:
    """A worker holds every task it would start within ``bind_ahead_s``: short tasks
    queue there to hide the round trip of the refill."""
    mesh = two_runners()
    cfp, _ = call_out(mesh, 40)
    run = CFG.bind_ahead_s / 4  # five per lane: one running, four bound ahead
    costs = tuple(run * (k + 1) for k in range(10))
    bid(mesh, "a", cfp, *costs, run_s=run)
    sent = bid(mesh, "b", cfp, *costs[:8:2], run_s=run, lanes=2)  # two lanes, four slots
    won = {d: len(m.tasks) for _, d, m in of(sent, Accept)}
    assert won == {"a": 5, "b": 4}  # b: two lanes of five, but it offered four slots


def test_identical_bids_still_place_the_task() -> None:
    """Two idle workers with the same bid each finish a task exactly when the other
    would: one of them takes it (a tie once left it to neither, and called again)."""
    for now in (0.0, 1.0, 3.7):
        mesh = two_runners()
        cfp, _ = call_out(mesh, 1, now)
        bid(mesh, "a", cfp, 0.1, now=now)
        sent = bid(mesh, "b", cfp, 0.1, now=now)
        assert len(of(sent, Accept)) == 1, now
        assert len(of(sent, Reject)) == 1, now
        advance(mesh.cores["i"], now)
        assert of(mesh.out("i"), CallForProposals) == [], now


def four_runners() -> Mesh:
    """``i`` cannot run ``t``; ``a`` .. ``d`` can: a call asks three of them."""
    return Mesh({"i": caps(tasks=()), **{n: caps() for n in "abcd"}})


def test_a_queue_the_pool_would_take_long_over_recruits_outside_the_pool() -> None:
    mesh = four_runners()
    core = mesh.cores["i"]
    cfp, asked = call_out(mesh, 8)
    assert len(asked) == CFG.candidates
    sent = [x for node in sorted(asked) for x in bid(mesh, node, cfp, 1.0)]
    assert len(of(sent, Accept)) == 3  # one each: a task takes a second, their window
    advance(core, 0.0)
    calls = of(mesh.out("i"), CallForProposals)
    (outsider,) = set("abcd") - asked
    assert [d for _, d, _ in calls] == [outsider]  # only nodes outside the pool
    recruit = calls[0][2]
    assert recruit.tasks == ("task-6", "task-7")  # from the back of the queue
    sent = bid(mesh, outsider, recruit.cfp, 1.0)
    assert [(d, m.cfp, m.tasks) for _, d, m in of(sent, Accept)] == [
        (outsider, recruit.cfp, ("task-6",))
    ]
    assert states(core, 8).count("awarded") == 4
    assert states(core, 8).count("queued") == 4


def next_call(mesh: Mesh, until: float) -> tuple[float, str, CallForProposals]:
    """Serve ``i``'s timers until it sends a call for proposals (by ``until``)."""
    core = mesh.cores["i"]
    while (t := core.next_timer()) is not None and t <= until:
        core.handle_timer(t)
        calls = of(mesh.out("i"), CallForProposals)
        if calls:
            (call,) = calls
            return t, call[1], call[2]
    raise AssertionError(f"no call for proposals by {until}")


def test_a_recruiting_call_nobody_answers_fails_nothing_and_waits_to_call_again() -> None:
    mesh = four_runners()
    core = mesh.cores["i"]
    cfp, asked = call_out(mesh, 8)
    for node in sorted(asked):
        bid(mesh, node, cfp, 0.5)  # one each; five wait for 0.5 s tasks
    _, outsider, _ = next_call(mesh, 0.0)
    assert outsider not in asked
    now = CFG.reply_timeout_s
    advance(core, now)  # the outsider stayed silent: its tasks go back to the pool's queue
    assert core.take_events() == []
    assert states(core, 8) == ["awarded"] * 3 + ["queued"] * 5
    at, node, again = next_call(mesh, 0.9)  # within the leases of what the pool holds
    assert node == outsider
    assert at >= now + CFG.recruit_s  # quiet a while first, not called again at once
    # Refused, the same: no call per round trip for as long as the pool is busy.
    now = at + 0.001
    core.receive(NodeId(outsider), Refuse(cfp=again.cfp, reason={"state": "leaving"}), now)
    advance(core, now + CFG.recruit_s)
    assert of(mesh.out("i"), CallForProposals) == []
    assert core.take_events() == []
    assert states(core, 8) == ["awarded"] * 3 + ["queued"] * 5


def test_a_decline_puts_the_task_back_and_a_pool_worker_takes_it() -> None:
    mesh = two_runners()
    core = mesh.cores["i"]
    cfp, _ = call_out(mesh, 2)
    bid(mesh, "a", cfp, 1.0)
    sent = bid(mesh, "b", cfp, 1.0)
    assert {d: m.tasks for _, d, m in of(sent, Accept)} == {"a": ("task-0",), "b": ("task-1",)}
    core.receive(NodeId("a"), Decline(cfp=cfp, tasks=(TaskId("task-0"),), reason="busy"), 0.01)
    assert core.stats()["declines_received"] == 1
    assert states(core, 2) == ["queued", "awarded"]  # back in the queue, not to a next bid
    mesh.timers(0.01)
    # Another initiator's task took a's lane: a stays in the pool, taken for about a run,
    # and nobody is called (the pool is everyone there is).
    assert mesh.out("i") == []
    mesh.timers(0.5)
    assert of(mesh.out("i"), Accept) == []
    assert states(core, 2) == ["queued", "awarded"]
    core.receive(NodeId("b"), result("task-1", "one", 1.0), 1.0)
    mesh.timers(1.0)
    assert [(d, m.cfp, m.tasks) for _, d, m in of(mesh.out("i"), Accept)] == [
        ("b", cfp, ("task-0",))
    ]
    rec = core.record(TaskId("task-0"))
    assert rec is not None
    assert (rec.winner, rec.attempts) == ("b", 0)  # a decline is not a failed placement


def test_a_worker_that_declined_as_busy_is_tried_again_after_a_run() -> None:
    mesh = two_runners()
    core = mesh.cores["i"]
    cfp, _ = call_out(mesh, 2)
    bid(mesh, "a", cfp, 0.2)
    bid(mesh, "b", cfp, 3.0)  # b runs one for 3 s: a, free again at 0.21, is sooner
    core.receive(NodeId("a"), Decline(cfp=cfp, tasks=(TaskId("task-0"),), reason="busy"), 0.01)
    mesh.timers(0.1)
    assert of(mesh.out("i"), Accept) == []
    mesh.timers(0.21)
    assert [(d, m.cfp, len(m.tasks)) for _, d, m in of(mesh.out("i"), Accept)] == [("a", cfp, 1)]


def test_a_holder_that_declined_its_own_task_as_busy_gets_it_again_only_after_a_run() -> None:
    """``a`` holds the task's input, and work of another group took its lane: after that
    busy decline the task waits for the lane, instead of going back to ``a`` at once, as
    often as the two can send."""
    mesh = Mesh({"i": caps(tasks=()), "a": caps(cpu=1)})
    core = mesh.cores["i"]
    core.submit(spec(0, input_bytes={NodeId("a"): 1000}, est_runtime_s=1.0), None, 0.0)
    core.handle_timer(0.0)
    ((_, dst, accept),) = of(mesh.pump(0.0), Accept)
    assert dst == "a"
    core.receive(
        NodeId("a"), Decline(cfp=accept.cfp, tasks=(TaskId("task-0"),), reason="busy"), 0.1
    )
    for now in (0.1, 0.5, 0.9):
        mesh.timers(now)
        assert of(mesh.out("i"), Accept) == []
    assert states(core, 1) == ["queued"]
    mesh.timers(1.1)  # a's lane is free again: a is asked for the task again
    assert [(d, type(m)) for _, d, m in mesh.out("i")] == [("a", CallForProposals)]


def test_a_busy_decline_calls_for_proposals_beside_the_busy_worker() -> None:
    mesh = initiator_mesh()
    core = mesh.cores["i"]
    cfp = open_auction(mesh).cfp
    bid(mesh, "a", cfp, 5.0)
    bid(mesh, "b", cfp, 2.0)
    sent = bid(mesh, "c", cfp, 3.0)
    assert [d for _, d, _ in of(sent, Accept)] == ["b"]
    core.receive(NodeId("b"), Decline(cfp=cfp, tasks=(TaskId("task-0"),), reason="busy"), 0.01)
    assert of(mesh.out("i"), Accept) == []  # no next bid: the losers were released
    mesh.timers(0.01)
    # b, busy for a run, stays in the pool; the others are called again
    calls = of(mesh.out("i"), CallForProposals)
    assert sorted(d for _, d, _ in calls) == ["a", "c"]
    again = calls[0][2].cfp
    assert again != cfp
    bid(mesh, "a", again, 5.0, now=0.02)
    sent = bid(mesh, "c", again, 3.0, now=0.02)
    assert [(d, m.cfp) for _, d, m in of(sent, Accept)] == [("c", again)]


def test_confirm_and_result_are_delivered_once() -> None:
    mesh = initiator_mesh()
    cfp = open_auction(mesh).cfp
    for n, c in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        bid(mesh, n, cfp, c)
    core = mesh.cores["i"]
    t0 = TaskId("task-0")
    core.receive(NodeId("a"), Confirm(cfp=cfp, tasks=(t0,)), 0.01)
    core.receive(NodeId("a"), result(t0, 42, run_s=0.45), 0.5)
    core.receive(NodeId("a"), result(t0, 42, run_s=0.45), 0.6)
    events = core.take_events()
    assert events == [Completed(task_id=t0, node=NodeId("a"), value=42)]
    assert core.stats()["duplicates"] == 1
    rec = core.record(t0)
    assert rec is not None
    assert (rec.state, rec.run_s) == ("completed", 0.45)  # what the winner measured


def test_late_bid_is_ignored() -> None:
    mesh = initiator_mesh()
    cfp = open_auction(mesh).cfp
    bid(mesh, "a", cfp, 5.0)
    mesh.cores["i"].handle_timer(CFG.reply_timeout_s)  # b and c silent: decide without them
    assert [d for _, d, _ in of(mesh.out("i"), Accept)] == ["a"]
    assert bid(mesh, "b", cfp, 0.1, now=CFG.reply_timeout_s + 0.01) == []
    assert mesh.cores["i"].stats()["late_answers"] == 1
    rec = mesh.cores["i"].record(TaskId("task-0"))
    assert rec is not None
    assert rec.winner == "a"
    assert set(rec.rounds[0].silent) == {"b", "c"}


def test_a_bid_that_finishes_before_the_others_answer_is_awarded_at_once() -> None:
    mesh = initiator_mesh()
    cfp = open_auction(mesh).cfp
    # Done 1 ms from now, and its answer took 3 ms: no later bid can make up for the wait.
    sent = bid(mesh, "a", cfp, 0.001, now=0.003)
    assert [d for _, d, _ in of(sent, Accept)] == ["a"]
    assert sorted(d for _, d, _ in of(sent, Reject)) == ["b", "c"]  # their slots go free
    assert mesh.cores["i"].stats()["early_awards"] == 1
    assert bid(mesh, "b", cfp, 0.0005, now=0.004) == []
    assert mesh.cores["i"].stats()["late_answers"] == 1


def test_a_bid_slower_than_its_round_trip_waits_for_the_others() -> None:
    mesh = initiator_mesh()
    cfp = open_auction(mesh).cfp
    assert bid(mesh, "a", cfp, 0.010, now=0.003) == []
    assert bid(mesh, "b", cfp, 0.005, now=0.004) == []
    sent = bid(mesh, "c", cfp, 0.020, now=0.005)
    assert [d for _, d, _ in of(sent, Accept)] == ["b"]
    assert "early_awards" not in mesh.cores["i"].stats()


def test_a_batch_settles_early_only_if_the_first_bid_finishes_all_of_it_in_time() -> None:
    mesh = initiator_mesh()
    cfp = open_auction(mesh, n=3).cfp
    # Three slots, but the third ends after the 3 ms this answer took: wait for the others.
    assert bid(mesh, "a", cfp, 0.001, 0.002, 0.004, now=0.003) == []
    mesh2 = initiator_mesh()
    cfp2 = open_auction(mesh2, n=3).cfp
    sent = bid(mesh2, "a", cfp2, 0.001, 0.002, 0.0025, now=0.003)
    assert [(d, len(m.tasks)) for _, d, m in of(sent, Accept)] == [("a", 3)]


def test_rejects_and_confirms_share_the_next_write_or_go_after_the_lazy_delay() -> None:
    lazy = replace(CFG, lazy_delay_s=0.005)
    mesh = Mesh({"i": caps(tasks=()), "a": caps(), "b": caps()}, config=lazy)
    core = mesh.cores["i"]
    core.submit(spec(0), {"k": 0}, 0.0)
    core.handle_timer(0.0)
    sent = mesh.out("i")
    for _, dst, msg in sent:
        mesh.cores[dst].receive(NodeId("i"), msg, 0.0)
    bids = [x for n in ("a", "b") for x in mesh.out(n)]
    for src, _, msg in bids:
        core.receive(NodeId(src), msg, 0.001)
    winner = of(mesh.out("i"), Accept)[0][1]
    loser = "b" if winner == "a" else "a"
    core.handle_timer(0.001)  # the pool's refill after the decision: nothing left to bind
    assert mesh.out("i") == []
    assert core.next_timer() == pytest.approx(0.006)  # the loser's reject waits
    # A second task: the reject to the loser rides with its call for proposals.
    core.submit(spec(1), {"k": 1}, 0.002)
    core.handle_timer(0.002)
    to_loser = [type(m).__name__ for _, d, m in mesh.out("i") if d == loser]
    assert to_loser == ["Reject", "CallForProposals"]
    core.handle_timer(0.010)  # nothing lazy is left over for anyone
    assert not [m for _, _, m in mesh.out("i") if isinstance(m, Reject)]


def test_a_lazy_confirm_goes_with_the_result() -> None:
    lazy = replace(CFG, lazy_delay_s=0.005)
    mesh = Mesh({"i": caps(tasks=()), "a": caps()}, config=lazy)
    mesh.cores["i"].submit(spec(0), {"k": 0}, 0.0)
    mesh.cores["i"].handle_timer(0.0)
    mesh.pump(0.0)
    assert of(mesh.out("a"), Confirm) == []  # held back
    mesh.run("a", 0.001)
    sent = mesh.out("a")
    assert [type(m).__name__ for _, _, m in sent] == ["Confirm", "Result"]
    for _, _, msg in sent:
        mesh.cores["i"].receive(NodeId("a"), msg, 0.001)
    assert mesh.cores["i"].take_events() == [
        Completed(task_id=TaskId("task-0"), node=NodeId("a"), value="v-task-0")
    ]


def test_a_lazy_message_goes_alone_after_the_delay() -> None:
    lazy = replace(CFG, lazy_delay_s=0.005)
    mesh = Mesh({"i": caps(tasks=()), "a": caps()}, config=lazy)
    mesh.cores["i"].submit(spec(0), {"k": 0}, 0.0)
    mesh.cores["i"].handle_timer(0.0)
    mesh.pump(0.0)
    core = mesh.cores["a"]
    assert core.next_timer() == pytest.approx(0.005)
    core.handle_timer(0.005)
    assert [type(m).__name__ for _, _, m in mesh.out("a")] == ["Confirm"]


# ---------------------------------------------------------------------------------------
# Leases and reannouncement
# ---------------------------------------------------------------------------------------


def awarded_to_a(mesh: Mesh) -> int:
    cfp = open_auction(mesh).cfp
    for n, c in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        bid(mesh, n, cfp, c)
    mesh.cores["i"].receive(NodeId("a"), Confirm(cfp=cfp, tasks=(TaskId("task-0"),)), 0.0)
    return cfp


def test_lease_expiry_reannounces_and_progress_keeps_it() -> None:
    mesh = initiator_mesh()
    awarded_to_a(mesh)
    core = mesh.cores["i"]
    t = 0.0
    while t < 3 * CFG.lease_s:  # progress renews the lease well past its length
        t += CFG.progress_interval_s
        core.receive(NodeId("a"), Progress(tasks=(TaskId("task-0"),)), t)
        core.handle_timer(t)
        assert mesh.out("i") == []
    t += CFG.lease_s + 0.01
    core.handle_timer(t)
    sent = mesh.out("i")
    assert [d for _, d, m in of(sent, Cancel)] == ["a"]
    calls = of(sent, CallForProposals)
    assert len(calls) == 3
    assert all(m.tasks == ("task-0",) for _, _, m in calls)
    assert core.stats()["leases_lapsed"] == 1


def test_winner_death_reannounces() -> None:
    mesh = initiator_mesh()
    awarded_to_a(mesh)
    core = mesh.cores["i"]
    mesh.peers.set_state("a", MemberState.DEAD)
    core.peer_down(NodeId("a"), 0.1)
    core.handle_timer(0.1)
    calls = of(mesh.out("i"), CallForProposals)
    assert sorted(d for _, d, _ in calls) == ["b", "c"]  # the dead node is no candidate


def test_old_winner_result_after_reannounce_is_accepted_once_and_cancels_the_new() -> None:
    mesh = initiator_mesh()
    awarded_to_a(mesh)
    core = mesh.cores["i"]
    core.peer_down(NodeId("a"), 0.1)
    core.handle_timer(0.1)
    cfp = of(mesh.out("i"), CallForProposals)[0][2].cfp
    bid(mesh, "b", cfp, 1.0)
    bid(mesh, "c", cfp, 2.0)
    core.handle_timer(0.1 + CFG.reply_timeout_s)
    mesh.out("i")
    core.receive(NodeId("a"), result("task-0", "late"), 0.3)
    assert [d for _, d, _ in of(mesh.out("i"), Cancel)] == ["b"]
    core.receive(NodeId("b"), result("task-0", "new"), 0.4)
    assert core.take_events() == [
        Completed(task_id=TaskId("task-0"), node=NodeId("a"), value="late")
    ]


def test_cancel_reaches_the_winner_and_its_result_is_dropped() -> None:
    mesh = Mesh({"i": caps(tasks=()), "a": caps()})
    core = mesh.cores["i"]
    core.submit(spec(0), "p", 0.0)
    core.handle_timer(0.0)
    mesh.pump(0.0)
    assert [e.task_id for e in mesh.events["a"] if isinstance(e, Execute)] == ["task-0"]
    core.cancel(TaskId("task-0"), 0.1)
    mesh.pump(0.1)
    assert CancelExecution(task_id=TaskId("task-0")) in mesh.events["a"]
    mesh.run("a", 0.2, ok=False)
    sent = mesh.pump(0.2)
    assert of(sent, Result) == []
    assert of(sent, Failure) == []
    assert mesh.events["i"] == []


# ---------------------------------------------------------------------------------------
# Participant
# ---------------------------------------------------------------------------------------


def call(
    cfp: int, n: int, r: Requirements | None = None, est: float | None = 1.0
) -> CallForProposals:
    return CallForProposals(
        cfp=cfp,
        requirements=r or req(),
        tasks=tuple(TaskId(f"x{cfp}-{k}") for k in range(n)),
        est_runtime_s=est,
        inputs={},
    )


def participant(cpu: float = 1, gpu: float = 0) -> Mesh:
    return Mesh({"p": caps(cpu=cpu, gpu=gpu), "i": caps(tasks=()), "j": caps(tasks=())})


def test_participant_bids_completion_times_and_queues_when_busy() -> None:
    mesh = participant(cpu=2)
    p = mesh.cores["p"]
    p.receive(NodeId("i"), call(1, 8), 0.0)
    ((_, _, prop),) = mesh.out("p")
    assert isinstance(prop, Propose)
    # 2 slots, 2 queued per slot: 6 slots offered, completion 1, 1, 2, 2, 3, 3 seconds.
    assert prop.costs == (1.0, 1.0, 2.0, 2.0, 3.0, 3.0)
    p.receive(NodeId("j"), call(2, 4), 0.0)
    ((_, _, prop2),) = mesh.out("p")
    assert isinstance(prop2, Propose)  # busy is not a refusal: it bids with its queue
    assert prop2.costs == (4.0,)


def test_reservation_expiry_releases_capacity() -> None:
    mesh = participant(cpu=1)
    p = mesh.cores["p"]
    p.receive(NodeId("i"), call(1, 3), 0.0)
    mesh.out("p")
    p.receive(NodeId("j"), call(2, 3), 0.01)
    busy = last(mesh.out("p"), Propose)
    assert busy.costs == (4.0,)
    assert p.load().queued == 4
    t = CFG.reservation_s + 0.001
    p.handle_timer(t)
    assert p.load().queued == 1
    p.handle_timer(0.01 + CFG.reservation_s)
    assert p.load().queued == 0
    p.receive(NodeId("j"), call(3, 3), 1.0)
    free = last(mesh.out("p"), Propose)
    assert free.costs == (1.0, 2.0, 3.0)


def test_reject_releases_the_reservation() -> None:
    mesh = participant(cpu=1)
    p = mesh.cores["p"]
    p.receive(NodeId("i"), call(1, 3), 0.0)
    mesh.out("p")
    p.receive(NodeId("i"), Reject(cfp=1), 0.01)
    assert p.load().queued == 0


def test_participant_refuses_with_the_missing_capability() -> None:
    mesh = participant(cpu=4)
    p = mesh.cores["p"]
    p.receive(NodeId("i"), call(1, 2, req(gpu=1)), 0.0)
    ((_, _, refuse),) = mesh.out("p")
    assert refuse == Refuse(cfp=1, reason={"missing": "gpu"})
    lib = Requirements(task="t", resources={}, libraries={"torch": ">=2.2"}, labels={})
    p.receive(NodeId("i"), call(2, 1, lib), 0.0)
    ((_, _, refuse2),) = mesh.out("p")
    assert refuse2 == Refuse(cfp=2, reason={"library": "torch>=2.2"})


def test_participant_never_runs_more_than_its_slots() -> None:
    mesh = participant(cpu=2)
    p = mesh.cores["p"]
    p.receive(NodeId("i"), call(1, 6), 0.0)
    mesh.out("p")
    ids = tuple(TaskId(f"x1-{k}") for k in range(6))
    p.receive(NodeId("i"), Accept(cfp=1, tasks=ids, payloads=tuple(range(6))), 0.0)
    ((_, _, confirm),) = mesh.out("p")
    assert confirm == Confirm(cfp=1, tasks=ids)
    started = [e for e in p.take_events() if isinstance(e, Execute)]
    assert [e.task_id for e in started] == list(ids[:2])
    assert [e.payload for e in started] == [0, 1]
    p.task_finished(ids[0], True, "r0", 0.1)  # before a timer is late: no stall
    assert [e.task_id for e in p.take_events()] == [ids[2]]
    assert p.load().running == 2
    ((_, _, result),) = mesh.out("p")
    assert result == Result(tasks=(ids[0],), values=("r0",), run_s=(0.1,))  # ran 0.0 .. 0.1


def test_gpu_lanes_bound_gpu_tasks_and_cpu_tasks_pass_a_blocked_one() -> None:
    mesh = participant(cpu=4, gpu=1)
    p = mesh.cores["p"]
    p.receive(NodeId("i"), call(1, 2, req(gpu=1)), 0.0)
    prop = last(mesh.out("p"), Propose)
    assert prop.costs == (1.0, 2.0)
    p.receive(NodeId("i"), call(2, 1), 0.0)
    mesh.out("p")
    g = (TaskId("x1-0"), TaskId("x1-1"))
    p.receive(NodeId("i"), Accept(cfp=1, tasks=g, payloads=(0, 1)), 0.0)
    p.receive(NodeId("i"), Accept(cfp=2, tasks=(TaskId("x2-0"),), payloads=(2,)), 0.0)
    assert [e.task_id for e in p.take_events()] == ["x1-0", "x2-0"]


def test_progress_is_one_message_per_initiator_and_only_for_long_holds() -> None:
    mesh = participant(cpu=1)
    p = mesh.cores["p"]
    p.receive(NodeId("i"), call(1, 3), 0.0)
    ids = tuple(TaskId(f"x1-{k}") for k in range(3))
    p.receive(NodeId("i"), Accept(cfp=1, tasks=ids, payloads=(0, 1, 2)), 0.0)
    mesh.out("p")
    sent: list[tuple[float, Wire]] = []
    now = 0.0
    while now < 3 * CFG.lease_s:
        t = p.next_timer()
        assert t is not None
        now = max(now, t)
        p.handle_timer(now)
        sent += [(now, m) for _, _, m in mesh.out("p")]
    assert all(m == Progress(tasks=ids) for _, m in sent)
    times = [0.0, *(at for at, _ in sent)]
    # Not before half the lease needs it, and twice per lease: one lost message never
    # lets the lease lapse.
    assert times[1] >= CFG.lease_s / 2 - CFG.progress_interval_s
    assert all(b - a <= CFG.lease_s / 2 for a, b in itertools.pairwise(times))


def test_a_long_task_keeps_its_lease_end_to_end() -> None:
    mesh = Mesh({"i": caps(tasks=()), "a": caps()})
    core = mesh.cores["i"]
    core.submit(spec(0), None, 0.0)
    core.handle_timer(0.0)
    mesh.pump(0.0)
    now = 0.0
    while now < 10 * CFG.lease_s:
        now += CFG.progress_interval_s / 3
        mesh.timers(now)
        mesh.pump(now)
    assert core.stats().get("reannounces", 0) == 0
    mesh.run("a", now)
    mesh.pump(now)
    assert [type(e) for e in mesh.events["i"]] == [Completed]


def test_not_accepting_refuses_and_gives_queued_tasks_back() -> None:
    mesh = participant(cpu=1)
    p = mesh.cores["p"]
    p.receive(NodeId("i"), call(1, 2), 0.0)
    ids = (TaskId("x1-0"), TaskId("x1-1"))
    p.receive(NodeId("i"), Accept(cfp=1, tasks=ids, payloads=(0, 1)), 0.0)
    mesh.out("p")
    p.set_accepting(False, 0.1)
    assert [m for _, _, m in mesh.out("p")] == [Decline(cfp=1, tasks=(ids[1],), reason="leaving")]
    p.receive(NodeId("i"), call(2, 1), 0.2)
    assert [m for _, _, m in mesh.out("p")] == [Refuse(cfp=2, reason={"state": "leaving"})]


def test_cancel_of_a_queued_task_removes_it_and_running_one_is_stopped() -> None:
    mesh = participant(cpu=1)
    p = mesh.cores["p"]
    p.receive(NodeId("i"), call(1, 2), 0.0)
    ids = (TaskId("x1-0"), TaskId("x1-1"))
    p.receive(NodeId("i"), Accept(cfp=1, tasks=ids, payloads=(0, 1)), 0.0)
    p.take_events()
    p.receive(NodeId("i"), Cancel(tasks=ids), 0.1)
    assert p.take_events() == [CancelExecution(task_id=ids[0])]
    p.task_finished(ids[0], False, "stopped", 0.2)
    assert p.take_events() == []  # the cancelled queued task never starts
    sent = mesh.out("p")
    assert of(sent, Result) == []
    assert of(sent, Failure) == []


def test_runtime_history_changes_the_bid() -> None:
    mesh = participant(cpu=1)
    p = mesh.cores["p"]
    p.receive(NodeId("i"), call(1, 1, est=1.0), 0.0)
    p.receive(NodeId("i"), Accept(cfp=1, tasks=(TaskId("x1-0"),), payloads=(0,)), 0.0)
    p.task_finished(TaskId("x1-0"), True, None, 4.0)
    mesh.out("p")
    p.receive(NodeId("i"), call(2, 1, est=1.0), 5.0)
    prop = last(mesh.out("p"), Propose)
    assert prop.costs == (4.0,)
    other = replace(req(), task="u")
    p.receive(NodeId("i"), call(3, 1, other, est=2.0), 5.0)  # unseen task: scaled by speed
    p.set_capabilities(replace(caps(cpu=1), tasks=("t", "u")), 5.0)
    p.receive(NodeId("i"), call(4, 1, other, est=2.0), 5.0)
    props = [m for _, _, m in mesh.out("p") if isinstance(m, Propose)]
    assert props
    assert props[-1].costs[0] > 2.0


def test_runtime_learned_on_one_input_size_scales_to_another() -> None:
    """A task run on 1 MB of inputs took 4 s: one on 2 MB is bid at about 8 s, one on
    0.5 MB at 2 s, and one with small or no referenced inputs at the 4 s learned."""
    mesh = participant(cpu=1)
    p = mesh.cores["p"]
    mb = 1 << 20

    def sized(cfp: int, nbytes: int) -> CallForProposals:
        c = call(cfp, 1, est=1.0)
        return replace(c, inputs={c.tasks[0]: {NodeId("j"): nbytes}} if nbytes else {})

    p.receive(NodeId("i"), sized(1, mb), 0.0)
    p.receive(NodeId("i"), Accept(cfp=1, tasks=(TaskId("x1-0"),), payloads=(0,)), 0.0)
    p.task_finished(TaskId("x1-0"), True, None, 4.0)
    mesh.out("p")
    bids = {}
    for cfp, nbytes in ((2, 2 * mb), (3, mb // 2), (4, 1000), (5, 0)):
        p.receive(NodeId("i"), sized(cfp, nbytes), 5.0)
        bids[nbytes] = last(mesh.out("p"), Propose).run_s
        p.receive(NodeId("i"), Reject(cfp=cfp), 5.0)
    assert bids[2 * mb] == pytest.approx(8.0, rel=0.01)
    assert bids[mb // 2] == pytest.approx(2.0, rel=0.01)
    assert bids[1000] == bids[0] == pytest.approx(4.0, rel=0.01)


def test_transfer_is_counted_and_data_holder_wins() -> None:
    mesh = Mesh({"i": caps(tasks=()), "a": caps(), "b": caps()})
    core = mesh.cores["i"]
    big = 10 * int(CFG.bandwidth_bytes_per_s)  # ten seconds to move
    core.submit(spec(0, input_bytes={NodeId("b"): big}), None, 0.0)
    core.handle_timer(0.0)
    sent = mesh.pump(0.0)
    props = {s: m for s, _, m in of(sent, Propose)}
    # Each bidder says how fast it gets data from the holders; the initiator adds it up.
    assert props["a"].bandwidth == {"b": CFG.bandwidth_bytes_per_s}
    assert props["b"].bandwidth == {}
    assert [d for _, d, _ in of(sent, Accept)] == ["b"]
    rec = core.record(TaskId("task-0"))
    assert rec is not None
    assert rec.transfer_s == 0.0


def test_a_measured_bandwidth_prices_the_transfer() -> None:
    """``b`` holds the input but cannot run the task: ``a`` runs it, and the record says
    what moving the input costs at the rate ``a`` measured from ``b``."""
    mesh = Mesh({"i": caps(tasks=()), "a": caps(), "b": caps(tasks=())})
    mesh.cores["a"].set_bandwidth(NodeId("b"), CFG.bandwidth_bytes_per_s / 2)
    mesh.cores["a"].set_bandwidth(NodeId("b"), math.nan)  # ignored: not a rate
    core = mesh.cores["i"]
    big = 10 * int(CFG.bandwidth_bytes_per_s)
    core.submit(spec(0, input_bytes={NodeId("b"): big}), None, 0.0)
    core.handle_timer(0.0)
    sent = mesh.pump(0.0)
    ((_, _, prop),) = of(sent, Propose)
    assert prop.bandwidth == {"b": CFG.bandwidth_bytes_per_s / 2}
    assert [d for _, d, _ in of(sent, Accept)] == ["a"]
    rec = core.record(TaskId("task-0"))
    assert rec is not None
    assert rec.transfer_s == pytest.approx(20.0)
    assert rec.cost_s == pytest.approx(prop.costs[0] + 20.0)


def test_the_holder_of_the_inputs_takes_a_task_nobody_else_finishes_clearly_sooner() -> None:
    """``a`` would finish first, but not by enough to move ``b``'s input; ``b`` holds the
    input but ``a`` finishes first. One of them takes the task in the first auction: the
    rule that keeps a slow node off a queue's last task never overrules locality."""
    mesh = Mesh({"i": caps(tasks=()), "a": caps(cpu=1), "b": caps(cpu=1)}, speeds={"b": 1.1})
    core = mesh.cores["i"]
    core.submit(spec(0, input_bytes={NodeId("b"): 1000}, est_runtime_s=1.0), None, 0.0)
    core.handle_timer(0.0)
    sent = mesh.pump(0.0)  # every bid is in: the auction is decided
    assert [d for _, d, _ in of(sent, Accept)] == ["b"]
    assert len(of(sent, CallForProposals)) == 2  # one call, to each bidder


def pooled(cores: int) -> Capabilities:
    """One slot on a host whose ``cores`` cores every node of the test shares."""
    labels = {CPU_POOL_LABEL: "host-1", CPU_CORES_LABEL: str(cores)}
    return replace(caps(cpu=1), labels=labels)


@pytest.mark.parametrize("cores", [2, 3])
def test_inputs_move_between_nodes_on_one_host_only_to_a_spare_core(cores: int) -> None:
    """``a`` holds the inputs of two tasks, ``b`` of one; ``c``, on the same host, holds
    none. With ``a`` and ``b`` running, ``c`` would finish ``a``'s second task a run sooner
    by its bid, but on a host of two cores it would only share theirs: the task waits for
    ``a``. With a third core ``c`` takes it at once."""
    nodes = {"i": caps(tasks=())} | {n: pooled(cores) for n in "abc"}
    mesh = Mesh(nodes)
    core = mesh.cores["i"]
    held = {0: "a", 1: "a", 2: "b"}
    for k, holder in held.items():
        core.submit(spec(k, input_bytes={NodeId(holder): 1000}, est_runtime_s=1.0), None, 0.0)
    core.handle_timer(0.0)
    sent = mesh.pump(0.0)
    awarded = {t: d for _, d, m in of(sent, Accept) for t in m.tasks}
    if cores == 2:
        assert awarded == {"task-0": "a", "task-2": "b"}
        assert mesh.run("a", 0.5) == ["task-0"]  # sooner than it bid: within every lease
        sent = mesh.pump(0.5)  # the result, then the refill it makes room for
        core.handle_timer(0.5)
        sent += mesh.pump(0.5)
        assert [(d, m.tasks) for _, d, m in of(sent, Accept)] == [("a", ("task-1",))]
    else:
        assert awarded == {"task-0": "a", "task-1": "c", "task-2": "b"}


def test_shared_cores_need_one_named_pool_and_its_size() -> None:
    two = pooled(2)
    assert shared_cores(two, pooled(4)) == 2
    assert shared_cores(two, caps()) is None
    other = replace(two, labels={**two.labels, CPU_POOL_LABEL: "host-2"})
    assert shared_cores(two, other) is None
    unsized = replace(two, labels={CPU_POOL_LABEL: "host-1", CPU_CORES_LABEL: "many"})
    assert shared_cores(two, unsized) is None


# ---------------------------------------------------------------------------------------
# Failures without a winner
# ---------------------------------------------------------------------------------------


def test_nobody_capable_fails_at_once_from_gossip() -> None:
    mesh = initiator_mesh()
    core = mesh.cores["i"]
    core.submit(spec(0, req(gpu=1)), None, 0.0)
    core.handle_timer(0.0)
    assert mesh.out("i") == []
    (ev,) = core.take_events()
    assert isinstance(ev, Failed)
    assert ev.kind == FAILED_NO_PEER
    assert ev.details["missing"] == {"missing": "gpu", "task": "t"}
    err = ErrorInfo.reported(ev.kind, ev.message, ev.details).exception(ev.task_id, "")
    assert isinstance(err, NoCapablePeerError)
    assert "gpu" in str(err)


def test_refusals_widen_then_fail_naming_what_was_missing() -> None:
    nodes = {"i": caps(tasks=())} | {f"n{k}": caps() for k in range(9)}
    mesh = Mesh(nodes)
    for name in nodes:  # gossip is stale: the nodes have lost the task since
        if name != "i":
            mesh.cores[name].set_capabilities(caps(tasks=()), 0.0)
    core = mesh.cores["i"]
    core.submit(spec(0), None, 0.0)
    core.handle_timer(0.0)
    sent = mesh.pump(0.0)
    calls = of(sent, CallForProposals)
    assert len(calls) == 9
    assert len({d for _, d, _ in calls}) == 9
    (ev,) = mesh.events["i"]
    assert isinstance(ev, Failed)
    assert ev.kind == FAILED_NO_PEER
    assert ev.details["missing"] == {"task": "t"}


def test_silence_widens_then_asks_again_until_patience_runs_out() -> None:
    nodes = {"i": caps(tasks=())} | {f"n{k}": caps() for k in range(9)}
    mesh = Mesh(nodes)
    core = mesh.cores["i"]
    core.submit(spec(0), None, 0.0)
    now = 0.0
    core.handle_timer(now)
    calls: list[str] = []
    events: list[ContractEvent] = []
    while not events:
        calls += [d for _, d, _ in of(mesh.out("i"), CallForProposals)]
        nxt = core.next_timer()
        assert nxt is not None
        now = nxt
        core.handle_timer(now)
        events = core.take_events()
    assert set(calls) == set(nodes) - {"i"}  # widened to every candidate
    assert len(calls) > len(set(calls))  # then asked the silent ones again
    assert now >= CFG.silence_patience_s
    (ev,) = events
    assert isinstance(ev, Failed)
    assert ev.kind == FAILED_NO_BIDS


def test_a_silent_candidate_that_answers_a_later_round_gets_the_task() -> None:
    mesh = Mesh({"i": caps(tasks=()), "a": caps()})
    core = mesh.cores["i"]
    core.submit(spec(0), None, 0.0)
    core.handle_timer(0.0)
    mesh.out("i")  # the first call is lost
    now = 0.0
    for _ in range(CFG.widen_rounds + 2):  # rounds go by unanswered
        nxt = core.next_timer()
        assert nxt is not None
        now = nxt
        core.handle_timer(now)
        assert not core.take_events()
        mesh.out("i")
    nxt = core.next_timer()
    assert nxt is not None
    core.handle_timer(nxt)
    mesh.pump(nxt)  # this round gets through
    assert any(isinstance(e, Execute) for e in mesh.events["a"])


def test_remote_failure_is_delivered_as_task_error() -> None:
    mesh = Mesh({"i": caps(tasks=()), "a": caps()})
    core = mesh.cores["i"]
    core.submit(spec(0), None, 0.0)
    core.handle_timer(0.0)
    mesh.pump(0.0)
    ev = next(e for e in mesh.events["a"] if isinstance(e, Execute))
    mesh.events["a"].clear()
    info = {"message": "boom", "exc_type": "ValueError", "traceback": "tb"}
    mesh.cores["a"].task_finished(ev.task_id, False, info, 1.0)
    mesh.pump(1.0)
    (failed,) = mesh.events["i"]
    assert isinstance(failed, Failed)
    assert failed.kind == FAILED_TASK
    assert failed.node == "a"
    err = ErrorInfo.reported(failed.kind, failed.message, failed.details).exception(
        failed.task_id, failed.node or ""
    )
    assert isinstance(err, TaskError)
    assert err.exc_type == "ValueError"
    assert "boom" in str(err)


def test_own_node_runs_tasks_without_messages() -> None:
    mesh = Mesh({"i": caps()})
    core = mesh.cores["i"]
    core.submit(spec(0), "p", 0.0)
    core.handle_timer(0.0)
    assert mesh.pump(0.0) == []
    assert [e.task_id for e in mesh.events["i"] if isinstance(e, Execute)] == ["task-0"]
    mesh.run("i", 0.5)
    mesh.collect()
    assert [e for e in mesh.events["i"] if isinstance(e, Completed)] == [
        Completed(task_id=TaskId("task-0"), node=NodeId("i"), value="v-task-0")
    ]


def test_own_task_queued_behind_the_longest_estimate_still_places() -> None:
    """A peer's call with the largest estimate accepted (MAX_ESTIMATE_S) queues that much
    work here; this node's bid for its own task behind it would end past the bound. It
    bids the bound instead: its own initiator refused the bid before, and the refusal of
    its own message surfaced as LocalProtocolError out of ``handle_timer``. The task waits
    (late binding) until the peer's reservation lapses, and then runs here."""
    mesh = Mesh({"i": caps(cpu=1), "j": caps(tasks=())})
    core = mesh.cores["i"]
    core.receive(NodeId("j"), call(1, 1, est=MAX_ESTIMATE_S), 0.0)
    assert last(mesh.out("i"), Propose).costs == (MAX_ESTIMATE_S,)
    core.submit(spec(0, est_runtime_s=1.0), None, 0.0)
    core.handle_timer(0.0)
    rec = core.record(TaskId("task-0"))
    assert rec is not None
    assert (rec.state, rec.winner) == ("queued", None)
    steps = 0
    while (at := core.next_timer()) is not None and at < 10 * CFG.reservation_s:
        core.handle_timer(at)
        mesh.pump(at)
        steps += 1
        assert steps < 100  # timers move on: no call after call at one instant
    rec = core.record(TaskId("task-0"))
    assert rec is not None
    assert (rec.state, rec.winner) == ("held", "i")


def test_a_submitted_estimate_beyond_the_bound_is_refused_at_once() -> None:
    mesh = Mesh({"i": caps()})
    core = mesh.cores["i"]
    for k, est in enumerate((MAX_ESTIMATE_S * 2, math.inf, math.nan, -1.0)):
        with pytest.raises(LocalProtocolError):
            core.submit(spec(k, est_runtime_s=est), None, 0.0)
    core.submit(spec(9, est_runtime_s=MAX_ESTIMATE_S), None, 0.0)
    core.handle_timer(0.0)  # every bidder, this node included, takes this one
    mesh.collect()
    assert [e.task_id for e in mesh.events["i"] if isinstance(e, Execute)] == ["task-9"]


def test_a_run_longer_than_the_bound_reports_the_bound() -> None:
    """A run over MAX_ESTIMATE_S (11.6 days) is reported as that: a longer one would get
    the whole result refused by its initiator (its own, here: LocalProtocolError)."""
    mesh = Mesh({"i": caps(), "j": caps(tasks=())})
    core = mesh.cores["i"]
    core.submit(spec(0), None, 0.0)
    core.handle_timer(0.0)
    core.receive(NodeId("j"), call(1, 1), 0.0)
    core.receive(NodeId("j"), Accept(cfp=1, tasks=(TaskId("x1-0"),), payloads=(0,)), 0.0)
    mesh.out("i")
    mesh.collect()
    assert sorted(e.task_id for e in mesh.events["i"] if isinstance(e, Execute)) == [
        "task-0",
        "x1-0",
    ]
    late = 2 * MAX_ESTIMATE_S
    mesh.run("i", late)
    mesh.collect()
    assert [e for e in mesh.events["i"] if isinstance(e, Completed)] == [
        Completed(task_id=TaskId("task-0"), node=NodeId("i"), value="v-task-0")
    ]
    rec = core.record(TaskId("task-0"))
    assert rec is not None
    assert rec.run_s == MAX_ESTIMATE_S
    assert last(mesh.out("i"), Result).run_s == (MAX_ESTIMATE_S,)  # to j, which accepts it


# ---------------------------------------------------------------------------------------
# Bad input: RemoteProtocolError, counted, state unchanged
# ---------------------------------------------------------------------------------------


def rejects(core: Contract, src: str, msg: Wire, reason: str) -> None:
    before = core.stats().get(f"rejected.{reason}", 0)
    with pytest.raises(RemoteProtocolError) as info:
        core.receive(NodeId(src), msg, 0.0)
    assert info.value.reason == reason
    assert core.stats()[f"rejected.{reason}"] == before + 1


def test_bad_bids_are_rejected_and_the_auction_carries_on() -> None:
    mesh = initiator_mesh()
    core = mesh.cores["i"]
    cfp = open_auction(mesh).cfp
    rejects(core, "a", proposal(cfp + 999, 1.0), "unknown-cfp")
    rejects(core, "a", proposal(cfp, math.nan, run_s=0.1), "bad-cost")
    rejects(core, "a", proposal(cfp, -1.0, run_s=0.1), "bad-cost")
    rejects(core, "a", proposal(cfp, math.inf, run_s=0.1), "bad-cost")
    rejects(core, "a", proposal(cfp, run_s=0.1), "bad-cost")  # no slot
    rejects(core, "a", proposal(cfp, 1.0, lanes=0), "bad-cost")
    for rate in (0.0, -1.0, math.nan, math.inf):
        rejects(core, "a", proposal(cfp, 1.0, bandwidth={NodeId("b"): rate}), "bad-cost")
    rejects(core, "zz", proposal(cfp, 1.0), "not-asked")
    assert mesh.out("i") == []
    bid(mesh, "a", cfp, 3.0)
    rejects(core, "a", proposal(cfp, 1.0), "duplicate")
    bid(mesh, "b", cfp, 2.0)
    sent = bid(mesh, "c", cfp, 4.0)
    assert [d for _, d, _ in of(sent, Accept)] == ["b"]


BAD_SECONDS = (math.nan, -1.0, -0.0001, 1.5e6, math.inf)


@pytest.mark.parametrize("bad", BAD_SECONDS)
@pytest.mark.parametrize("where", ["costs", "run_s", "a later slot"])
def test_a_bid_with_an_implausible_duration_is_rejected_and_never_awarded(
    bad: float, where: str
) -> None:
    """Costs and runtimes must be finite, >= 0 and at most MAX_ESTIMATE_S (1e6 s): the
    bidder is then as good as silent, however cheap its bid looks."""
    mesh = initiator_mesh()
    core = mesh.cores["i"]
    cfp = open_auction(mesh).cfp
    if where == "costs":
        hostile = proposal(cfp, bad, run_s=0.001)
    elif where == "run_s":
        hostile = proposal(cfp, 0.001, run_s=bad)
    else:
        hostile = proposal(cfp, 0.001, bad, run_s=0.001)
    before = core.stats()
    rejects(core, "a", hostile, "bad-cost")
    after = core.stats()
    assert {k: v for k, v in after.items() if k != "rejected.bad-cost"} == before
    assert mesh.out("i") == []
    bid(mesh, "b", cfp, 5.0)
    sent = bid(mesh, "c", cfp, 9.0)
    assert sent == []  # a has not answered yet, as far as the auction knows
    core.handle_timer(CFG.reply_timeout_s)
    sent = mesh.out("i")
    assert [d for _, d, _ in of(sent, Accept)] == ["b"]
    rec = core.record(TaskId("task-0"))
    assert rec is not None
    assert rec.winner == "b"
    assert "a" not in rec.rounds[0].bids
    assert "a" in rec.rounds[0].silent


def test_a_bid_of_exactly_the_largest_duration_is_taken() -> None:
    mesh = initiator_mesh()
    cfp = open_auction(mesh).cfp
    bid(mesh, "a", cfp, MAX_ESTIMATE_S, run_s=MAX_ESTIMATE_S)
    bid(mesh, "b", cfp, 0.0, run_s=0.0)
    sent = bid(mesh, "c", cfp, 5.0)
    assert [d for _, d, _ in of(sent, Accept)] == ["b"]
    assert mesh.cores["i"].stats().get("rejected.bad-cost", 0) == 0


def test_results_from_a_non_winner_are_rejected() -> None:
    mesh = initiator_mesh()
    awarded_to_a(mesh)
    core = mesh.cores["i"]
    t0 = TaskId("task-0")
    rejects(core, "b", result(t0, 1), "not-winner")
    rejects(core, "b", Failure(tasks=(t0,), errors=("x",)), "not-winner")
    rejects(core, "a", result("task-77", 1), "unknown-task")
    rejects(core, "a", Result(tasks=(t0,), values=(1, 2), run_s=(0.1,)), "malformed")
    # A message mixing a valid and an invalid entry changes nothing.
    rejects(
        core,
        "a",
        Result(tasks=(t0, TaskId("task-77")), values=(1, 2), run_s=(0.1, 0.1)),
        "unknown-task",
    )
    rejects(core, "b", Confirm(cfp=1, tasks=(t0,)), "not-winner")
    assert core.take_events() == []
    core.receive(NodeId("a"), result(t0, 1), 0.1)
    assert core.take_events() == [Completed(task_id=t0, node=NodeId("a"), value=1)]


@pytest.mark.parametrize(
    ("run_s", "reason"),
    [
        ((), "malformed"),
        ((0.1, 0.1), "malformed"),
        ((math.nan,), "bad-cost"),
        ((-1.0,), "bad-cost"),
        ((math.inf,), "bad-cost"),
        ((1.5e6,), "bad-cost"),
    ],
)
def test_a_result_with_bad_run_times_is_rejected_and_changes_nothing(
    run_s: tuple[float, ...], reason: str
) -> None:
    mesh = initiator_mesh()
    awarded_to_a(mesh)
    core = mesh.cores["i"]
    t0 = TaskId("task-0")
    before = (core.stats(), core.next_timer(), core.record(t0))
    rejects(core, "a", Result(tasks=(t0,), values=(1,), run_s=run_s), reason)
    stats = {k: v for k, v in core.stats().items() if not k.startswith("rejected.")}
    assert (stats, core.next_timer(), core.record(t0)) == before
    assert core.take_events() == []
    assert mesh.out("i") == []
    core.receive(NodeId("a"), result(t0, 1, run_s=0.3), 0.1)  # the winner tries again
    assert core.take_events() == [Completed(task_id=t0, node=NodeId("a"), value=1)]
    rec = core.record(t0)
    assert rec is not None
    assert rec.run_s == 0.3


def test_unsolicited_awards_and_bad_calls_are_rejected() -> None:
    mesh = participant(cpu=2)
    p = mesh.cores["p"]
    rejects(p, "i", Accept(cfp=5, tasks=(TaskId("x"),), payloads=(0,)), "unsolicited")
    rejects(p, "i", Reject(cfp=5), "unsolicited")
    rejects(p, "i", call(1, 0), "bad-batch")
    bad = Requirements(task="t", resources={"cpu": -1.0}, libraries={}, labels={})
    rejects(p, "i", call(1, 1, bad), "bad-requirements")
    for est in (math.nan, -1.0, math.inf, MAX_ESTIMATE_S * 1.5):
        rejects(p, "i", call(1, 1, est=est), "bad-cost")
    p.receive(NodeId("i"), call(1, 2), 0.0)
    mesh.out("p")
    rejects(p, "i", call(1, 2), "duplicate")
    rejects(p, "j", Accept(cfp=1, tasks=(TaskId("x1-0"),), payloads=(0,)), "unsolicited")
    rejects(p, "i", Accept(cfp=1, tasks=(), payloads=()), "bad-batch")
    three = (TaskId("x1-0"), TaskId("x1-1"), TaskId("x1-0"))
    rejects(p, "i", Accept(cfp=1, tasks=three, payloads=(0, 1, 2)), "malformed")
    rejects(p, "i", Accept(cfp=1, tasks=three[:2], payloads=(0,)), "malformed")
    rejects(p, "p", Accept(cfp=1, tasks=(TaskId("x1-0"),), payloads=(0,)), "self")
    assert p.take_events() == []
    assert p.load().running == 0
    p.receive(NodeId("i"), Accept(cfp=1, tasks=(TaskId("x1-0"),), payloads=(0,)), 0.0)
    assert [e.task_id for e in p.take_events()] == ["x1-0"]
    rejects(p, "j", Cancel(tasks=(TaskId("x1-0"),)), "not-initiator")


def test_a_rejected_peer_message_changes_nothing_at_the_participant() -> None:
    mesh = participant(cpu=2)
    p = mesh.cores["p"]
    p.receive(NodeId("i"), call(1, 2), 0.0)
    mesh.out("p")
    before = (p.load(), p.next_timer(), p.waiting())
    rejects(p, "i", Accept(cfp=1, tasks=(TaskId("a"), TaskId("a")), payloads=(0, 1)), "malformed")
    rejects(p, "i", call(2, 1, est=2e6), "bad-cost")
    rejects(p, "p", call(3, 1), "self")
    assert (p.load(), p.next_timer(), p.waiting()) == before
    assert mesh.out("p") == []
    assert p.take_events() == []


def test_an_award_beyond_the_room_is_taken_in_part_and_the_rest_declined_as_busy() -> None:
    """A refill may name any task of the call's kind, and as many as the initiator likes:
    the participant takes what fits (its reserved slots, then what would start within
    ``bind_ahead_s``) and gives the rest back, never running over its resources."""
    mesh = participant(cpu=1)
    p = mesh.cores["p"]
    p.receive(NodeId("j"), call(9, 3), 0.0)  # fills the queue: the next bid offers one slot
    p.receive(NodeId("i"), call(1, 3), 0.0)
    prop = last(mesh.out("p"), Propose)
    assert len(prop.costs) == 1
    ids = (TaskId("x1-0"), TaskId("other"))  # "other" was not in the call: a refill
    p.receive(NodeId("i"), Accept(cfp=1, tasks=ids, payloads=(0, 1)), 0.0)
    sent = [m for _, _, m in mesh.out("p")]
    assert Confirm(cfp=1, tasks=(TaskId("x1-0"),)) in sent
    assert Decline(cfp=1, tasks=(TaskId("other"),), reason="busy") in sent
    assert p.stats()["declines_sent"] == 1
    assert p.waiting() == 0  # x1-0 runs: j's reservation is only a reservation
    assert p.load().running == 1


def test_refills_under_one_call_are_taken_as_results_go_back() -> None:
    """The reservation a call made stays known while it holds tasks, however long they
    run; further awards under it (tasks the call never named) are taken while there is
    room. Once idle for a few reservation periods it is forgotten."""
    mesh = participant(cpu=1)
    p = mesh.cores["p"]
    p.receive(NodeId("i"), call(1, 1, est=1.0), 0.0)
    mesh.out("p")
    p.receive(NodeId("i"), Accept(cfp=1, tasks=(TaskId("x1-0"),), payloads=(0,)), 0.0)
    assert [e.task_id for e in p.take_events()] == ["x1-0"]
    advance(p, 1.0)  # far beyond the reservation: the task holds it
    mesh.out("p")
    p.task_finished(TaskId("x1-0"), True, "r", 1.0)
    assert of(mesh.out("p"), Result) == [
        ("p", "i", Result(tasks=(TaskId("x1-0"),), values=("r",), run_s=(1.0,)))
    ]
    p.receive(NodeId("i"), Accept(cfp=1, tasks=(TaskId("refill-1"),), payloads=(1,)), 1.001)
    assert [e.task_id for e in p.take_events()] == ["refill-1"]
    assert last(mesh.out("p"), Confirm) == Confirm(cfp=1, tasks=(TaskId("refill-1"),))
    p.task_finished(TaskId("refill-1"), True, "r1", 1.1)
    mesh.out("p")
    advance(p, 1.1 + 5 * CFG.reservation_s)  # idle: forgotten
    rejects(p, "i", Accept(cfp=1, tasks=(TaskId("refill-2"),), payloads=(2,)), "unsolicited")


# ---------------------------------------------------------------------------------------
# Wire
# ---------------------------------------------------------------------------------------


def test_every_contract_message_survives_the_codec() -> None:
    t = (TaskId("a"), TaskId("b"))
    msgs: list[Wire] = [
        call(3, 2),
        CallForProposals(
            cfp=1,
            requirements=req(gpu=1),
            tasks=t,
            est_runtime_s=None,
            inputs={TaskId("a"): {NodeId("n"): 10}},
        ),
        Propose(cfp=1, costs=(0.5, 1.0), lanes=2, run_s=0.5, bandwidth={NodeId("n"): 1e8}),
        Refuse(cfp=1, reason={"missing": "gpu"}),
        Accept(cfp=1, tasks=t, payloads=({"name": "f", "args": [1, 2]}, None)),
        Reject(cfp=1),
        Confirm(cfp=1, tasks=t),
        Decline(cfp=1, tasks=t, reason="busy"),
        Progress(tasks=t),
        Result(tasks=t, values=(1, "x"), run_s=(0.25, 0.0)),
        Failure(tasks=t, errors=({"message": "boom"}, "x")),
        Cancel(tasks=t),
    ]
    for m in msgs:
        assert loads(dumps(m)) == m


def test_short_tasks_get_offers_up_to_the_horizon() -> None:
    mesh = participant(cpu=2)
    p = mesh.cores["p"]
    p.receive(NodeId("i"), call(1, 500, est=0.001), 0.0)
    prop = last(mesh.out("p"), Propose)
    # Far beyond the queue depth of 6: everything that completes within the horizon.
    assert len(prop.costs) == min(CFG.max_offer, int(2 * CFG.queue_horizon_s / 0.001))
    assert prop.costs[-1] <= CFG.queue_horizon_s


def test_queued_tasks_wait_for_a_free_auction_and_then_go() -> None:
    config = replace(CFG, max_auctions=1)
    mesh = Mesh({"i": caps(tasks=("t", "u")), "a": caps(tasks=("t", "u"))}, config=config)
    core = mesh.cores["i"]
    core.submit(spec(0), None, 0.0)
    core.submit(spec(1, req("u")), None, 0.0)
    now = 0.0
    for _ in range(20):
        mesh.timers(now)
        mesh.pump(now)
        for n in ("i", "a"):
            mesh.run(n, now)
        mesh.pump(now)
        now += 0.01
    assert sorted(e.task_id for e in mesh.events["i"] if isinstance(e, Completed)) == [
        "task-0",
        "task-1",
    ]


def test_a_suspect_that_alone_can_run_a_task_is_still_asked() -> None:
    mesh = Mesh({"i": caps(tasks=()), "a": caps()})
    mesh.peers.set_state("a", MemberState.SUSPECT)
    core = mesh.cores["i"]
    core.submit(spec(0), None, 0.0)
    core.handle_timer(0.0)
    mesh.pump(0.0)
    mesh.collect()
    assert not [e for e in mesh.events["i"] if isinstance(e, Failed)]
    assert any(isinstance(e, Execute) for e in mesh.events["a"])
