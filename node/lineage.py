"""What a node owns: the tasks submitted to it, and how to make their results again.

Ownership as in Ray: the node a task is submitted to owns the task and its result. It keeps,
for every object a task of its made, the *recipe*: the task's name, its call (whose
arguments may be references to other objects) and its requirements. When a task of its
fails because an input is lost (``ErrorInfo.object_id``: the holder died, or no longer has
it), the owner runs the recipe again on a live node, points the lost object's id at the new
copy, and runs the failed task again on the copy; a recipe whose own inputs are lost fails
the same way and is rebuilt in turn, so a chain of lost objects is made again from its
first surviving input. A client that still holds the old reference is answered with the
copy (``POST /v1/objects/{id}/rebuild``), and a task submitted with it gets the copy. A
rebuild runs wherever the task can: with the task's own requirements and the resources its
submission asked for, but not the labels its submission added (which often name the node
that died).

Bounds (the lineage budget, ``NodeConfig.lineage_*``): at most ``lineage_max_objects``
recipes are kept (the oldest are forgotten first, and their objects then cannot be rebuilt),
one object is made again at most ``lineage_max_rebuilds`` times, and a chain of rebuilds is
at most ``lineage_max_depth`` deep; an object whose rebuild needs itself (a lineage loop) is
refused at once.

Not rebuilt, with an ``ObjectLostError`` saying why: the results of tasks declared
``deterministic=False``, objects made from arguments the client uploaded (the owner releases
an upload once its task ends), objects another node owns, and objects whose recipe was
forgotten. Flags are read from the owner's own installation of the task; a task the owner
does not have installed takes the defaults (deterministic, ``DEFAULT_MAX_RETRIES``).

Retries follow the same path: a task whose worker or node died (or whose every placement
failed) runs again up to ``max_retries`` times, and one that raised does too when its
definition or its submission asks (``retry_exceptions``). Each run is a new task id in the
contract net; the submitter sees only the first one, and gets one outcome.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Final

from mesh.errors import ErrorInfo, FailureKind
from mesh.protocol.args import walk_call
from mesh.protocol.messages import ObjectRef, Requirements, TaskCall

SYSTEM_FAILURES: Final = frozenset({"WorkerDied", "SegmentLostError"})
"""``exc_type`` of a run that failed for the machine's sake, not the task's: retried. A
``SegmentLostError`` is an input segment that left its name before the worker mapped it
(its holder spilled the object meanwhile): the next run asks for the input again."""
NEVER_RETRIED: Final = frozenset({"Cancelled"})


@dataclass(frozen=True, slots=True)
class Recipe:
    """How an object was made."""

    name: str
    call: TaskCall
    requirements: Requirements
    est_runtime_s: float | None
    deterministic: bool
    uploads: bool
    """Its call named objects the client uploaded for it: released once it ended."""
    made_by: str
    """The id of the task that made it (as its submitter knows it)."""


@dataclass(slots=True)
class Retry:
    """How often a task may run again, and on what."""

    max_retries: int
    exceptions: bool | tuple[str, ...]
    used: int = 0

    def allows(self, error: ErrorInfo) -> bool:
        """Whether a run that failed with ``error`` is run again (and counts it)."""
        if self.used >= self.max_retries or error.exc_type in NEVER_RETRIED:
            return False
        system = error.kind is FailureKind.LOST or (
            error.kind is FailureKind.TASK and error.exc_type in SYSTEM_FAILURES
        )
        raised = error.kind is FailureKind.TASK and not system and not error.object_id
        ok = system or (
            raised
            and (
                self.exceptions is True
                or (isinstance(self.exceptions, tuple) and error.exc_type in self.exceptions)
            )
        )
        if ok:
            self.used += 1
        return ok


@dataclass(slots=True)
class Runs:
    """The runs of one submitted task: what ``why`` shows beside the auction record."""

    current: str
    reruns: list[dict[str, str]] = field(default_factory=list)
    rebuilds: str = ""
    """For a run that makes a lost object again: that object's id."""


class Lineage:
    """The recipes of the objects this node owns, and the copies made of lost ones."""

    def __init__(self, *, max_objects: int, max_rebuilds: int, max_depth: int) -> None:
        self.max_objects = max_objects
        self.max_rebuilds = max_rebuilds
        self.max_depth = max_depth
        self._recipes: OrderedDict[str, Recipe] = OrderedDict()
        self._copies: dict[str, ObjectRef] = {}
        """Lost object id -> the reference of the copy made in its place."""
        self._rebuilds: dict[str, int] = {}
        self.rebuilt = 0
        """Objects made again (for the metrics), and their bytes."""
        self.rebuilt_bytes = 0

    def __len__(self) -> int:
        return len(self._recipes)

    def record(self, ref: ObjectRef, recipe: Recipe) -> None:
        self._recipes[ref.id] = recipe
        self._recipes.move_to_end(ref.id)
        while len(self._recipes) > self.max_objects:
            oid, _ = self._recipes.popitem(last=False)
            self._rebuilds.pop(oid, None)
            self._copies.pop(oid, None)

    def forget(self, object_id: str) -> None:
        self._recipes.pop(object_id, None)
        self._rebuilds.pop(object_id, None)
        for lost, copy in list(self._copies.items()):
            if copy.id == object_id or lost == object_id:
                del self._copies[lost]

    def recipe(self, object_id: str) -> Recipe | None:
        return self._recipes.get(object_id)

    def copy_of(self, object_id: str) -> ObjectRef | None:
        """The latest copy made of the lost object ``object_id``, if one was."""
        copy = self._copies.get(object_id)
        return None if copy is None else self.current(copy)

    def current(self, ref: ObjectRef) -> ObjectRef:
        """The reference to use for ``ref``: the latest copy made of it, or itself."""
        seen = 0
        while (copy := self._copies.get(ref.id)) is not None and seen <= self.max_rebuilds:
            ref, seen = copy, seen + 1
        return ref

    def rewrite(self, call: TaskCall) -> TaskCall:
        """``call`` with every reference to a lost object replaced by its copy."""
        if not self._copies:
            return call
        args, kwargs = walk_call(call.args, call.kwargs, ObjectRef, self.current)
        return TaskCall(name=call.name, args=tuple(args), kwargs=kwargs, timeout_s=call.timeout_s)

    def refusal(self, object_id: str, chain: Iterable[str]) -> str | None:
        """Why the lost object ``object_id`` cannot be made again (None: it can), when
        rebuilding it is asked for by the rebuilds in ``chain`` (innermost last)."""
        chain = tuple(chain)
        recipe = self._recipes.get(object_id)
        if recipe is None:
            return "this node has no recipe for it (another node made it, or it was forgotten)"
        if object_id in chain:
            return "making it again needs itself (a lineage loop)"
        if not recipe.deterministic:
            return f"it was made by {recipe.name}, declared non-deterministic: not made again"
        if recipe.uploads:
            return (
                f"it was made by {recipe.name} from an argument the client uploaded, which is "
                "released once its task ends: it cannot be made again"
            )
        if len(chain) >= self.max_depth:
            return f"rebuilding it would go deeper than {self.max_depth} lost objects"
        if self._rebuilds.get(object_id, 0) >= self.max_rebuilds:
            return f"it was made again {self.max_rebuilds} times already"
        return None

    def rebuilding(self, object_id: str) -> Recipe:
        """Count one rebuild of ``object_id`` (``refusal`` said it may be) and its recipe."""
        self._rebuilds[object_id] = self._rebuilds.get(object_id, 0) + 1
        return self._recipes[object_id]

    def rebuilt_as(self, lost: str, copy: ObjectRef, made_by: str) -> None:
        """``copy``, made by the task ``made_by``, now stands for ``lost``; it has the same
        recipe and rebuild count."""
        self.rebuilt += 1
        self.rebuilt_bytes += copy.nbytes
        self._copies[lost] = copy
        recipe = self._recipes.get(lost)
        if recipe is not None:
            self.record(copy, replace(recipe, made_by=made_by))
            self._rebuilds[copy.id] = self._rebuilds.get(lost, 0)
