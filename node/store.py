"""The local object store: results that stay on the node that made them.

A result larger than ``NodeConfig.store_threshold_bytes`` is put here and its submitter gets
an ``ObjectRef`` naming this node as holder; a task whose arguments are references fetches
them from the holder, so work can move to the data instead of the data to the submitter.

Each object is encoded once, when it is put (``mesh.protocol.codec.encode_body``, which does
not copy arrays), and the same chunks serve every fetch. The store holds at most ``limit_bytes``; a
put beyond that fails with ``ObjectStoreFullError``. Nothing is ever evicted behind a
reference's back: an object leaves only when ``release`` is called for it.

Processes on the same machine share large objects through shared memory, as a plasma store
does: an object from ``segment_min_bytes`` on can live in a segment the store owns, a file
in ``/dev/shm`` named ``<store prefix><n>`` that other nodes' workers map read-only. A
client's upload is copied into such a segment in the kernel (``take_upload``): copy-on-adopt,
because the client could still shrink its own file under a mapping of it, which kills the
reader with SIGBUS; the store's copy is a file only the node writes. Any other object gets
its segment written once, in a thread, the first time a process on this machine asks for it.
A segment is removed exactly when its object is released or the store closes; processes that
mapped it keep its pages until they unmap them. Segments of processes that died (a node
killed with SIGKILL, its workers) and uploads no node took are removed by
``remove_orphan_segments``, which the daemon runs at start and then on a timer.

The daemon serves ``encoded`` chunks or segment names over HTTP and decides what to put and
when to release; the store touches no socket.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import mmap
import os
import re
import secrets
import sys
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import psutil

from mesh.config import NodeConfig
from mesh.errors import (
    LocalProtocolError,
    MeshError,
    ObjectLostError,
    RemoteProtocolError,
    TaskLostError,
)
from mesh.protocol.codec import Chunks, decode_body, encode_body
from mesh.protocol.messages import NodeId, ObjectRef, Segment, Wire, field_names
from mesh.runtime.shm import OBJECT_PREFIX, SHM_DIR, UPLOAD_PREFIX, open_exact, unlink, write_chunks

_LIMIT_SHARE: Final = 4
"""With no configured limit the store may take 1/_LIMIT_SHARE of the machine's memory."""

_MAP_POPULATE: Final[int] = getattr(mmap, "MAP_POPULATE", 0)
_OWNER: Final = re.compile(r"mesh-(?:obj-)?([0-9]{1,10})-")
"""A segment's owner: an object store (``OBJECT_PREFIX``) or an executor (``mesh-<pid>-``)."""
_UPLOAD: Final = re.compile(re.escape(UPLOAD_PREFIX) + r"[0-9a-f]{24}")
_MAX_UPLOAD: Final = 64 * 1024 * 1024 * 1024


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


# ---------------------------------------------------------------------------------------
# Segment files
# ---------------------------------------------------------------------------------------


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive, and not ours to clean up after
    return True


def remove_orphan_segments(*, upload_max_age_s: float = 600.0) -> int:
    """Remove what crashed processes left in shared memory; how many files.

    Segments carry their owner's process id (a store's ``mesh-obj-<pid>-``, an executor's
    ``mesh-<pid>-``): those of a process that is gone go, a live one's are never touched.
    A client's upload is taken within moments of being written, so one older than
    ``upload_max_age_s`` belongs to a client that died before submitting it.
    """
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    removed = 0
    now = time.time()
    for name in names:
        owner = _OWNER.match(name)
        if owner is not None:
            pid = int(owner.group(1))
            if pid == os.getpid() or _pid_alive(pid):
                continue
        elif _UPLOAD.fullmatch(name):
            try:
                if now - os.lstat(_path(name)).st_mtime < upload_max_age_s:
                    continue
            except OSError:
                continue
        else:
            continue
        unlink(name)
        removed += 1
    return removed


def _create(name: str, size: int) -> mmap.mmap:
    """A new segment of ``size`` bytes, mapped writable with every page already in place."""
    fd = os.open(_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


def _write(name: str, chunks: Chunks, size: int) -> mmap.mmap:
    """A new segment holding ``chunks``, mapped read-only for the store's own use."""
    fd = os.open(_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        write_chunks(fd, chunks)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


class UploadError(RemoteProtocolError):
    """A client's shared-memory upload that cannot be taken: its message names the upload."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="bad-upload")


def _copy_exact(src: int, dst: int, nbytes: int) -> int:
    """Copy up to ``nbytes`` from the start of ``src`` to ``dst`` through the kernel (no
    mapping of ``src``); the bytes copied, fewer if ``src`` is shorter."""
    done = 0
    kernel = True
    while done < nbytes:
        if kernel:
            try:
                n = os.copy_file_range(src, dst, nbytes - done, done, done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                kernel = False  # an old kernel or two file systems: read and write instead
                continue
        else:
            block = os.pread(src, min(nbytes - done, 1 << 20), done)
            n = os.pwrite(dst, block, done) if block else 0
        if n == 0:
            break
        done += n
    return done


class OwnedSegment:
    """A segment this store made, removed when this is dropped unless the store keeps it.

    Either a client's upload, taken (``ObjectStore.take_upload``: ``value`` is decoded from
    the segment, its arrays views of it) until ``ObjectStore.adopt`` makes it an object's;
    or room for a fetched argument (``ObjectStore.new_segment``: ``buffer`` is writable
    until ``seal``), which lives as long as the task that maps it. ``segment`` names it to
    other processes.
    """

    __slots__ = ("__weakref__", "_gone", "_mapping", "buffer", "name", "nbytes", "value")

    def __init__(self, name: str, nbytes: int, mapping: mmap.mmap, value: Any = None) -> None:
        self._mapping = mapping
        self.name = name
        self.nbytes = nbytes
        self.buffer = memoryview(mapping)
        self.value = value
        self._gone = weakref.finalize(self, unlink, name)

    @property
    def segment(self) -> Segment:
        return Segment(name=self.name, nbytes=self.nbytes)

    def seal(self) -> None:
        """Drop the writable mapping (the file keeps the bytes for whoever maps it next)."""
        try:
            self.buffer.release()
            self._mapping.close()
        except BufferError:
            pass  # a view of it is still alive somewhere: the mapping goes when that does

    def remove(self) -> None:
        """Remove the segment's name now (its pages stay mapped where they are)."""
        self._gone()

    def _kept(self) -> None:
        self._gone.detach()


@dataclass(slots=True, eq=False)
class _Entry:
    value: Any
    chunks: Chunks
    size: int
    ref: ObjectRef
    segment: str | None = None
    writing: asyncio.Future[None] | None = field(default=None, repr=False)


class ObjectStore:
    """Objects held by node ``node_id``, at most ``limit_bytes`` of them (encoded size).

    Objects from ``segment_min_bytes`` on are shared with processes on this machine through
    segments named ``prefix`` + a counter; ``close`` removes them all.
    """

    def __init__(
        self, node_id: NodeId, limit_bytes: int, *, segment_min_bytes: int = 1024 * 1024
    ) -> None:
        if limit_bytes < 0:
            raise LocalProtocolError(f"store limit must not be negative, got {limit_bytes}")
        self.node_id = node_id
        self.limit_bytes = limit_bytes
        self.segment_min_bytes = segment_min_bytes
        self.prefix = f"{OBJECT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"
        self._names = itertools.count(1)
        self._objects: dict[str, _Entry] = {}
        self._used = 0
        self._closed = False
        self._reaper: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(cls, node_id: NodeId, config: NodeConfig) -> ObjectStore:
        limit = config.store_limit_bytes
        return cls(
            node_id,
            default_limit() if limit is None else limit,
            segment_min_bytes=config.store_segment_min_bytes,
        )

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

    def _new_id(self, object_id: str | None) -> str:
        if self._closed:
            raise LocalProtocolError("the object store is closed")
        oid = object_id if object_id is not None else secrets.token_hex(12)
        if oid in self._objects:
            raise LocalProtocolError(f"object {oid} is already stored")
        return oid

    def _check_room(self, size: int) -> None:
        over = self._used + size - self.limit_bytes
        if over > 0:
            raise ObjectStoreFullError(over, self.limit_bytes)

    def _keep(self, oid: str, entry: _Entry) -> ObjectRef:
        self._objects[oid] = entry
        self._used += entry.size
        return entry.ref

    def put(self, value: Any, *, object_id: str | None = None) -> ObjectRef:
        """Keep ``value`` and return a reference to it.

        ``object_id`` names the object (a task id, say); by default a fresh random id. Raises
        ``ObjectStoreFullError`` if it does not fit, ``LocalProtocolError`` if ``value``
        cannot be encoded or ``object_id`` is already held.
        """
        oid = self._new_id(object_id)
        chunks, size = encode_body(value)
        self._check_room(size)
        dtype, shape = _summary(value)
        ref = ObjectRef(id=oid, holder=self.node_id, nbytes=size, dtype=dtype, shape=shape)
        return self._keep(oid, _Entry(value=value, chunks=chunks, size=size, ref=ref))

    def take_upload(self, upload: Segment) -> OwnedSegment:
        """Copy a same-machine client's upload into a new segment of this store and decode it.

        Blocking (a copy of the whole body): call it in a thread. The client's file is opened
        by ``mesh.runtime.shm.open_exact`` (no link, no FIFO, this user's, the announced size) and
        copied in the kernel, never mapped: the client keeps its descriptor and could shrink
        the file at any time, and a mapping of a shrunk file kills the reader with SIGBUS.
        The copy is this store's own file, which only the node changes. The client's file is
        removed once copied or refused. Raises ``UploadError`` naming the upload,
        ``LocalProtocolError`` if the store is closed.
        """
        if self._closed:
            raise LocalProtocolError("the object store is closed")
        what = f"shared-memory upload {upload.name}"
        if not _UPLOAD.fullmatch(upload.name) or not 0 < upload.nbytes <= _MAX_UPLOAD:
            raise UploadError(f"bad shared-memory upload {upload.name!r}")
        src_path = _path(upload.name)
        try:
            src = open_exact(src_path, upload.nbytes, what=what)
        except FileNotFoundError:
            raise UploadError(f"{what} not found: is the client on this machine?") from None
        except PermissionError:
            raise UploadError(f"{what} belongs to another user") from None
        except RemoteProtocolError as exc:
            unlink(upload.name)
            raise UploadError(str(exc)) from None
        name = f"{self.prefix}{next(self._names)}"
        try:
            fd = os.open(_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, upload.nbytes)
                copied = _copy_exact(src, fd, upload.nbytes)
                if copied != upload.nbytes:
                    raise UploadError(f"{what} changed size while it was read")
                mapping = mmap.mmap(fd, upload.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
        except BaseException:
            unlink(name)
            raise
        finally:
            os.close(src)
            unlink(upload.name)
        taken = OwnedSegment(name, upload.nbytes, mapping)
        try:
            taken.value = decode_body(memoryview(mapping))
        except MeshError as exc:
            raise UploadError(f"{what}: {exc}") from None
        return taken

    def adopt(self, upload: OwnedSegment, *, object_id: str | None = None) -> ObjectRef:
        """Keep an upload (``take_upload``) as an object; its segment becomes the object's.

        Raises like ``put``; the upload then still removes its segment when dropped.
        """
        oid = self._new_id(object_id)
        self._check_room(upload.nbytes)
        name = upload.name
        upload._kept()
        value = upload.value
        dtype, shape = _summary(value)
        size = upload.nbytes
        ref = ObjectRef(id=oid, holder=self.node_id, nbytes=size, dtype=dtype, shape=shape)
        entry = _Entry(value=value, chunks=[upload.buffer], size=size, ref=ref, segment=name)
        return self._keep(oid, entry)

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
        """The object's body (``mesh.protocol.codec`` format) as chunks to write in order, and
        its size.

        Made once at ``put``; ``mesh.protocol.codec.loads`` of the joined chunks gives the value
        back.
        The chunks are read-only views: write them, never modify them.
        """
        entry = self._entry(ref_or_id)
        return list(entry.chunks), entry.size

    def segment(self, ref_or_id: ObjectRef | str) -> Segment | None:
        """The object's segment if it has one already (no I/O)."""
        entry = self._entry(ref_or_id)
        if entry.segment is None:
            return None
        return Segment(name=entry.segment, nbytes=entry.size)

    async def share(self, ref_or_id: ObjectRef | str) -> Segment | None:
        """The segment that holds the object's body, written (in a thread) on first use.

        None for objects under ``segment_min_bytes``: a socket copies them for less. Raises
        ``ObjectNotFoundError`` if the object is not held, or is released meanwhile.
        """
        entry = self._entry(ref_or_id)
        if entry.segment is None:
            if entry.size < self.segment_min_bytes:
                return None
            if entry.writing is None:
                entry.writing = asyncio.ensure_future(self._write_segment(entry))
            try:
                await asyncio.shield(entry.writing)
            except OSError:
                return None  # no room in shared memory: the bytes still go by socket
        if entry.segment is None or self._objects.get(entry.ref.id) is not entry:
            raise ObjectNotFoundError(entry.ref.id, self.node_id)
        return Segment(name=entry.segment, nbytes=entry.size)

    def _held(self, entry: _Entry) -> bool:
        return not self._closed and self._objects.get(entry.ref.id) is entry

    async def _write_segment(self, entry: _Entry) -> None:
        name = f"{self.prefix}{next(self._names)}"

        def write() -> mmap.mmap:
            mapping = _write(name, entry.chunks, entry.size)
            if not self._held(entry):
                unlink(name)  # released or closed while the copy ran
            return mapping

        try:
            mapping = await asyncio.to_thread(write)
        finally:
            entry.writing = None
        if not self._held(entry):
            unlink(name)
            raise ObjectNotFoundError(entry.ref.id, self.node_id)
        # From now on the segment is the only copy: the value and what is served are views
        # of it, and the memory the object came in can be given back.
        entry.value = decode_body(memoryview(mapping))
        entry.chunks = [memoryview(mapping)]
        entry.segment = name

    def new_segment(self, nbytes: int) -> OwnedSegment:
        """A fresh, writable segment under this store's prefix (for a fetched argument).

        Not counted against the limit: it lives as long as the task that reads it.
        """
        if self._closed:
            raise LocalProtocolError("the object store is closed")
        name = f"{self.prefix}{next(self._names)}"
        return OwnedSegment(name, nbytes, _create(name, nbytes))

    def release(self, ref_or_id: ObjectRef | str) -> bool:
        """Forget an object; False if it was not held (releasing twice is harmless)."""
        oid = ref_or_id.id if isinstance(ref_or_id, ObjectRef) else ref_or_id
        entry = self._objects.pop(oid, None)
        if entry is None:
            return False
        self._used -= entry.size
        if entry.segment is not None:
            # Cheap while the store still maps it: the pages go when the last mapping does.
            unlink(entry.segment)
            self._dispose(entry)
        return True

    def _dispose(self, entry: _Entry) -> None:
        """Drop the last references to a large object in a thread.

        Unmapping and freeing tens of MiB of pages takes milliseconds; on the event loop
        they would delay whatever comes next (the result this release makes room for).
        """
        if self._closed:
            return
        if self._reaper is None:
            self._reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-store")
        box = [entry]
        del entry
        self._reaper.submit(box.clear)

    def close(self) -> None:
        """Release everything and remove every segment this store made."""
        for oid in list(self._objects):
            self.release(oid)
        self._closed = True
        if self._reaper is not None:
            self._reaper.shutdown(wait=True)
        try:
            names = os.listdir(SHM_DIR)
        except OSError:
            return
        for name in names:
            if name.startswith(self.prefix):
                unlink(name)
