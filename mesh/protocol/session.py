"""The client session: what a client and the node it talks to say over ``/v1/session``.

One websocket per client; each message is a ``mesh.protocol.codec`` body (msgpack, arrays out of
band and never pickled) holding a map with an ``op``:

- client -> node, ``Submit``: ``{"op": "submit", "tasks": [[cid, name, args, kwargs,
  options], ...]}``. ``cid`` is the client's own name for a task (any value; the node
  echoes it), ``options`` a map of ``timeout``, ``labels`` and ``resources`` (or None).
  Arguments may hold ``ObjectRef``s, and large arrays of a client on the node's machine
  come as ``Segment``s it left in shared memory.
- client -> node, ``Forget``: ``{"op": "forget", "ids": [object id, ...]}``: the client
  holds no reference to these objects any more (its last ``ObjectRef`` to each was
  garbage-collected or released); the node lets go of them (``node.refs``).
- node -> client, ``Results``: ``{"op": "results", "items": [[cid, task_id, ok, value,
  node, error], ...]}``, one item per task of every batch the node took, as each ends:
  ``value`` when ``ok``, else ``error``, an ``ErrorInfo`` record.
- node -> client, ``SessionError``: ``{"op": "error", "message": ...}``: a message the node
  could not read; the session ends.

A batch the node cannot read (not a submit, tasks not a list, a task not a list of five)
is a ``SessionError``. A task of a readable batch whose fields are wrong is refused on its
own (``BadTask``), with a ``bad-request`` result. Each type here encodes itself to that map
(``encode``) and reads it back (``decode``), refusing anything else with
``RemoteProtocolError``.

This module is pure: no I/O, no state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from mesh.errors import ErrorInfo, RemoteProtocolError

SUBMIT: Final = "submit"
FORGET: Final = "forget"
RESULTS: Final = "results"
ERROR: Final = "error"


@dataclass(frozen=True, slots=True, kw_only=True)
class Submission:
    """One task of a ``Submit``: the registered task ``name`` and its arguments."""

    cid: Any
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: Mapping[str, Any] | None = None
    """Checked by the node (``node.api.parse_options``), which knows its own bounds."""

    def encode(self) -> list[Any]:
        options = dict(self.options) if self.options is not None else None
        return [self.cid, self.name, list(self.args), self.kwargs, options]


@dataclass(frozen=True, slots=True, kw_only=True)
class BadTask:
    """A task of a readable batch that the node refuses on its own: ``reason`` says why."""

    cid: Any
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Submit:
    """Client -> node: a batch of tasks, each answered by one result."""

    tasks: tuple[Submission, ...]

    def encode(self) -> dict[str, Any]:
        return {"op": SUBMIT, "tasks": [t.encode() for t in self.tasks]}

    @staticmethod
    def decode(body: Any) -> tuple[Submission | BadTask, ...]:
        """The tasks of a submit message, each a ``Submission`` or a ``BadTask``. Raises
        ``RemoteProtocolError`` for a message that is no batch (the session ends)."""
        op = body.get("op") if isinstance(body, dict) else None
        if not (isinstance(op, str) and op == SUBMIT):  # an array compares elementwise
            raise RemoteProtocolError("expected {'op': 'submit', 'tasks': [...]}")
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise RemoteProtocolError("tasks must be a list")
        if not all(isinstance(item, list) and len(item) == 5 for item in tasks):
            raise RemoteProtocolError("each task is [id, name, args, kwargs, options]")
        return tuple(_task(*item) for item in tasks)


@dataclass(frozen=True, slots=True, kw_only=True)
class Forget:
    """Client -> node: object ids the client holds no reference to any more."""

    ids: tuple[str, ...]

    def encode(self) -> dict[str, Any]:
        return {"op": FORGET, "ids": list(self.ids)}


def decode_request(body: Any) -> tuple[Submission | BadTask, ...] | Forget:
    """A message from a client: a ``Submit``'s tasks or a ``Forget``. Raises
    ``RemoteProtocolError`` for anything else (the session ends)."""
    op = body.get("op") if isinstance(body, dict) else None
    if isinstance(op, str) and op == FORGET:
        ids = body.get("ids")
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise RemoteProtocolError("forget ids must be a list of strings", reason="bad-field")
        return Forget(ids=tuple(ids))
    return Submit.decode(body)


def _task(cid: Any, name: Any, args: Any, kwargs: Any, options: Any) -> Submission | BadTask:
    if not isinstance(name, str) or not isinstance(args, list):
        return BadTask(cid=cid, reason="task name or args malformed")
    if not isinstance(kwargs, dict):
        return BadTask(cid=cid, reason="kwargs must be a map")
    kwargs = {str(k): v for k, v in kwargs.items()}  # keywords are names
    return Submission(cid=cid, name=name, args=tuple(args), kwargs=kwargs, options=options)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """How a submitted task ended, as its submitter learns it: its ``value``, or the
    ``error`` that ended it. ``node`` ran it ("" when none did); ``task_id`` is "" for a
    task the node refused before it had one."""

    task_id: str
    node: str = ""
    value: Any = None
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True, kw_only=True)
class Results:
    """Node -> client: tasks that ended, each with the ``cid`` it was submitted under."""

    items: tuple[tuple[Any, Outcome], ...] = field(default=())

    def encode(self) -> dict[str, Any]:
        return {
            "op": RESULTS,
            "items": [
                [
                    cid,
                    o.task_id,
                    o.ok,
                    o.value,
                    o.node,
                    None if o.error is None else o.error.encode(),
                ]
                for cid, o in self.items
            ],
        }

    @classmethod
    def decode(cls, body: Any) -> Results:
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise RemoteProtocolError("results must be a list", reason="bad-field")
        return cls(items=tuple(_result(item) for item in items))


def _result(item: Any) -> tuple[Any, Outcome]:
    if not (isinstance(item, list) and len(item) == 6):
        raise RemoteProtocolError("each result is [id, task id, ok, value, node, error]")
    cid, task_id, ok, value, node, error = item
    if not (isinstance(task_id, str) and isinstance(ok, bool) and isinstance(node, str)):
        raise RemoteProtocolError("a result's task id, ok or node malformed", reason="bad-field")
    if ok:
        return cid, Outcome(task_id=task_id, node=node, value=value)
    return cid, Outcome(task_id=task_id, node=node, error=ErrorInfo.decode(error))


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionError:
    """Node -> client: a message the node could not read; the session ends."""

    message: str

    def encode(self) -> dict[str, Any]:
        return {"op": ERROR, "message": self.message}


def decode_reply(body: Any) -> Results | SessionError:
    """A message from the node: ``Results`` or ``SessionError``. Raises
    ``RemoteProtocolError`` for anything else."""
    op = body.get("op") if isinstance(body, dict) else None
    if isinstance(op, str) and op == RESULTS:
        return Results.decode(body)
    if isinstance(op, str) and op == ERROR:
        message = body.get("message")
        return SessionError(message=message if isinstance(message, str) else "session error")
    raise RemoteProtocolError(f"unknown session message {op!r}")
