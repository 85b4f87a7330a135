"""The task registry: functions installed on a node and known on the wire by name.

No code crosses the wire (a task is named, never shipped), so a node runs exactly the tasks
whose modules it has installed: ``tasks.builtin`` always, plugins registered under the
``mesh.tasks`` entry-point group, and modules named on the command line (``--tasks``).

``@task`` only marks a function with its ``TaskDef``; it records nothing globally. A
``Registry`` is built by importing modules and collecting the marked functions they hold,
so two registries (the daemon's and a worker's) never share state.

Task modules must stay cheap to import: heavy libraries (torch, scikit-learn) are imported
inside the task functions, so that a node without them still starts and still runs the
tasks that do not need them.
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType, ModuleType
from typing import Any, Final, Self, TypeVar, overload

from mesh.errors import LocalProtocolError
from mesh.protocol.messages import NodeId, Requirements

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP: Final = "mesh.tasks"
BUILTIN_MODULE: Final = "tasks.builtin"
MARK: Final = "__mesh_task__"
"""Attribute under which ``@task`` stores a function's ``TaskDef``."""

_EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_MAX_RETRIES: Final = 3
"""Runs after a system failure unless a task or a submission says otherwise (Ray's default)."""
MAX_RETRIES_LIMIT: Final = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskDef:
    """One installed task: its wire name, the function, and what it needs to run."""

    name: str
    fn: Callable[..., Any]
    requirements: Requirements
    est_runtime_s: float | None
    """The author's guess of a run's seconds, used to bid before any run was measured."""
    module: str
    deterministic: bool = True
    """Whether a run on the same arguments gives the same result: only then is a lost result
    made again by running the task again (``node.lineage``)."""
    max_retries: int = DEFAULT_MAX_RETRIES
    """Runs again after a system failure (its worker or node died, every placement failed)."""
    retry_exceptions: bool | tuple[str, ...] = False
    """Also run again when the task raises: any exception (True) or those whose class name
    is listed; bounded by ``max_retries`` too."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskContext:
    """Where the calling task runs; what ``context()`` returns inside a task."""

    node_id: NodeId
    task_id: str


_CONTEXT: Final = contextvars.ContextVar[TaskContext]("mesh_task_context")


def context() -> TaskContext:
    """The running task's context (node id, task id); only valid inside a task."""
    try:
        return _CONTEXT.get()
    except LookupError:
        raise LocalProtocolError("tasks.context() called outside a running task") from None


@contextmanager
def running_as(ctx: TaskContext) -> Iterator[None]:
    """Make ``ctx`` what ``context()`` returns for the duration of the block (the worker)."""
    token = _CONTEXT.set(ctx)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _requirements(
    name: str,
    *,
    cpu: float,
    gpu: float,
    memory: int,
    resources: Mapping[str, float],
    libraries: Mapping[str, str],
    labels: Mapping[str, str],
) -> Requirements:
    if cpu < 0 or gpu < 0 or memory < 0 or any(v < 0 for v in resources.values()):
        raise LocalProtocolError(f"task {name}: resource amounts must not be negative")
    needs: dict[str, float] = {"cpu": float(cpu)}
    if gpu:
        needs["gpu"] = float(gpu)
    if memory:
        needs["memory"] = float(memory)
    for key, amount in resources.items():
        if key in needs:
            raise LocalProtocolError(f"task {name}: resource {key!r} given twice")
        needs[key] = float(amount)
    return Requirements(task=name, resources=needs, libraries=dict(libraries), labels=dict(labels))


@overload
def task(name: F, /) -> F: ...


@overload
def task(
    name: str | None = None,
    *,
    cpu: float = 1,
    gpu: float = 0,
    memory: int = 0,
    resources: Mapping[str, float] = _EMPTY,
    libraries: Mapping[str, str] = _EMPTY,
    labels: Mapping[str, str] = _EMPTY,
    est_runtime_s: float | None = None,
    deterministic: bool = True,
    max_retries: int = DEFAULT_MAX_RETRIES,
    retry_exceptions: bool | Sequence[str] = False,
) -> Callable[[F], F]: ...


def task(
    name: str | Callable[..., Any] | None = None,
    *,
    cpu: float = 1,
    gpu: float = 0,
    memory: int = 0,
    resources: Mapping[str, float] = _EMPTY,
    libraries: Mapping[str, str] = _EMPTY,
    labels: Mapping[str, str] = _EMPTY,
    est_runtime_s: float | None = None,
    deterministic: bool = True,
    max_retries: int = DEFAULT_MAX_RETRIES,
    retry_exceptions: bool | Sequence[str] = False,
) -> Any:
    """Mark a function as a task named ``name`` (default: the function's name).

    ``cpu``, ``gpu`` and ``memory`` (bytes) are what one run holds on its node;
    ``resources`` adds custom amounts, ``libraries`` maps distributions to version
    specifiers (``{"torch": ">=2.2"}``), ``labels`` must match the node's exactly. Usable
    bare (``@task``) or called (``@task("name", gpu=1)``). ``deterministic``,
    ``max_retries`` and ``retry_exceptions``: see ``TaskDef``.
    """
    if callable(name):
        return task()(name)

    def mark(fn: F) -> F:
        task_name = name or fn.__name__
        if not task_name.isidentifier() and not all(
            part.isidentifier() for part in task_name.split(".")
        ):
            raise LocalProtocolError(f"task name {task_name!r} is not a dotted identifier")
        if isinstance(max_retries, bool) or not 0 <= max_retries <= MAX_RETRIES_LIMIT:
            raise LocalProtocolError(
                f"task {task_name}: max_retries must be an integer from 0 to {MAX_RETRIES_LIMIT}"
            )
        reqs = _requirements(
            task_name,
            cpu=cpu,
            gpu=gpu,
            memory=memory,
            resources=resources,
            libraries=libraries,
            labels=labels,
        )
        setattr(
            fn,
            MARK,
            TaskDef(
                name=task_name,
                fn=fn,
                requirements=reqs,
                est_runtime_s=est_runtime_s,
                module=fn.__module__,
                deterministic=deterministic,
                max_retries=max_retries,
                retry_exceptions=(
                    retry_exceptions
                    if isinstance(retry_exceptions, bool)
                    else tuple(str(e) for e in retry_exceptions)
                ),
            ),
        )
        return fn

    return mark


def tasks_of(module: ModuleType) -> list[TaskDef]:
    """The tasks a module defines or imports, in definition order."""
    found: list[TaskDef] = []
    for value in vars(module).values():
        tdef = getattr(value, MARK, None) if callable(value) else None
        if isinstance(tdef, TaskDef):
            found.append(tdef)
    return found


class Registry:
    """The tasks installed on this node, by name. Immutable once loaded."""

    __slots__ = ("_modules", "_tasks")

    def __init__(self, defs: Sequence[TaskDef] = (), modules: Sequence[str] = ()) -> None:
        tasks: dict[str, TaskDef] = {}
        for tdef in defs:
            known = tasks.get(tdef.name)
            if known is not None and known.fn is not tdef.fn:
                raise LocalProtocolError(
                    f"task {tdef.name!r} is defined twice: in {known.module} and {tdef.module}"
                )
            tasks[tdef.name] = tdef
        self._tasks = tasks
        self._modules = tuple(modules)

    @classmethod
    def load(cls, modules: Sequence[str] = (), *, entry_points: bool = True) -> Self:
        """Import ``tasks.builtin``, the ``mesh.tasks`` plugins and ``modules``.

        A plugin that fails to import is logged and skipped (a broken package must not keep
        the node down); a module named explicitly that fails raises ``LocalProtocolError``.
        """
        names: list[str] = [BUILTIN_MODULE]
        if entry_points:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                if ep.value in names:
                    continue
                try:
                    importlib.import_module(ep.value)
                except Exception as exc:  # a plugin's import error is its own bug, not ours
                    log.warning("task plugin %s (%s) failed to import: %r", ep.name, ep.value, exc)
                    continue
                names.append(ep.value)
        for name in modules:
            if name in names:
                continue
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise LocalProtocolError(f"cannot import task module {name!r}: {exc}") from exc
            names.append(name)
        defs: list[TaskDef] = []
        for name in names:
            defs.extend(tasks_of(importlib.import_module(name)))
        return cls(defs, names)

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules the tasks were collected from, in load order."""
        return self._modules

    def get(self, name: str) -> TaskDef | None:
        return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._tasks))

    def requirements(self, name: str) -> Requirements:
        """What ``name`` needs; for a task not installed here, one CPU and nothing else."""
        tdef = self._tasks.get(name)
        if tdef is not None:
            return tdef.requirements
        return Requirements(task=name, resources={"cpu": 1.0}, libraries={}, labels={})

    def libraries(self) -> set[str]:
        """Every distribution some installed task names in its requirements."""
        return {lib for tdef in self._tasks.values() for lib in tdef.requirements.libraries}
