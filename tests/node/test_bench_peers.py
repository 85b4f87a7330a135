"""``benchmarks/peers.py --quick``: Mesh alone at tiny sizes, as CI runs it.

Checks that the script starts real nodes on 127.0.0.1, runs every workload through them,
prints its table, and ends with one JSON line holding every figure; and that the table and
ratio helpers orient each figure the right way. No timing is asserted: only that figures
exist and are positive numbers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import peers
from tests.node.conftest import ROOT, node_env

KEYS = {
    "tasks_per_s",
    "latency_ms_p50",
    "latency_ms_p99",
    "transfer_mib_per_s",
    "fanout_s",
    "pipeline_s",
}


@pytest.mark.timeout(240)
def test_quick_run_ends_with_the_json_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=220,
        env=node_env(tmp_path),
        cwd=str(ROOT),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"mesh"}
    mesh = result["mesh"]
    assert set(mesh) == KEYS
    for key, value in mesh.items():
        assert isinstance(value, float | int), key
        assert math.isfinite(value), key
        assert value > 0, (key, value)
    assert mesh["latency_ms_p99"] >= mesh["latency_ms_p50"]
    assert any(line.startswith("| figure | Mesh |") for line in lines)


def test_the_table_says_who_is_ahead_whichever_way_a_figure_points() -> None:
    figures: dict[str, float | None] = dict.fromkeys(peers.FIGURES, 2.0)
    other: dict[str, float | None] = dict.fromkeys(peers.FIGURES, 1.0)
    table = peers.table({"mesh": figures, "ray": other}, peers.QUICK)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    labels = peers.labels(peers.QUICK)
    # Twice the tasks per second is ahead; twice the latency is behind.
    assert rows[labels["tasks_per_s"]].endswith("2.00 (ahead) |")
    assert rows[labels["latency_ms_p50"]].endswith("2.00 (behind) |")
    assert peers.advantage("fanout_s", 1.0, 3.0) == 3.0
    assert peers.advantage("transfer_mib_per_s", 1.0, 4.0) == 0.25


def test_medians_take_the_middle_round_and_mark_a_system_with_none() -> None:
    rounds = [dict.fromkeys(peers.FIGURES, float(v)) for v in (5, 1, 3)]
    assert peers.medians(rounds) == dict.fromkeys(peers.FIGURES, 3.0)
    assert peers.medians([]) == dict.fromkeys(peers.FIGURES, None)


def test_ray_argument_templates_put_nested_values_back() -> None:
    template = [[1, peers._Slot(0), [peers._Slot(1), 4]], {"k": peers._Slot(2)}]
    refs = ["a", "b", "c"]
    assert peers._refill(template, refs) == [[1, "a", ["b", 4]], {"k": "c"}]
