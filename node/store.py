"""The local object store: results that stay on the node that made them.

A result larger than ``NodeConfig.store_threshold_bytes`` is put here and its submitter gets
an ``ObjectRef`` naming this node as holder; a task whose arguments are references fetches
them from the holder, so work can move to the data instead of the data to the submitter.

Each object is encoded once, when it is put (``mesh.protocol.codec.encode_body``, which does
not copy arrays), and the same chunks serve every fetch. Nothing is ever evicted behind a
reference's back: an object leaves only when ``release`` is called for it.

Memory is bounded by a target (``NodeConfig.store_memory_target_bytes``), not a wall: above
it the store writes its least recently used objects to a spill directory, one file each,
and reads one back (into shared memory again) the next time it is asked for, after making
room for it; a put fails with ``ObjectStoreFullError`` only when the spill directory cannot
take the bytes either. Spill files are written and read in the store's I/O threads, never
on the event loop: ``put``, ``adopt``, ``get``, ``encoded`` and ``share`` are coroutines
that return at once when no file is touched. One move (a spill or a read-back) runs per
object at a time, and whoever asks for an object that is being read back waits for that
read. A spill file is written under a temporary name and renamed when whole, and never
synced: it is a copy of memory that no restart reads. It goes with its object, and those
of dead processes go at start (``remove_orphan_spill``), like orphan segments.

Processes on the same machine share large objects through shared memory, as a plasma store
does: an object from ``segment_min_bytes`` on can live in a segment the store owns, a file
in ``/dev/shm`` named ``<store prefix><n>`` that other nodes' workers map read-only. A
client's upload is renamed into the store's names and becomes such a segment as it is
(``take_upload``) when nothing else holds the file (one name, no other open file: a write
lease can be had); an upload still held is copied in the kernel instead, because the
client could shrink its file under a mapping of it, which kills the reader with SIGBUS.
Either way no descriptor the client kept reaches the segment (a process of the same user
can open any segment by its name, as ever). Any other object gets
its segment written once, in a thread, the first time a process on this machine asks for it.
A segment whose name is handed to a process (``share`` with ``lend_s``, a fetch over HTTP)
spills for that long only when nothing else is left to, so the borrower finds it under that
name when it maps it; once mapped, a spill cannot take the pages from under it (see the
pool below). A borrower that finds the name gone asks again and takes the bytes (or, for a
worker, the task runs again), so a spill under pressure costs a copy, never the object.

A released object's segment is not removed but kept in a pool (``SegmentPool``) under a new
name and written again for a later object of about its size: fresh shared-memory pages cost
the kernel a zeroing per page, reused ones do not. Every mapping of an object segment holds
a shared ``flock`` on it (``mesh.runtime.shm.map_object``), and a pooled segment is written
again only once the pool can lock it exclusively, so never under a reader that still maps
the old object. Pooled segments count against the memory target, are given up first when
room is needed, and are removed when idle (``trim_pool``) or when the store closes; one may
instead be given back to a client that uploaded, for its next upload. Segments of processes
that died (a node killed with SIGKILL, its workers), and uploads and given-back files no one
took, are removed by ``remove_orphan_segments``, which the daemon runs at start and then
on a timer.

The daemon serves ``encoded`` chunks or segment names over HTTP and decides what to put and
when to release; the store touches no socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import itertools
import mmap
import os
import re
import secrets
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np
import psutil

from mesh.config import NodeConfig
from mesh.errors import (
    LocalProtocolError,
    MeshError,
    ObjectLostError,
    ObjectStoreFullError,
    RemoteProtocolError,
    SpillReadError,
    TaskLostError,
)
from mesh.protocol.codec import Chunks, decode_body, encode_body
from mesh.protocol.messages import NodeId, ObjectRef, Segment, Wire, field_names
from mesh.runtime.shm import (
    OBJECT_PREFIX,
    RETURN_PREFIX,
    SHM_DIR,
    UPLOAD_PREFIX,
    held_by_none_else,
    open_exact,
    unlink,
    unmapped,
    write_chunks,
)

_LIMIT_SHARE: Final = 4
"""With no configured limit the store may take 1/_LIMIT_SHARE of the machine's memory."""

_MAP_POPULATE: Final[int] = getattr(mmap, "MAP_POPULATE", 0)
_OWNER: Final = re.compile(r"mesh-(?:obj-)?([0-9]{1,10})-")
"""A segment's owner: an object store (``OBJECT_PREFIX``) or an executor (``mesh-<pid>-``)."""
_UPLOAD: Final = re.compile(re.escape(UPLOAD_PREFIX) + r"[0-9a-f]{24}")
_RETURN: Final = re.compile(re.escape(RETURN_PREFIX) + r"[0-9a-f]{24}")
_MAX_UPLOAD: Final = 64 * 1024 * 1024 * 1024
SPILL_PREFIX: Final = "mesh-spill-"
"""Names of spill files: ``mesh-spill-<pid>-<token>-<object id>``."""
_SPILL_OWNER: Final = re.compile(re.escape(SPILL_PREFIX) + r"([0-9]{1,10})-")
_GIVEN_KEPT: Final = 64
"""Files given back to clients that the store remembers (to remove on close)."""
_POOL_SLACK: Final = 4
"""A pooled segment is reused for an object within 1/_POOL_SLACK of its size."""
LEND_S: Final = 30.0
"""How long a segment whose name went to a fetcher (``share``) stays from spilling: the
fetcher maps it within moments of the answer, and once mapped it needs the name no more."""
_IO_THREADS: Final = 2
"""Threads that write and read spill files: a spill and a read-back can overlap."""
_PART: Final = ".part"
"""The suffix of a spill file still being written."""


class ObjectNotFoundError(ObjectLostError):
    """The store does not hold the object asked for (never put, or released)."""

    def __init__(self, object_id: str, holder: str) -> None:
        TaskLostError.__init__(
            self, f"object {object_id} is not held by {holder}: it was released or never stored"
        )
        self.ref = object_id
        self.holder = holder


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
    ``upload_max_age_s`` belongs to a client that died before submitting it; a file given
    back to a client (``RETURN_PREFIX``) that long ago goes too (at worst the client then
    writes its next upload into a new file).
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
        elif _UPLOAD.fullmatch(name) or _RETURN.fullmatch(name):
            given = name.startswith(RETURN_PREFIX)
            try:
                st = os.lstat(_path(name))
            except OSError:
                continue
            # An upload is as old as its last write; a file given back, as old as the
            # rename that gave it back (its change time), however long ago it was written.
            if now - (st.st_ctime if given else st.st_mtime) < upload_max_age_s:
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


def _adopt_in_place(fd: int, nbytes: int) -> mmap.mmap | None:
    """The store's mapping of upload ``fd`` as it is, if nothing but ``fd`` holds the file
    (``held_by_none_else``) and nothing locks it; None if it must be copied instead."""
    if not held_by_none_else(fd):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)


def _rename_or_unlink(name: str, new: str) -> bool:
    """Rename segment ``name`` to ``new``; if that fails, remove it. Whether it was renamed."""
    try:
        os.rename(_path(name), _path(new))
    except OSError:
        unlink(name)
        return False
    return True


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


def default_spill_dir() -> Path:
    """Where objects spill when no directory is configured: this user's cache directory
    (``$XDG_CACHE_HOME/mesh/spill``, by default ``~/.cache/mesh/spill``), on disk."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mesh" / "spill"


def remove_orphan_spill(spill_dir: str | os.PathLike[str]) -> int:
    """Remove the spill files of processes that are gone from ``spill_dir``; how many.

    A spill file names its store's process (``mesh-spill-<pid>-``): a node killed with
    SIGKILL leaves its files behind, and nothing can read them any more.
    """
    try:
        names = os.listdir(spill_dir)
    except OSError:
        return 0
    removed = 0
    for name in names:
        owner = _SPILL_OWNER.match(name)
        if owner is None:
            continue
        pid = int(owner.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            os.unlink(os.path.join(spill_dir, name))
        except OSError:
            continue
        removed += 1
    return removed


def _write_spill(path: Path, chunks: Chunks) -> None:
    """Write a spill file (blocking): under a temporary name, renamed when whole, so that a
    file cut short by a crash is never read. Not synced: nothing reads it after a crash."""
    part = path.with_name(path.name + _PART)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_chunks(fd, chunks)
        finally:
            os.close(fd)
        os.rename(part, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise


# ---------------------------------------------------------------------------------------
# Segments written again
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pooled:
    name: str
    size: int
    since: float


class SegmentPool:
    """Segment files that no object uses any more, kept to be written again.

    ``give`` takes a segment (already renamed away from its object's name), ``take`` hands
    back one of about the size asked for that nothing maps any more (``shm.unmapped``),
    opened for writing and cut or grown to the exact size. Thread-safe: segments are given
    from the store's disposal thread and taken from upload threads.
    """

    def __init__(self) -> None:
        self._free: list[_Pooled] = []
        self._bytes = 0
        self._lock = threading.Lock()
        self.reused = 0
        """Segments handed out again (not made anew)."""
        self.busy = 0
        """Times a pooled segment of the right size was still mapped by some reader."""

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._free)

    def names(self) -> set[str]:
        with self._lock:
            return {p.name for p in self._free}

    def give(self, name: str, size: int) -> None:
        with self._lock:
            self._free.append(_Pooled(name, size, time.monotonic()))
            self._bytes += size

    def take(self, size: int) -> tuple[str, int] | None:
        """A pooled segment for ``size`` bytes, as (name, descriptor open for reading and
        writing, file of exactly ``size`` bytes); None if none fits or all are mapped."""
        with self._lock:
            fits = sorted(
                (p for p in self._free if abs(p.size - size) <= size // _POOL_SLACK),
                key=lambda p: abs(p.size - size),
            )
            for pooled in fits:
                try:
                    fd = os.open(_path(pooled.name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    self._drop(pooled)  # removed behind the pool's back
                    continue
                try:
                    if not unmapped(fd):
                        os.close(fd)
                        self.busy += 1
                        continue  # a reader still maps the old object: try it next time
                    if pooled.size != size:
                        os.ftruncate(fd, size)
                except OSError:
                    os.close(fd)
                    self._drop(pooled)
                    unlink(pooled.name)
                    continue
                self._drop(pooled)
                self.reused += 1
                return pooled.name, fd
        return None

    def _drop(self, pooled: _Pooled) -> None:
        self._free.remove(pooled)
        self._bytes -= pooled.size

    def trim(self, *, keep_bytes: int = 0, idle_s: float | None = None) -> int:
        """Remove pooled segments, oldest first, until at most ``keep_bytes`` are pooled;
        with ``idle_s``, only those pooled for longer than that. The bytes removed."""
        removed = 0
        now = time.monotonic()
        with self._lock:
            for pooled in list(self._free):
                if self._bytes <= keep_bytes:
                    break
                if idle_s is not None and now - pooled.since <= idle_s:
                    continue
                self._drop(pooled)
                unlink(pooled.name)
                removed += pooled.size
        return removed


def _map_read(fd: int, size: int) -> mmap.mmap:
    """The store's own read-only mapping of segment ``fd``, which holds a shared lock like any
    reader's (so the segment is not written again while the store's views live)."""
    fcntl.flock(fd, fcntl.LOCK_SH)
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)


@dataclass(slots=True, eq=False)
class _Entry:
    value: Any
    chunks: Chunks
    size: int
    ref: ObjectRef
    segment: str | None = None
    writing: asyncio.Future[None] | None = field(default=None, repr=False)
    used: int = 0
    """When it was last asked for (the store's tick): the least recently used spill first."""
    spilled: bool = False
    """In its spill file, not in memory (``value`` None, ``chunks`` empty)."""
    spill: int = 0
    """Its spill file's number, once it has one."""
    pins: int = 0
    """Tasks of this node whose worker maps its segment: it does not spill meanwhile."""
    lent_until: float = 0.0
    """Its segment's name was handed out (``share``): until this (``time.monotonic``) it
    spills only when no object that is not lent is left to."""
    moving: asyncio.Task[MeshError | None] | None = field(default=None, repr=False)
    """The spill (when in memory) or read-back (when spilled) under way, which gives the
    error that stopped it, if any."""

    def spillable(self) -> bool:
        return not (self.spilled or self.moving or self.writing or self.pins)


class ObjectStore:
    """Objects held by node ``node_id``; about ``target_bytes`` of them (encoded size) in
    memory, the least recently used beyond that in ``spill_dir``.

    ``spill_limit_bytes`` caps the bytes in ``spill_dir`` (None: as much as the disk takes,
    0: nothing spills and the target is a limit). Objects from ``segment_min_bytes`` on are
    shared with processes on this machine through segments named ``prefix`` + a counter;
    ``close`` removes them all, and every spill file.
    """

    def __init__(
        self,
        node_id: NodeId,
        target_bytes: int,
        *,
        segment_min_bytes: int = 1024 * 1024,
        spill_dir: str | os.PathLike[str] | None = None,
        spill_limit_bytes: int | None = None,
    ) -> None:
        if target_bytes < 0:
            raise LocalProtocolError(
                f"store memory target must not be negative, got {target_bytes}"
            )
        self.node_id = node_id
        self.target_bytes = target_bytes
        self.segment_min_bytes = segment_min_bytes
        self.spill_dir = Path(spill_dir) if spill_dir is not None else default_spill_dir()
        self.spill_limit_bytes = spill_limit_bytes
        token = secrets.token_hex(4)
        self.prefix = f"{OBJECT_PREFIX}{os.getpid()}-{token}-"
        self.spill_prefix = f"{SPILL_PREFIX}{os.getpid()}-{token}-"
        self.pool = SegmentPool()
        self._names = itertools.count(1)
        self._ticks = itertools.count(1)
        self._objects: dict[str, _Entry] = {}
        self._used = 0
        self._spilled = 0
        self._leaving = 0
        """Bytes in memory that are being spilled (counted in ``_used`` until written)."""
        self._arriving = 0
        """Bytes being read back (counted in ``_spilled`` until read): room kept for them."""
        self._io: ThreadPoolExecutor | None = None
        self.spills = 0
        """Objects written to the spill directory."""
        self.readbacks = 0
        """Spilled objects read back into memory."""
        self._closed = False
        self._reaper: ThreadPoolExecutor | None = None
        self._given: collections.deque[str] = collections.deque(maxlen=_GIVEN_KEPT)
        """Files last given back to clients (``take_upload``), removed on close if not taken."""
        self._fresh = ""
        """The last file made to give back (``_give_back``)."""
        self._making = False
        self._giving = threading.Lock()

    @classmethod
    def from_config(cls, node_id: NodeId, config: NodeConfig) -> ObjectStore:
        target = config.store_memory_target_bytes
        return cls(
            node_id,
            default_limit() if target is None else target,
            segment_min_bytes=config.store_segment_min_bytes,
            spill_dir=config.store_spill_dir,
            spill_limit_bytes=config.store_spill_limit_bytes,
        )

    @property
    def used_bytes(self) -> int:
        """Bytes of objects in memory (spilled ones not included)."""
        return self._used

    @property
    def spilled_bytes(self) -> int:
        """Bytes of objects in spill files."""
        return self._spilled

    @property
    def spilled_objects(self) -> int:
        return sum(1 for e in self._objects.values() if e.spilled)

    @property
    def free_bytes(self) -> int:
        """Room in memory before the next put spills something."""
        return max(0, self.target_bytes - self._taken() - self.pool.nbytes)

    def _taken(self) -> int:
        """Bytes of memory spoken for: in memory and staying, or on their way back."""
        return self._used - self._leaving + self._arriving

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

    async def _keep(self, oid: str, entry: _Entry) -> ObjectRef:
        """Hold ``entry``, spilling what it takes to stay within the memory target; if
        even that fails, hold nothing new and raise ``ObjectStoreFullError``."""
        entry.used = next(self._ticks)
        self._objects[oid] = entry
        self._used += entry.size
        try:
            if entry.size > self.target_bytes:  # never fits in memory: straight to disk
                error = await asyncio.shield(self._start_spill(entry))
                if error is not None:
                    raise error
            await self._make_room(keep=entry)
        except BaseException:
            if self._objects.get(oid) is entry:
                self._forget(oid)
            raise
        return entry.ref

    # -- memory target and spill -----------------------------------------------------------

    async def _make_room(self, keep: _Entry | None = None) -> None:
        """Spill until what memory is spoken for fits the target (``_fit``), waiting for
        those spills; raises the ``ObjectStoreFullError`` of one that failed. A spill given
        up (its object was lent or pinned meanwhile) is made up for by the next one."""
        while spills := self._fit(keep):
            errors = await asyncio.gather(*(asyncio.shield(s) for s in spills))
            for error in errors:
                if error is not None:
                    raise error

    def _fit(self, keep: _Entry | None = None) -> list[asyncio.Task[MeshError | None]]:
        """Start what makes the objects in memory and the pool fit the target: pooled
        segments go first, then the least recently used objects start to spill (never
        ``keep``); the spills started. Raises ``ObjectStoreFullError`` if the spill cap
        cannot take them (those started already go on)."""
        over = self._taken() + self.pool.nbytes - self.target_bytes
        if over <= 0:
            return []
        self.pool.trim(keep_bytes=max(0, self.pool.nbytes - over))
        over = self._taken() - self.target_bytes
        now = time.monotonic()
        candidates = sorted(
            (e for e in self._objects.values() if e.spillable() and e is not keep),
            key=lambda e: (e.lent_until > now, e.used),  # lent ones last
        )
        started: list[asyncio.Task[MeshError | None]] = []
        for entry in candidates:
            if over <= 0:
                break
            started.append(self._start_spill(entry))
            over -= entry.size
        return started

    def _spill_path(self, entry: _Entry) -> Path:
        return self.spill_dir / f"{self.spill_prefix}{entry.spill}"

    def _full(self, entry: _Entry, why: str) -> ObjectStoreFullError:
        return ObjectStoreFullError(
            f"object store full: the memory target of {self.target_bytes} bytes is reached"
            f" and the spill directory {self.spill_dir} cannot take {entry.size} bytes"
            f" more: {why}",
            needed=entry.size,
        )

    def _in_thread(self, job: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``job`` in one of the store's I/O threads."""
        if self._io is None:
            self._io = ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="mesh-spill")
        return asyncio.get_running_loop().run_in_executor(self._io, job)

    def _start_spill(self, entry: _Entry) -> asyncio.Task[MeshError | None]:
        """Start writing ``entry`` to its spill file (``_spill``); raises
        ``ObjectStoreFullError`` at once if the spill cap cannot take it."""
        limit = self.spill_limit_bytes
        if limit is not None and self._spilled + self._leaving + entry.size > limit:
            why = "spilling is off" if limit == 0 else f"the spill cap of {limit} bytes is reached"
            raise self._full(entry, why)
        entry.spill = next(self._names)
        self._leaving += entry.size
        entry.moving = asyncio.get_running_loop().create_task(self._spill(entry))
        return entry.moving

    async def _spill(self, entry: _Entry) -> MeshError | None:
        """Write ``entry`` to its spill file in a thread, then let go of its memory unless
        it was released, lent, pinned or shared meanwhile (then the file goes again). The error
        that stopped it, if any: an ``ObjectStoreFullError`` naming why."""
        path = self._spill_path(entry)
        lent, segment = entry.lent_until, entry.segment
        try:
            await self._in_thread(partial(_write_spill, path, list(entry.chunks)))
        except OSError as exc:
            return self._full(entry, exc.strerror or str(exc))
        finally:
            entry.moving = None
            self._leaving -= entry.size
        if (
            not self._held(entry)
            or not entry.spillable()
            or entry.lent_until > lent
            # A segment written meanwhile, for a reader that may not have said it borrows
            # it yet (a lend is marked once the segment is whole).
            or entry.segment != segment
        ):
            self._remove_spill(path)
            return None
        self._let_go(entry)
        entry.value = None
        entry.chunks = []
        entry.spilled = True
        self._used -= entry.size
        self._spilled += entry.size
        self.spills += 1
        return None

    @staticmethod
    def _remove_spill(path: Path) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)

    async def _load(self, entry: _Entry) -> None:
        """Make sure ``entry`` is in memory: read it back if it is spilled (``_read_back``,
        one read however many ask), waiting for its spill first if that is under way.
        Raises ``SpillReadError`` if its file cannot be read (the object is then
        forgotten), ``ObjectNotFoundError`` if it is released meanwhile."""
        entry.used = next(self._ticks)
        while True:
            if not self._held(entry):
                raise ObjectNotFoundError(entry.ref.id, self.node_id)
            if not entry.spilled:
                return  # in memory, even if a spill of it is under way
            if entry.moving is None:
                entry.moving = asyncio.get_running_loop().create_task(self._read_back(entry))
            error = await asyncio.shield(entry.moving)
            if error is not None:
                raise error

    async def _read_back(self, entry: _Entry) -> MeshError | None:
        """Make room for spilled ``entry``, then read it back in a thread (into a segment,
        pooled if one fits); the error that stopped it, if any.

        If no room can be made (the spill directory is full, this object's own file still
        in it), the object comes back all the same, and room is made once its file is gone:
        with memory and disk both full, a read-back trades places with the least recently
        used object. A read never fails for want of room.
        """
        size = entry.size
        path = self._spill_path(entry)
        self._arriving += size
        cramped = False
        try:
            try:
                await self._make_room(keep=entry)
            except ObjectStoreFullError:
                cramped = True
            await self._settled()  # what made room is in the pool: no fresh pages to fault
            try:
                read = await self._in_thread(partial(self._read_spill, path, size))
            except (OSError, MeshError) as exc:
                if not self._held(entry):  # released meanwhile, its file with it
                    return ObjectNotFoundError(entry.ref.id, self.node_id)
                self.release(entry.ref.id)
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                return SpillReadError(entry.ref.id, self.node_id, str(path), why)
        finally:
            entry.moving = None
            self._arriving -= size
        value, chunks, segment = read
        if not self._held(entry):
            if segment is not None:
                unlink(segment)
            return ObjectNotFoundError(entry.ref.id, self.node_id)
        entry.value, entry.chunks, entry.segment = value, chunks, segment
        entry.spilled = False
        self._spilled -= size
        self._used += size
        self.readbacks += 1
        if cramped:
            with contextlib.suppress(ObjectStoreFullError):
                await self._make_room(keep=entry)
        return None

    def _read_spill(self, path: Path, size: int) -> tuple[Any, Chunks, str | None]:
        """Read a spill file (blocking), then remove it: (value, chunks, segment name)."""
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(src).st_size != size:
                raise OSError(
                    errno.EIO, f"the file holds {os.fstat(src).st_size} bytes, not {size}"
                )
            if size < self.segment_min_bytes:
                data = bytearray(size)
                if os.preadv(src, [data], 0) != size:
                    raise OSError(errno.EIO, "the file was cut short")
                read: tuple[Any, Chunks, str | None] = (
                    decode_body(memoryview(data)),
                    [memoryview(data)],
                    None,
                )
            else:
                name, fd = self._segment_fd(size)
                try:
                    if _copy_exact(src, fd, size) != size:
                        raise OSError(errno.EIO, "the file was cut short")
                    mapping = _map_read(fd, size)
                    read = decode_body(memoryview(mapping)), [memoryview(mapping)], name
                except BaseException:
                    unlink(name)
                    raise
                finally:
                    os.close(fd)
        finally:
            os.close(src)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return read

    def _segment_fd(self, size: int) -> tuple[str, int]:
        """A segment for ``size`` bytes to write, pooled if one fits: (name, descriptor)."""
        taken = self.pool.take(size)
        if taken is not None:
            return taken
        name = f"{self.prefix}{next(self._names)}"
        fd = os.open(_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            unlink(name)
            raise
        return name, fd

    # -- putting ---------------------------------------------------------------------------

    async def put(self, value: Any, *, object_id: str | None = None) -> ObjectRef:
        """Keep ``value`` and return a reference to it.

        ``object_id`` names the object (a task id, say); by default a fresh random id. Above
        the memory target the least recently used objects spill to disk first; raises
        ``ObjectStoreFullError`` if they cannot (nothing is lost then),
        ``LocalProtocolError`` if ``value`` cannot be encoded or ``object_id`` is already
        held.
        """
        oid = self._new_id(object_id)
        chunks, size = encode_body(value)
        dtype, shape = _summary(value)
        ref = ObjectRef(id=oid, holder=self.node_id, nbytes=size, dtype=dtype, shape=shape)
        return await self._keep(oid, _Entry(value=value, chunks=chunks, size=size, ref=ref))

    def take_upload(self, upload: Segment) -> OwnedSegment:
        """Take a same-machine client's upload over as a segment of this store and decode it.

        Blocking (a copy of the whole body at worst): call it in a thread. The upload is
        renamed into this store's names first, so the client can no longer open it by the
        name it knows, then opened by ``mesh.runtime.shm.open_exact`` (no link, no FIFO,
        this user's, the announced size). If nothing else holds the file
        (``mesh.runtime.shm.held_by_none_else``: one name, no other open file, so no
        descriptor the client kept) it becomes the store's segment as it is, and a pooled
        segment of about its size, if one is free, is given back to the client
        (``RETURN_PREFIX`` + the upload's digits) for its next upload. Otherwise it is copied
        in the kernel, never mapped (a client that still holds it could shrink it under the
        mapping, which kills the reader with SIGBUS), and the client's file is what is given
        back. Raises ``UploadError`` naming the upload (whose file is then removed),
        ``LocalProtocolError`` if the store is closed.
        """
        if self._closed:
            raise LocalProtocolError("the object store is closed")
        what = f"shared-memory upload {upload.name}"
        if not _UPLOAD.fullmatch(upload.name) or not 0 < upload.nbytes <= _MAX_UPLOAD:
            raise UploadError(f"bad shared-memory upload {upload.name!r}")
        try:
            st = os.lstat(_path(upload.name))
        except FileNotFoundError:
            raise UploadError(f"{what} not found: is the client on this machine?") from None
        if not stat.S_ISREG(st.st_mode):
            unlink(upload.name)
            raise UploadError(f"{what} is not a regular file")
        if st.st_uid not in (os.geteuid(), 0):
            raise UploadError(f"{what} belongs to another user")
        name = f"{self.prefix}{next(self._names)}"
        try:
            os.rename(_path(upload.name), _path(name))
        except FileNotFoundError:
            raise UploadError(f"{what} not found: is the client on this machine?") from None
        except PermissionError:
            raise UploadError(f"{what} belongs to another user") from None
        except OSError as exc:
            raise UploadError(f"{what} cannot be taken: {exc.strerror}") from None
        try:
            src = open_exact(_path(name), upload.nbytes, what=what)
        except FileNotFoundError:
            raise UploadError(f"{what} not found: is the client on this machine?") from None
        except (PermissionError, RemoteProtocolError) as exc:
            unlink(name)
            raise UploadError(
                f"{what} belongs to another user" if isinstance(exc, PermissionError) else str(exc)
            ) from None
        back = f"{RETURN_PREFIX}{upload.name.removeprefix(UPLOAD_PREFIX)}"
        try:
            mapping = _adopt_in_place(src, upload.nbytes)
            if mapping is not None:
                self._give_back(back, upload.nbytes)
            else:
                copy, mapping = self._copy_upload(src, upload.nbytes, what)
                if _rename_or_unlink(name, back):  # the client's own file, for its next upload
                    self._given.append(back)
                name = copy
        except BaseException:
            unlink(name)
            raise
        finally:
            os.close(src)
        taken = OwnedSegment(name, upload.nbytes, mapping)
        try:
            taken.value = decode_body(memoryview(mapping))
        except MeshError as exc:
            raise UploadError(f"{what}: {exc}") from None
        return taken

    def _copy_upload(self, src: int, nbytes: int, what: str) -> tuple[str, mmap.mmap]:
        """Copy upload ``src`` into a segment of this store: (its name, the store's mapping)."""
        name, fd = self._segment_fd(nbytes)
        try:
            if _copy_exact(src, fd, nbytes) != nbytes:
                raise UploadError(f"{what} changed size while it was read")
            return name, _map_read(fd, nbytes)
        except BaseException:
            unlink(name)
            raise
        finally:
            os.close(fd)

    def _give_back(self, back: str, nbytes: int) -> None:
        """Give the client a file of about ``nbytes`` as ``back`` for its next upload, whose
        pages are then in place already (fresh ones cost the writer as much again as the
        copy): a pooled segment if one is free; if none is, one made in the background, at
        most one of those waiting to be taken, and only within the memory target."""
        taken = self.pool.take(nbytes)
        if taken is not None:
            pooled, fd = taken
            os.close(fd)
            if _rename_or_unlink(pooled, back):
                self._given.append(back)
            return
        with self._giving:
            waiting = self._fresh and os.path.lexists(_path(self._fresh))
            if self._closed or self._making or waiting or nbytes > self.free_bytes:
                return
            self._making = True
            self._fresh = back
        self._background(partial(self._make_given, back, nbytes))

    def _make_given(self, back: str, nbytes: int) -> None:
        """Make ``back`` with its pages in place: a file with no name until it is whole."""
        try:
            fd = os.open(SHM_DIR, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, nbytes)
                shm = os.open(SHM_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:  # a directory descriptor makes it linkat, which follows the /proc link
                    os.link(f"/proc/self/fd/{fd}", back, dst_dir_fd=shm, follow_symlinks=True)
                finally:
                    os.close(shm)
            finally:
                os.close(fd)
            self._given.append(back)
        except OSError:
            pass  # no file to give (O_TMPFILE unsupported, no room): the client makes one
        finally:
            with self._giving:
                self._making = False

    def _background(self, job: Callable[[], None]) -> None:
        """Run ``job`` in the store's thread (one, so jobs run in order)."""
        with self._giving:
            if self._reaper is None:
                self._reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-store")
            reaper = self._reaper
        reaper.submit(job)

    async def _settled(self) -> None:
        """Wait until the store's thread has run every job given it so far (segments let go
        are in the pool by then)."""
        if self._reaper is not None:
            await asyncio.wrap_future(self._reaper.submit(lambda: None))

    async def adopt(self, upload: OwnedSegment, *, object_id: str | None = None) -> ObjectRef:
        """Keep an upload (``take_upload``) as an object; its segment becomes the object's.

        Raises like ``put``; the segment is then the store's all the same, and pooled.
        """
        oid = self._new_id(object_id)
        value = upload.value
        dtype, shape = _summary(value)
        size = upload.nbytes
        ref = ObjectRef(id=oid, holder=self.node_id, nbytes=size, dtype=dtype, shape=shape)
        entry = _Entry(value=value, chunks=[upload.buffer], size=size, ref=ref, segment=upload.name)
        upload._kept()
        return await self._keep(oid, entry)

    # -- reading ---------------------------------------------------------------------------

    def _entry(self, ref_or_id: ObjectRef | str) -> _Entry:
        oid = ref_or_id.id if isinstance(ref_or_id, ObjectRef) else ref_or_id
        entry = self._objects.get(oid)
        if entry is None:
            raise ObjectNotFoundError(oid, self.node_id)
        return entry

    async def get(self, ref_or_id: ObjectRef | str) -> Any:
        """The stored value (read back if it was spilled); raises ``ObjectNotFoundError`` if
        it is not held here, ``SpillReadError`` if its spill file cannot be read."""
        entry = self._entry(ref_or_id)
        await self._load(entry)
        return entry.value

    def ref(self, object_id: str) -> ObjectRef:
        """The reference of a held object."""
        return self._entry(object_id).ref

    def pin(self, object_id: str) -> bool:
        """Keep a held object in memory until ``unpin``; False if it is not held."""
        entry = self._objects.get(object_id)
        if entry is None:
            return False
        entry.pins += 1
        return True

    def unpin(self, object_id: str) -> None:
        entry = self._objects.get(object_id)
        if entry is not None and entry.pins > 0:
            entry.pins -= 1

    def is_spilled(self, object_id: str) -> bool:
        return self._entry(object_id).spilled

    async def encoded(self, ref_or_id: ObjectRef | str) -> tuple[Chunks, int]:
        """The object's body (``mesh.protocol.codec`` format) as chunks to write in order, and
        its size; a spilled object is read back first.

        Made once at ``put``; ``mesh.protocol.codec.loads`` of the joined chunks gives the value
        back.
        The chunks are read-only views: write them, never modify them.
        """
        entry = self._entry(ref_or_id)
        await self._load(entry)
        return list(entry.chunks), entry.size

    def segment(self, ref_or_id: ObjectRef | str) -> Segment | None:
        """The object's segment if it has one already (no I/O)."""
        entry = self._entry(ref_or_id)
        if entry.segment is None:
            return None
        return Segment(name=entry.segment, nbytes=entry.size)

    async def share(self, ref_or_id: ObjectRef | str, *, lend_s: float = 0.0) -> Segment | None:
        """The segment that holds the object's body, written (in a thread) on first use; a
        spilled object is read back into one.

        ``lend_s``: its name is handed to another process, which maps it within that many
        seconds; until then the object spills only when no object that is not lent is left
        to (its segment would leave that name).
        None for objects under ``segment_min_bytes``: a socket copies them for less. Raises
        ``ObjectNotFoundError`` if the object is not held, or is released meanwhile.
        """
        entry = self._entry(ref_or_id)
        while True:
            await self._load(entry)
            if entry.segment is not None:
                break
            if entry.size < self.segment_min_bytes:
                return None
            if entry.writing is None:
                entry.writing = asyncio.ensure_future(self._write_segment(entry))
            try:
                await asyncio.shield(entry.writing)
            except OSError:
                return None  # no room in shared memory: the bytes still go by socket
            # Spilled meanwhile (its segment gone with it) or released: load says which.
        entry.lent_until = max(entry.lent_until, time.monotonic() + lend_s)
        return Segment(name=entry.segment, nbytes=entry.size)

    def _held(self, entry: _Entry) -> bool:
        return not self._closed and self._objects.get(entry.ref.id) is entry

    async def _write_segment(self, entry: _Entry) -> None:
        def write() -> tuple[str, mmap.mmap]:
            name, fd = self._segment_fd(entry.size)
            try:
                write_chunks(fd, entry.chunks)
                mapping = _map_read(fd, entry.size)
            except BaseException:
                unlink(name)
                raise
            finally:
                os.close(fd)
            if not self._held(entry):
                unlink(name)  # released or closed while the copy ran
            return name, mapping

        try:
            name, mapping = await asyncio.to_thread(write)
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

        Not counted against the memory target: it lives as long as the task that reads it.
        """
        if self._closed:
            raise LocalProtocolError("the object store is closed")
        name = f"{self.prefix}{next(self._names)}"
        return OwnedSegment(name, nbytes, _create(name, nbytes))

    # -- letting go ------------------------------------------------------------------------

    def release(self, ref_or_id: ObjectRef | str) -> bool:
        """Forget an object, its spill file too; False if it was not held (releasing twice
        is harmless)."""
        oid = ref_or_id.id if isinstance(ref_or_id, ObjectRef) else ref_or_id
        entry = self._objects.get(oid)
        if entry is None:
            return False
        if entry.spilled:
            self._remove_spill(self._spill_path(entry))
        self._forget(oid)
        return True

    def _forget(self, oid: str) -> None:
        entry = self._objects.pop(oid)
        if entry.spilled:
            self._spilled -= entry.size
        else:
            self._used -= entry.size
            self._let_go(entry)

    def _let_go(self, entry: _Entry) -> None:
        """Drop the store's hold on ``entry``'s memory: its segment leaves its name at once
        (fetchers find it gone) and goes to the pool; the last references go in a thread."""
        segment, entry.segment = entry.segment, None
        if segment is None:
            return
        pooled = f"{self.prefix}{next(self._names)}"
        try:
            os.rename(_path(segment), _path(pooled))
        except OSError:
            unlink(segment)
            pooled = ""
        box = [entry.value, entry.chunks]
        entry.value = None
        entry.chunks = []
        self._dispose(box, pooled, entry.size)

    def _dispose(self, box: list[Any], pooled: str, size: int) -> None:
        """Drop the last references to a large object in a thread, then pool its segment.

        Unmapping and freeing tens of MiB of pages takes milliseconds; on the event loop
        they would delay whatever comes next (the result this release makes room for).
        """

        def drop() -> None:
            box.clear()
            if not pooled:
                return
            if self._closed:
                unlink(pooled)
            else:
                self.pool.give(pooled, size)

        if self._closed:
            drop()
            return
        self._background(drop)

    def trim_pool(self, idle_s: float) -> int:
        """Remove the pooled segments unused for ``idle_s``; the bytes removed."""
        return self.pool.trim(idle_s=idle_s)

    def close(self) -> None:
        """Release everything and remove every segment and spill file this store made."""
        for oid in list(self._objects):
            self.release(oid)
        self._closed = True
        if self._io is not None:
            self._io.shutdown(wait=True)  # spills under way end before their files go
        if self._reaper is not None:
            self._reaper.shutdown(wait=True)
        self.pool.trim()
        for name in list(self._given):
            unlink(name)
        try:
            names = os.listdir(SHM_DIR)
        except OSError:
            names = []
        for name in names:
            if name.startswith(self.prefix):
                unlink(name)
        try:
            spilled = os.listdir(self.spill_dir)
        except OSError:
            return
        for name in spilled:
            if name.startswith(self.spill_prefix):
                with contextlib.suppress(OSError):
                    os.unlink(self.spill_dir / name)
