"""The one walk over a task's arguments.

Every hop that treats some arguments specially finds them here: the client (futures to
wait for), the submitting node (large arrays and uploads to store, references to count),
the running node (references to fetch) and the worker (shared segments to map). They are
looked for in lists, tuples and dicts down to ``MAX_ARG_DEPTH`` levels; anything deeper
travels as it is. Containers that hold nothing sought come back as they were (no copy);
the others come back as lists and dicts, which is what the wire makes of them anyway.

This module is pure: no I/O, no state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

MAX_ARG_DEPTH: Final = 8
"""How many levels of lists, tuples and dicts are searched inside one argument (the
argument itself is level 0)."""

Kind = type | tuple[type, ...]
"""What is sought: a class, or a tuple of classes (as ``isinstance`` takes them)."""


def walk(value: Any, kind: Kind, fn: Callable[[Any], Any]) -> Any:
    """``value`` with every instance of ``kind`` inside it replaced by ``fn(instance)``."""
    return _walk(value, kind, _seek(kind), fn, 0)


def walk_call(
    args: Iterable[Any], kwargs: Mapping[str, Any], kind: Kind, fn: Callable[[Any], Any]
) -> tuple[list[Any], dict[str, Any]]:
    """``walk`` over each argument of a call: the arguments as a list and a dict."""
    seek = _seek(kind)
    return (
        [_walk(v, kind, seek, fn, 0) for v in args],
        {k: _walk(v, kind, seek, fn, 0) for k, v in kwargs.items()},
    )


def find_in_call(args: Iterable[Any], kwargs: Mapping[str, Any], kind: Kind) -> list[Any]:
    """Every instance of ``kind`` among the arguments of a call, in walking order."""
    found: list[Any] = []
    walk_call(args, kwargs, kind, found.append)
    return found


async def walk_call_async(
    args: Iterable[Any],
    kwargs: Mapping[str, Any],
    kind: Kind,
    fn: Callable[[Any], Awaitable[Any]],
) -> tuple[list[Any], dict[str, Any]]:
    """``walk_call`` with an async ``fn``, awaited once per distinct instance, in order."""
    args = list(args)
    done: dict[int, Any] = {}
    for item in find_in_call(args, kwargs, kind):
        if id(item) not in done:
            done[id(item)] = await fn(item)
    if not done:
        return args, dict(kwargs)
    return walk_call(args, kwargs, kind, lambda item: done[id(item)])


def _seek(kind: Kind) -> tuple[type, ...]:
    """``kind`` and the containers that may hold it."""
    return (*(kind if isinstance(kind, tuple) else (kind,)), list, tuple, dict)


def _walk(
    value: Any, kind: Kind, seek: tuple[type, ...], fn: Callable[[Any], Any], depth: int
) -> Any:
    if isinstance(value, kind):
        return fn(value)
    if depth >= MAX_ARG_DEPTH:
        return value
    if isinstance(value, list | tuple):
        if not any(isinstance(v, seek) for v in value):
            return value
        items = [_walk(v, kind, seek, fn, depth + 1) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if isinstance(value, dict):
        if not any(isinstance(v, seek) for v in value.values()):
            return value
        entries = {k: _walk(v, kind, seek, fn, depth + 1) for k, v in value.items()}
        return value if all(entries[k] is v for k, v in value.items()) else entries
    return value
