"""The Mesh error family.

Two errors carry the blame for protocol trouble, as in h11: ``LocalProtocolError`` means
this process called the library wrong (a bug here), ``RemoteProtocolError`` means a peer sent
something that cannot be accepted (drop the frame, count it, maybe penalise the peer).
Everything the library raises on purpose derives from ``MeshError``; anything else escaping
is a bug.

A failed task has one record on its whole way back, ``ErrorInfo``: made by the worker that
ran it (or the node, for failures of its own), carried by the contract net and the client
session, and turned into the submitter's exception by ``ErrorInfo.exception``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final


class MeshError(Exception):
    """Root of every error Mesh raises on purpose."""


class LocalProtocolError(MeshError):
    """The caller used the library wrong: a bug on this side, never caused by a peer."""


class RemoteProtocolError(MeshError):
    """A peer sent something unacceptable.

    ``reason`` is a short, stable, machine-readable word used as a metrics label, so that
    rejected frames can be counted by cause without parsing messages. The codec uses:
    ``bad-mac`` (authentication failed), ``oversized``, ``truncated``, ``version``,
    ``stale`` (timestamp outside the allowed skew), ``replay``, ``malformed`` (not msgpack,
    bad envelope, nested too deeply), ``unknown-type`` (wire tag or ext code),
    ``bad-field`` (a field of the wrong type) and ``bad-array`` (dtype, shape or buffer).
    """

    def __init__(self, message: str, *, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class AuthenticationError(RemoteProtocolError):
    """A frame or request did not prove knowledge of the mesh key."""

    def __init__(self, message: str = "authentication failed", *, reason: str = "bad-mac"):
        super().__init__(message, reason=reason)


class TaskError(MeshError):
    """A task raised on the node that ran it; carries the remote message and traceback."""

    def __init__(
        self,
        message: str,
        *,
        task_id: str = "",
        node: str = "",
        exc_type: str = "",
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.task_id = task_id
        self.node = node
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        where = f" on {self.node}" if self.node else ""
        kind = f"{self.exc_type}: " if self.exc_type else ""
        return f"task {self.task_id}{where} failed: {kind}{self.message}"


class NoCapablePeerError(MeshError):
    """No live peer can ever run the task; ``missing`` names what every candidate lacked."""

    def __init__(self, task: str, missing: dict[str, object]) -> None:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(missing.items())) or "nothing matched"
        super().__init__(f"no peer can run {task}: missing {detail}")
        self.task = task
        self.missing = dict(missing)


class TaskLostError(MeshError):
    """A task could not be completed: its inputs are gone or every attempt failed."""


class ObjectLostError(TaskLostError):
    """A referenced object is no longer held by any live peer."""

    def __init__(self, ref: str, holder: str, message: str = "") -> None:
        super().__init__(message or f"object {ref} is lost: its holder {holder} is gone")
        self.ref = ref
        self.holder = holder


class ObjectStoreFullError(MeshError):
    """An object fits neither in the store's memory target nor in its spill directory.

    The store writes its least recently used objects to disk above its memory target; this
    is raised only when that fails too (the disk is full, or the spill size cap is reached,
    or spilling is off). ``needed`` is the object's size; the message names the target and
    the spill directory. Nothing else stored is lost.
    """

    def __init__(self, message: str, *, needed: int = 0) -> None:
        super().__init__(message)
        self.needed = needed


class SpillReadError(ObjectLostError):
    """A spilled object's file cannot be read back (removed, cut short, unreadable): the
    object is lost on this node, and may be made again from its lineage."""

    def __init__(self, ref: str, holder: str, path: str, why: str) -> None:
        super().__init__(ref, holder, f"object {ref} spilled to {path} cannot be read back: {why}")
        self.path = path


class FailureKind(StrEnum):
    """How a task failed, as its submitter learns it; the value is its one spelling on every
    wire (the contract net's ``Failed.kind``, a worker's and a session's error record)."""

    TASK = "task-error"
    """It ran and raised, or its run failed on the node (worker died, timed out, lost input)."""
    NO_PEER = "no-capable-peer"
    """No live peer can ever run it: ``ErrorInfo.missing`` says what every one lacked."""
    NO_BIDS = "no-bids"
    """Candidates exist, but none answered."""
    LOST = "lost"
    """Every placement failed, or the node or session it was submitted through went away."""
    BAD_REQUEST = "bad-request"
    """The node refused the submission itself (malformed, too deep, a full store)."""
    INTERNAL = "internal"
    """A bug on the node's side of the submission."""


_OPTIONAL: Final = ("exc_type", "traceback", "task", "object_id")
"""The text fields of an ``ErrorInfo`` that may be empty (and are then left off the wire)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorInfo:
    """One failed task: the record a worker, a node and a session carry, and the exception
    its submitter sees (``exception``).

    ``exc_type`` is the class name of the exception the task raised (or a name the node
    gives a failure of its own: ``WorkerDied``, ``Timeout``, ``Cancelled``, ...);
    ``traceback`` is the remote one, starting in the task. ``task`` and ``missing`` name the
    task and what no peer had, for ``NO_PEER``; ``object_id`` the input whose loss failed
    the run (an ``ObjectLostError``), which its owner can make again.
    """

    kind: FailureKind
    message: str
    exc_type: str = ""
    traceback: str = ""
    task: str = ""
    object_id: str = ""
    missing: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        """The record as a map of strings (what sessions and the contract net carry)."""
        out: dict[str, Any] = {"kind": str(self.kind), "message": self.message}
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value:
                out[name] = value
        if self.missing:
            out["missing"] = dict(self.missing)
        return out

    @classmethod
    def decode(cls, raw: Any) -> ErrorInfo:
        """Undo ``encode``. Raises ``RemoteProtocolError`` (reason ``bad-field``) for
        anything ``encode`` does not make: no map, an unknown kind, a field of another type."""
        if not isinstance(raw, dict):
            raise RemoteProtocolError("an error record must be a map", reason="bad-field")
        kind = raw.get("kind")
        if not isinstance(kind, str) or kind not in _KINDS:
            raise RemoteProtocolError(f"unknown failure kind {kind!r}", reason="bad-field")
        text = {"message": raw.get("message"), **{name: raw.get(name, "") for name in _OPTIONAL}}
        for name, value in text.items():
            if not isinstance(value, str):
                raise RemoteProtocolError(f"error field {name} is no string", reason="bad-field")
        missing = raw.get("missing", {})
        if not (
            isinstance(missing, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in missing.items())
        ):
            raise RemoteProtocolError(
                "error field missing is no map of strings", reason="bad-field"
            )
        return cls(kind=_KINDS[kind], missing=missing, **text)

    @classmethod
    def of(cls, exc: BaseException, *, traceback: str = "") -> ErrorInfo:
        """The record of a task's run that ended with ``exc``."""
        return cls(
            kind=FailureKind.TASK,
            message=str(exc),
            exc_type=type(exc).__name__,
            traceback=traceback,
            object_id=exc.ref if isinstance(exc, ObjectLostError) else "",
        )

    @classmethod
    def reported(cls, kind: str, message: str, details: Mapping[str, Any]) -> ErrorInfo:
        """The record of a failure the contract net reported (``mesh.protocol.contract.Failed``):
        its kind, message and the details a peer sent, kept only where they are what they
        should be (a peer may send anything)."""
        missing = details.get("missing")
        return cls(
            kind=_KINDS.get(kind, FailureKind.LOST),
            message=message,
            exc_type=_text(details.get("exc_type")),
            traceback=_text(details.get("traceback")),
            task=_text(details.get("task")),
            object_id=_text(details.get("object_id")),
            missing=(
                {str(k): str(v) for k, v in missing.items()} if isinstance(missing, dict) else {}
            ),
        )

    def exception(self, task_id: str, node: str) -> MeshError:
        """The exception the submitter of task ``task_id`` (run on ``node``) sees."""
        if self.kind is FailureKind.NO_PEER:
            return NoCapablePeerError(self.task, dict(self.missing))
        if self.kind in (FailureKind.LOST, FailureKind.NO_BIDS):
            return TaskLostError(f"task {task_id}: {self.message}")
        if self.kind is FailureKind.BAD_REQUEST:
            return LocalProtocolError(self.message)
        if self.object_id:
            return ObjectLostError(self.object_id, node, f"task {task_id}: {self.message}")
        return TaskError(
            self.message,
            task_id=task_id,
            node=node,
            exc_type=self.exc_type,
            remote_traceback=self.traceback,
        )


_KINDS: Final[dict[str, FailureKind]] = {str(k): k for k in FailureKind}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
