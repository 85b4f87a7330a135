"""The contract net over simulated meshes: one test per goal, fixed seeds, virtual time."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from mesh.config import ContractConfig
from mesh.protocol.contract import FAILED_NO_PEER, Contract
from mesh.protocol.messages import Capabilities, NodeId, Requirements, TaskId
from mesh.protocol.resources import check
from mesh.runtime.sim_contract import (
    AllocationSim,
    Outcome,
    SimNode,
    SimTask,
    greedy_makespan,
    workload,
)

LAN = ContractConfig.lan()
D = LAN.candidates


def run(
    n: int,
    initiators: int,
    tasks: int,
    *,
    seed: int = 3,
    config: ContractConfig = LAN,
    crash: float = 0.0,
    loss: float = 0.0,
    extra: list[SimTask] | None = None,
) -> tuple[Outcome, list[SimNode], list[SimTask], AllocationSim]:
    nodes, stream = workload(n=n, initiators=initiators, tasks=tasks, seed=seed)
    sim = AllocationSim(
        nodes=nodes, tasks=[*stream, *(extra or [])], config=config, seed=seed, loss=loss
    )
    if crash:
        starters = {t.initiator for t in stream}
        others = [x.node for x in nodes if x.node not in starters]
        window = max(t.at for t in stream)
        for node in random.Random(seed).sample(others, round(crash * n)):
            sim.crash(node, window / 2)
    return sim.run(2000.0), nodes, stream, sim


def test_every_task_completes_once_within_capacity_and_message_bound() -> None:
    out, _, _, _ = run(50, 4, 400)
    assert out.completed == 400
    assert (out.lost, out.duplicate_results, out.capacity_violations, out.failed) == (0, 0, 0, 0)
    assert out.messages / out.tasks <= 3 * D + 2


def test_gpu_and_library_tasks_only_land_on_capable_nodes() -> None:
    out, nodes, stream, _ = run(40, 4, 300, seed=5)
    assert out.completed == 300
    assert out.misplaced == 0
    kinds = {t.requirements.task for t in stream}
    assert {"features", "train"} <= kinds  # the GPU kind and the kind needing scikit-learn
    assert any(not check(stream[0].requirements, x.capabilities) for x in nodes)
    assert sum(1 for x in nodes if "gpu" not in x.capabilities.resources) > len(nodes) // 2
    assert sum(1 for x in nodes if "scikit-learn" not in x.capabilities.libraries) > 0


def test_messages_per_task_do_not_grow_with_the_mesh() -> None:
    small, *_ = run(50, 4, 400)
    large, *_ = run(200, 8, 1600)
    per_small = small.messages / small.tasks
    per_large = large.messages / large.tasks
    assert per_small <= 3 * D + 2
    assert per_large <= 3 * D + 2
    assert per_large <= per_small + 0.5


def test_makespan_is_close_to_omniscient_greedy() -> None:
    out, nodes, stream, _ = run(50, 4, 1600, seed=1)
    assert out.completed == 1600
    assert out.makespan / greedy_makespan(nodes, stream) <= 1.15


def test_crash_of_a_tenth_of_the_nodes_loses_nothing_and_delivers_once() -> None:
    out, _, _, _ = run(50, 4, 400, crash=0.1)
    assert out.completed == 400
    assert (out.lost, out.duplicate_results, out.capacity_violations) == (0, 0, 0)


def test_message_loss_is_recovered_by_leases_and_results_stay_exactly_once() -> None:
    config = replace(ContractConfig.test(), reply_timeout_s=0.02)
    out, _, _, sim = run(30, 3, 300, config=config, loss=0.02, seed=11)
    assert out.completed == 300
    assert (out.lost, out.duplicate_results, out.capacity_violations) == (0, 0, 0)
    assert sim.sim.network.dropped > 0
    assert out.executions > out.completed  # a lost result means running the task again


@pytest.mark.parametrize("resource", ["fpga", "gpu"])
def test_task_nobody_can_run_fails_within_one_reply_deadline(resource: str) -> None:
    nodes, _ = workload(n=20, initiators=1, tasks=1, seed=2)
    if resource == "gpu":
        nodes = [
            replace(
                x,
                capabilities=replace(
                    x.capabilities,
                    resources={k: v for k, v in x.capabilities.resources.items() if k != "gpu"},
                ),
            )
            for x in nodes
        ]
    probe = SimTask(
        task_id=TaskId("probe"),
        initiator=NodeId("n005"),
        at=1.0,
        requirements=Requirements(
            task="preprocess", resources={resource: 1.0}, libraries={}, labels={}
        ),
        base_s=1.0,
        noise=1.0,
    )
    sim = AllocationSim(nodes=nodes, tasks=[probe], config=LAN, seed=2)
    out = sim.run(60.0)
    failed = out.failures[TaskId("probe")]
    assert failed.kind == FAILED_NO_PEER
    assert failed.details["missing"] == {"missing": resource}
    assert out.failed_at[TaskId("probe")] - 1.0 <= LAN.reply_timeout_s


def stalled_run(
    config: ContractConfig, *, detect_s: float, duration: float, seed: int = 3
) -> tuple[Outcome, frozenset[TaskId], dict[str, int]]:
    """A burst of short tasks from two initiators overloads eight nodes; tasks this short
    queue at their winners (late binding binds what starts within ``bind_ahead_s``), and
    the fastest other node stalls in the middle of it. Returns the outcome, what the
    stalled node was running when it stalled, and its counters."""
    nodes, _ = workload(n=8, initiators=2, tasks=1, seed=seed)
    starters = (nodes[0].node, nodes[1].node)
    rng = random.Random(seed)
    burst = [
        SimTask(
            task_id=TaskId(f"s{j:04d}"),
            initiator=starters[j % 2],
            at=1.0 + rng.uniform(0.0, 0.5),
            requirements=Requirements(
                task="infer", resources={"cpu": 1.0}, libraries={}, labels={}
            ),
            base_s=0.002,
            noise=1.0,
        )
        for j in range(1000)
    ]
    # One more task after the stall keeps the run going until the stalled node resumes.
    late = replace(burst[0], task_id=TaskId("late"), at=1.2 + duration + 1.0)
    burst = sorted([*burst, late], key=lambda t: t.at)
    victim = max(
        (x for x in nodes if x.node not in starters),
        key=lambda x: x.capabilities.resources["cpu"] / x.slowness,
    ).node
    sim = AllocationSim(nodes=nodes, tasks=burst, config=config, seed=seed, detect_s=detect_s)
    sim.stall(victim, 1.2, duration)
    out = sim.run(500.0)
    core = sim.contract(victim)
    assert isinstance(core, Contract)
    return out, sim.running_at_stall[victim], core.stats()


@pytest.mark.parametrize(
    ("config", "detect_s", "duration"),
    [
        # SIGSTOP for 12 s on a LAN: membership declares the node dead meanwhile and its
        # tasks are placed again without a cancel (the case the issue measured).
        (LAN, 1.0, 12.0),
        # Membership keeps it: its leases lapse, and the initiators' cancels wait in its
        # socket behind the results of what it was running.
        (ContractConfig.test(), 100.0, 3.0),
    ],
    ids=["declared-dead", "leases-lapse"],
)
def test_a_stalled_node_runs_none_of_its_waiting_tasks_that_were_placed_again(
    config: ContractConfig, detect_s: float, duration: float
) -> None:
    out, running, stats = stalled_run(config, detect_s=detect_s, duration=duration)
    assert out.completed == 1001
    assert (out.lost, out.failed, out.duplicate_results, out.capacity_violations) == (0, 0, 0, 0)
    twice = {t for t, n in out.runs.items() if n > 1}
    assert twice <= running  # only what it was running when it stalled ran twice
    assert stats["stalls"] == 1
    # Late binding leaves a stalled node few unstarted tasks to ask about; what it does
    # with them (LeaseQuery, LeaseReply, Decline) is covered in tests/unit/test_contract_stall.py.


# ---------------------------------------------------------------------------------------
# Late binding on machines of different speed
# ---------------------------------------------------------------------------------------

SPIN = Requirements(task="spin", resources={"cpu": 1.0}, libraries={}, labels={})
ONE_SLOT = Capabilities(resources={"cpu": 1.0}, libraries={}, tasks=("spin",), labels={})


def spin_burst(
    nodes: list[SimNode], count: int, base_s: float, *, prefix: str = "t", at: float = 0.0
) -> list[SimTask]:
    return [
        SimTask(
            task_id=TaskId(f"{prefix}{j:04d}"),
            initiator=nodes[0].node,
            at=at,
            requirements=SPIN,
            base_s=base_s,
            noise=1.0,
        )
        for j in range(count)
    ]


def machines(*slowness: float, speed: float = 1.0) -> list[SimNode]:
    return [
        SimNode(node=NodeId(f"m{i}"), capabilities=ONE_SLOT, slowness=s, speed=speed)
        for i, s in enumerate(slowness)
    ]


def test_a_burst_on_nodes_of_speeds_1_to_4_runs_mostly_on_the_fast_node() -> None:
    nodes = machines(1.0, 4.0)
    tasks = spin_burst(nodes, 100, 0.06)
    out = AllocationSim(nodes=nodes, tasks=tasks, config=LAN, seed=1).run(100.0)
    assert out.completed == 100
    assert (out.lost, out.duplicate_results, out.capacity_violations) == (0, 0, 0)
    fast, slow = out.ran_on[NodeId("m0")], out.ran_on[NodeId("m1")]
    assert fast > 3 * slow  # in proportion to speed (4:1), not 50/50
    assert out.makespan < 0.5 * 50 * (0.06 * 4.0)  # an even split ends when m1 ends its 50


def test_long_tasks_are_bound_only_to_a_lane_about_to_free() -> None:
    """No task waits at a node that cannot start it: with tasks longer than
    ``bind_ahead_s`` a one-slot node never holds an unstarted task."""
    nodes = machines(1.0, 2.0, 8.0)
    out = AllocationSim(nodes=nodes, tasks=spin_burst(nodes, 60, 0.5), config=LAN, seed=2).run(
        200.0
    )
    assert out.completed == 60
    assert max(out.most_waiting.values(), default=0) == 0


def test_a_node_whose_estimate_is_ten_times_too_high_gets_work_and_corrects_it() -> None:
    """m1 believes itself ten times slower than it is (a bad calibration): it bids 10x
    too high, yet a burst still reaches it; its measured runs correct its bids, and the
    second burst is spread as evenly as the machines are."""
    nodes = [
        SimNode(node=NodeId("m0"), capabilities=ONE_SLOT, slowness=1.0),
        SimNode(node=NodeId("m1"), capabilities=ONE_SLOT, slowness=1.0, speed=10.0),
    ]
    first = spin_burst(nodes, 40, 0.1, prefix="a")
    second = spin_burst(nodes, 40, 0.1, prefix="b", at=20.0)
    sim = AllocationSim(nodes=nodes, tasks=[*first, *second], config=LAN, seed=3)
    out = sim.run(200.0)
    assert out.completed == 80
    core = sim.contract(NodeId("m1"))
    assert isinstance(core, Contract)
    assert core.stats()["executions"] >= 30  # about half of both bursts, not none


def test_a_node_that_dies_holding_a_window_of_unstarted_tasks_loses_none() -> None:
    nodes = machines(1.0, 1.0, 1.0)
    tasks = spin_burst(nodes, 3000, 0.002)  # short: each node holds a window of them
    sim = AllocationSim(nodes=nodes, tasks=tasks, config=LAN, seed=4)
    sim.crash(NodeId("m2"), 0.5)
    out = sim.run(200.0)
    assert out.most_waiting[NodeId("m2")] > 0
    assert out.completed == 3000
    assert (out.lost, out.duplicate_results, out.capacity_violations) == (0, 0, 0)
