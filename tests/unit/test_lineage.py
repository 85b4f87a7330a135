"""``node.lineage``: what may be made again, and which failures are run again."""

from __future__ import annotations

from mesh.errors import ErrorInfo, FailureKind
from mesh.protocol.messages import NodeId, ObjectRef, Requirements, TaskCall
from node.lineage import Lineage, Recipe, Retry


def _ref(oid: str, holder: str = "h") -> ObjectRef:
    return ObjectRef(id=oid, holder=NodeId(holder), nbytes=100)


def _recipe(*args: object, deterministic: bool = True, uploads: bool = False) -> Recipe:
    return Recipe(
        name="t",
        call=TaskCall(name="t", args=tuple(args), kwargs={}, timeout_s=None),
        requirements=Requirements(task="t", resources={"cpu": 1.0}, libraries={}, labels={}),
        est_runtime_s=None,
        deterministic=deterministic,
        uploads=uploads,
        made_by="task-1",
    )


def _lineage(**kw: int) -> Lineage:
    return Lineage(**{"max_objects": 10, "max_rebuilds": 3, "max_depth": 4, **kw})


def test_a_recipe_that_needs_its_own_result_is_a_loop() -> None:
    lin = _lineage()
    x = _ref("x")
    lin.record(x, _recipe(x))
    assert lin.refusal("x", ()) is None
    # Making x again runs t(x), which finds x lost: x is then in the chain.
    assert "loop" in (lin.refusal("x", ("x",)) or "")
    assert lin.recipe("x") is not None  # nothing changed


def test_rebuilds_are_bounded_per_object_and_in_depth() -> None:
    lin = _lineage(max_rebuilds=2, max_depth=2)
    lin.record(_ref("x"), _recipe(1))
    assert "deeper than 2" in (lin.refusal("x", ("a", "b")) or "")
    for n in range(2):
        assert lin.refusal("x", ()) is None
        lin.rebuilding("x")
        lin.rebuilt_as("x", _ref(f"x{n}", "k"), f"task-{n + 2}")
    assert "2 times" in (lin.refusal("x", ()) or "")
    # The copy counts the rebuilds of what it stands for.
    assert "2 times" in (lin.refusal("x1", ()) or "")


def test_what_is_never_made_again() -> None:
    lin = _lineage()
    lin.record(_ref("n"), _recipe(deterministic=False))
    lin.record(_ref("u"), _recipe(uploads=True))
    assert "non-deterministic" in (lin.refusal("n", ()) or "")
    assert "uploaded" in (lin.refusal("u", ()) or "")
    assert "no recipe" in (lin.refusal("other", ()) or "")


def test_copies_stand_in_for_lost_objects_in_calls() -> None:
    lin = _lineage()
    lost = _ref("x")
    lin.record(lost, _recipe(1))
    lin.rebuilding("x")
    copy = _ref("y", "k")
    lin.rebuilt_as("x", copy, "task-9")
    assert lin.current(lost) == copy
    assert lin.copy_of("x") == copy
    call = lin.rewrite(TaskCall(name="s", args=([lost, 2],), kwargs={"a": lost}, timeout_s=None))
    assert call.args == ([copy, 2],)
    assert call.kwargs == {"a": copy}
    recipe = lin.recipe("y")
    assert recipe is not None
    assert recipe.made_by == "task-9"


def test_the_oldest_recipes_are_forgotten_first() -> None:
    lin = _lineage(max_objects=3)
    for n in range(5):
        lin.record(_ref(f"o{n}"), _recipe(n))
    assert len(lin) == 3
    assert lin.recipe("o1") is None
    assert lin.recipe("o4") is not None
    lin.forget("o4")
    assert lin.recipe("o4") is None


def _error(exc_type: str, kind: FailureKind = FailureKind.TASK, object_id: str = "") -> ErrorInfo:
    return ErrorInfo(kind=kind, message="m", exc_type=exc_type, object_id=object_id)


def test_system_failures_are_retried_and_exceptions_only_when_asked() -> None:
    retry = Retry(max_retries=2, exceptions=False)
    assert not retry.allows(_error("ValueError"))
    assert retry.allows(_error("WorkerDied"))
    assert retry.allows(_error("", FailureKind.LOST))
    assert not retry.allows(_error("WorkerDied"))  # used up
    assert retry.used == 2

    named = Retry(max_retries=5, exceptions=("ValueError",))
    assert named.allows(_error("ValueError"))
    assert not named.allows(_error("KeyError"))
    every = Retry(max_retries=5, exceptions=True)
    assert every.allows(_error("KeyError"))
    for never in (_error("Cancelled"), _error("ObjectLostError", object_id="x")):
        assert not every.allows(never)
    assert not every.allows(_error("", FailureKind.NO_PEER))
