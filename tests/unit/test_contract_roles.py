"""The contract core by role: the state tables of both roles, and what the cores import."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

import pytest

import mesh.protocol.contract
from mesh.config import ContractConfig
from mesh.errors import LocalProtocolError
from mesh.protocol.contract import HELD_TRANSITIONS, TRANSITIONS, HeldState, TaskState
from mesh.protocol.messages import CallForProposals, NodeId, Requirements, TaskId
from mesh.protocol.participant import _Held, _Reservation

ROOT = Path(__file__).resolve().parents[2]
SANS_IO = sorted((ROOT / "mesh" / "protocol").glob("*.py"))
NO_IO = frozenset({"asyncio", "aiohttp", "zeroconf", "socket", "time"})
OUTSIDE_PROTOCOL = ("mesh.runtime", "mesh.client", "node")
S = TypeVar("S", bound=StrEnum)


def reachable(table: Mapping[tuple[S, str], S], start: S) -> set[S]:
    seen, todo = {start}, [start]
    while todo:
        state = todo.pop()
        for (src, _), dst in table.items():
            if src is state and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    return seen


def held() -> _Held:
    req = Requirements(task="t", resources={"cpu": 1.0}, libraries={}, labels={})
    call = CallForProposals(
        cfp=1, requirements=req, tasks=(TaskId("x"),), est_runtime_s=1.0, inputs={}
    )
    res = _Reservation(NodeId("i"), 1, call, {"cpu": 1.0}, 1.0, 1, 0.0, ContractConfig.test())
    return _Held(TaskId("x"), res, None, 0.0)


def test_every_task_state_is_reachable_from_queued() -> None:
    assert reachable(TRANSITIONS, TaskState.QUEUED) == set(TaskState)


def test_every_held_state_is_reachable_and_all_but_the_ends_can_be_cancelled() -> None:
    assert reachable(HELD_TRANSITIONS, HeldState.WAITING) == set(HeldState)
    leave = {src for src, _ in HELD_TRANSITIONS}
    assert set(HeldState) - leave == {HeldState.DROPPED, HeldState.FINISHED}
    assert all((state, "cancel") in HELD_TRANSITIONS for state in leave)


def test_a_held_task_moves_only_as_the_table_says() -> None:
    assert held().state is HeldState.WAITING  # where an award taken starts
    h = held()
    with pytest.raises(LocalProtocolError):
        h.move("finish")  # it never started
    h.move("stall")
    with pytest.raises(LocalProtocolError):
        h.move("start")  # it waits for its initiator's word
    h.move("keep")
    h.move("start")
    with pytest.raises(LocalProtocolError):
        h.move("stall")  # a running task goes on through a stall
    with pytest.raises(LocalProtocolError):
        h.move("give-back")  # it runs already: only a cancel stops it
    h.move("cancel")
    h.move("cancel")  # a repeated cancel: it is stopping already
    h.move("finish")
    with pytest.raises(LocalProtocolError):
        h.move("cancel")
    assert h.state is HeldState.FINISHED


def imports(path: Path) -> set[str]:
    """The modules ``path`` imports, by full dotted name."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    return imported


@pytest.mark.parametrize("path", SANS_IO, ids=lambda p: p.name)
def test_a_sans_io_core_imports_no_io(path: Path) -> None:
    assert not {name.split(".")[0] for name in imports(path)} & NO_IO


@pytest.mark.parametrize("path", SANS_IO, ids=lambda p: p.name)
def test_the_protocol_imports_nothing_that_drives_it(path: Path) -> None:
    assert not {
        name
        for name in imports(path)
        if any(name == out or name.startswith(f"{out}.") for out in OUTSIDE_PROTOCOL)
    }


def test_mesh_contract_still_offers_every_public_name() -> None:
    for name in mesh.protocol.contract.__all__:
        assert hasattr(mesh.protocol.contract, name), name
