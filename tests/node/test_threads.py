"""Threads per worker with real workers and nodes: a worker takes a new count before its next
task (environment, BLAS through threadpoolctl, torch) without a restart, a new worker starts
with it, a task alone on its node takes the cores of its idle slots, an operator's
OMP_NUM_THREADS fixes it, and two nodes on this host share its cores until one leaves."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest

from mesh.client import connect
from mesh.config import NodeConfig
from mesh.errors import LocalProtocolError
from mesh.protocol.messages import NodeId
from node.cores import THREAD_VARS, local_pool, threads_per_worker
from node.executor import Executor
from tests.node.conftest import Cluster, wait_for

pytest.importorskip("threadpoolctl")

T = TypeVar("T")

MODULE = "tests.node.thread_tasks"
DEADLINE_S = 60.0
"""Bound on any single wait: generous, a loaded 2-core machine is slow."""

on_loop = pytest.mark.asyncio(loop_scope="function")


@pytest.fixture(autouse=True)
def no_operator_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OMP_NUM_THREADS inherited from the shell would fix every count."""
    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)


def executor(slots: int, cores: int, **changes: Any) -> Executor:
    config = dataclasses.replace(NodeConfig.test(), executor_idle_exit_s=None, **changes)
    return Executor(
        node_id=NodeId("node-t"),
        slots=slots,
        registry_modules=(MODULE,),
        config=config,
        cores=cores,
    )


async def seen(ex: Executor, task_id: str, *, use_torch: bool = False) -> dict[str, int]:
    outcome = await bounded(ex.run(task_id, "threads.seen", kwargs={"use_torch": use_torch}))
    assert outcome.ok, outcome.error
    value: dict[str, int] = outcome.value
    return value


async def bounded(aw: Awaitable[T]) -> T:
    async with asyncio.timeout(DEADLINE_S):
        return await aw


def blas(threads: int) -> int:
    """What OpenBLAS reports for ``threads``: it never runs more than this machine's CPUs."""
    return min(threads, len(os.sched_getaffinity(0)))


@on_loop
async def test_a_running_worker_takes_the_new_count_before_its_next_task() -> None:
    async with executor(slots=1, cores=2) as ex:
        assert ex.threads == 2
        alone = await seen(ex, "t-alone")
        assert alone["env"] == 2
        assert alone["blas"] == blas(2)

        ex.set_host_slots(2)  # a node with one slot joined on this host
        assert ex.threads == 1
        shared = await seen(ex, "t-shared")
        assert (shared["env"], shared["blas"]) == (1, 1)

        ex.set_host_slots(1)  # and left
        assert ex.threads == 2
        again = await seen(ex, "t-again")
        assert (again["env"], again["blas"]) == (2, blas(2))
        assert alone["pid"] == shared["pid"] == again["pid"]


@on_loop
async def test_torch_follows_the_count_whenever_it_was_imported() -> None:
    pytest.importorskip("torch")
    async with executor(slots=1, cores=2) as ex:
        await seen(ex, "t-warm")  # the worker is running, torch not yet imported
        ex.set_host_slots(2)
        first = await seen(ex, "t-import", use_torch=True)
        assert first["torch"] == 1  # imported after the change: read the environment
        ex.set_host_slots(1)
        second = await seen(ex, "t-imported", use_torch=True)
        assert second["torch"] == 2  # already imported: told directly
        assert first["pid"] == second["pid"]


@on_loop
async def test_a_worker_started_after_a_change_starts_with_the_new_count() -> None:
    async with executor(slots=2, cores=4, executor_prestart=False) as ex:
        assert ex.threads == 2
        ex.set_host_slots(4)
        assert ex.threads == 1
        value = await seen(ex, "t-new")
        assert (value["env"], value["blas"]) == (1, 1)


@on_loop
async def test_a_task_alone_on_its_node_takes_the_cores_of_its_idle_slots() -> None:
    async with executor(slots=2, cores=2) as ex:
        assert ex.threads == 1
        alone = await seen(ex, "t-alone")
        assert (alone["env"], alone["blas"]) == (2, blas(2))
        async with asyncio.TaskGroup() as tg:
            held = tg.create_task(bounded(ex.run("t-held", "threads.seen", kwargs={"hold_s": 1.5})))
            async with asyncio.timeout(DEADLINE_S):
                while ex.running < 1:  # noqa: ASYNC110 - the executor has no event for it
                    await asyncio.sleep(0.01)
            beside = await seen(ex, "t-beside")  # the other slot is busy: half the cores
            assert (beside["env"], beside["blas"]) == (1, 1)
        outcome = held.result()
        assert outcome.ok, outcome.error
        assert outcome.value["env"] == 2  # it started alone, and kept its count
        ex.set_host_slots(3)  # another node's slot on this host: counted busy
        shared = await seen(ex, "t-shared")
        assert (shared["env"], shared["blas"]) == (1, 1)


@on_loop
async def test_host_slots_never_count_fewer_than_this_nodes_own() -> None:
    async with executor(slots=2, cores=4) as ex:
        ex.set_host_slots(0)
        assert ex.threads == 2


@on_loop
async def test_an_operators_omp_num_threads_fixes_the_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    async with executor(slots=1, cores=8) as ex:
        assert ex.threads == 3
        ex.set_host_slots(8)
        assert ex.threads == 3
        value = await seen(ex, "t-pinned")
        assert value["env"] == 3


def test_an_executor_needs_a_core() -> None:
    with pytest.raises(LocalProtocolError):
        executor(slots=1, cores=0)


def test_two_nodes_on_this_host_share_its_cores_until_one_leaves(cluster: Cluster) -> None:
    cores = local_pool().cores
    if cores < 2:
        pytest.skip("one core: one thread alone or shared, nothing to tell apart")
    a = cluster.start("a", "--tasks", MODULE, slots=1)
    client = connect(a.url, cluster.key)

    def seen_on(name: str) -> dict[str, int]:
        fut = client.submit_with("threads.seen", labels={"name": name})
        value: dict[str, int] = fut.result(DEADLINE_S)
        return value

    try:
        assert seen_on("a")["env"] == threads_per_worker(cores, 1)
        cluster.start("b", "--tasks", MODULE, slots=1)
        wait_for(lambda: cluster.all_alive(["a", "b"]), 30, "a and b alive everywhere")
        for name in ("a", "b"):
            value = seen_on(name)
            assert (value["env"], value["blas"]) == (threads_per_worker(cores, 2),) * 2

        cluster.signal("b", signal.SIGTERM)
        wait_for(lambda: cluster.nodes["b"].proc.poll() is not None, 30, "b to exit")
        wait_for(lambda: cluster.states("a").get("b") != "alive", 30, "a to see b go")
        assert seen_on("a")["env"] == threads_per_worker(cores, 1)
    finally:
        client.close()
