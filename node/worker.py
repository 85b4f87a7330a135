"""The worker process that runs tasks for the executor, one at a time.

A worker is started with ``python -m node.worker`` (never forked: the daemon runs threads),
inherits one end of a Unix socket pair, loads the task registry, says ``Ready`` and then
runs one task per ``Run``, answering each with a ``Done``. It ends when the executor says
``Stop`` or closes the socket. ``node.pipe`` holds the frames and messages both ends speak.

Shared memory (``mesh.runtime.shm``) keeps large bodies off the socket:

- Arguments: each worker has one argument segment that the executor rewrites for every large
  call, because writing into pages that already exist is about twice as fast as having the
  kernel allocate fresh ones. After the task, the worker closes its mapping; if the task kept
  a view of its arguments (the mapping cannot close), the worker unlinks the segment so the
  executor makes a new one rather than overwrite pages still in use.
- Results: the worker writes a fresh segment per result; the executor maps it and unlinks it
  at once, so it lives exactly as long as the result's arrays.
- Shared objects: a call names the object-store segments among its arguments that the
  worker maps (``Run.shared``); it maps them read-only and decodes them in place, so an
  object held on this machine reaches the task with no copy at all. Their files belong to a
  store, which removes them when the object is released; the worker's mapping keeps the
  pages.

Every segment a worker makes starts with its worker's prefix, so the executor removes
whatever a dead worker left behind.

A task's exception is caught here and reported as the ``Done``'s ``ErrorInfo``; anything
that ends the process (``os._exit``, a signal, running out of memory) is seen by the
executor as the worker's death and fails only the task it was running.

This module may not import torch or other heavy libraries itself: tasks import what they need.
"""

from __future__ import annotations

import argparse
import asyncio
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
import sys
import time
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from mesh.errors import (
    ErrorInfo,
    FailureKind,
    LocalProtocolError,
    MeshError,
    ObjectLostError,
    TaskLostError,
)
from mesh.protocol.args import walk, walk_call
from mesh.protocol.codec import decode_body, encode_body
from mesh.protocol.messages import NodeId, Segment
from mesh.runtime.shm import map_object, map_segment, unlink, write_segment
from node.cores import THREAD_VARS
from node.pipe import (
    HEADER,
    SEGMENT,
    UNKNOWN_TASK,
    Done,
    Ready,
    Run,
    Stop,
    Threads,
    decode_call,
    decode_frame,
    inline_frame,
    parse_segment,
    segment_frame,
)
from tasks import Registry, TaskContext, running_as


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
    try:
        return map_object(name, nbytes)
    except (FileNotFoundError, PermissionError) as exc:
        raise SegmentLostError(name, exc.strerror or "cannot open it") from None


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

    def recv(self) -> tuple[Run | Threads | Stop, tuple[str, mmap.mmap] | None] | None:
        """The next call and the argument segment it came in (if any); None at the end."""
        if not self._read_exactly(memoryview(self.header)):
            return None
        kind, length = HEADER.unpack(self.header)
        payload = bytearray(length)
        if not self._read_exactly(memoryview(payload)):
            return None
        if kind != SEGMENT:
            return decode_call(decode_frame(kind, payload)), None
        name, size = parse_segment(payload)
        # The task reads its arguments whole: map every page in one call, not one fault each.
        mapping = map_segment(name, size, unlink_now=False, populate=True)
        return decode_call(decode_body(memoryview(mapping))), (name, mapping)

    def pack(self, reply: Ready | Done) -> bytes:
        """Encode ``reply`` for sending; a large body goes to a fresh result segment."""
        chunks, size = encode_body(reply.encode())
        if size <= self.threshold:
            return b"".join(inline_frame(chunks, size))
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
        unlink(name)


def attach_shared(value: Any, names: frozenset[str]) -> Any:
    """``value`` with each ``Segment`` named in ``names`` replaced by the object it holds.

    Arrays are read-only views of the mapped segment. Raises ``ObjectLostError`` when a
    segment is gone (its object was released), ``RemoteProtocolError`` when it is not what
    it should be.
    """
    return walk(value, Segment, _attach(names))


def _attach(names: frozenset[str]) -> Any:
    def attach(segment: Segment) -> Any:
        if segment.name not in names:
            return segment  # the task's own data
        return decode_body(memoryview(map_shared(segment.name, segment.nbytes)))

    return attach


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


def _failed(seq: int, exc_type: str, message: str, runtime_s: float = 0.0) -> Done:
    error = ErrorInfo(kind=FailureKind.TASK, message=message, exc_type=exc_type)
    return Done(seq=seq, error=error, runtime_s=runtime_s)


def _run_one(registry: Registry, node_id: NodeId, run: Run, held: list[Any]) -> Done:
    tdef = registry.get(run.name)
    if tdef is None:
        return _failed(run.seq, UNKNOWN_TASK, f"task {run.name} is not installed")
    args: Sequence[Any] = run.args
    kwargs: dict[str, Any] = run.kwargs
    if run.shared:
        try:
            args, kwargs = walk_call(args, kwargs, Segment, _attach(frozenset(run.shared)))
            held.append((args, kwargs))
        except ObjectLostError as exc:
            return _failed(run.seq, type(exc).__name__, str(exc))
        except MeshError as exc:
            return Done(seq=run.seq, error=ErrorInfo.of(exc))
    started = time.perf_counter()
    try:
        with running_as(TaskContext(node_id=node_id, task_id=run.task_id)):
            value = tdef.fn(*args, **kwargs)
            if inspect.iscoroutine(value):
                # An ``async def`` task gets an event loop of its own for the one call.
                value = asyncio.run(value)
    except Exception as exc:
        runtime = time.perf_counter() - started
        # The first frame is this function's call: the remote traceback starts in the task.
        tb = exc.__traceback__.tb_next if exc.__traceback__ else None
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        return Done(seq=run.seq, error=ErrorInfo.of(exc, traceback=text), runtime_s=runtime)
    return Done(seq=run.seq, value=value, runtime_s=time.perf_counter() - started)


def _reply(
    channel: _Channel, registry: Registry, node_id: NodeId, run: Run, held: list[Any]
) -> bytes:
    done = _run_one(registry, node_id, run, held)
    try:
        return channel.pack(done)
    except LocalProtocolError as exc:
        message = f"task result of type {type(done.value).__name__} cannot cross the wire: {exc}"
        return channel.pack(_failed(done.seq, "TypeError", message, done.runtime_s))


def serve(
    sock: socket.socket, *, node_id: NodeId, prefix: str, threshold: int, registry: Registry
) -> None:
    """Answer the executor until it says stop or goes away."""
    channel = _Channel(sock, prefix, threshold)
    sock.sendall(channel.pack(Ready(pid=os.getpid())))
    while True:
        received = channel.recv()
        if received is None:
            return
        call, segment = received
        del received
        if isinstance(call, Stop):
            return
        if isinstance(call, Threads):
            set_threads(call.threads)
            continue
        # Shared segments the task mapped: unmapping a large one takes milliseconds, which
        # the reply need not wait for (their files are the store's, never rewritten).
        held: list[Any] = []
        data = _reply(channel, registry, node_id, call, held)
        # The reply is encoded (copied) and the task's locals are gone: nothing here still
        # needs the argument mapping, so release it before the executor may reuse it.
        del call
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
