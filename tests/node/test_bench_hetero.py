"""``benchmarks/hetero.py``: placement on nodes held to different CPU quotas.

The smoke run (``--quick``: Mesh alone, two nodes at 0.8 and 0.4 of a core, about 12 s)
needs root and the cgroup-v1 CPU controller; elsewhere the script says it skipped, and so
does the test. It checks the last line's shape, that every task ran in one of the groups,
and that no group is left behind. No timing is asserted. The rest needs neither root nor
processes: how a mix becomes quotas and a task count, and the skip line.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.node.conftest import ROOT, node_env

CPU_ROOT = Path("/sys/fs/cgroup/cpu")


@pytest.fixture(scope="module")
def hetero() -> Iterator[ModuleType]:
    # The script imports its sibling ``peers`` as the nodes do: from benchmarks/ on the path.
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "benchmarks"))
        yield importlib.import_module("hetero")


@pytest.mark.timeout(90)
def test_quick_run_ends_with_the_json_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "hetero.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=80,
        env=node_env(tmp_path),
        cwd=str(ROOT),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "skipped" in result:
        pytest.skip(f"hetero.py skipped: {result['skipped']}")
    [mix] = result["mixes"]
    assert mix["speeds"] == [2, 1]
    assert mix["quotas"] == [0.8, 0.4]
    assert "dask" not in mix
    assert "ray" not in mix
    for ratio in mix["mesh"]:
        assert isinstance(ratio, float)
        assert math.isfinite(ratio)
        assert ratio > 0.5
    for split in mix["split"]["mesh"]:
        assert len(split) == 2
        assert sum(split) == mix["tasks"]
    assert len(mix["calibration"]) == 2
    assert not list(CPU_ROOT.glob("mesh-bench-*")), "a CPU group was left behind"


def test_mixes_become_quotas_under_the_cores_and_bursts_of_equal_ideal(
    hetero: ModuleType,
) -> None:
    a = hetero.plan((4, 4, 1), cores=2)
    assert a.shares == (0.8, 0.8, 0.2)
    assert a.tasks == 72
    b = hetero.plan((1, 2, 4, 8), cores=2)
    assert b.shares == (0.1, 0.2, 0.4, 0.8)
    assert b.tasks == 60
    assert a.ideal_s == pytest.approx(b.ideal_s) == pytest.approx(2.4)
    assert b.fastest == 3
    # Too much for two cores at 0.8 for the fastest: scaled down to 90% of them.
    c = hetero.plan((1, 1, 1), cores=2)
    assert sum(c.shares) == pytest.approx(1.8)
    with pytest.raises(ValueError, match="under 1%"):
        hetero.plan((1, 100), cores=2)
    with pytest.raises(ValueError, match="two or more"):
        hetero.plan((3,), cores=2)
    assert hetero.parse_mixes("4:4:1,1:2:4:8") == [(4, 4, 1), (1, 2, 4, 8)]


def test_a_task_outside_the_groups_fails_the_split(hetero: ModuleType) -> None:
    names = ["/mesh-bench-1-0", "/mesh-bench-1-1"]
    ran = ["/mesh-bench-1-1", "/mesh-bench-1-1", "/mesh-bench-1-0"]
    assert hetero.split(ran, names) == [1, 2]
    with pytest.raises(RuntimeError, match="outside the quota groups"):
        hetero.split(["/mesh-bench-1-0", "/"], names)


def test_where_groups_cannot_be_made_it_says_skipped_and_exits_0(
    hetero: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(hetero, "unsupported", lambda: "needs root to create cgroups")
    monkeypatch.setattr(sys, "argv", ["hetero.py", "--quick"])
    hetero.main()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == {"skipped": "needs root to create cgroups", "mixes": []}
