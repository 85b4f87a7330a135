"""The local object store: results that stay on the node that made them.

A result larger than ``NodeConfig.store_threshold_bytes`` is put here and its submitter gets
an ``ObjectRef`` naming this node as holder; a task whose arguments are references fetches
them from the holder, so work can move to the data instead of the data to the submitter.

Each object is encoded once, when it is put (``mesh.codec.encode_body``, which does not copy
arrays), and the same chunks serve every fetch. The store holds at most ``limit_bytes``; a
put beyond that fails with ``ObjectStoreFullError``. Nothing is ever evicted behind a
reference's back: an object leaves only when ``release`` is called for it.

This module does no I/O; the daemon serves ``encoded`` chunks over HTTP and decides what to
put and when to release.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import psutil

from mesh.codec import Chunks, encode_body
from mesh.config import NodeConfig
from mesh.errors import LocalProtocolError, MeshError, ObjectLostError, TaskLostError
from mesh.messages import NodeId, ObjectRef, Wire, field_names

_LIMIT_SHARE: Final = 4
"""With no configured limit the store may take 1/_LIMIT_SHARE of the machine's memory."""


class ObjectNotFoundError(ObjectLostError):
    """The store does not hold the object asked for (never put, or released)."""

    def __init__(self, object_id: str, holder: str) -> None:
        TaskLostError.__init__(
            self, f"object {object_id} is not held by {holder}: it was released or never stored"
        )
        self.ref = object_id
        self.holder = holder


class ObjectStoreFullError(MeshError):
    """Putting an object would take the store over its limit."""

    def __init__(self, over: int, limit: int) -> None:
        super().__init__(f"object store full: {over} bytes over the limit of {limit}")
        self.over = over
        self.limit = limit


def nbytes_of(value: Any) -> int:
    """Bytes of payload in ``value``: arrays, tensors, bytes and strings, nested anywhere.

    What the daemon compares with the store threshold. A value that appears twice counts
    twice, as the codec would send it twice; the few bytes of msgpack structure around the
    payload are ignored. A container inside itself (which cannot be encoded) counts once.
    """
    return _nbytes(value, set(), sys.modules.get("torch"))


def _nbytes(item: Any, path: set[int], torch: Any) -> int:
    if isinstance(item, np.ndarray):
        return int(item.nbytes)
    if isinstance(item, bytes | bytearray | memoryview):
        return memoryview(item).nbytes
    if isinstance(item, str):
        return len(item)
    if torch is not None and isinstance(item, torch.Tensor):
        return int(item.numel() * item.element_size())
    if not isinstance(item, list | tuple | dict | set | frozenset | Wire) or id(item) in path:
        return 0
    if isinstance(item, dict):
        parts: list[Any] = [*item.keys(), *item.values()]
    elif isinstance(item, Wire):
        parts = [getattr(item, name) for name in field_names(type(item))]
    else:
        parts = list(item)
    path.add(id(item))
    try:
        return sum(_nbytes(part, path, torch) for part in parts)
    finally:
        path.discard(id(item))


def default_limit() -> int:
    """The store limit when none is configured: a share of this machine's memory."""
    return int(psutil.virtual_memory().total) // _LIMIT_SHARE


def _summary(value: Any) -> tuple[str, tuple[int, ...]]:
    if isinstance(value, np.ndarray):
        return value.dtype.str, tuple(int(d) for d in value.shape)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch."), tuple(int(d) for d in value.shape)
    return "", ()


@dataclass(frozen=True, slots=True)
class _Entry:
    value: Any
    chunks: Chunks
    size: int
    ref: ObjectRef


class ObjectStore:
    """Objects held by node ``node_id``, at most ``limit_bytes`` of them (encoded size)."""

    def __init__(self, node_id: NodeId, limit_bytes: int) -> None:
        if limit_bytes < 0:
            raise LocalProtocolError(f"store limit must not be negative, got {limit_bytes}")
        self.node_id = node_id
        self.limit_bytes = limit_bytes
        self._objects: dict[str, _Entry] = {}
        self._used = 0

    @classmethod
    def from_config(cls, node_id: NodeId, config: NodeConfig) -> ObjectStore:
        limit = config.store_limit_bytes
        return cls(node_id, default_limit() if limit is None else limit)

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return max(0, self.limit_bytes - self._used)

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._objects

    def __iter__(self) -> Iterator[ObjectRef]:
        return iter([e.ref for e in self._objects.values()])

    def put(self, value: Any, *, object_id: str | None = None) -> ObjectRef:
        """Keep ``value`` and return a reference to it.

        ``object_id`` names the object (a task id, say); by default a fresh random id. Raises
        ``ObjectStoreFullError`` if it does not fit, ``LocalProtocolError`` if ``value``
        cannot be encoded or ``object_id`` is already held.
        """
        oid = object_id if object_id is not None else secrets.token_hex(12)
        if oid in self._objects:
            raise LocalProtocolError(f"object {oid} is already stored")
        chunks, size = encode_body(value)
        over = self._used + size - self.limit_bytes
        if over > 0:
            raise ObjectStoreFullError(over, self.limit_bytes)
        dtype, shape = _summary(value)
        ref = ObjectRef(id=oid, holder=self.node_id, nbytes=size, dtype=dtype, shape=shape)
        self._objects[oid] = _Entry(value=value, chunks=chunks, size=size, ref=ref)
        self._used += size
        return ref

    def _entry(self, ref_or_id: ObjectRef | str) -> _Entry:
        oid = ref_or_id.id if isinstance(ref_or_id, ObjectRef) else ref_or_id
        entry = self._objects.get(oid)
        if entry is None:
            raise ObjectNotFoundError(oid, self.node_id)
        return entry

    def get(self, ref_or_id: ObjectRef | str) -> Any:
        """The stored value; raises ``ObjectNotFoundError`` if it is not held here."""
        return self._entry(ref_or_id).value

    def ref(self, object_id: str) -> ObjectRef:
        """The reference of a held object."""
        return self._entry(object_id).ref

    def encoded(self, ref_or_id: ObjectRef | str) -> tuple[Chunks, int]:
        """The object's body (``mesh.codec`` format) as chunks to write in order, and its size.

        Made once at ``put``; ``mesh.codec.loads`` of the joined chunks gives the value back.
        The chunks are read-only views: write them, never modify them.
        """
        entry = self._entry(ref_or_id)
        return list(entry.chunks), entry.size

    def release(self, ref_or_id: ObjectRef | str) -> bool:
        """Forget an object; False if it was not held (releasing twice is harmless)."""
        oid = ref_or_id.id if isinstance(ref_or_id, ObjectRef) else ref_or_id
        entry = self._objects.pop(oid, None)
        if entry is None:
            return False
        self._used -= entry.size
        return True
