"""The Mesh error family.

Two errors carry the blame for protocol trouble, as in h11: ``LocalProtocolError`` means
this process called the library wrong (a bug here), ``RemoteProtocolError`` means a peer sent
something that cannot be accepted (drop the frame, count it, maybe penalise the peer).
Everything the library raises on purpose derives from ``MeshError``; anything else escaping
is a bug.
"""

from __future__ import annotations


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

    def __init__(self, ref: str, holder: str) -> None:
        super().__init__(f"object {ref} is lost: its holder {holder} is gone")
        self.ref = ref
        self.holder = holder
