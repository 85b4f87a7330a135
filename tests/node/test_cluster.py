"""Three real nodes on loopback: membership, placement, failures and big references."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mesh.client import connect
from mesh.errors import TaskError
from mesh.protocol.messages import ObjectRef
from tests.node.conftest import Cluster, wait_for


def test_peers_lists_all_three_alive_on_each(trio: Cluster) -> None:
    for name in ("a", "b", "c"):
        peers = trio.cli_json(name, "peers")
        assert {p["id"]: p["state"] for p in peers} == {"a": "alive", "b": "alive", "c": "alive"}
        for p in peers:
            assert {"id", "address", "state", "load", "capabilities"} <= set(p)
            assert "whoami" in p["capabilities"]["tasks"]


def test_metrics_count_the_frames_each_node_exchanges(trio: Cluster) -> None:
    for name in ("a", "b", "c"):
        with urllib.request.urlopen(f"http://{trio.nodes[name].address}/metrics") as resp:
            text = resp.read().decode()
        counts = {
            m.group(1): float(m.group(2))
            for m in re.finditer(r'^mesh_frames_total\{direction="(\w+)"\} (\S+)$', text, re.M)
        }
        assert counts.keys() == {"sent", "received"}
        assert min(counts.values()) > 0  # gossip with the two others at least


def test_whoami_runs_elsewhere_when_own_slots_are_busy(trio: Cluster) -> None:
    for name in ("a", "b", "c"):
        with connect(trio.nodes[name].url, key=trio.key) as c:
            # Fill this node's two slots, and its queue behind them, with work only it may
            # run: its bids then carry the queue's wait (about 2 s) whatever its estimates.
            busy = [c.submit_with("sleep", [1.0], labels={"name": name}) for _ in range(6)]
            wait_for(lambda: trio.cli_json(name, "status")["running"] == 2, 20, "busy")  # noqa: B023
            futures = [c.submit("whoami") for _ in range(4)]
            ran = c.gather(futures, timeout=30)
            assert set(ran) <= {"a", "b", "c"}
            records = [c.why(f.task_id) for f in futures]
            assert set(ran) - {name}, f"every whoami from {name} waited for {name}: {records}"
            assert c.gather(busy, timeout=30) == [1.0] * 6


def test_500_sleeps_complete_exactly_once(trio: Cluster) -> None:
    before = {n: trio.cli_json(n, "status")["completed"] for n in ("a", "b", "c")}
    with connect(trio.nodes["b"].url, key=trio.key) as c:
        futures = [c.submit("sleep", 0.01) for _ in range(500)]
        results = c.gather(futures, timeout=120)
        assert results == [0.01] * 500
        ids = [f.task_id for f in futures]
        assert len(set(ids)) == 500
        ran_on = {f.node for f in futures}
    after = {n: trio.cli_json(n, "status")["completed"] for n in ("a", "b", "c")}
    # Execution is at least once; delivery is exactly once (checked above).
    assert sum(after.values()) - sum(before.values()) >= 500
    assert len(ran_on) >= 2, f"all 500 ran on {ran_on}"


def test_why_shows_the_bids(trio: Cluster) -> None:
    res = trio.cli_json("a", "submit", "whoami")
    assert res["result"] == res["node"]
    record = trio.cli_json("a", "why", res["task_id"])
    assert record["task_id"] == res["task_id"]
    assert record["winner"] == res["node"]
    bids = {n: cost for r in record["rounds"] for n, cost in r["bids"].items()}
    assert res["node"] in bids
    assert all(cost >= 0 for cost in bids.values())
    assert record["rounds"][0]["asked"]
    # The parts of the winner's expected time, and the run it measured.
    assert all(record[k] >= 0 for k in ("wait_s", "est_s", "transfer_s", "run_s"))
    assert record["cost_s"] >= record["est_s"]
    text = trio.cli("a", "why", res["task_id"])
    assert text.returncode == 0
    assert "bid" in text.stdout
    assert "winner" in text.stdout
    assert "expected: queue wait" in text.stdout
    assert "measured: run" in text.stdout


def test_worker_exit_fails_only_that_task(trio: Cluster) -> None:
    with connect(trio.nodes["c"].url, key=trio.key) as c:
        crash = c.submit("crash", 3)
        others = [c.submit("echo", i) for i in range(20)]
        with pytest.raises(TaskError) as failed:
            crash.result(timeout=60)
        assert failed.value.exc_type == "WorkerDied"
        assert c.gather(others, timeout=60) == list(range(20))
        assert c.submit("echo", "still here").result(timeout=30) == "still here"
    assert trio.all_alive(["a", "b", "c"])


def test_256mib_reference_is_fetched_peer_to_peer(trio: Cluster) -> None:
    n_bytes = 256 * 1024 * 1024
    n = n_bytes // 8
    with connect(trio.nodes["a"].url, key=trio.key) as c:
        ref = c.submit_with("make_array", [n_bytes], labels={"name": "c"}).result(timeout=120)
        assert ref.holder == "c"
        assert ref.shape == (n,)
        total = c.submit_with("array_sum", [ref], labels={"name": "b"})
        assert total.result(timeout=180) == float(n * (n - 1) // 2)
        assert total.node == "b"
        # A smaller one back at the client, fetched from its holder.
        mib = c.submit_with("make_array", [1 << 20], labels={"name": "c"}).result(timeout=30)
        assert isinstance(mib, ObjectRef)
        assert c.result(mib).tolist() == [float(i) for i in range(1 << 17)]
        assert c.release(mib) is True
        assert c.release(ref) is True
        assert c.release(ref) is False


def test_sigkill_during_tasks_every_task_completes(cluster: Cluster) -> None:
    for name in ("a", "b", "c"):
        cluster.start(name)
    wait_for(lambda: cluster.all_alive(["a", "b", "c"]), 30, "three nodes alive")
    code = (
        "import json, sys\nfrom mesh.client import connect\n"
        f"c = connect({cluster.nodes['a'].url!r}, key={cluster.key!r})\n"
        "fs = [c.submit('sleep', 0.2) for _ in range(60)]\n"
        "r = c.gather(fs, timeout=120)\n"
        "print(json.dumps({'n': len(r), 'ok': r == [0.2] * 60}))\n"
    )
    client = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: cluster.cli_json("c", "status")["running"] > 0, 30, "c running tasks")
        cluster.signal("c", signal.SIGKILL)
        out, err = client.communicate(timeout=150)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == '{"n": 60, "ok": true}'
    wait_for(
        lambda: all(cluster.states(n).get("c") in ("dead", None) for n in ("a", "b")),
        20,
        "c marked dead",
    )
    wait_for(lambda: all("c" not in cluster.states(n) for n in ("a", "b")), 30, "c purged")


def _declared_dead(cluster: Cluster, name: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{cluster.nodes[name].address}/metrics") as resp:
        text = resp.read().decode()
    pattern = r'^mesh_declared_dead_total\{evidence="(\w+)"\} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def test_a_killed_node_is_declared_dead_when_its_port_refuses(tmp_path: Path) -> None:
    # The local preset suspects for 2.8-5.6 s before declaring a node dead; a refused
    # connection is evidence enough at once.
    cluster = Cluster(tmp_path, preset="local")
    try:
        for name in ("a", "b", "c"):
            cluster.start(name)
        wait_for(lambda: cluster.all_alive(["a", "b", "c"]), 30, "three nodes alive")
        assert _declared_dead(cluster, "a") == {"suspicion": 0.0, "refused": 0.0}
        cluster.signal("c", signal.SIGKILL)
        cluster.nodes["c"].proc.wait(timeout=10)
        wait_for(
            lambda: all(cluster.states(n).get("c") in ("dead", None) for n in ("a", "b")),
            20,
            "c marked dead",
        )
        counts = [_declared_dead(cluster, n) for n in ("a", "b")]
        assert sum(c["refused"] for c in counts) >= 1, counts
        assert sum(c["suspicion"] for c in counts) == 0, counts
        assert cluster.all_alive(["a", "b"])
    finally:
        cluster.close()


def test_sigterm_leaves_cleanly_and_finishes_running_tasks(cluster: Cluster) -> None:
    for name in ("a", "b", "c"):
        cluster.start(name)
    wait_for(lambda: cluster.all_alive(["a", "b", "c"]), 30, "three nodes alive")
    with connect(cluster.nodes["a"].url, key=cluster.key) as c:
        on_c = [c.submit_with("sleep", [3.0], labels={"name": "c"}) for _ in range(2)]

        def c_running() -> bool:
            for f in on_c:
                if f.done():
                    raise AssertionError(f"a task for c ended early: {f.exception()!r}")
            return bool(cluster.cli_json("c", "status")["running"] == 2)

        wait_for(c_running, 20, "c running both tasks")
        stopped = time.monotonic()
        cluster.signal("c", signal.SIGTERM)
        assert c.gather(on_c, timeout=60) == [3.0, 3.0]
        assert {f.node for f in on_c} == {"c"}
        assert cluster.nodes["c"].proc.wait(timeout=30) == 0
        wait_for(
            lambda: all(cluster.states(n).get("c") in ("left", None) for n in ("a", "b")),
            10,
            "c seen leaving",
        )
        assert time.monotonic() - stopped < 30
        # The mesh keeps working without it.
        assert c.submit("whoami").result(timeout=30) in {"a", "b"}


def test_mdns_finds_peers_of_the_same_mesh_only(cluster: Cluster, tmp_path: Path) -> None:
    other = Cluster(tmp_path / "other")
    (tmp_path / "other").mkdir()
    try:
        cluster.start("m1", join=False, mdns=True)
        cluster.start("m2", join=False, mdns=True)
        other.start("x1", join=False, mdns=True)
        wait_for(lambda: cluster.all_alive(["m1", "m2"]), 30, "m1 and m2 find each other")
        assert cluster.cli_json("m1", "status")["mdns_found"] >= 1
        assert set(cluster.states("m2")) == {"m1", "m2"}
        assert set(other.states("x1")) == {"x1"}
        stopped = time.monotonic()
        cluster.signal("m2", signal.SIGTERM)
        assert cluster.nodes["m2"].proc.wait(timeout=30) == 0
        wait_for(lambda: cluster.states("m1").get("m2") in ("left", None), 10, "m2 leaving")
        assert time.monotonic() - stopped < 10
    finally:
        other.close()
