"""The executor with real worker processes: results, errors, deaths, timeouts, cancellation,
concurrency bounded by slots, large arrays through shared memory without leaked segments."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import pytest_asyncio

from mesh.config import NodeConfig
from mesh.errors import LocalProtocolError
from mesh.protocol.messages import NodeId
from mesh.runtime.shm import SHM_DIR
from node.executor import Executor

pytestmark = pytest.mark.asyncio(loop_scope="module")

T = TypeVar("T")

DEADLINE_S = 60.0
"""Bound on any single wait in these tests: generous, a loaded 2-core machine is slow."""

PLUGIN = "mesh_test_executor_tasks"
PLUGIN_SOURCE = textwrap.dedent(
    '''
    """Tasks the executor tests need beyond the built-in ones."""
    import asyncio
    import importlib
    import signal
    import os
    import time

    import numpy as np

    from tasks import task

    _kept = []


    @task
    def overlap(directory: str, seconds: float) -> int:
        """Count the tasks running at once, through marker files in ``directory``."""
        marker = os.path.join(directory, str(os.getpid()))
        open(marker, "w").close()
        try:
            seen = len(os.listdir(directory))
            time.sleep(seconds)
            return max(seen, len(os.listdir(directory)))
        finally:
            os.unlink(marker)


    @task
    def crash_holding(a: object) -> None:
        os._exit(9)


    @task
    def keep(a: np.ndarray) -> float:
        _kept.append(a)
        return float(a[0])


    @task
    def kept_first() -> float:
        return float(_kept[0][0])


    @task
    def unencodable() -> object:
        return object()


    @task
    def imports(module: str) -> str:
        return importlib.import_module(module).__name__


    @task
    def pid() -> int:
        return os.getpid()


    @task
    def visible_gpus() -> str:
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")


    @task
    def segfault() -> None:
        os.kill(os.getpid(), signal.SIGSEGV)


    @task
    async def later(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1
    '''
)


def config(**changes: object) -> NodeConfig:
    return dataclasses.replace(NodeConfig.test(), **changes)  # type: ignore[arg-type]


def segments(prefix: str) -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(prefix)}


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while not condition():  # noqa: ASYNC110 - state of other processes, no event to await
            await asyncio.sleep(0.01)
    assert condition(), what


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("plugin")
    (directory / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    sys.path.insert(0, str(directory))
    yield directory
    sys.path.remove(str(directory))
    sys.modules.pop(PLUGIN, None)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def ex(plugin_dir: Path) -> AsyncIterator[Executor]:
    """One two-slot executor shared by the tests that leave it as they found it."""
    async with Executor(
        node_id=NodeId("node-a"), slots=2, registry_modules=(PLUGIN,), config=config()
    ) as executor:
        yield executor


def fresh(slots: int, **kwargs: object) -> Executor:
    kwargs.setdefault("config", config())
    return Executor(
        node_id=NodeId("node-b"),
        slots=slots,
        registry_modules=(PLUGIN,),
        **kwargs,  # type: ignore[arg-type]
    )


async def bounded(aw: Awaitable[T]) -> T:
    async with asyncio.timeout(DEADLINE_S):
        return await aw


async def test_results_come_back(ex: Executor) -> None:
    value = {"a": [1, 2.5, "x", None, True], "b": b"\x00\x01"}
    echoed = await bounded(ex.run("t-echo", "echo", [value]))
    assert echoed.ok
    assert echoed.value == value
    assert echoed.runtime_s >= 0
    noop = await bounded(ex.run("t-noop", "noop"))
    assert noop.ok
    assert noop.value is None
    who = await bounded(ex.run("t-who", "whoami"))
    assert who.value == "node-a"
    slept = await bounded(ex.run("t-sleep", "sleep", kwargs={"seconds": 0.01}))
    assert slept.value == 0.01


async def test_exception_comes_back_with_remote_traceback(ex: Executor) -> None:
    out = await bounded(ex.run("t-fail", "fail", ["it broke"]))
    assert not out.ok
    assert out.value is None
    assert out.error.exc_type == "RuntimeError"
    assert out.error.message == "it broke"
    assert "raise RuntimeError(message)" in out.error.traceback
    assert "builtin.py" in out.error.traceback
    assert "node/worker.py" not in out.error.traceback


async def test_unknown_task_and_unencodable_result(ex: Executor) -> None:
    unknown = await bounded(ex.run("t-unknown", "no_such_task"))
    assert (unknown.ok, unknown.error.exc_type) == (False, "UnknownTask")
    assert "no_such_task" in unknown.error.message
    bad = await bounded(ex.run("t-bad", "unencodable"))
    assert (bad.ok, bad.error.exc_type) == (False, "TypeError")
    assert "cannot cross the wire" in bad.error.message
    after = await bounded(ex.run("t-after-bad", "echo", [1]))
    assert after.value == 1


async def test_same_task_id_twice_at_once_is_refused(ex: Executor) -> None:
    first = asyncio.ensure_future(ex.run("t-dup", "sleep", [0.2]))
    await wait_for(lambda: ex.running + ex.queued >= 1, "first run registered")
    with pytest.raises(LocalProtocolError):
        await ex.run("t-dup", "noop")
    assert (await bounded(first)).ok


async def test_many_concurrent_noops(ex: Executor) -> None:
    outcomes = await bounded(asyncio.gather(*(ex.run(f"t-n{i}", "noop") for i in range(1000))))
    assert all(o.ok for o in outcomes)
    assert ex.running == 0
    assert ex.queued == 0


async def test_never_more_running_than_slots(ex: Executor, tmp_path: Path) -> None:
    runs = [ex.run(f"t-o{i}", "overlap", [str(tmp_path), 0.1]) for i in range(8)]
    tasks = [asyncio.ensure_future(r) for r in runs]
    peak = 0
    while not all(t.done() for t in tasks):
        peak = max(peak, ex.running)
        assert ex.running + ex.queued <= 8
        await asyncio.sleep(0.005)
    outcomes = [await bounded(t) for t in tasks]
    assert all(o.ok for o in outcomes), outcomes
    assert max(o.value for o in outcomes) <= ex.slots
    assert peak <= ex.slots


async def test_large_arrays_round_trip_through_shared_memory(ex: Executor) -> None:
    prefix = ex._prefix
    big = np.arange(4 * 1024 * 1024, dtype=np.float64)  # 32 MiB
    summed = await bounded(ex.run("t-sum", "array_sum", [big]))
    assert summed.ok, summed
    assert summed.value == float(big.sum())
    made = await bounded(ex.run("t-make", "make_array", [16 * 1024 * 1024]))
    assert made.ok
    assert made.value.shape == (2 * 1024 * 1024,)
    assert made.value[12345] == 12345.0
    echoed = await bounded(ex.run("t-echo-big", "echo", [big[::2]]))
    assert np.array_equal(echoed.value, big[::2])
    # Only the workers' reusable argument segments remain; results were unlinked on arrival.
    assert all(name.endswith("-args") for name in segments(prefix))


async def test_worker_death_fails_only_its_task_and_is_replaced(ex: Executor) -> None:
    before = set(ex.worker_pids())
    slow = asyncio.ensure_future(ex.run("t-slow", "sleep", [0.5]))
    crashed = await bounded(ex.run("t-crash", "crash", [7]))
    assert (crashed.ok, crashed.error.exc_type) == (False, "WorkerDied")
    assert "code 7" in crashed.error.message
    assert (await bounded(slow)).ok
    await wait_for(lambda: len(ex.worker_pids()) == ex.slots, "worker replaced")
    assert set(ex.worker_pids()) != before
    assert (await bounded(ex.run("t-after-crash", "echo", ["still up"]))).value == "still up"


async def test_a_signal_death_names_the_signal(ex: Executor) -> None:
    out = await bounded(ex.run("t-segv", "segfault"))
    assert (out.ok, out.error.exc_type) == (False, "WorkerDied")
    assert "SIGSEGV" in out.error.message
    await wait_for(lambda: len(ex.worker_pids()) == ex.slots, "worker replaced")


async def test_async_task_runs_to_completion(ex: Executor) -> None:
    assert (await bounded(ex.run("t-later", "later", [41]))).value == 42


async def test_worker_death_with_a_large_argument_leaks_no_segment(ex: Executor) -> None:
    big = np.ones(2 * 1024 * 1024)  # 16 MiB: through shared memory
    out = await bounded(ex.run("t-crash-big", "crash_holding", [big]))
    assert out.error.exc_type == "WorkerDied"
    await wait_for(lambda: len(ex.worker_pids()) == ex.slots, "worker replaced")
    live = {w.prefix for w in ex._workers}
    leftovers = {n for n in segments(ex._prefix) if not any(n.startswith(p) for p in live)}
    assert leftovers == set()


async def test_timeout_kills_the_task_and_the_node_goes_on(ex: Executor) -> None:
    out = await bounded(ex.run("t-timeout", "sleep", [60], timeout=0.3))
    assert (out.ok, out.error.exc_type) == (False, "Timeout")
    assert ex.running == 0
    assert (await bounded(ex.run("t-after-timeout", "echo", [2]))).value == 2


async def test_a_timeout_that_is_not_a_number_fails_the_task_not_the_executor(
    ex: Executor,
) -> None:
    # Regression: a peer's award with timeout NaN reached call_later, which raised in the
    # event loop and ended the daemon.
    for i, bad in enumerate([float("nan"), "3", True]):
        out = await bounded(ex.run(f"t-nan-{i}", "echo", [1], timeout=bad))  # type: ignore[arg-type]
        assert (out.ok, out.error.exc_type) == (False, "BadTimeout")
    out = await bounded(ex.run("t-neg", "echo", [1], timeout=-1.0))
    assert (out.ok, out.error.exc_type) == (False, "Timeout")
    out = await bounded(ex.run("t-inf", "echo", [3], timeout=float("inf")))
    assert (out.ok, out.value) == (True, 3)
    assert ex.running == 0


async def test_cancel_running_and_queued_tasks(plugin_dir: Path) -> None:
    async with fresh(1) as one:
        running = asyncio.ensure_future(one.run("t-long", "sleep", [60]))
        queued = asyncio.ensure_future(one.run("t-queued", "echo", [1]))
        await wait_for(lambda: one.running == 1 and one.queued == 1, "one running, one queued")
        assert one.cancel("t-queued")
        assert (await bounded(queued)).error.exc_type == "Cancelled"
        assert one.queued == 0
        assert one.cancel("t-long")
        assert (await bounded(running)).error.exc_type == "Cancelled"
        assert not one.cancel("t-long")
        assert not one.cancel("never-seen")
        assert (await bounded(one.run("t-next", "echo", [3]))).value == 3


async def test_cancelling_the_caller_stops_the_task(plugin_dir: Path) -> None:
    async with fresh(1) as one:
        first_pid = (await bounded(one.run("t-pid", "pid"))).value
        caller = asyncio.ensure_future(one.run("t-long", "sleep", [60]))
        await wait_for(lambda: one.running == 1, "task running")
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert one.running == 0
        second_pid = (await bounded(one.run("t-pid-2", "pid"))).value
        assert second_pid != first_pid


async def test_a_kept_argument_is_never_overwritten(plugin_dir: Path) -> None:
    async with fresh(1) as one:
        ones = np.ones(1024 * 1024)  # 8 MiB: through the argument segment
        assert (await bounded(one.run("t-keep", "keep", [ones]))).value == 1.0
        twos = np.full(1024 * 1024, 2.0)
        assert (await bounded(one.run("t-sum2", "array_sum", [twos]))).value == 2.0 * twos.size
        assert (await bounded(one.run("t-kept", "kept_first"))).value == 1.0


async def test_without_refuses_the_library_in_workers(plugin_dir: Path) -> None:
    async with fresh(1, without=("scikit-learn",)) as one:
        out = await bounded(one.run("t-imp", "imports", ["sklearn"]))
        assert (out.ok, out.error.exc_type) == (False, "ModuleNotFoundError")
        assert "without scikit-learn" in out.error.message
        assert (await bounded(one.run("t-imp-np", "imports", ["json"]))).value == "json"


async def test_stop_ends_every_worker_and_removes_every_segment(plugin_dir: Path) -> None:
    executor = fresh(2)
    async with executor:
        big = np.ones(1024 * 1024)
        outs = await bounded(
            asyncio.gather(*(executor.run(f"t-{i}", "array_sum", [big]) for i in range(4)))
        )
        assert all(o.value == big.size for o in outs)
        pids = executor.worker_pids()
        assert pids
        prefix = executor._prefix
        assert segments(prefix)
    assert segments(prefix) == set()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(LocalProtocolError):
        await executor.run("t-late", "noop")


async def test_stop_cancels_what_is_still_running(plugin_dir: Path) -> None:
    executor = fresh(1, config=config(executor_stop_grace_s=0.2))
    async with executor:
        running = asyncio.ensure_future(executor.run("t-long", "sleep", [60]))
        queued = asyncio.ensure_future(executor.run("t-queued", "noop"))
        await wait_for(lambda: executor.running == 1, "task running")
    assert (await bounded(running)).error.exc_type == "Cancelled"
    assert (await bounded(queued)).error.exc_type == "Cancelled"


async def test_each_worker_is_pinned_to_one_gpu(plugin_dir: Path) -> None:
    async with fresh(2, gpu_devices=(0, 1)) as two:
        await wait_for(lambda: len(two.worker_pids()) == 2, "both workers ready")
        pinned = {w.gpu for w in two._workers}
        assert pinned == {0, 1}
        seen = await bounded(two.run("t-gpu", "visible_gpus"))
        assert seen.value in {"0", "1"}


async def test_unknown_task_module_is_refused_at_construction() -> None:
    with pytest.raises(LocalProtocolError, match="no_such_module_for_mesh"):
        Executor(
            node_id=NodeId("n"),
            slots=1,
            registry_modules=("no_such_module_for_mesh",),
            config=config(),
        )


async def test_lazy_start_spawns_workers_only_for_work(plugin_dir: Path) -> None:
    async with Executor(
        node_id=NodeId("n"),
        slots=2,
        registry_modules=(PLUGIN,),
        config=config(executor_prestart=False),
    ) as lazy:
        assert lazy.workers == 0
        assert (await bounded(lazy.run("t-1", "echo", [1]))).value == 1
        assert lazy.workers == 1


async def test_idle_workers_exit_and_a_new_task_starts_one_again(plugin_dir: Path) -> None:
    async with fresh(2, config=config(executor_idle_exit_s=0.3)) as ex:
        await wait_for(lambda: ex.workers == 2, "both workers started")
        first = set(ex.worker_pids())
        await wait_for(lambda: ex.workers == 0, "idle workers exited and were not replaced")
        assert (await bounded(ex.run("t-1", "echo", [7]))).value == 7
        assert ex.workers == 1
        assert not set(ex.worker_pids()) & first


async def test_a_busy_worker_is_not_retired(plugin_dir: Path) -> None:
    async with fresh(1, config=config(executor_idle_exit_s=0.5)) as ex:
        outcome = await bounded(ex.run("t-1", "sleep", [1.0]))
        assert outcome.ok, outcome.error
        pids = ex.worker_pids()
        assert (await bounded(ex.run("t-2", "echo", [1]))).value == 1
        assert ex.worker_pids() == pids
