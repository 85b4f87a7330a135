"""The one walk over a task's arguments (``mesh.protocol.args``)."""

from __future__ import annotations

from typing import Any

from mesh.protocol.args import MAX_ARG_DEPTH, find_in_call, walk, walk_call, walk_call_async


class Mark:
    """Something sought."""

    def __init__(self, n: int) -> None:
        self.n = n


def nest(value: Any, levels: int) -> Any:
    for _ in range(levels):
        value = [value]
    return value


def test_marks_are_replaced_in_lists_tuples_and_dicts() -> None:
    value = {"a": [Mark(1), (2, Mark(3))], "b": "x", "c": Mark(4)}
    out = walk(value, Mark, lambda m: m.n * 10)
    assert out == {"a": [10, [2, 30]], "b": "x", "c": 40}


def test_containers_without_marks_come_back_as_they_were() -> None:
    plain = [1, (2, 3), {"k": [4]}]
    assert walk(plain, Mark, lambda m: 0) is plain
    mixed = [[1, 2], Mark(1)]
    out = walk(mixed, Mark, lambda m: m.n)
    assert out == [[1, 2], 1]
    assert out[0] is mixed[0]


def test_the_walk_stops_at_the_depth_limit() -> None:
    reached = nest(Mark(1), MAX_ARG_DEPTH)
    assert walk(reached, Mark, lambda m: "found") == nest("found", MAX_ARG_DEPTH)
    too_deep = nest(Mark(1), MAX_ARG_DEPTH + 1)
    assert walk(too_deep, Mark, lambda m: "found") is too_deep
    assert find_in_call([too_deep], {}, Mark) == []


def test_a_tuple_of_kinds_is_sought_and_the_mark_itself_is_a_leaf() -> None:
    assert walk(Mark(2), (Mark, int), lambda v: "hit") == "hit"
    assert walk([1, "a", Mark(0)], (Mark, int), lambda v: "hit") == ["hit", "a", "hit"]


def test_each_argument_of_a_call_is_walked_from_level_zero() -> None:
    args = (Mark(1), nest(Mark(2), MAX_ARG_DEPTH))
    kwargs = {"k": Mark(3), "plain": 5}
    found = find_in_call(args, kwargs, Mark)
    assert [m.n for m in found] == [1, 2, 3]
    new_args, new_kwargs = walk_call(args, kwargs, Mark, lambda m: m.n)
    assert new_args == [1, nest(2, MAX_ARG_DEPTH)]
    assert new_kwargs == {"k": 3, "plain": 5}


async def test_the_async_walk_awaits_once_per_instance_in_order() -> None:
    shared = Mark(7)
    seen: list[int] = []

    async def resolve(m: Mark) -> int:
        seen.append(m.n)
        return m.n + 100

    args, kwargs = await walk_call_async([shared, [Mark(1), shared]], {"k": Mark(2)}, Mark, resolve)
    assert args == [107, [101, 107]]
    assert kwargs == {"k": 102}
    assert seen == [7, 1, 2]
    plain_args, plain_kwargs = await walk_call_async((1, 2), {"a": 3}, Mark, resolve)
    assert (plain_args, plain_kwargs) == ([1, 2], {"a": 3})
