"""Runs tasks in worker processes, one task per worker, as many workers as the node has slots.

The executor never blocks the event loop: workers are separate processes (started with
``python -m node.worker``, not forked, because the daemon runs threads), messages to them are
written and read by asyncio protocol callbacks, and the one slow step on this side (copying a
large argument into shared memory) runs in a thread. An argument that is an object-store
segment on this machine (a ``Segment`` named in ``run``'s ``shared``) is not copied at all:
the worker maps it. See ``node.pipe`` for the pipe protocol and ``node.worker`` for the
shared-memory segments.

Each worker's BLAS and torch threads are the node's usable cores divided among every slot on
its host (``node.cores``): the daemon tells ``set_host_slots`` when nodes on this host come
and go, a worker is started with that share in its environment, and one that already runs
gets a new count just before its next task. A task that starts while some of this node's
slots have no work (none running, none queued) takes their share too: alone on its node,
it gets every core the node's slots would have had (a model trains on both cores of a
one-node laptop, not on one). It keeps that count while it runs, so work that arrives
meanwhile shares its cores for that time. The other nodes' slots on the host always count
as busy: their load is known only late. An ``OMP_NUM_THREADS`` in the node's own
environment is the operator's choice and fixes the count instead.

Guarantees: never more tasks running than slots; tasks start in the order they were
submitted; a task that raises comes back as a ``Done`` whose ``ErrorInfo`` holds its
exception's type, message and remote traceback; a worker that dies fails only the task it
was running (``WorkerDied``) and is replaced; a timeout or a cancellation kills the task's
worker (the only way to stop arbitrary code) and a fresh one takes its place. No
shared-memory segment outlives the executor, even when workers die.

This module may not import torch or any task module's heavy dependencies: the daemon stays
lean and only workers load what tasks need.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import itertools
import logging
import math
import os
import secrets
import signal
import site
import socket
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

from mesh.config import NodeConfig
from mesh.errors import ErrorInfo, FailureKind, LocalProtocolError, MeshError
from mesh.protocol.codec import Chunks, encode_body
from mesh.protocol.messages import NodeId
from mesh.runtime.background import Background, Ready, until_cancelled
from mesh.runtime.shm import remove_segments, unlink, write_segment
from node.cores import THREAD_VARS, local_pool, threads_per_worker
from node.pipe import (
    HEADER,
    UNKNOWN_TASK,
    Call,
    Done,
    Run,
    Stop,
    Threads,
    decode_frame,
    decode_reply,
    inline_frame,
    segment_frame,
)
from tasks import Registry

log = logging.getLogger(__name__)

WORKER_DIED: Final = "WorkerDied"
TIMEOUT: Final = "Timeout"
CANCELLED: Final = "Cancelled"
BAD_TIMEOUT: Final = "BadTimeout"

_KEEP_ARGS_BYTES: Final = 256 * 1024 * 1024
"""A worker's argument segment is kept for reuse up to this size, and freed above it."""


@dataclass(slots=True, eq=False)
class _Job:
    task_id: str
    seq: int
    body: Chunks
    """The encoded call; it still refers to the caller's arrays (encoding does not copy)."""
    size: int
    timeout: float | None
    future: asyncio.Future[Done]
    worker: _Worker | None = None
    timer: asyncio.TimerHandle | None = None
    started: float = 0.0


@dataclass(slots=True, eq=False)
class _Worker:
    index: int
    prefix: str
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    proc: asyncio.subprocess.Process | None = None
    transport: asyncio.Transport | None = None
    job: _Job | None = None
    killed: bool = False
    retired: bool = False
    """Asked to exit after idling ``executor_idle_exit_s``: not replaced when it does."""
    idle_timer: asyncio.TimerHandle | None = None
    pid: int = 0
    pidfd: int = -1
    gpu: int | None = None
    threads: int = 0
    """The BLAS/torch thread count this worker was last given (in its environment or in a
    ``threads`` message)."""


class _Pipe(asyncio.Protocol):
    """The executor's end of one worker's socket: splits the stream into frames."""

    def __init__(self, executor: Executor, worker: _Worker) -> None:
        self.executor = executor
        self.worker = worker
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        size = HEADER.size
        while len(buf) - pos >= size:
            kind, length = HEADER.unpack_from(buf, pos)
            end = pos + size + length
            if len(buf) < end:
                break
            payload = bytes(buf[pos + size : end])
            pos = end
            self.executor._on_frame(self.worker, kind, payload)
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.executor._on_pipe_lost(self.worker)


def _child_pythonpath() -> str:
    """The parent's own source directories, so workers import the same task modules."""
    system = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    system.update(os.path.realpath(p) for p in site.getsitepackages())
    keep: list[str] = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if not os.path.isdir(path) or any(path == s or path.startswith(s + os.sep) for s in system):
            continue
        if path not in keep:
            keep.append(path)
    inherited = os.environ.get("PYTHONPATH")
    if inherited:
        keep.append(inherited)
    return os.pathsep.join(keep)


def _pinned_threads(environ: Mapping[str, str]) -> int | None:
    """The thread count an operator fixed with ``OMP_NUM_THREADS``, if any."""
    try:
        threads = int(environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return threads if threads >= 1 else None


def _exit_text(code: int | None) -> str:
    if code is None:
        return "worker process ended"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"worker process was killed by {name} (exit code {code})"
    return f"worker process exited with code {code}"


def trim_memory() -> None:
    """Collect cyclic garbage and hand the freed heap back to the system (glibc's
    ``malloc_trim``, where there is one). Done when the node falls idle: after a burst of
    thousands of tasks the daemon would otherwise keep its peak size, some 20 MB over its
    60 MB, until the next full collection happens to run."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(None).malloc_trim(0)


class Executor:
    """A pool of ``slots`` worker processes running named tasks.

    Use as ``async with Executor(...) as ex: outcome = await ex.run(...)``. ``without``
    names libraries the workers refuse to import (a node kept off ML work);
    ``gpu_devices`` (CUDA indices) pins each worker to one of them. ``cores`` is how many
    cores the workers may keep busy (measured by ``node.cores.local_pool`` when None).
    """

    def __init__(
        self,
        *,
        node_id: NodeId,
        slots: int,
        registry_modules: Sequence[str],
        config: NodeConfig,
        without: Sequence[str] = (),
        entry_points: bool = True,
        gpu_devices: Sequence[int] = (),
        cores: int | None = None,
    ) -> None:
        if slots < 1:
            raise LocalProtocolError(f"an executor needs at least one slot, not {slots}")
        if cores is not None and cores < 1:
            raise LocalProtocolError(f"workers need at least one core, not {cores}")
        self.node_id = node_id
        self._slots = slots
        self.config = config
        self.without = tuple(without)
        self.registry = Registry.load(registry_modules, entry_points=entry_points)
        self._modules = tuple(registry_modules)
        self._entry_points = entry_points
        self._gpu_devices = tuple(gpu_devices)
        self._prefix = f"mesh-{os.getpid()}-{secrets.token_hex(4)}"
        self._seq = itertools.count(1)
        self._worker_index = itertools.count(1)
        self._queue: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}
        self._workers: set[_Worker] = set()
        self._idle: list[_Worker] = []
        self._background = Background(f"executor {node_id}")
        self._closing = False
        self._no_workers = asyncio.Event()
        self._no_workers.set()
        self._cores = cores if cores is not None else local_pool().cores
        self._pinned = _pinned_threads(os.environ)
        self._host_slots = slots
        self._env = self._worker_env()

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._background.start(self._serve)
        return self

    async def _serve(self, ready: Ready) -> None:
        """The executor's main task: the first workers, then hold the service open."""
        if self.config.executor_prestart:
            for _ in range(self._slots):
                self._spawn()
        ready()
        await until_cancelled()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if not self._background.running:
            return None
        self._closing = True
        while self._queue:
            self._resolve(self._queue.popleft(), self._failed(CANCELLED, "executor stopped"))
        for w in self._workers:
            self._send_stop(w)
        try:
            async with asyncio.timeout(self.config.executor_stop_grace_s):
                await self._no_workers.wait()
        except TimeoutError:
            for w in self._workers:
                self._kill(w)
            # Killed: their supervisors reap them and clean up after them.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.executor_stop_grace_s):
                    await self._no_workers.wait()
        finally:
            try:
                await self._background.stop()
            finally:
                for job in list(self._jobs.values()):
                    self._resolve(job, self._failed(CANCELLED, "executor stopped"))
                remove_segments(self._prefix)
        return None

    @staticmethod
    def _send_stop(worker: _Worker) -> None:
        if worker.transport is not None and not worker.transport.is_closing():
            _send(worker.transport, Stop())

    # --- public API -------------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def running(self) -> int:
        """Tasks executing in a worker right now."""
        return len(self._jobs) - len(self._queue)

    @property
    def queued(self) -> int:
        """Tasks waiting for a free worker."""
        return len(self._queue)

    @property
    def workers(self) -> int:
        """Worker processes alive or starting."""
        return len(self._workers)

    @property
    def threads(self) -> int:
        """BLAS/torch threads per slot: what each task gets while every slot has work."""
        return self._threads_with(self._slots)

    def set_host_slots(self, slots: int) -> None:
        """Slots of every node on this host, this one's included (``node.cores.HostSlots``).

        Each worker takes the new thread count before its next task; a running task keeps
        the count it started with. Cheap when nothing changes: call it on every membership
        change.
        """
        was = self.threads
        self._host_slots = max(slots, self._slots)
        if self.threads != was:
            log.info(
                "%d slots on this host share %d cores: %d threads per worker (were %d)",
                self._host_slots,
                self._cores,
                self.threads,
                was,
            )

    def worker_pids(self) -> tuple[int, ...]:
        """Process ids of the workers that are ready (for diagnostics and tests)."""
        return tuple(w.pid for w in self._workers if w.ready.is_set() and w.pid)

    async def run(
        self,
        task_id: str,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        shared: Sequence[str] = (),
        timeout: float | None = None,  # noqa: ASYNC109 - bounds the run in the worker, not the await
    ) -> Done:
        """Run task ``name`` once and return how it ended; never raises for the task's sake.

        ``shared`` names the object-store segments among the arguments (``Segment``s) that
        the worker maps; the caller keeps them until this returns. ``timeout`` bounds the
        seconds the task runs (time spent queued does not count).
        Raises ``LocalProtocolError`` if the executor is not open, ``task_id`` is already
        running here, or the arguments cannot be encoded. Cancelling the caller cancels the
        task.
        """
        if not self._background.running or self._closing:
            raise LocalProtocolError("executor is not running")
        if task_id in self._jobs:
            raise LocalProtocolError(f"task {task_id} is already running here")
        if name not in self.registry:
            return self._failed(UNKNOWN_TASK, f"task {name} is not installed on {self.node_id}")
        if timeout is not None:
            # From a peer's award: NaN or a string-made float must fail the task, never reach
            # call_later, where it would raise in the event loop. Infinite means unbounded.
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                return self._failed(BAD_TIMEOUT, f"task {task_id}: timeout {timeout!r}")
            if math.isnan(timeout):
                return self._failed(BAD_TIMEOUT, f"task {task_id}: timeout is not a number")
            if timeout <= 0:
                return self._failed(TIMEOUT, f"task {task_id} had no time left to run")
            if math.isinf(timeout):
                timeout = None
        seq = next(self._seq)
        call = Run(
            seq=seq,
            task_id=task_id,
            name=name,
            args=list(args),
            kwargs=dict(kwargs or {}),
            shared=tuple(shared),
        )
        # Zero-copy for arrays: a large argument is copied once, into shared memory, when a
        # worker is free to take it; a shared one is not copied at all, the worker maps it.
        body, size = encode_body(call.encode())
        job = _Job(
            task_id=task_id,
            seq=seq,
            body=body,
            size=size,
            timeout=timeout,
            future=asyncio.get_running_loop().create_future(),
        )
        self._jobs[task_id] = job
        self._queue.append(job)
        self._dispatch()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._abandon(job, self._failed(CANCELLED, "the caller was cancelled"))
            raise

    def cancel(self, task_id: str) -> bool:
        """Stop ``task_id``: drop it if queued, kill its worker if running. False if unknown."""
        job = self._jobs.get(task_id)
        if job is None:
            return False
        self._abandon(job, self._failed(CANCELLED, f"task {task_id} was cancelled"))
        return True

    # --- internals --------------------------------------------------------------------

    @staticmethod
    def _failed(exc_type: str, message: str, runtime_s: float = 0.0) -> Done:
        error = ErrorInfo(kind=FailureKind.TASK, message=message, exc_type=exc_type)
        return Done(seq=0, error=error, runtime_s=runtime_s)

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = _child_pythonpath()
        return env

    def _spawn_env(self, worker: _Worker) -> dict[str, str]:
        """The environment of a new worker: its thread count (and its GPU)."""
        # Without a count every worker's BLAS or torch would use every core: slots x cores
        # threads on each node of the host.
        worker.threads = self.threads
        env = {**self._env, **dict.fromkeys(THREAD_VARS, str(worker.threads))}
        if self._pinned is not None:
            env.update({v: self._env[v] for v in THREAD_VARS if v in self._env})
        if self._gpu_devices:
            # One device per worker, spread evenly: a task sees cuda:0 and never
            # contends with another worker's task for memory it did not plan for.
            busy = [w.gpu for w in self._workers]
            worker.gpu = min(self._gpu_devices, key=busy.count)
            env["CUDA_VISIBLE_DEVICES"] = str(worker.gpu)
        return env

    def _resolve(self, job: _Job, outcome: Done) -> None:
        if self._jobs.get(job.task_id) is job:
            del self._jobs[job.task_id]
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if not job.future.done():
            job.future.set_result(outcome)

    def _abandon(self, job: _Job, outcome: Done) -> None:
        if job.future.done() and self._jobs.get(job.task_id) is not job:
            return
        worker = job.worker
        if worker is None:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
        self._resolve(job, outcome)
        if worker is not None and worker.job is job:
            self._kill(worker)

    def _dispatch(self) -> None:
        while self._queue and self._idle:
            # The most recently busy worker first: the others keep idling towards their exit.
            worker = self._idle[-1]
            self._unpark(worker)
            job = self._queue.popleft()
            self._start(worker, job)
        if self._closing or not self._queue:
            return
        starting = sum(1 for w in self._workers if not w.ready.is_set())
        room = self._slots - len(self._workers)
        for _ in range(min(room, len(self._queue) - starting)):
            self._spawn()

    def _start(self, worker: _Worker, job: _Job) -> None:
        transport = worker.transport
        if transport is None or transport.is_closing():
            self._queue.appendleft(job)
            return
        worker.job = job
        job.worker = worker
        # This node's slots with work (running or queued, this task's included).
        threads = self._threads_with(max(1, min(self._slots, len(self._jobs))))
        if worker.threads != threads:
            # Read by the worker just before the call that follows: no cost per task.
            worker.threads = threads
            _send(transport, Threads(threads=threads))
        if job.size > self.config.executor_shm_threshold_bytes and self._background.spawn(
            self._start_large(worker, job), f"mesh-args-{job.seq}"
        ):
            return
        transport.writelines(inline_frame(job.body, job.size))
        self._started(job)

    def _threads_with(self, busy: int) -> int:
        """Threads for a task while ``busy`` of this node's slots have work: the host's
        cores shared among them and the other nodes' slots on the host."""
        if self._pinned is not None:
            return self._pinned
        return threads_per_worker(self._cores, self._host_slots - self._slots + busy)

    def _started(self, job: _Job) -> None:
        job.body = []
        if job.timeout is not None:
            loop = asyncio.get_running_loop()
            job.timer = loop.call_later(job.timeout, self._expire, job)

    async def _start_large(self, worker: _Worker, job: _Job) -> None:
        """Copy a large call into the worker's argument segment (in a thread), then send it."""
        name = worker.prefix + "-args"
        work = asyncio.get_running_loop().run_in_executor(
            None, functools.partial(write_segment, name, job.body, job.size, reuse=True)
        )
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            # The copy runs on; whatever it leaves is removed when it ends.
            work.add_done_callback(lambda _: unlink(name))
            raise
        except OSError as exc:  # /dev/shm full, most likely
            if worker.job is job:
                worker.job = None
                if not worker.killed and not self._closing:
                    self._park(worker)
            self._resolve(
                job, self._failed(type(exc).__name__, f"cannot pass the arguments: {exc}")
            )
            self._dispatch()
            return
        transport = worker.transport
        if worker.job is not job or worker.killed or transport is None or transport.is_closing():
            return  # cancelled or timed out meanwhile; the worker's exit cleans the segment up
        transport.writelines(segment_frame(name, job.size))
        self._started(job)

    def _expire(self, job: _Job) -> None:
        job.timer = None
        self._abandon(
            job,
            self._failed(
                TIMEOUT, f"task {job.task_id} ran over its {job.timeout:g} s", job.timeout or 0.0
            ),
        )

    def _kill(self, worker: _Worker) -> None:
        worker.killed = True
        self._unpark(worker)
        proc = worker.proc
        if proc is None or proc.returncode is not None:
            return
        # Not proc.kill(): Popen.send_signal polls first, and reaping the child here would
        # take its exit status from the watcher that reports it. A pidfd cannot hit a reused
        # pid even when the child is already gone.
        with contextlib.suppress(ProcessLookupError):
            if worker.pidfd >= 0:
                signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGKILL)

    def _spawn(self) -> None:
        if self._closing:
            return
        index = next(self._worker_index)
        worker = _Worker(index=index, prefix=f"{self._prefix}-w{index}")
        if not self._background.spawn(self._supervise(worker), f"mesh-worker-{index}"):
            return
        self._workers.add(worker)
        self._no_workers.clear()

    async def _supervise(self, worker: _Worker) -> None:
        """Start one worker, watch it until it exits, then clean up after it."""
        code: int | None = None
        try:
            await self._launch(worker)
            proc = worker.proc
            if proc is None:
                return
            try:
                async with asyncio.timeout(self.config.executor_worker_start_timeout_s):
                    await worker.ready.wait()
            except TimeoutError:
                log.warning("worker %d did not start in time; killing it", worker.index)
                self._kill(worker)
            code = await proc.wait()
        except OSError as exc:
            log.error("cannot start a worker process: %s", exc)
        except asyncio.CancelledError:
            self._kill(worker)  # the executor is being torn down: no worker may outlive it
            raise
        finally:
            self._after_exit(worker, code)

    async def _launch(self, worker: _Worker) -> None:
        parent, child = socket.socketpair()
        try:
            argv = [
                sys.executable,
                "-m",
                "node.worker",
                "--fd",
                str(child.fileno()),
                "--node-id",
                self.node_id,
                "--prefix",
                worker.prefix,
                "--threshold",
                str(self.config.executor_shm_threshold_bytes),
            ]
            for module in self._modules:
                argv += ["--tasks", module]
            for lib in self.without:
                argv += ["--without", lib]
            if not self._entry_points:
                argv.append("--no-entry-points")
            env = self._spawn_env(worker)
            worker.proc = await asyncio.create_subprocess_exec(
                *argv,
                pass_fds=(child.fileno(),),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
            )
            if hasattr(os, "pidfd_open"):
                worker.pidfd = os.pidfd_open(worker.proc.pid)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_unix_connection(lambda: _Pipe(self, worker), sock=parent)
        worker.transport = transport
        if self._closing:
            self._send_stop(worker)

    def _after_exit(self, worker: _Worker, code: int | None) -> None:
        self._workers.discard(worker)
        if not self._workers:
            self._no_workers.set()
        self._unpark(worker)
        if worker.transport is not None:
            worker.transport.close()
        if worker.pidfd >= 0:
            os.close(worker.pidfd)
            worker.pidfd = -1
        remove_segments(worker.prefix + "-")
        job = worker.job
        worker.job = None
        if job is not None:
            if self._closing:
                outcome = self._failed(CANCELLED, "executor stopped before the task ended")
            else:
                outcome = self._failed(WORKER_DIED, _exit_text(code))
            self._resolve(job, outcome)
        if not worker.ready.is_set() and not self._closing:
            # A worker that cannot even start (a broken task module, no memory) would be
            # restarted forever; fail what waits instead and try again on the next run().
            message = f"no worker could start: {_exit_text(code)}"
            while self._queue:
                self._resolve(self._queue.popleft(), self._failed(WORKER_DIED, message))
            return
        if self._closing:
            return
        if (
            self.config.executor_prestart
            and len(self._workers) < self._slots
            and not worker.retired
        ):
            self._spawn()
        self._dispatch()

    def _on_frame(self, worker: _Worker, kind: int, payload: bytes) -> None:
        try:
            reply = decode_reply(decode_frame(kind, payload))
        except MeshError as exc:
            log.error("worker %d sent an unreadable message (%s); replacing it", worker.index, exc)
            self._kill(worker)
            return
        if isinstance(reply, Done):
            self._on_done(worker, reply)
            return
        worker.pid = reply.pid
        worker.ready.set()
        if self._closing:
            return
        self._park(worker)
        self._dispatch()

    def _on_done(self, worker: _Worker, done: Done) -> None:
        job = worker.job
        if job is None or done.seq != job.seq:
            log.error(
                "worker %d answered task %d it was not running; replacing it",
                worker.index,
                done.seq,
            )
            self._kill(worker)
            return
        worker.job = None
        self._resolve(job, done)
        if job.size > _KEEP_ARGS_BYTES:
            # Keeping the pages saves the next large call their allocation, but not at any size.
            unlink(worker.prefix + "-args")
        if worker.killed or self._closing:
            return
        self._park(worker)
        self._dispatch()

    def _park(self, worker: _Worker) -> None:
        """``worker`` waits for work; after ``executor_idle_exit_s`` of waiting it exits,
        so an idle node holds only the daemon's memory, not a Python per slot."""
        self._idle.append(worker)
        idle_s = self.config.executor_idle_exit_s
        if idle_s is not None:
            worker.idle_timer = asyncio.get_running_loop().call_later(idle_s, self._retire, worker)

    def _unpark(self, worker: _Worker) -> None:
        if worker in self._idle:
            self._idle.remove(worker)
        if worker.idle_timer is not None:
            worker.idle_timer.cancel()
            worker.idle_timer = None

    def _retire(self, worker: _Worker) -> None:
        worker.idle_timer = None
        if worker not in self._idle or self._closing:
            return
        self._idle.remove(worker)
        worker.retired = True
        self._send_stop(worker)
        if not self._jobs:
            trim_memory()

    def _on_pipe_lost(self, worker: _Worker) -> None:
        # The process exit (seen by _supervise) settles the task; a pipe closed under a live
        # worker is a bug on one side, so make sure that exit happens.
        if worker.proc is not None and worker.proc.returncode is None and not self._closing:
            self._kill(worker)


def _send(transport: asyncio.Transport, call: Call) -> None:
    chunks, size = encode_body(call.encode())
    transport.writelines(inline_frame(chunks, size))
