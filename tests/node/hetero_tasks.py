"""A task whose runtime depends on the node running it, for placement tests on one machine.

A node named ``<anything>-x<k>`` stands for a machine ``k`` times slower than one named
``-x1``: ``paced(base)`` sleeps ``base * k`` seconds there.
"""

from __future__ import annotations

import time

from tasks import context, task


def slowness(node: str) -> float:
    """The ``k`` of a node named ``...-x<k>`` (1 for any other name)."""
    head, sep, tail = node.rpartition("-x")
    return float(tail) if sep and head and tail.replace(".", "", 1).isdigit() else 1.0


@task(est_runtime_s=0.05)
def paced(base: float) -> str:
    """Hold a slot ``base`` seconds times this node's slowness; the node's id."""
    node = context().node_id
    time.sleep(base * slowness(node))
    return node
