"""Placement on machines of different speed, with real nodes: faster nodes run more.

Speeds are imitated without root: ``hetero_tasks.paced`` sleeps in proportion to a factor
in the node's name, so a node named ``s-x4`` is four times slower at it than ``f-x1``.
"""

from __future__ import annotations

from collections import Counter

from mesh.client import connect

from .conftest import Cluster, wait_for
from .hetero_tasks import slowness

TASKS = ("--tasks", "tests.node.hetero_tasks")


def test_slowness_is_read_from_the_node_name() -> None:
    assert slowness("f-x1") == 1.0
    assert slowness("s-x4") == 4.0
    assert slowness("plain") == 1.0
    assert slowness("a-xb") == 1.0


def test_a_burst_runs_mostly_on_the_faster_nodes(cluster: Cluster) -> None:
    """Speeds 4:4:1, one slot each, 45 tasks at once from the slow node's client: an even
    split would give each node 15; in proportion to speed the slow one runs about 5."""
    names = ("f-x1", "g-x1", "s-x4")
    for name in names:
        cluster.start(name, *TASKS, slots=1)
    wait_for(lambda: cluster.all_alive(list(names)), 30, "three nodes alive")
    with connect(cluster.nodes["s-x4"].url, key=cluster.key) as c:
        futures = [c.submit("paced", 0.05) for _ in range(45)]
        ran = Counter(c.gather(futures, timeout=120))
    assert sum(ran.values()) == 45
    assert ran["s-x4"] < 10, f"the slow node ran {ran['s-x4']} of 45: {dict(ran)}"
    assert ran["f-x1"] > ran["s-x4"], dict(ran)
    assert ran["g-x1"] > ran["s-x4"], dict(ran)
