"""The task registry: @task, loading built-ins, plugins and --tasks modules, unknown tasks."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mesh.errors import LocalProtocolError
from mesh.protocol.messages import NodeId, Requirements
from tasks import MARK, Registry, TaskContext, TaskDef, builtin, context, running_as, task

BUILTIN_NAMES = (
    "array_sum",
    "crash",
    "echo",
    "fail",
    "make_array",
    "noop",
    "sleep",
    "whoami",
)


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def test_decorator_called_and_bare() -> None:
    @task(
        "vision.resize",
        gpu=1,
        memory=2048,
        resources={"fpga": 1},
        libraries={"torch": ">=2.2"},
        labels={"room": "lab"},
        est_runtime_s=1.5,
    )
    def resize(x: int) -> int:
        return x

    @task
    def plain() -> int:
        return 1

    tdef = getattr(resize, MARK)
    assert isinstance(tdef, TaskDef)
    assert tdef.name == "vision.resize"
    assert tdef.fn is resize
    assert tdef.est_runtime_s == 1.5
    assert tdef.module == __name__
    assert tdef.requirements == Requirements(
        task="vision.resize",
        resources={"cpu": 1.0, "gpu": 1.0, "memory": 2048.0, "fpga": 1.0},
        libraries={"torch": ">=2.2"},
        labels={"room": "lab"},
    )
    assert resize(4) == 4  # the function itself is untouched
    plain_def = getattr(plain, MARK)
    assert plain_def.name == "plain"
    assert plain_def.requirements.resources == {"cpu": 1.0}


def test_decorator_refuses_bad_declarations() -> None:
    with pytest.raises(LocalProtocolError):
        task("has space")(lambda: None)
    with pytest.raises(LocalProtocolError):
        task(cpu=-1)(lambda: None)
    with pytest.raises(LocalProtocolError):
        task(resources={"cpu": 2})(lambda: None)


def test_builtin_tasks_always_load() -> None:
    reg = Registry.load(entry_points=False)
    assert reg.names() == BUILTIN_NAMES
    assert reg.modules == ("tasks.builtin",)
    echo = reg.get("echo")
    assert echo is not None
    assert echo.fn(5) == 5
    assert "noop" in reg
    assert len(reg) == len(BUILTIN_NAMES)


def test_entry_point_plugins_load_and_a_broken_one_is_skipped(
    module_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_module(
        module_dir,
        "mesh_plugin_good",
        """
        from tasks import task

        @task
        def plugged(x):
            return x + 1
        """,
    )
    points = importlib.metadata.EntryPoints(
        [
            importlib.metadata.EntryPoint("builtin", "tasks.builtin", "mesh.tasks"),
            importlib.metadata.EntryPoint("good", "mesh_plugin_good", "mesh.tasks"),
            importlib.metadata.EntryPoint("broken", "mesh_plugin_missing", "mesh.tasks"),
        ]
    )

    def fake_entry_points(*, group: str) -> importlib.metadata.EntryPoints:
        assert group == "mesh.tasks"
        return points

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    reg = Registry.load()
    assert "plugged" in reg
    assert reg.modules == ("tasks.builtin", "mesh_plugin_good")
    assert "mesh_plugin_missing" in caplog.text


def test_installed_entry_point_names_builtin() -> None:
    values = [ep.value for ep in importlib.metadata.entry_points(group="mesh.tasks")]
    assert "tasks.builtin" in values
    assert Registry.load().modules.count("tasks.builtin") == 1


def test_tasks_module_from_the_command_line(module_dir: Path) -> None:
    write_module(
        module_dir,
        "mesh_cli_tasks",
        """
        from tasks import task
        from tasks.builtin import echo  # re-exported: the same task, not a clash

        @task("cli.double", cpu=2)
        def double(x):
            return 2 * x
        """,
    )
    reg = Registry.load(["mesh_cli_tasks"], entry_points=False)
    tdef = reg.get("cli.double")
    assert tdef is not None
    assert tdef.fn(4) == 8
    assert reg.requirements("cli.double").resources == {"cpu": 2.0}
    assert reg.modules == ("tasks.builtin", "mesh_cli_tasks")


def test_two_modules_defining_one_name_clash(module_dir: Path) -> None:
    write_module(
        module_dir, "mesh_clash", "from tasks import task\n\n@task\ndef echo(x):\n    return x\n"
    )
    with pytest.raises(LocalProtocolError, match="defined twice"):
        Registry.load(["mesh_clash"], entry_points=False)


def test_unknown_module_and_unknown_task() -> None:
    with pytest.raises(LocalProtocolError, match="mesh_no_such_module"):
        Registry.load(["mesh_no_such_module"], entry_points=False)
    reg = Registry.load(entry_points=False)
    assert reg.get("nope") is None
    assert "nope" not in reg
    assert reg.requirements("nope") == Requirements(
        task="nope", resources={"cpu": 1.0}, libraries={}, labels={}
    )


def test_context_only_inside_a_task() -> None:
    with pytest.raises(LocalProtocolError):
        context()
    ctx = TaskContext(node_id=NodeId("n-9"), task_id="t-1")
    with running_as(ctx):
        assert context() == ctx
        assert builtin.whoami() == "n-9"
    with pytest.raises(LocalProtocolError):
        context()


def test_builtin_behaviour() -> None:
    assert builtin.noop() is None
    assert builtin.echo([1, "a"]) == [1, "a"]
    assert builtin.sleep(0) == 0
    with pytest.raises(ValueError, match="cannot sleep"):
        builtin.sleep(-1)
    with pytest.raises(RuntimeError, match="boom"):
        builtin.fail("boom")
    assert builtin.array_sum(np.arange(4)) == 6.0
    assert isinstance(builtin.array_sum([1, 2]), float)
    made = builtin.make_array(8 * 10 + 3)
    assert made.dtype == np.float64
    assert made.nbytes == 80
    assert made[9] == 9.0


def test_loading_tasks_and_node_parts_imports_no_ml_library() -> None:
    code = (
        "import sys\n"
        "from tasks import Registry\n"
        "import node.executor, node.store, node.capabilities, node.worker\n"
        "Registry.load()\n"
        "heavy = {'torch', 'sklearn'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
