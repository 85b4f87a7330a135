"""Lost objects made again from their lineage, and tasks run again after failures
(``node.lineage``), on real nodes: a holder is ended with SIGKILL, as a machine that
loses power."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mesh.client import AsyncClient, Client
from mesh.client.local import LocalMesh
from mesh.errors import MeshError, ObjectLostError, TaskError
from mesh.protocol.messages import NodeId, ObjectRef

MIB = 1 << 20
TASKS = ("--tasks", "tests.node.lineage_tasks")


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    with LocalMesh(3, slots=2, args=TASKS, timeout=90) as m:
        yield m


@pytest.fixture
def client(mesh: LocalMesh) -> Iterator[Client]:
    c = mesh.client("node-1")
    return c


def _victim(mesh: LocalMesh, name: str) -> None:
    mesh.start(name, slots=2)
    mesh.wait_alive()


def _on(node: str) -> dict[str, str]:
    return {"name": node}


def test_a_chain_three_deep_is_made_again_after_its_holder_dies(
    mesh: LocalMesh, client: Client
) -> None:
    _victim(mesh, "v-chain")
    first = client.submit_with("make_array", [4 * MIB], labels=_on("node-2")).result(60)
    second = client.submit_with("lineage.grow", [first, 1.0], labels=_on("v-chain")).result(60)
    third = client.submit_with("lineage.grow", [second, 1.0], labels=_on("v-chain")).result(60)
    assert isinstance(third, ObjectRef)
    assert third.holder == "v-chain"
    expected = float((np.arange(4 * MIB // 8) + 2.0).sum())
    mesh.nodes["v-chain"].kill()

    total = client.submit("array_sum", third)
    assert total.result(180) == expected
    record = client.why(total.task_id)
    assert [r["reason"] for r in record["reruns"]] == [
        f"input {third.id} was lost; made again by task {_made_by(client, record)} on "
        f"{_copy_holder(record)}"
    ]
    # The run that made the third object again needed the second one made again first.
    rebuild = client.why(_made_by(client, record))
    assert rebuild["rebuilds"] == third.id
    assert [r["reason"].split(";")[0] for r in rebuild["reruns"]] == [f"input {second.id} was lost"]
    # The client's old reference reads the copy; a task given it again runs on the copy.
    np.testing.assert_array_equal(client.result(third, timeout=60), np.arange(4 * MIB // 8) + 2)
    again = client.submit("array_sum", third)
    assert again.result(60) == expected
    assert client.why(again.task_id)["reruns"] == []


def _made_by(client: Client, record: dict[str, object]) -> str:
    reruns = record["reruns"]
    assert isinstance(reruns, list)
    assert reruns
    return str(reruns[0]["reason"]).split("made again by task ")[1].split()[0]


def _copy_holder(record: dict[str, object]) -> str:
    reruns = record["reruns"]
    assert isinstance(reruns, list)
    return str(reruns[0]["reason"]).rsplit(" on ", 1)[1]


def test_what_cannot_be_made_again_says_why(mesh: LocalMesh, client: Client) -> None:
    _victim(mesh, "v-lost")
    noisy = client.submit_with("lineage.noisy", [MIB], labels=_on("v-lost")).result(60)
    uploaded = client.submit_with(
        "lineage.grow", [np.ones(MIB // 8), 1.0], labels=_on("v-lost")
    ).result(60)
    assert isinstance(noisy, ObjectRef)
    assert isinstance(uploaded, ObjectRef)
    mesh.nodes["v-lost"].kill()

    with pytest.raises(ObjectLostError, match="non-deterministic") as lost:
        client.submit("array_sum", noisy).result(120)
    assert lost.value.ref == noisy.id
    with pytest.raises(ObjectLostError, match="uploaded"):
        client.submit("array_sum", uploaded).result(120)
    with pytest.raises(ObjectLostError, match="non-deterministic"):
        client.result(noisy, timeout=60)
    # Still serving: a new task runs.
    assert client.submit("echo", 7).result(30) == 7


def test_a_forged_or_unknown_reference_is_a_clear_error(mesh: LocalMesh, client: Client) -> None:
    forged = ObjectRef(id="forged-1", holder=NodeId("nobody"), nbytes=8 * MIB)
    with pytest.raises(ObjectLostError, match="no recipe"):
        client.submit("array_sum", forged).result(60)
    known = client.submit_with("make_array", [MIB], labels=_on("node-2")).result(60)
    stranger = ObjectRef(id="unknown-2", holder=known.holder, nbytes=known.nbytes)
    with pytest.raises(ObjectLostError, match="no recipe"):
        client.submit("array_sum", stranger).result(60)

    async def ask(object_id: str) -> None:
        async with await AsyncClient.connect(mesh.nodes["node-1"].url, mesh.key) as c:
            await c.request("POST", f"/v1/objects/{object_id}/rebuild")

    with pytest.raises(MeshError, match=r"404.*no recipe"):
        asyncio.run(ask("forged-1"))
    # The real object is untouched.
    assert client.submit("array_sum", known).result(60) == float(np.arange(MIB // 8).sum())


def test_exceptions_are_retried_only_when_asked(client: Client, tmp_path: Path) -> None:
    runs = tmp_path / "a"
    asked = client.submit_with("lineage.flaky", [str(runs), 2], retry_exceptions=True)
    assert asked.result(60) == 3
    assert len(client.why(asked.task_id)["reruns"]) == 2

    not_asked = client.submit("lineage.flaky", str(tmp_path / "b"), 1)
    with pytest.raises(TaskError, match="run 1 fails"):
        not_asked.result(60)
    assert (tmp_path / "b").read_text() == "1"

    # Retries used up: the last run's error, with its remote traceback.
    used_up = client.submit_with(
        "lineage.flaky", [str(tmp_path / "c"), 5], retry_exceptions=True, max_retries=2
    )
    with pytest.raises(TaskError, match="run 3 fails") as failed:
        used_up.result(60)
    assert failed.value.exc_type == "RuntimeError"
    assert "fails on purpose" in failed.value.remote_traceback
    assert (tmp_path / "c").read_text() == "3"


def test_a_task_retries_the_exceptions_its_definition_names(client: Client, tmp_path: Path) -> None:
    assert client.submit("lineage.flaky_picky", str(tmp_path / "v"), "ValueError").result(60) == 2
    with pytest.raises(TaskError) as failed:
        client.submit("lineage.flaky_picky", str(tmp_path / "k"), "KeyError").result(60)
    assert failed.value.exc_type == "KeyError"
    # A submission may turn them off.
    off = client.submit_with(
        "lineage.flaky_picky", [str(tmp_path / "o"), "ValueError"], retry_exceptions=False
    )
    with pytest.raises(TaskError):
        off.result(60)


def test_a_dead_worker_is_retried_by_default(client: Client, tmp_path: Path) -> None:
    assert client.submit("lineage.crash_once", str(tmp_path / "w")).result(60) == 2
    never = client.submit_with("lineage.crash_once", [str(tmp_path / "n")], max_retries=0)
    with pytest.raises(TaskError) as failed:
        never.result(60)
    assert failed.value.exc_type == "WorkerDied"


def test_bad_retry_options_are_refused(client: Client) -> None:
    for options in ({"max_retries": -1}, {"max_retries": 10_000}, {"retry_exceptions": [3]}):
        with pytest.raises(MeshError, match=r"max_retries|retry_exceptions"):
            client.submit_with("echo", [1], **options).result(30)  # type: ignore[arg-type]
