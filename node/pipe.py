"""The pipe between the executor and a worker: its frames and its messages.

Each worker has one Unix socket pair with the executor. Messages are ``mesh.protocol.codec`` bodies
(msgpack, never pickle), each in a frame::

    u8 kind | u64 length | payload

``INLINE`` frames carry the body itself. A body larger than the executor's threshold goes
through a shared-memory segment (``mesh.runtime.shm``) and the frame carries ``u64 size | name``
(``SEGMENT``); the reader maps the segment and decodes arrays as views of the mapping, with
no copy.

The executor sends ``Run`` (one task; ``shared`` names the object-store segments among its
arguments that the worker maps), ``Threads`` (run what follows with that many BLAS and
torch threads) and ``Stop``. The worker answers ``Ready`` once, then one ``Done`` per
``Run``. Each type encodes itself as a list led by its op (``encode``); ``decode_call``
and ``decode_reply`` read them back and refuse anything else with ``RemoteProtocolError``,
so a worker that sends garbage is replaced rather than believed.

This module is pure: no I/O, no state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

from mesh.errors import ErrorInfo, RemoteProtocolError
from mesh.protocol.codec import Buffer, Chunks, decode_body
from mesh.runtime.shm import map_segment

HEADER: Final = struct.Struct("<BQ")
_SIZE: Final = struct.Struct("<Q")
INLINE: Final = 0
SEGMENT: Final = 1

UNKNOWN_TASK: Final = "UnknownTask"
"""``ErrorInfo.exc_type`` of a call for a task the worker's registry does not hold."""


# ---------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------


def inline_frame(chunks: Chunks, size: int) -> Chunks:
    """The frame that carries a ``size``-byte body made of ``chunks``."""
    return [HEADER.pack(INLINE, size), *chunks]


def segment_frame(name: str, size: int) -> Chunks:
    """The frame that points the reader at segment ``name`` holding a ``size``-byte body."""
    payload = _SIZE.pack(size) + name.encode()
    return [HEADER.pack(SEGMENT, len(payload)), payload]


def parse_segment(payload: Buffer) -> tuple[str, int]:
    """(name, body size) from a ``SEGMENT`` frame's payload."""
    if len(payload) <= _SIZE.size:
        raise RemoteProtocolError("bad segment frame", reason="bad-segment")
    (size,) = _SIZE.unpack_from(payload, 0)
    try:
        name = bytes(payload[_SIZE.size :]).decode()
    except UnicodeDecodeError:
        raise RemoteProtocolError("bad segment name", reason="bad-segment") from None
    return name, size


def decode_frame(kind: int, payload: Buffer) -> Any:
    """Decode one frame (the executor's side): result segments are unlinked once mapped."""
    if kind == INLINE:
        return decode_body(memoryview(payload).cast("B"))
    if kind == SEGMENT:
        name, size = parse_segment(payload)
        return decode_body(memoryview(map_segment(name, size, unlink_now=True)))
    raise RemoteProtocolError(f"unknown frame kind {kind}", reason="malformed")


# ---------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """Executor -> worker: run task ``name`` as ``task_id``; ``seq`` numbers the call.

    ``shared`` names the object-store segments among the arguments (``Segment``s) that the
    worker maps; any other ``Segment`` is the task's own data and stays as it is.
    """

    seq: int
    task_id: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    shared: tuple[str, ...] = ()

    def encode(self) -> list[Any]:
        return ["run", self.seq, self.task_id, self.name, self.args, self.kwargs, [*self.shared]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Threads:
    """Executor -> worker: run what follows with ``threads`` BLAS and torch threads (sent
    just before a call when the count changed)."""

    threads: int

    def encode(self) -> list[Any]:
        return ["threads", self.threads]


@dataclass(frozen=True, slots=True)
class Stop:
    """Executor -> worker: exit."""

    def encode(self) -> list[Any]:
        return ["stop"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """Worker -> executor, once: it has loaded the task registry and takes calls."""

    pid: int

    def encode(self) -> list[Any]:
        return ["ready", self.pid]


@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """How one run of a task ended: its ``value``, or the ``error`` that ended it.

    The worker's answer to ``Run`` number ``seq``, and what ``node.executor.Executor.run``
    returns (with ``seq`` 0 for an ending the executor saw itself: the worker died, the
    task timed out or was cancelled). ``runtime_s`` is the seconds the task ran, measured
    in the worker (0 when it never ran).
    """

    seq: int
    value: Any = None
    error: ErrorInfo | None = None
    runtime_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def encode(self) -> list[Any]:
        error = None if self.error is None else self.error.encode()
        return ["done", self.seq, self.value, error, self.runtime_s]


Call = Run | Threads | Stop
Reply = Ready | Done


def decode_call(raw: Any) -> Call:
    """A message from the executor (the worker's side)."""
    op = _op(raw)
    if op == "run" and len(raw) == 7:
        _, seq, task_id, name, args, kwargs, shared = raw
        if (
            type(seq) is int
            and isinstance(task_id, str)
            and isinstance(name, str)
            and isinstance(args, list)
            and isinstance(kwargs, dict)
            and isinstance(shared, list)
            and all(isinstance(s, str) for s in shared)
        ):
            return Run(
                seq=seq, task_id=task_id, name=name, args=args, kwargs=kwargs, shared=tuple(shared)
            )
    elif op == "threads" and len(raw) == 2 and type(raw[1]) is int:
        return Threads(threads=raw[1])
    elif op == "stop" and len(raw) == 1:
        return Stop()
    raise RemoteProtocolError(f"bad call {op!r} from the executor", reason="bad-field")


def decode_reply(raw: Any) -> Reply:
    """A message from a worker (the executor's side)."""
    op = _op(raw)
    if op == "done" and len(raw) == 5:
        _, seq, value, error, runtime = raw
        if type(seq) is int and type(runtime) is float:
            if error is None:
                return Done(seq=seq, value=value, runtime_s=runtime)
            return Done(seq=seq, error=ErrorInfo.decode(error), runtime_s=runtime)
    elif op == "ready" and len(raw) == 2 and type(raw[1]) is int:
        return Ready(pid=raw[1])
    raise RemoteProtocolError(f"bad reply {op!r} from a worker", reason="bad-field")


def _op(raw: Any) -> str:
    if not (isinstance(raw, list) and raw and isinstance(raw[0], str)):
        raise RemoteProtocolError("a pipe message is a list led by its op", reason="malformed")
    return raw[0]
