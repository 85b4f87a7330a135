"""The participant role of the contract net: bids for the tasks this node can run, and
runs what it is awarded.

A task awarded here moves through the states of ``HeldState``; the legal transitions are
the data in ``HELD_TRANSITIONS``, and ``_Held.move`` raises ``LocalProtocolError`` on any
other, which is a bug here. Peer input that cannot be accepted raises
``RemoteProtocolError`` and leaves the state unchanged.

It bids its estimated seconds to completion for every task it can ever run (busy is not
a refusal: a busy node bids its queue), refuses with a structured reason those it cannot,
and holds the slots it offered in a soft ``_Reservation`` for a while. Awards under one
call keep coming as its initiator refills it (late binding); it takes those it has room
for and declines the rest as busy. What it holds (``_Held``) waits in a queue and starts,
in order, when it fits, never exceeding the node's resources; progress renews the
initiators' leases, and results and failures go back batched, one message per initiator.

Estimates learn: a node speed factor (seeded by calibration, corrected by every run with
an estimate) scales submitters' estimates, and this node's own runtime history for a task
outweighs that prior while fresh. Transfer is priced at the bandwidth measured per peer.

After a stall it asks before running what may have been placed again elsewhere (see
``mesh/protocol/contract.py``): tasks not yet started wait for a ``LeaseReply``.

This module may not import asyncio, aiohttp, zeroconf, socket or time, and may not read a
clock: ``now`` is always an argument.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from enum import StrEnum
from typing import Any, Final

from mesh.config import ContractConfig
from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.protocol.contract_shared import (
    EPS,
    INF,
    MAX_CFP_TASKS,
    MAX_ESTIMATE_S,
    MAX_LANES,
    MIN_ESTIMATE_S,
    CancelExecution,
    Context,
    Execute,
    plausible,
)
from mesh.protocol.messages import (
    Accept,
    CallForProposals,
    Cancel,
    Capabilities,
    Confirm,
    Decline,
    Failure,
    LeaseQuery,
    LeaseReply,
    Load,
    NodeId,
    Progress,
    Propose,
    Refuse,
    Reject,
    Result,
    TaskId,
    Wire,
)
from mesh.protocol.resources import check, demand, invalid

# ---------------------------------------------------------------------------------------
# Held tasks, their states, and the participant's reservations
# ---------------------------------------------------------------------------------------


class HeldState(StrEnum):
    """Where a task awarded to this node is, in its participant."""

    WAITING = "waiting"  # confirmed and queued: starts, in order, once it fits
    ASKING = "asking"  # held back after a stall until its initiator says it is still here
    RUNNING = "running"  # Execute emitted: the driver runs it
    CANCELLING = "cancelling"  # CancelExecution emitted: the driver has yet to stop it
    DROPPED = "dropped"  # cancelled or given back unrun; the queue passes over it
    FINISHED = "finished"  # the driver reported it ended, run to the end or stopped


HELD_TRANSITIONS: Final[dict[tuple[HeldState, str], HeldState]] = {
    (HeldState.WAITING, "start"): HeldState.RUNNING,  # it fits: Execute
    (HeldState.WAITING, "stall"): HeldState.ASKING,  # this node stalled: LeaseQuery
    (HeldState.ASKING, "stall"): HeldState.ASKING,  # stalled again before the reply: asked again
    (HeldState.ASKING, "keep"): HeldState.WAITING,  # LeaseReply kept it, or awarded again
    (HeldState.WAITING, "cancel"): HeldState.DROPPED,  # Cancel, or its initiator went down
    (HeldState.ASKING, "cancel"): HeldState.DROPPED,  # ... or LeaseReply did not keep it
    (HeldState.RUNNING, "cancel"): HeldState.CANCELLING,  # CancelExecution
    (HeldState.CANCELLING, "cancel"): HeldState.CANCELLING,  # already stopping
    (HeldState.WAITING, "give-back"): HeldState.DROPPED,  # Decline: leaving, or incapable
    (HeldState.ASKING, "give-back"): HeldState.DROPPED,  # Decline: no LeaseReply in time
    (HeldState.RUNNING, "finish"): HeldState.FINISHED,  # its result or failure goes back
    (HeldState.CANCELLING, "finish"): HeldState.FINISHED,  # stopped: nothing goes back
}
"""(state, event) -> next state. Anything missing is illegal. A task enters WAITING when
an award of it is taken; DROPPED and FINISHED are ends."""

_UNSTARTED: Final = frozenset({HeldState.WAITING, HeldState.ASKING})


class _Held:
    __slots__ = (
        "cfp",
        "est",
        "initiator",
        "nbytes",
        "need",
        "payload",
        "query",
        "renewed",
        "req",
        "res",
        "seed",
        "started",
        "state",
        "task_id",
    )

    def __init__(self, task_id: TaskId, res: _Reservation, payload: Any, now: float) -> None:
        self.task_id = task_id
        self.nbytes = res.inputs.get(task_id, 0)  # its referenced inputs' size
        self.res: _Reservation | None = res  # None once it no longer counts there
        res.holding += 1
        self.initiator = res.initiator
        self.cfp = res.cfp
        self.req = res.requirements
        self.need = res.need
        self.est = res.est
        self.seed = res.seed
        self.payload = payload
        self.state = HeldState.WAITING
        self.started = INF  # when it started (RUNNING, CANCELLING)
        self.renewed = now  # when the initiator last renewed the lease (the confirm)
        self.query = 0  # the LeaseQuery it waits for (ASKING)

    def move(self, event: str) -> None:
        nxt = HELD_TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise LocalProtocolError(f"held task {self.task_id}: no {event!r} from {self.state}")
        self.state = nxt


class _Query:
    """A ``LeaseQuery`` this participant sent after a stall, waiting for its reply."""

    __slots__ = ("deadline", "initiator", "tasks")

    def __init__(self, initiator: NodeId, tasks: tuple[TaskId, ...], deadline: float) -> None:
        self.initiator = initiator
        self.tasks = tasks
        self.deadline = deadline


class _Reservation:
    __slots__ = (
        "cfp",
        "est",
        "expires",
        "forget_at",
        "holding",
        "initiator",
        "inputs",
        "made",
        "need",
        "offered",
        "requirements",
        "reserved",
        "seed",
        "tasks",
    )

    def __init__(
        self,
        initiator: NodeId,
        cfp: int,
        msg: CallForProposals,
        need: dict[str, float],
        est: float,
        offered: int,
        now: float,
        config: ContractConfig,
    ) -> None:
        self.initiator = initiator
        self.cfp = cfp
        self.requirements = msg.requirements
        self.tasks = len(msg.tasks)
        self.need = need
        self.est = est
        self.seed = msg.est_runtime_s
        self.inputs = {t: sum(holders.values()) for t, holders in msg.inputs.items()}
        self.offered = offered
        self.reserved = offered
        self.holding = 0  # tasks awarded under it and not yet finished or dropped here
        self.made = now
        self.expires = now + config.reservation_s
        # Long enough to tell a late award (decline it) from one never solicited (reject it).
        self.forget_at = now + 4 * config.reservation_s


SIZE_MIN_BYTES: Final = 64 * 1024
"""Inputs smaller than this say nothing about a task's runtime (its own work dominates)."""
SIZE_RANGE: Final = 8.0
"""How far input size may scale a runtime learned on other inputs, either way."""


def _size_factor(nbytes: float, seen: float) -> float:
    """How much longer a task of ``nbytes`` of inputs runs than one of ``seen``: in
    proportion, within ``SIZE_RANGE``, where both are large enough to tell."""
    if nbytes < SIZE_MIN_BYTES or seen < SIZE_MIN_BYTES:
        return 1.0
    return min(max(nbytes / seen, 1.0 / SIZE_RANGE), SIZE_RANGE)


def _limiting(need: dict[str, float], have: dict[str, float]) -> tuple[str, int]:
    """The resource that bounds how many such tasks run at once, and that bound."""
    best_key, best = "cpu", MAX_LANES
    for k, v in need.items():
        if v <= 0:
            continue
        # A demand of 5e-324 divides to inf: bound before int().
        lanes = int(min(have.get(k, 0.0) / v + EPS, MAX_LANES))
        if lanes < best:
            best_key, best = k, lanes
    return best_key, best


class Participant:
    """The participant role of one node (``mesh.protocol.contract.Contract`` drives it)."""

    def __init__(
        self, ctx: Context, capabilities: Capabilities, speed: float, query_base: int
    ) -> None:
        self._ctx = ctx
        self._node = ctx.node
        self._cfg = ctx.config
        self._caps = capabilities
        self._reservations: dict[tuple[NodeId, int], _Reservation] = {}
        self._res_expiry: deque[_Reservation] = deque()
        # Reservations still holding slots: what bids and load are computed from.
        self._active: dict[tuple[NodeId, int], _Reservation] = {}
        # Work queued or reserved here, per resource it needs: what a bid's wait is made of,
        # kept as running sums so that a bid costs O(slots), not O(queue).
        self._pending_work: dict[str, float] = {}
        self._pending_count: dict[str, int] = {}
        self._res_forget: deque[_Reservation] = deque()
        self._queue: deque[_Held] = deque()
        self._running: dict[TaskId, _Held] = {}  # RUNNING and CANCELLING
        self._held: dict[TaskId, _Held] = {}  # every state but DROPPED and FINISHED
        self._used: dict[str, float] = {}
        # name -> (runtime, measured at, input bytes of the runs it averages)
        self._history: dict[str, tuple[float, float, float]] = {}
        # measured / estimated runtime, over every task with an estimate; seeded by the
        # driver's calibration (``speed``), replaced by the first real measurements
        self._speed = speed
        self._bandwidth: dict[NodeId, float] = {}  # measured from each peer, bytes/s
        self._speed_samples = 0
        self._progress_at = INF
        self._results: dict[NodeId, tuple[list[TaskId], list[Any], list[float]]] = {}
        self._failures: dict[NodeId, tuple[list[TaskId], list[Any]]] = {}
        # stalls
        self._stalled_at = -INF  # when the latest stall was noticed
        self._watch_at = INF  # a timer that only lets a stall be seen while tasks wait
        self._queries: dict[int, _Query] = {}  # in the order sent, so by deadline
        self._query_base = query_base
        self._next_query = query_base + 1

    # -----------------------------------------------------------------------------------
    # What the core asks of it
    # -----------------------------------------------------------------------------------

    def task_finished(self, task_id: TaskId, ok: bool, value: Any, now: float) -> None:
        """The driver ran (or stopped) ``task_id``: free its slot and report the outcome."""
        held = self._running.pop(task_id, None)
        if held is None:
            raise LocalProtocolError(f"task {task_id} is not running here")
        self._held.pop(task_id, None)
        for k, v in held.need.items():
            self._used[k] = self._used.get(k, 0.0) - v
        stopped = held.state is HeldState.CANCELLING
        held.move("finish")
        if ok and not stopped:
            self._learn(held, now - held.started, now)
        self._unhold(held, now)
        # Capped at what the initiator accepts: beyond it the whole result would be refused.
        run = min(max(0.0, now - held.started), MAX_ESTIMATE_S)
        if stopped:
            self._ctx.stats["cancelled_runs"] += 1
        elif held.initiator == self._node:
            msg: Wire = (
                Result(tasks=(task_id,), values=(value,), run_s=(run,))
                if ok
                else Failure(tasks=(task_id,), errors=(value,))
            )
            self._ctx.send(self._node, msg)
        elif ok:
            ids, values, runs = self._results.setdefault(held.initiator, ([], [], []))
            ids.append(task_id)
            values.append(value)
            runs.append(run)
        else:
            ids, errors = self._failures.setdefault(held.initiator, ([], []))
            ids.append(task_id)
            errors.append(value)
        self._ctx.stats["finished_ok" if ok else "finished_error"] += 1
        self._start_ready(now)

    def set_capabilities(self, capabilities: Capabilities, now: float) -> None:
        """The node's capabilities changed: give back queued tasks it can no longer run."""
        self._caps = capabilities
        back = [h for h in self._queue if h.state in _UNSTARTED and self._cannot_run(h)]
        self._give_back(back, "incapable")
        self._start_ready(now)

    def set_accepting(self, accepting: bool) -> None:
        """Graceful shutdown: stop bidding and give back tasks that have not started."""
        self._ctx.accepting = accepting
        if not accepting:
            self._give_back([h for h in self._queue if h.state in _UNSTARTED], "leaving")

    def waiting(self) -> int:
        """Tasks awarded here that have not started."""
        return len(self._held) - len(self._running)

    def set_bandwidth(self, node: NodeId, bytes_per_s: float) -> None:
        """The driver measured the transfer rate from ``node``: bids count inputs held
        there at this rate (``bandwidth_bytes_per_s`` until measured)."""
        if math.isfinite(bytes_per_s) and bytes_per_s > 0:
            old = self._bandwidth.get(node)
            alpha = self._cfg.runtime_alpha
            self._bandwidth[node] = (
                bytes_per_s if old is None else old + alpha * (bytes_per_s - old)
            )

    def load(self) -> Load:
        """Running, queued and backlog (committed seconds per slot), for gossip."""
        slots = max(1.0, self._caps.resources.get("cpu", 1.0))
        queued = sum(1 for h in self._queue if h.state in _UNSTARTED)
        reserved = sum(r.reserved for r in self._active.values())
        work = sum(h.est for h in self._held.values())
        work += sum(r.reserved * r.est for r in self._active.values())
        return Load(running=len(self._running), queued=queued + reserved, backlog_s=work / slots)

    def peer_down(self, node: NodeId) -> None:
        """``node`` died or left: its submitters are gone with it, and nobody wants the
        results of what it awarded here."""
        for key in [k for k in self._reservations if k[0] == node]:
            self._release(self._reservations[key])
        for held in list(self._held.values()):
            if held.initiator == node:
                self._drop_held(held)

    def next_timer(self) -> float:
        """When a timer method below next has work; INF: never."""
        t = min(self._progress_at, self._watch_at)
        if self._queries:
            t = min(t, next(iter(self._queries.values())).deadline)
        if self._res_expiry:
            t = min(t, self._res_expiry[0].expires)
        if self._res_forget:
            t = min(t, self._res_forget[0].forget_at)
        return t

    def send_outcomes(self) -> None:
        """Send the results and failures gathered since the last call, one message of
        each kind per initiator."""
        for dst, (ids, values, runs) in self._results.items():
            self._ctx.send_remote(
                dst, Result(tasks=tuple(ids), values=tuple(values), run_s=tuple(runs))
            )
        for dst, (ids, errors) in self._failures.items():
            self._ctx.send_remote(dst, Failure(tasks=tuple(ids), errors=tuple(errors)))
        self._results.clear()
        self._failures.clear()

    def watch(self, now: float) -> None:
        """While tasks wait to start, keep a timer close, so that a stall is seen by its
        lateness."""
        if self._watch_at == INF and len(self._held) > len(self._running):
            self._watch_at = now + self._cfg.stall_s / 2

    def watched(self, now: float) -> None:
        """The watch timer fired (it only lets a stall be seen): ``watch`` re-arms it."""
        if self._watch_at <= now:
            self._watch_at = INF

    # -----------------------------------------------------------------------------------
    # Bids, reservations, execution
    # -----------------------------------------------------------------------------------

    def _runtime(self, name: str, seed: float | None, now: float, nbytes: float = 0.0) -> float:
        """Expected runtime here of a task of ``nbytes`` of referenced inputs. The prior is
        the submitter's estimate (or the default) times this node's speed factor, which
        calibration at start seeds and every run with an estimate corrects. This node's
        own history for the name outweighs the prior while it is fresh and fades into it
        with age (``history_half_life_s``): one slow run long ago does not price a node
        out of every later auction. History learned on inputs of another size scales in
        proportion to the size (``_size_factor``)."""
        prior = (seed if seed is not None else self._cfg.default_runtime_s) * self._speed
        known = self._history.get(name)
        if known is None:
            return min(prior, MAX_ESTIMATE_S)
        value, at, seen = known
        value *= _size_factor(nbytes, seen)
        trust: float = 0.5 ** (max(0.0, now - at) / self._cfg.history_half_life_s)
        return min(trust * value + (1.0 - trust) * prior, MAX_ESTIMATE_S)

    def _learn(self, held: _Held, measured: float, now: float) -> None:
        alpha = self._cfg.runtime_alpha
        name = held.req.task
        old = self._history.get(name)
        if old is None:
            self._history[name] = (measured, now, float(held.nbytes))
        else:
            # The average moves towards this run as if it had had the average's input size.
            value, _, seen = old
            scaled = measured / _size_factor(held.nbytes, seen)
            seen += alpha * (held.nbytes - seen)
            self._history[name] = (value + alpha * (scaled - value), now, seen)
        if held.seed is not None and held.seed >= MIN_ESTIMATE_S:
            # A plain mean over the first few runs, then the moving average: the first
            # measurements are what tells a slow node from a fast one, so they count fully.
            # One ratio moves the factor by at most 1000x either way.
            ratio = min(max(measured / held.seed, 1e-3), 1e3)
            self._speed_samples += 1
            weight = max(alpha, 1.0 / self._speed_samples)
            self._speed += weight * (ratio - self._speed)

    def _account(self, need: dict[str, float], est: float, n: int) -> None:
        work, count = self._pending_work, self._pending_count
        for k, v in need.items():
            if v > 0:
                work[k] = work.get(k, 0.0) + est * n
                count[k] = count.get(k, 0) + n

    def _room(self, need: dict[str, float], est: float, now: float) -> int:
        """Tasks of this kind that could start here within ``bind_ahead_s`` beyond those
        already running, waiting or reserved: a refill beyond it is declined as busy, and
        its initiator places it elsewhere. Several initiators each refilling this node as
        if its lanes were theirs alone would otherwise queue work here that idle nodes
        could start at once."""
        key, lanes = _limiting(need, self._caps.resources)
        lanes = max(1, lanes)
        ahead = int(self._cfg.bind_ahead_s / max(est, MIN_ESTIMATE_S))
        busy = sum(1 for h in self._running.values() if h.need.get(key, 0.0) > 0)
        busy += self._pending_count.get(key, 0)
        return max(0, min(lanes * (1 + ahead), self._cfg.max_offer) - busy)

    def _bid(self, need: dict[str, float], est: float, n: int, now: float) -> list[float]:
        """Completion times of up to ``n`` more tasks on this node: running tasks by their
        remaining time, queued and reserved work spread evenly over the lanes."""
        key, lanes = _limiting(need, self._caps.resources)
        lanes = max(1, lanes)
        free_at = [0.0] * lanes
        running = 0
        for h in self._running.values():
            if h.need.get(key, 0.0) > 0:
                elapsed = now - h.started
                # A task past its estimate has shown that it is longer than thought; task
                # durations are heavy-tailed, so expect it to go on about as long as it has
                # overrun, not to end now (which would make a busy node bid as if idle).
                left = h.est - elapsed if elapsed < h.est else elapsed - h.est
                heapq.heapreplace(free_at, free_at[0] + left)
                running += 1
        pending = max(0.0, self._pending_work.get(key, 0.0))
        if pending:
            share = pending / lanes
            free_at = [t + share for t in free_at]
            heapq.heapify(free_at)
        room = lanes * (1 + self._cfg.queue_per_slot) - running - self._pending_count.get(key, 0)
        horizon = self._cfg.queue_horizon_s
        limit = min(n, self._cfg.max_offer)
        costs: list[float] = []
        while len(costs) < limit:
            c = free_at[0] + est
            # Always one slot (busy is not a refusal), the queue depth, and beyond it
            # whatever still completes within the horizon (short tasks come in thousands).
            if costs and len(costs) >= room and c > horizon:
                break
            heapq.heapreplace(free_at, c)
            costs.append(c)
        return costs

    def on_cfp(self, src: NodeId, msg: CallForProposals, now: float) -> None:
        key = (src, msg.cfp)
        if key in self._reservations:
            raise RemoteProtocolError(f"call {msg.cfp} from {src} repeated", reason="duplicate")
        ids = set(msg.tasks)
        if not msg.tasks or len(msg.tasks) > MAX_CFP_TASKS or len(ids) != len(msg.tasks):
            raise RemoteProtocolError("empty, oversized or repeating batch", reason="bad-batch")
        why = invalid(msg.requirements)
        if why is not None:
            raise RemoteProtocolError(why, reason="bad-requirements")
        if msg.est_runtime_s is not None and not plausible(msg.est_runtime_s):
            raise RemoteProtocolError(
                f"runtime estimate must be >= 0 and <= {MAX_ESTIMATE_S:g} s", reason="bad-cost"
            )
        for tid, holders in msg.inputs.items():
            if tid not in ids:
                raise RemoteProtocolError(
                    f"inputs for task {tid} not called", reason="unknown-task"
                )
            if any(b < 0 for b in holders.values()):
                raise RemoteProtocolError("negative input size", reason="bad-field")
        if not self._ctx.accepting:
            self._ctx.send(src, Refuse(cfp=msg.cfp, reason={"state": "leaving"}))
            self._ctx.stats["refusals_sent"] += 1
            return
        lacking = check(msg.requirements, self._caps)
        if lacking:
            self._ctx.send(src, Refuse(cfp=msg.cfp, reason={k: str(v) for k, v in lacking.items()}))
            self._ctx.stats["refusals_sent"] += 1
            return
        need = demand(msg.requirements)
        sizes = [sum(msg.inputs.get(t, {}).values()) for t in msg.tasks]
        est = self._runtime(msg.requirements.task, msg.est_runtime_s, now, sum(sizes) / len(sizes))
        # Queued behind long work a slot may end past MAX_ESTIMATE_S: bid the cap, which
        # the initiator accepts, rather than a number it refuses (``bad-cost``).
        costs = [min(c, MAX_ESTIMATE_S) for c in self._bid(need, est, len(msg.tasks), now)]
        default = self._cfg.bandwidth_bytes_per_s
        bandwidth = {
            h: self._bandwidth.get(h, default)
            for holders in msg.inputs.values()
            for h in holders
            if h != self._node
        }
        res = _Reservation(src, msg.cfp, msg, need, est, len(costs), now, self._cfg)
        self._reservations[key] = res
        self._res_expiry.append(res)
        self._active[key] = res
        self._account(need, est, res.offered)
        self._res_forget.append(res)
        self._ctx.stats["bids_sent"] += 1
        lanes = max(1, _limiting(need, self._caps.resources)[1])
        self._ctx.send(
            src,
            Propose(cfp=msg.cfp, costs=tuple(costs), lanes=lanes, run_s=est, bandwidth=bandwidth),
        )

    def on_accept(self, src: NodeId, msg: Accept, now: float) -> None:
        res = self._reservations.get((src, msg.cfp))
        if res is None:
            raise RemoteProtocolError(f"award for {msg.cfp} never called", reason="unsolicited")
        if len(msg.payloads) != len(msg.tasks) or len(set(msg.tasks)) != len(msg.tasks):
            raise RemoteProtocolError("tasks and payloads do not match", reason="malformed")
        if not msg.tasks or len(msg.tasks) > MAX_CFP_TASKS:
            raise RemoteProtocolError("empty or oversized award", reason="bad-batch")
        # Awards under one call keep coming while the initiator refills this node as its
        # results go back (late binding): any task of the call's kind, taken while there
        # is room (``_bid``), the rest declined as busy.
        fresh = [
            (tid, p)
            for tid, p in zip(msg.tasks, msg.payloads, strict=True)
            if tid not in self._held
        ]
        again = [tid for tid in msg.tasks if tid in self._held]
        res.forget_at = max(res.forget_at, now + 4 * self._cfg.reservation_s)
        # A bid made before this node stalled may have been awarded long ago, and the task
        # placed again elsewhere since: give it back rather than run it a second time.
        stale = res.made < self._stalled_at
        if not self._ctx.accepting or stale or check(res.requirements, self._caps):
            reason = "leaving" if not self._ctx.accepting else "stale" if stale else "incapable"
            if fresh:
                ids = tuple(t for t, _ in fresh)
                self._ctx.send(src, Decline(cfp=msg.cfp, tasks=ids, reason=reason))
                self._ctx.stats["declines_sent"] += 1
                if stale:
                    self._ctx.stats["stale_declined"] += len(ids)
            self._release(res)
            return
        for tid in again:
            h = self._held[tid]
            if h.state is HeldState.ASKING and h.initiator == src:
                # Awarded here again since the stall: the initiator's answer already.
                h.move("keep")
                h.renewed = now
                self._ctx.stats["stale_confirmed"] += 1
        # The reservation is soft: an award after it expired (or after a reject, when the
        # initiator falls back to this bid) is taken only if there is room now.
        room = res.reserved
        if room < len(fresh):
            room += self._room(res.need, res.est, now)
        take, back = fresh[:room], fresh[room:]
        self._release(res)
        for tid, payload in take:
            held = _Held(tid, res, payload, now)
            self._held[tid] = held
            self._queue.append(held)
            self._account(held.need, held.est, 1)
        confirmed = tuple(again) + tuple(tid for tid, _ in take)
        if confirmed:
            self._ctx.send_lazy(src, Confirm(cfp=msg.cfp, tasks=confirmed), now)
            self._ctx.stats["confirms_sent"] += 1
        if back:
            self._ctx.send(
                src, Decline(cfp=msg.cfp, tasks=tuple(t for t, _ in back), reason="busy")
            )
            self._ctx.stats["declines_sent"] += 1
        if take and src != self._node and self._progress_at == INF:
            self._progress_at = now + self._cfg.progress_interval_s
        self._start_ready(now)

    def on_reject(self, src: NodeId, msg: Reject) -> None:
        res = self._reservations.get((src, msg.cfp))
        if res is None:
            raise RemoteProtocolError(f"reject for {msg.cfp} never called", reason="unsolicited")
        self._release(res)
        self._ctx.stats["rejects_received"] += 1

    def on_cancel(self, src: NodeId, msg: Cancel) -> None:
        # A task named twice is cancelled once: the second would be no move from DROPPED.
        helds = list({tid: self._held[tid] for tid in msg.tasks if tid in self._held}.values())
        for h in helds:
            if h.initiator != src:
                raise RemoteProtocolError(
                    f"{src} did not award {h.task_id}", reason="not-initiator"
                )
        for h in helds:
            self._drop_held(h)
        self._ctx.stats["cancels_received"] += 1

    def _unhold(self, held: _Held, now: float) -> None:
        """``held`` no longer counts under its reservation, which stays known (for further
        awards under it) for a while after its last task."""
        res = held.res
        if res is not None:
            held.res = None
            res.holding -= 1
            res.forget_at = max(res.forget_at, now + 4 * self._cfg.reservation_s)

    def _drop_held(self, held: _Held) -> None:
        """Its initiator no longer wants ``held`` (a cancel, the initiator gone, its reply
        after a stall): the driver stops it if it runs, else it is forgotten unrun."""
        was = held.state
        held.move("cancel")
        if was is HeldState.RUNNING:
            self._ctx.events.append(CancelExecution(task_id=held.task_id))
        elif held.state is HeldState.DROPPED:
            self._account(held.need, held.est, -1)
            self._held.pop(held.task_id, None)
            self._unhold(held, self._ctx.now)

    def _release(self, res: _Reservation) -> None:
        if res.reserved:
            self._account(res.need, res.est, -res.reserved)
        res.reserved = 0
        self._active.pop((res.initiator, res.cfp), None)

    def _cannot_run(self, held: _Held) -> bool:
        return bool(check(held.req, self._caps))

    def _give_back(self, helds: list[_Held], reason: str) -> None:
        by: dict[tuple[NodeId, int], list[TaskId]] = {}
        for h in helds:
            h.move("give-back")
            self._account(h.need, h.est, -1)
            self._held.pop(h.task_id, None)
            self._unhold(h, self._ctx.now)
            by.setdefault((h.initiator, h.cfp), []).append(h.task_id)
        for (initiator, cfp), ids in by.items():
            self._ctx.send(initiator, Decline(cfp=cfp, tasks=tuple(ids), reason=reason))
            self._ctx.stats["declines_sent"] += 1

    def _start_ready(self, now: float) -> None:
        """Start queued tasks in order while they fit. A task that does not fit blocks the
        resources it is short of: later tasks may pass it only if they need none of them,
        so a two-slot task is not starved by a stream of one-slot tasks."""
        queue = self._queue
        have = self._caps.resources
        used = self._used
        blocked: set[str] = set()
        i = 0
        while i < len(queue) and i < 64:
            held = queue[i]
            if held.state is HeldState.DROPPED:
                del queue[i]
                continue
            if held.state is HeldState.ASKING:  # waits for its initiator's word
                i += 1
                continue
            short = [
                k
                for k, v in held.need.items()
                if v > 0 and (k in blocked or used.get(k, 0.0) + v > have.get(k, 0.0) + EPS)
            ]
            if short:
                blocked.update(short)
                if "cpu" in blocked:
                    break  # every task needs a slot: nothing further can start
                i += 1
                continue
            del queue[i]
            self._account(held.need, held.est, -1)
            held.move("start")
            held.started = now
            self._running[held.task_id] = held
            for k, v in held.need.items():
                used[k] = used.get(k, 0.0) + v
            payload, held.payload = held.payload, None
            self._ctx.events.append(
                Execute(task_id=held.task_id, initiator=held.initiator, payload=payload)
            )
            self._ctx.stats["executions"] += 1

    def send_progress(self, now: float) -> None:
        """Renew the leases of what this node holds for other initiators (when due)."""
        if self._progress_at > now:
            return
        self._progress_at = INF
        interval = self._cfg.progress_interval_s
        # Renew each lease at least twice in its span, so that one lost progress message
        # never lets it lapse; a task that finishes within half a lease costs none.
        due = now - max(0.0, self._cfg.lease_s / 2 - interval)
        by: dict[NodeId, list[TaskId]] = {}
        remote = False
        for h in self._held.values():
            if h.state is not HeldState.CANCELLING and h.initiator != self._node:
                remote = True
                if h.renewed <= due:
                    h.renewed = now
                    by.setdefault(h.initiator, []).append(h.task_id)
        for initiator, ids in by.items():
            self._ctx.send(initiator, Progress(tasks=tuple(ids)))
        if remote:
            self._progress_at = now + interval

    # -----------------------------------------------------------------------------------
    # Stalls: ask before running what may have been placed again elsewhere
    # -----------------------------------------------------------------------------------

    def stalled(self, now: float) -> None:
        """This node stalled (the core saw ``now`` come long after the timer it asked for):
        a bid made before is stale, and tasks not yet started wait until their initiators
        say whether they are still bound here."""
        self._stalled_at = now
        by: dict[NodeId, list[_Held]] = {}
        for h in self._held.values():
            if h.state in _UNSTARTED and h.initiator != self._node:
                by.setdefault(h.initiator, []).append(h)
        deadline = now + self._cfg.stall_reply_s
        for initiator, helds in by.items():
            for i in range(0, len(helds), MAX_CFP_TASKS):
                part = helds[i : i + MAX_CFP_TASKS]
                q = self._next_query
                self._next_query += 1
                for h in part:
                    h.move("stall")
                    h.query = q
                ids = tuple(h.task_id for h in part)
                self._queries[q] = _Query(initiator, ids, deadline)
                self._ctx.send(initiator, LeaseQuery(query=q, tasks=ids))
                self._ctx.stats["stale_checked"] += len(ids)

    def on_lease_reply(self, src: NodeId, msg: LeaseReply, now: float) -> None:
        """Start the tasks the initiator still binds here, drop the rest."""
        query = self._queries.get(msg.query)
        if query is None:
            if self._query_base < msg.query < self._next_query:
                self._ctx.stats["late_answers"] += 1  # after the deadline: already given back
                return
            raise RemoteProtocolError(f"no lease query {msg.query}", reason="unsolicited")
        if query.initiator != src:
            raise RemoteProtocolError(
                f"{src} was not asked in query {msg.query}", reason="not-initiator"
            )
        keep = set(msg.keep)
        if len(keep) != len(msg.keep):
            raise RemoteProtocolError("a task appears twice in one reply", reason="malformed")
        if not keep.issubset(query.tasks):
            raise RemoteProtocolError("reply names a task not asked about", reason="unknown-task")
        del self._queries[msg.query]
        for tid in query.tasks:
            h = self._held.get(tid)
            if h is None or h.state is not HeldState.ASKING or h.query != msg.query:
                continue  # cancelled, given back, awarded again, or asked about again since
            if tid in keep:
                h.move("keep")
                h.renewed = now
                self._ctx.stats["stale_confirmed"] += 1
            else:
                self._drop_held(h)
                self._ctx.stats["stale_dropped"] += 1
        self._start_ready(now)

    def expire_queries(self, now: float) -> None:
        """Give back what no reply came for: the initiator places it again."""
        while self._queries:
            q, query = next(iter(self._queries.items()))
            if query.deadline > now:
                return
            del self._queries[q]
            waiting = [
                h
                for tid in query.tasks
                if (h := self._held.get(tid)) is not None
                and h.state is HeldState.ASKING
                and h.query == q
            ]
            if waiting:
                self._ctx.stats["stale_unanswered"] += len(waiting)
                self._give_back(waiting, "stale")

    def expire_reservations(self, now: float) -> None:
        """Free the slots of reservations that expired; forget those long unused."""
        while self._res_expiry and self._res_expiry[0].expires <= now:
            self._release(self._res_expiry.popleft())
        forget = self._res_forget
        for _ in range(len(forget)):
            if forget[0].forget_at > now:
                break
            r = forget.popleft()
            if r.holding > 0 or r.forget_at > now:
                # Still working for its initiator, or awarded since: look again later.
                r.forget_at = max(r.forget_at, now + 4 * self._cfg.reservation_s)
                forget.append(r)
            else:
                self._reservations.pop((r.initiator, r.cfp), None)
