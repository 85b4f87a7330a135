"""References that free themselves (``node.refs``), on real nodes with the ``test`` preset's
short leases (3 s) and session grace (1 s)."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from mesh.client import AsyncClient, Client
from mesh.client.local import LocalMesh
from mesh.config import NodeConfig
from mesh.protocol.messages import NodeId, ObjectRef

MIB = 1 << 20
LEASE_S = NodeConfig.test().object_lease_s


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    with LocalMesh(3, preset="test", slots=1, timeout=90) as m:
        m.watchers = {name: m.client(name) for name in m.nodes}  # type: ignore[attr-defined]
        yield m


def _statuses(mesh: LocalMesh) -> dict[str, dict[str, object]]:
    watchers: dict[str, Client] = mesh.watchers  # type: ignore[attr-defined]
    return {name: c.status() for name, c in watchers.items()}


def _objects(mesh: LocalMesh) -> dict[str, int]:
    return {name: int(str(s["objects"])) for name, s in _statuses(mesh).items()}


def _until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.2)


def _empty(mesh: LocalMesh) -> bool:
    return not any(_objects(mesh).values())


def _spread(client: Client, n: int) -> list[object]:
    names = ["node-1", "node-2", "node-3"]
    futures = [
        client.submit_with("make_array", [MIB], labels={"name": names[i % 3]}) for i in range(n)
    ]
    return client.gather(futures, timeout=60)


def test_references_a_client_drops_are_freed_on_every_node(mesh: LocalMesh) -> None:
    _until(lambda: _empty(mesh), "the stores empty before the test")
    with mesh.client("node-1") as client:
        refs = _spread(client, 12)
        kept = refs.pop()
        assert sum(_objects(mesh).values()) == 12
        del refs
        gc.collect()
        _until(lambda: sum(_objects(mesh).values()) == 1, "dropped references freed")
        # The one still held outlives many leases, renewed by its owner.
        time.sleep(2 * LEASE_S)
        assert sum(_objects(mesh).values()) == 1
        assert client.submit("array_sum", kept).result(30) == float(sum(range(MIB // 8)))
        del kept
        gc.collect()
        _until(lambda: _empty(mesh), "the last reference freed")


def test_a_client_that_exits_without_releasing_leaves_nothing(mesh: LocalMesh) -> None:
    _until(lambda: _empty(mesh), "the stores empty before the test")
    code = (
        "import sys\nfrom mesh.client import connect\n"
        f"c = connect({mesh.nodes['node-2'].url!r}, key={mesh.key!r})\n"
        "refs = [c.submit_with('make_array', [1 << 20], labels={'name': n}).result(60)"
        " for n in ('node-1', 'node-2', 'node-3') * 3]\n"
        "print(len(refs))\n"
        "import os; os._exit(0)\n"  # no close, no release: as a crash would
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stdout.strip() == "9", done.stderr
    _until(lambda: _empty(mesh), "a gone client's objects freed after the grace")


def test_a_reference_given_to_a_waiting_task_is_not_freed_under_it(mesh: LocalMesh) -> None:
    _until(lambda: _empty(mesh), "the stores empty before the test")
    with mesh.client("node-1") as client:
        ref = client.submit_with("make_array", [MIB], labels={"name": "node-2"}).result(60)
        # Every slot busy for longer than a lease: the sum waits in a queue.
        busy = [client.submit("sleep", 2 * LEASE_S) for _ in range(3)]
        running = lambda: sum(int(str(s["running"])) for s in _statuses(mesh).values())  # noqa: E731
        _until(lambda: running() == 3, "slots busy")
        total = client.submit("array_sum", ref)
        del ref
        gc.collect()
        assert total.result(60) == float(sum(range(MIB // 8)))
        client.gather(busy, timeout=60)
        _until(lambda: _empty(mesh), "freed once the task that needed it ended")


def test_a_result_handed_out_over_json_outlives_its_leases(mesh: LocalMesh) -> None:
    _until(lambda: _empty(mesh), "the stores empty before the test")

    async def submit() -> dict[str, object]:
        async with await AsyncClient.connect(mesh.nodes["node-3"].url, mesh.key) as c:
            body = {"task": "make_array", "args": [MIB], "wait": 30, "labels": {"name": "node-1"}}
            reply: dict[str, object] = await c.request("POST", "/v1/tasks", body)
            return reply

    reply = asyncio.run(submit())
    assert reply["ok"] is True
    # No session holds it: node-3 keeps it for api_ref_ttl_s (``node.refs``), renewing the
    # lease on node-1 meanwhile.
    time.sleep(2 * LEASE_S)
    assert _objects(mesh) == {"node-1": 1, "node-2": 0, "node-3": 0}
    with mesh.client("node-3") as c:
        raw = reply["result"]
        assert isinstance(raw, dict)
        ref = ObjectRef(id=raw["$ref"], holder=NodeId(raw["holder"]), nbytes=raw["nbytes"])
        assert c.release(ref) is True
    _until(lambda: _empty(mesh), "a released JSON result freed")
