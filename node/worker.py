"""The worker process that runs tasks for the executor, and the pipe protocol both ends speak.

A worker is started with ``python -m node.worker`` (never forked: the daemon runs threads),
inherits one end of a Unix socket pair, loads the task registry, says ``ready`` and then
runs one task at a time. It ends when the executor says ``stop`` or closes the socket.

Messages are msgpack bodies (``mesh.codec``), never pickle. Each travels as a frame::

    u8 kind | u64 length | payload

``INLINE`` frames carry the body itself. A body larger than the executor's threshold goes
through a shared-memory segment (a file in ``/dev/shm``) and the frame carries
``u64 size | name`` (``SEGMENT``); the reader maps the segment and decodes arrays as views of
the mapping, with no copy.

- Arguments: each worker has one argument segment that the executor rewrites for every large
  call, because writing into pages that already exist is about twice as fast as having the
  kernel allocate fresh ones. After the task, the worker closes its mapping; if the task kept
  a view of its arguments (the mapping cannot close), the worker unlinks the segment so the
  executor makes a new one rather than overwrite pages still in use.
- Results: the worker writes a fresh segment per result; the executor maps it and unlinks it
  at once, so it lives exactly as long as the result's arrays.

- Shared objects: a call names the object-store segments it may map (``SharedArg``, sent
  as ``ShmArg``); the worker maps them read-only and decodes them in place, so an object
  held on this machine reaches the task with no copy at all. Their files belong to a store,
  which removes them when the object is released; the worker's mapping keeps the pages.

Every segment a worker makes starts with its worker's prefix, so the executor removes
whatever a dead worker left behind.

Calls are ``["run", seq, task_id, name, args, kwargs, shared_segment_names]``,
``["threads", n]`` (run what follows with ``n`` BLAS and torch threads; sent just before a
call when the count changed) and ``["stop"]``.

Replies are ``["ready", pid]`` once, then ``["done", seq, ok, value, error_type, message,
traceback, runtime_s]`` per task. A task's exception is caught here and reported; anything
that ends the process (``os._exit``, a signal, running out of memory) is seen by the
executor as the worker's death and fails only the task it was running.

This module may not import torch or other heavy libraries itself: tasks import what they need.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import inspect
import itertools
import mmap
import os
import socket
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

from mesh.codec import Buffer, Chunks, decode_body, encode_body
from mesh.errors import (
    LocalProtocolError,
    MeshError,
    ObjectLostError,
    RemoteProtocolError,
    TaskLostError,
)
from mesh.messages import NodeId, ShmArg
from mesh.shm import open_exact
from node.cores import THREAD_VARS
from tasks import Registry, TaskContext, running_as

HEADER: Final = struct.Struct("<BQ")
_SIZE: Final = struct.Struct("<Q")
_MAP_POPULATE: Final[int] = getattr(mmap, "MAP_POPULATE", 0)
INLINE: Final = 0
SEGMENT: Final = 1

SHM_DIR: Final = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
"""Where segments live: tmpfs on Linux, so they are memory, never disk."""

_MAX_NAME: Final = 255

OBJECT_SEGMENT_PREFIX: Final = "mesh-obj-"
"""Object-store segments (``mesh.client.SEGMENT_PREFIX``, not imported: a worker stays
without the HTTP client's imports). A worker maps nothing else it did not make itself."""
_MAX_ARG_DEPTH: Final = 8
"""How deep argument containers are searched for shared segments (as the daemon does)."""


# ---------------------------------------------------------------------------------------
# Shared-memory segments
# ---------------------------------------------------------------------------------------


def segment_path(name: str) -> str:
    if not name or len(name) > _MAX_NAME or "/" in name or name.startswith("."):
        raise RemoteProtocolError(f"bad segment name {name!r}", reason="bad-segment")
    return os.path.join(SHM_DIR, name)


def write_segment(name: str, chunks: Chunks, size: int, *, reuse: bool = False) -> None:
    """Write ``chunks`` back to back into segment ``name``, ``size`` bytes in all.

    ``reuse`` rewrites an existing segment in place (resizing it if needed); otherwise the
    segment must not exist yet.
    """
    path = segment_path(name)
    flags = os.O_RDWR | os.O_CREAT | (0 if reuse else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        write_chunks(fd, chunks)
    except BaseException:
        os.close(fd)
        unlink_quietly(name)
        raise
    os.close(fd)


def write_chunks(fd: int, chunks: Chunks) -> None:
    """Write ``chunks`` back to back from the start of the file ``fd``."""
    offset = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view.nbytes:
            written = os.pwrite(fd, view, offset)
            offset += written
            view = view[written:]


def map_segment(name: str, size: int, *, unlink: bool, populate: bool = False) -> mmap.mmap:
    """Map the first ``size`` bytes of segment ``name`` read-only.

    ``unlink`` removes the name at once (the mapping keeps the pages); ``populate`` maps every
    page up front, far cheaper than a fault per page when the reader will touch them all.
    """
    path = segment_path(name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise RemoteProtocolError(f"segment {name} does not exist", reason="bad-segment") from None
    try:
        if size <= 0 or os.fstat(fd).st_size < size:
            raise RemoteProtocolError(f"segment {name} is short", reason="bad-segment")
        flags = mmap.MAP_SHARED | (_MAP_POPULATE if populate else 0)
        return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
        if unlink:
            unlink_quietly(name)


class SegmentLostError(ObjectLostError):
    """An object segment a task should read is gone (its object was released) or closed."""

    def __init__(self, name: str, why: str) -> None:
        TaskLostError.__init__(self, f"object segment {name} cannot be read: {why}")
        self.ref = name
        self.holder = ""


def map_shared(name: str, nbytes: int) -> mmap.mmap:
    """Map object-store segment ``name``, which must hold exactly ``nbytes``, read-only.

    Raises ``ObjectLostError`` when it is gone (its object was released) or not readable,
    ``RemoteProtocolError`` for a name outside the store's prefix or a file of another size.
    """
    if not name.startswith(OBJECT_SEGMENT_PREFIX):
        raise RemoteProtocolError(f"{name!r} is not an object segment", reason="bad-segment")
    path = segment_path(name)
    try:
        fd = open_exact(path, nbytes, what=f"object segment {name}")
    except (FileNotFoundError, PermissionError) as exc:
        raise SegmentLostError(name, exc.strerror or "cannot open it") from None
    try:
        # The task reads its arguments whole: map every page in one call, not one fault each.
        flags = mmap.MAP_SHARED | _MAP_POPULATE
        return mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def unlink_quietly(name: str) -> None:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.unlink(os.path.join(SHM_DIR, name))


def remove_segments(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix``; returns how many."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix):
            unlink_quietly(name)
            removed += 1
    return removed


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


def decode_payload(kind: int, payload: Buffer) -> Any:
    """Decode one frame (the executor's side): result segments are unlinked once mapped."""
    if kind == INLINE:
        return decode_body(memoryview(payload).cast("B"))
    if kind == SEGMENT:
        name, size = parse_segment(payload)
        return decode_body(memoryview(map_segment(name, size, unlink=True)))
    raise RemoteProtocolError(f"unknown frame kind {kind}", reason="malformed")


# ---------------------------------------------------------------------------------------
# The worker side
# ---------------------------------------------------------------------------------------


class _Refused(importlib.abc.MetaPathFinder):
    """Refuses to import the modules of libraries this node runs without."""

    def __init__(self, modules: dict[str, str]) -> None:
        self.modules = modules

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        dist = self.modules.get(fullname.partition(".")[0])
        if dist is not None:
            raise ModuleNotFoundError(
                f"{fullname} is disabled on this node (it runs without {dist})", name=fullname
            )
        return None


def refuse_libraries(without: Sequence[str]) -> None:
    """Make importing the named distributions (and their top-level modules) fail."""
    if not without:
        return
    modules: dict[str, str] = {}
    wanted = {d.lower().replace("_", "-") for d in without}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            if dist.lower().replace("_", "-") in wanted:
                modules[module] = dist
    for dist in without:
        modules.setdefault(dist.replace("-", "_"), dist)
    sys.meta_path.insert(0, _Refused(modules))


class _Channel:
    """The worker's blocking end of the socket pair."""

    def __init__(self, sock: socket.socket, prefix: str, threshold: int) -> None:
        self.sock = sock
        self.prefix = prefix
        self.threshold = threshold
        self.counter = itertools.count()
        self.header = bytearray(HEADER.size)

    def _read_exactly(self, buf: memoryview) -> bool:
        while buf.nbytes:
            n = self.sock.recv_into(buf)
            if n == 0:
                return False
            buf = buf[n:]
        return True

    def recv(self) -> tuple[Any, tuple[str, mmap.mmap] | None] | None:
        """The next message and the argument segment it came in (if any); None at the end."""
        if not self._read_exactly(memoryview(self.header)):
            return None
        kind, length = HEADER.unpack(self.header)
        payload = bytearray(length)
        if not self._read_exactly(memoryview(payload)):
            return None
        if kind != SEGMENT:
            return decode_payload(kind, payload), None
        name, size = parse_segment(payload)
        # The task reads its arguments whole: map every page in one call, not one fault each.
        mapping = map_segment(name, size, unlink=False, populate=True)
        return decode_body(memoryview(mapping)), (name, mapping)

    def pack(self, value: Any) -> bytes:
        """Encode ``value`` for sending; a large body goes to a fresh result segment."""
        chunks, size = encode_body(value)
        if size <= self.threshold:
            return b"".join([HEADER.pack(INLINE, size), *chunks])
        name = f"{self.prefix}-r{next(self.counter)}"
        write_segment(name, chunks, size)
        return b"".join(segment_frame(name, size))


def release_segment(name: str, mapping: mmap.mmap) -> None:
    """Close an argument mapping; if a task still holds views of it, give the segment up."""
    try:
        mapping.close()
        return
    except BufferError:
        gc.collect()  # views caught in reference cycles (a traceback, say) go with a collection
    try:
        mapping.close()
    except BufferError:
        # The executor would overwrite pages a task still reads: make it create a new segment.
        unlink_quietly(name)


@dataclass(frozen=True, slots=True, eq=False)
class SharedArg:
    """An argument the worker maps from an object-store segment instead of receiving it.

    The executor sends it as a ``ShmArg`` and names it in the call's list of shared
    segments; only those are mapped, so a ``ShmArg`` that is a task's own data stays data.
    ``keep`` holds whatever must outlive the task for the segment to stay (an
    ``OwnedSegment`` that removes the file when dropped), or None for a holder's segment.
    """

    name: str
    nbytes: int
    keep: object = None


def attach_shared(value: Any, names: frozenset[str], depth: int = 0) -> Any:
    """``value`` with each ``ShmArg`` named in ``names`` replaced by the object it holds.

    Arrays are read-only views of the mapped segment. Raises ``ObjectLostError`` when a
    segment is gone (its object was released), ``RemoteProtocolError`` when it is not what
    it should be.
    """
    if isinstance(value, ShmArg) and value.name in names:
        return decode_body(memoryview(map_shared(value.name, value.nbytes)))
    if depth >= _MAX_ARG_DEPTH:
        return value
    if isinstance(value, list):
        return [attach_shared(v, names, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: attach_shared(v, names, depth + 1) for k, v in value.items()}
    return value


def set_threads(threads: int) -> None:
    """Run what follows with ``threads`` BLAS and torch threads.

    Libraries loaded later read the environment; torch, if a task imported it, is told
    directly; OpenBLAS, MKL and OpenMP already loaded are told through threadpoolctl where
    it is installed (scikit-learn brings it).
    """
    if threads < 1:
        raise LocalProtocolError(f"bad thread count {threads!r}")
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    set_num_threads = getattr(torch, "set_num_threads", None)
    if set_num_threads is not None:
        set_num_threads(threads)
    try:
        # Imported untyped (it ships no annotations), and only once a count changes.
        threadpoolctl: Any = importlib.import_module("threadpoolctl")
    except ImportError:
        return
    threadpoolctl.threadpool_limits(limits=threads)


def _run_one(registry: Registry, node_id: NodeId, msg: list[Any], held: list[Any]) -> list[Any]:
    _, seq, task_id, name, args, kwargs, shared = msg
    tdef = registry.get(name)
    if tdef is None:
        return ["done", seq, False, None, "UnknownTask", f"task {name} is not installed", "", 0.0]
    if shared:
        try:
            names = frozenset(shared)
            args = attach_shared(args, names)
            kwargs = attach_shared(kwargs, names)
            held.append((args, kwargs))
        except ObjectLostError as exc:
            return ["done", seq, False, None, "ObjectLostError", str(exc), "", 0.0]
        except MeshError as exc:
            return ["done", seq, False, None, type(exc).__name__, str(exc), "", 0.0]
    started = time.perf_counter()
    try:
        with running_as(TaskContext(node_id=node_id, task_id=task_id)):
            value = tdef.fn(*args, **kwargs)
            if inspect.iscoroutine(value):
                # An ``async def`` task gets an event loop of its own for the one call.
                value = asyncio.run(value)
    except Exception as exc:
        runtime = time.perf_counter() - started
        # The first frame is this function's call: the remote traceback starts in the task.
        tb = exc.__traceback__.tb_next if exc.__traceback__ else None
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        return ["done", seq, False, None, type(exc).__name__, str(exc), text, runtime]
    return ["done", seq, True, value, "", "", "", time.perf_counter() - started]


def _reply(
    channel: _Channel, registry: Registry, node_id: NodeId, msg: list[Any], held: list[Any]
) -> bytes:
    reply = _run_one(registry, node_id, msg, held)
    try:
        return channel.pack(reply)
    except LocalProtocolError as exc:
        value_type = type(reply[3]).__name__
        message = f"task result of type {value_type} cannot cross the wire: {exc}"
        return channel.pack(["done", reply[1], False, None, "TypeError", message, "", reply[7]])


def serve(
    sock: socket.socket, *, node_id: NodeId, prefix: str, threshold: int, registry: Registry
) -> None:
    """Answer the executor until it says stop or goes away."""
    channel = _Channel(sock, prefix, threshold)
    sock.sendall(channel.pack(["ready", os.getpid()]))
    while True:
        received = channel.recv()
        if received is None:
            return
        msg, segment = received
        del received
        if msg[0] == "stop":
            return
        if msg[0] == "threads":
            set_threads(int(msg[1]))
            continue
        if msg[0] != "run":
            raise LocalProtocolError(f"worker got unknown message {msg[0]!r}")
        # Shared segments the task mapped: unmapping a large one takes milliseconds, which
        # the reply need not wait for (their files are the store's, never rewritten).
        held: list[Any] = []
        data = _reply(channel, registry, node_id, msg, held)
        # The reply is encoded (copied) and the task's locals are gone: nothing here still
        # needs the argument mapping, so release it before the executor may reuse it.
        del msg
        if segment is not None:
            release_segment(*segment)
            del segment
        sock.sendall(data)
        del held


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--threshold", type=int, required=True)
    parser.add_argument("--tasks", action="append", default=[])
    parser.add_argument("--without", action="append", default=[])
    parser.add_argument("--no-entry-points", action="store_true")
    opts = parser.parse_args(argv)
    refuse_libraries(opts.without)
    registry = Registry.load(opts.tasks, entry_points=not opts.no_entry_points)
    sock = socket.socket(fileno=opts.fd)
    try:
        serve(
            sock,
            node_id=NodeId(opts.node_id),
            prefix=opts.prefix,
            threshold=opts.threshold,
            registry=registry,
        )
    except (MeshError, OSError) as exc:
        print(f"mesh worker {os.getpid()}: {exc}", file=sys.stderr)
        return 1
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
