"""A winner that stalled asks before running what it waited to start (hand-stepped cores).

The stage: initiators ``i`` (lease 1 s) and ``j`` (lease 10 s) each award to ``a``, which
has one slot: ``i0`` runs, ``i1`` and ``j0`` wait (the tasks are declared short, ``EST``,
so late binding binds several per lane at once). Then ``a`` stalls for 2 s while ``b``
joins: ``i`` lets its leases at ``a`` lapse and has ``b`` run both of its tasks, ``j``
keeps its own. Frames to ``a`` meanwhile wait in its socket; the test decides when they
arrive.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from mesh.protocol.codec import dumps, loads
from mesh.protocol.contract import Completed, Contract, Execute
from mesh.protocol.core import MemberState
from mesh.protocol.messages import (
    Accept,
    CallForProposals,
    Cancel,
    Capabilities,
    Decline,
    LeaseQuery,
    LeaseReply,
    NodeId,
    Result,
    TaskId,
    Wire,
)
from tests.unit.test_contract import CFG, Mesh, Sent, caps, of, rejects, spec

I0, I1, J0 = TaskId("task-i0"), TaskId("task-i1"), TaskId("task-j0")
RESUME = 2.0
EST = CFG.bind_ahead_s / 4


class Logged(Mesh):
    """A ``Mesh`` that remembers every execution it was told of, finished or not."""

    def __init__(self, nodes: dict[str, Capabilities]) -> None:
        super().__init__(nodes)
        self.ran: dict[str, list[TaskId]] = {n: [] for n in nodes}

    def collect(self) -> None:
        for n, core in self.cores.items():
            events = core.take_events()
            self.events[n].extend(events)
            self.ran[n].extend(e.task_id for e in events if isinstance(e, Execute))


class Stage:
    def __init__(self) -> None:
        mesh = Logged(
            {"i": caps(tasks=()), "j": caps(tasks=()), "a": caps(cpu=1), "b": caps(cpu=1)}
        )
        # Configs may differ per node: j's leases outlast a's stall.
        mesh.cores["j"] = Contract(
            node=NodeId("j"),
            config=replace(CFG, lease_s=10.0),
            rng=random.Random(1),
            peers=mesh.peers,
            capabilities=caps(tasks=()),
        )
        mesh.peers.set_state("b", MemberState.LEFT)  # joins once a has its tasks
        self.mesh = mesh
        self.i, self.j, self.a, self.b = (mesh.cores[n] for n in "ijab")
        self.buffered: Sent = []
        self.i.submit(spec("i0", est_runtime_s=EST), "p-i0", 0.0)
        self.i.submit(spec("i1", est_runtime_s=EST), "p-i1", 0.0)
        self.i.handle_timer(0.0)
        mesh.pump(0.0)
        self.j.submit(spec("j0", est_runtime_s=EST), "p-j0", 0.0)
        self.j.handle_timer(0.0)
        mesh.pump(0.0)
        assert self.executed("a") == [I0]

    def executed(self, node: str) -> list[TaskId]:
        self.mesh.collect()
        return list(self.mesh.ran[node])

    def finish(self, task_id: TaskId, now: float) -> None:
        """``a``'s worker reports ``task_id`` done (the first call ``a`` gets after a stall)."""
        self.mesh.collect()
        self.mesh.events["a"] = [
            e
            for e in self.mesh.events["a"]
            if not (isinstance(e, Execute) and e.task_id == task_id)
        ]
        self.a.task_finished(task_id, True, f"v-{task_id}", now)

    def completed(self, node: str) -> list[TaskId]:
        self.mesh.collect()
        return [e.task_id for e in self.mesh.events[node] if isinstance(e, Completed)]

    def step(self, now: float, *, frozen: bool, drop: tuple[type[Wire], ...] = ()) -> Sent:
        """Timers of every core (but a stalled ``a``), then deliver everything; frames to a
        stalled ``a`` are kept for later, frames of the types in ``drop`` are lost."""
        for name, core in self.mesh.cores.items():
            t = core.next_timer()
            if t is not None and t <= now and not (frozen and name == "a"):
                core.handle_timer(now)

        def hold(src: str, dst: str, msg: Wire) -> bool:
            if isinstance(msg, drop):
                return True
            if frozen and dst == "a":
                self.buffered.append((src, dst, msg))
                return True
            return False

        sent = self.mesh.pump(now, hold)
        self.mesh.run("b", now)
        if not frozen:
            self.mesh.run("a", now)
        return sent + self.mesh.pump(now, hold)

    def stall(self) -> None:
        self.mesh.peers.set_state("b", MemberState.ALIVE)
        now = 0.0
        while now < RESUME - 0.01:
            now += 0.05
            self.step(now, frozen=True)
        assert self.i.stats()["leases_lapsed"] == 2
        assert sorted(self.completed("i")) == [I0, I1]  # b ran both
        assert "leases_lapsed" not in self.j.stats()

    def deliver_buffered(self, now: float) -> None:
        for src, _, msg in self.buffered:
            self.a.receive(NodeId(src), msg, now)
        self.buffered.clear()


def test_a_stalled_winner_asks_then_runs_only_what_is_still_its_own() -> None:
    s = Stage()
    s.stall()
    # The first thing a does after the stall: its running task's result comes in. Without
    # the check it would start i1 now, which b has already run.
    s.finish(I0, RESUME)
    sent = s.mesh.out("a")
    assert s.executed("a") == [I0]
    queries = {dst: m.tasks for _, dst, m in of(sent, LeaseQuery)}
    assert queries == {"i": (I1,), "j": (J0,)}  # one per initiator
    assert of(sent, Result)  # the running task's result goes as usual
    for _, dst, msg in sent:
        s.mesh.cores[dst].receive(NodeId("a"), msg, RESUME)
    replies = of(s.mesh.out("i") + s.mesh.out("j"), LeaseReply)
    assert {src: m.keep for src, _, m in replies} == {"i": (), "j": (J0,)}  # from their state
    for src, _, msg in replies:
        s.a.receive(NodeId(src), msg, RESUME)
    assert s.executed("a") == [I0, J0]
    stats = s.a.stats()
    assert (stats["stalls"], stats["stale_checked"]) == (1, 2)
    assert (stats["stale_confirmed"], stats["stale_dropped"]) == (1, 1)
    assert s.j.stats()["lease_queries_received"] == 1
    # What waited in its socket changes nothing now (the cancels, i's new call).
    s.deliver_buffered(RESUME)
    now = RESUME
    for _ in range(10):
        now += 0.05
        s.step(now, frozen=False)
    assert s.executed("a") == [I0, J0]  # never i1
    assert sorted(s.completed("i")) == [I0, I1]
    assert s.completed("j") == [J0]
    assert s.i.stats()["duplicates"] == 1  # i0 ran on a (before the stall) and on b


def queries_id(sent: Sent, dst: str) -> int:
    (q,) = [m.query for _, d, m in of(sent, LeaseQuery) if d == dst]
    return q


@pytest.mark.parametrize("decline_lost", [False, True], ids=["declined", "lease-lapses"])
def test_without_an_answer_the_tasks_are_given_back_and_still_run_once(
    decline_lost: bool,
) -> None:
    s = Stage()
    s.stall()
    s.deliver_buffered(RESUME)  # i's cancels: i1 goes; j0 still waits for j's word
    assert s.a.stats()["stalls"] == 1
    assert s.executed("a") == [I0]
    now = RESUME
    # Every answer is lost; so is the give-back if ``decline_lost``.
    lost: tuple[type[Wire], ...] = (LeaseReply, Decline) if decline_lost else (LeaseReply,)
    while now < RESUME + CFG.stall_reply_s:
        now += 0.05
        s.step(now, frozen=False, drop=lost)
    assert s.a.stats()["stale_unanswered"] == 1
    assert s.executed("a") == [I0]  # j0 was not run on a's own authority
    while not s.completed("j") and now < 30.0:
        now += 0.05
        s.step(now, frozen=False, drop=lost)
    assert s.completed("j") == [J0]
    assert (s.executed("a") + s.executed("b")).count(J0) == 1  # placed again, run once
    # A lost give-back costs a lease: the initiator's sweep places the task again.
    lapsed = s.j.stats().get("leases_lapsed", 0)
    assert lapsed == (1 if decline_lost else 0)
    assert now > (10.0 if decline_lost else 0.0)
    assert sorted(s.completed("i")) == [I0, I1]


def test_an_award_on_a_bid_made_before_the_stall_is_declined() -> None:
    s = Stage()
    s.i.submit(spec("i2", est_runtime_s=EST), "p-i2", 0.0)
    s.i.handle_timer(0.0)
    assert s.mesh.out("i") == []  # a, in i's pool, holds all it offered: i2 waits at i
    # i0's result frees room at a: i gives it i2, under the call a bid on at 0.0.
    s.finish(I0, 0.01)
    for _, dst, msg in s.mesh.out("a"):
        if dst == "i":
            s.i.receive(NodeId("a"), msg, 0.01)
    s.i.handle_timer(0.01)
    sent_i = s.mesh.out("i")
    assert not of(sent_i, CallForProposals)
    (accept,) = [m for _, d, m in of(sent_i, Accept) if d == "a"]
    assert accept.tasks == (TaskId("task-i2"),)
    # The award waits in a's socket through a stall.
    s.a.receive(NodeId("i"), accept, RESUME)
    sent = s.mesh.out("a")
    assert [m for _, _, m in of(sent, Decline)] == [
        Decline(cfp=accept.cfp, tasks=(TaskId("task-i2"),), reason="stale")
    ]
    assert s.a.stats()["stale_declined"] == 1
    assert TaskId("task-i2") not in s.executed("a")


def test_a_reply_from_before_a_second_stall_starts_nothing() -> None:
    s = Stage()
    s.stall()
    s.finish(I0, RESUME)  # frees the slot the waiting tasks want
    first = s.mesh.out("a")
    q1 = queries_id(first, "j")
    # Stalled again before the answer came: a new question, and the old answer is void.
    later = RESUME + 1.0
    s.a.handle_timer(later)
    q2 = queries_id(s.mesh.out("a"), "j")
    assert q2 != q1
    s.a.receive(NodeId("j"), LeaseReply(query=q1, keep=(J0,)), later)
    assert J0 not in s.executed("a")
    s.a.receive(NodeId("j"), LeaseReply(query=q2, keep=(J0,)), later)
    assert J0 in s.executed("a")
    # The first question expired with the second stall: its answers are late, not errors.
    s.a.receive(NodeId("i"), LeaseReply(query=queries_id(first, "i"), keep=(I1,)), later)
    assert s.a.stats()["late_answers"] == 2
    assert I1 not in s.executed("a")


def test_bad_questions_and_answers_change_nothing() -> None:
    s = Stage()
    s.stall()
    s.finish(I0, RESUME)  # frees the slot the waiting tasks want
    sent = s.mesh.out("a")
    qi, qj = queries_id(sent, "i"), queries_id(sent, "j")
    before = s.a.stats()
    rejects(s.a, "i", LeaseReply(query=qj, keep=(J0,)), "not-initiator")
    rejects(s.a, "b", LeaseReply(query=qi, keep=()), "not-initiator")
    rejects(s.a, "j", LeaseReply(query=qj + 10**6, keep=()), "unsolicited")
    rejects(s.a, "j", LeaseReply(query=qj, keep=(TaskId("nope"),)), "unknown-task")
    rejects(s.a, "j", LeaseReply(query=qj, keep=(I1,)), "unknown-task")
    rejects(s.a, "j", LeaseReply(query=qj, keep=(J0, J0)), "malformed")
    assert s.executed("a") == [I0]
    assert s.a.stats().get("stale_dropped") == before.get("stale_dropped")
    # Initiator side: only the winner may ask, only about tasks that exist.
    rejects(s.j, "b", LeaseQuery(query=1, tasks=(J0,)), "not-winner")
    rejects(s.j, "a", LeaseQuery(query=1, tasks=(TaskId("nope"),)), "unknown-task")
    rejects(s.j, "a", LeaseQuery(query=1, tasks=(J0, TaskId("nope"))), "unknown-task")
    rejects(s.j, "a", LeaseQuery(query=1, tasks=()), "bad-batch")
    rejects(s.j, "a", LeaseQuery(query=1, tasks=(J0, J0)), "bad-batch")
    assert s.mesh.out("j") == []
    assert "lease_queries_received" not in s.j.stats()
    # The real answer still works afterwards.
    s.a.receive(NodeId("j"), LeaseReply(query=qj, keep=(J0,)), RESUME)
    assert s.executed("a") == [I0, J0]


def test_no_stall_no_question() -> None:
    s = Stage()
    now = 0.0
    while now < 3.0:  # a's timers served on time: the waiting tasks are not in doubt
        now += 0.05
        s.step(now, frozen=False)
    assert "stalls" not in s.a.stats()
    assert sorted(s.completed("i")) == [I0, I1]
    assert s.completed("j") == [J0]


def test_stall_messages_survive_the_codec() -> None:
    for m in (
        LeaseQuery(query=7, tasks=(I0, I1)),
        LeaseReply(query=7, keep=(I1,)),
        LeaseReply(query=7, keep=()),
        Cancel(tasks=(I0,)),
    ):
        assert loads(dumps(m)) == m
