"""Objects shared through shared memory between processes of one machine.

The store's segments (adopting a client's upload, writing one on first use, removing it on
release, on close, after a crash), what a fetcher and a worker accept from a segment, and
two in-process nodes: a same-machine fetch sends no object byte through the socket, a
node that pretends to be on another host gets the bytes over HTTP into a segment of its
own, and no segment outlives its object or its node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import numpy as np
import pytest

from mesh.client import AsyncClient
from mesh.config import MeshConfig
from mesh.errors import MeshError, ObjectLostError, RemoteProtocolError
from mesh.protocol.codec import encode_body, loads
from mesh.protocol.core import MemberState
from mesh.protocol.messages import NodeId, ObjectRef, Segment
from mesh.runtime.auth import key_bytes
from mesh.runtime.http import _segment_answer, fetch_body
from mesh.runtime.shm import (
    OBJECT_PREFIX,
    RETURN_PREFIX,
    SHM_DIR,
    check_object,
    host_id,
    map_object,
    write_chunks,
)
from node.daemon import Daemon, NodeOptions
from node.store import (
    ObjectNotFoundError,
    ObjectStore,
    OwnedSegment,
    UploadError,
    _copy_exact,
    remove_orphan_segments,
)
from node.worker import attach_shared, map_shared
from tests.node.conftest import serving

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm")

NODE = NodeId("holder-1")
MIB = 1024 * 1024


def _files(prefix: str) -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)}


def _upload(value: Any) -> tuple[str, int]:
    """What ``AsyncClient._to_shm`` leaves: a body in a ``mesh-up-`` file."""
    chunks, size = encode_body(value)
    name = f"mesh-up-{secrets.token_hex(12)}"
    with open(SHM_DIR / name, "xb") as f:
        for chunk in chunks:
            f.write(chunk)
    return name, size


@pytest.fixture
def store() -> Any:
    s = ObjectStore(NODE, 1 << 30, segment_min_bytes=MIB)
    yield s
    s.close()
    assert not _files(s.prefix)


# ---------------------------------------------------------------------------------------
# The store's segments
# ---------------------------------------------------------------------------------------


def test_large_writes_land_whole_in_shared_memory_and_on_disk(tmp_path: Any) -> None:
    """A shared-memory file of the right size with old bytes in it, and a spill file (empty,
    write-only), both hold the chunks back to back, odd sizes and all."""
    big = np.random.default_rng(3).integers(0, 256, 8 * MIB + 7, dtype=np.uint8)
    chunks = [b"head", memoryview(big), bytearray(b"x" * 3), memoryview(big)[1:]]
    whole = b"".join(bytes(c) for c in chunks)
    shm = SHM_DIR / f"mesh-test-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(shm, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, len(whole))
        os.pwrite(fd, b"\xff" * len(whole), 0)  # old bytes everywhere: all must be replaced
        write_chunks(fd, chunks)
    finally:
        os.close(fd)
    try:
        assert shm.read_bytes() == whole
    finally:
        shm.unlink()
    spill = tmp_path / "spill"
    fd = os.open(spill, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        write_chunks(fd, chunks)
    finally:
        os.close(fd)
    assert spill.read_bytes() == whole


def test_host_id_is_stable_and_names_no_path() -> None:
    assert host_id() == host_id()
    assert host_id().isalnum()


async def test_an_upload_nothing_else_holds_becomes_the_stores_segment_as_it_is(
    store: ObjectStore,
) -> None:
    arr = np.arange(MIB // 4, dtype=np.float64)
    name, size = _upload(arr)
    inode = os.stat(SHM_DIR / name).st_ino
    upload = store.take_upload(Segment(name=name, nbytes=size))
    assert not (SHM_DIR / name).exists()
    ref = await store.adopt(upload)
    del upload
    shared = store.segment(ref)
    assert shared is not None
    assert shared.name.startswith(store.prefix)
    assert os.stat(SHM_DIR / shared.name).st_ino == inode  # no copy
    assert shared.nbytes == size == ref.nbytes
    assert store.used_bytes == size
    assert (ref.dtype, ref.shape) == ("<f8", arr.shape)
    np.testing.assert_array_equal(loads(memoryview(map_object(shared.name, size))), arr)
    assert store.release(ref)
    assert not (SHM_DIR / shared.name).exists()
    assert store.used_bytes == 0


def _given_back(upload: str) -> Any:
    path = SHM_DIR / upload.replace("mesh-up-", "mesh-ret-")
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return path


async def test_a_file_is_given_back_for_an_upload_and_an_upload_still_held_is_copied(
    store: ObjectStore,
) -> None:
    first, size = _upload(np.ones(MIB // 4))
    ref = await store.adopt(store.take_upload(Segment(name=first, nbytes=size)))
    made = _given_back(first)  # nothing pooled: a file made anew
    assert os.stat(made).st_size == size
    made.unlink()  # as the client takes it
    pooled = os.stat(SHM_DIR / store.segment(ref).name).st_ino  # type: ignore[union-attr]
    store.release(ref)
    async with asyncio.timeout(10):
        while not len(store.pool):  # noqa: ASYNC110 - given back from the store's thread
            await asyncio.sleep(0.01)
    assert len(store.pool) == 1
    arr = np.arange(MIB // 4, dtype=np.float64)
    second, size = _upload(arr)
    held = os.open(SHM_DIR / second, os.O_RDWR)  # the client kept a descriptor
    try:
        inode = os.fstat(held).st_ino
        ref = await store.adopt(store.take_upload(Segment(name=second, nbytes=size)))
    finally:
        os.close(held)
    shared = store.segment(ref)
    assert shared is not None
    assert os.stat(SHM_DIR / shared.name).st_ino == pooled  # copied into the pooled segment
    back = SHM_DIR / second.replace("mesh-up-", "mesh-ret-")
    assert os.stat(back).st_ino == inode  # and the client's file given back
    third, size = _upload(arr)
    ref = await store.adopt(store.take_upload(Segment(name=third, nbytes=size)))
    made = _given_back(third)  # the pool is empty again: made anew
    assert os.stat(made).st_size == size
    store.close()
    assert not back.exists()
    assert not made.exists()


async def test_a_client_that_shrinks_its_file_after_the_upload_changes_nothing(
    store: ObjectStore,
) -> None:
    # Regression: the node mapped the client's file, and a client that truncated it through
    # the descriptor it kept made the node die of SIGBUS on its next read of the object.
    arr = np.arange(MIB // 2, dtype=np.float64)
    name, size = _upload(arr)
    fd = os.open(SHM_DIR / name, os.O_RDWR)
    try:
        ref = await store.adopt(store.take_upload(Segment(name=name, nbytes=size)))
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    np.testing.assert_array_equal(await store.get(ref), arr)
    np.testing.assert_array_equal(loads(b"".join((await store.encoded(ref))[0])), arr)


def test_an_upload_nobody_adopts_leaves_no_file(store: ObjectStore) -> None:
    name, size = _upload(np.ones(MIB // 8))
    upload = store.take_upload(Segment(name=name, nbytes=size))
    assert not (SHM_DIR / name).exists()
    assert _files(store.prefix) == {upload.name}
    del upload
    assert not _files(store.prefix)


def test_bad_uploads_are_refused_by_name_and_leave_nothing(store: ObjectStore) -> None:
    name, size = _upload(np.ones(1000))
    with pytest.raises(UploadError, match=f"{name} holds {size} bytes, not {size + 8}"):
        store.take_upload(Segment(name=name, nbytes=size + 8))
    assert not (SHM_DIR / name).exists()
    for bad in ("mesh-up-../../etc/passwd", "mesh-obj-1-00000000-1", "x" * 32):
        with pytest.raises(UploadError, match="bad shared-memory upload"):
            store.take_upload(Segment(name=bad, nbytes=8))
    with pytest.raises(UploadError, match="not found"):
        store.take_upload(Segment(name=f"mesh-up-{secrets.token_hex(12)}", nbytes=8))
    assert not _files(store.prefix)


def test_an_upload_named_for_a_link_reveals_nothing_of_its_target(
    store: ObjectStore, tmp_path: Any
) -> None:
    # Regression: the node followed the link, and its error told whether a root-only file
    # existed and its size; a link to a valid body was adopted and crashed a fetching peer.
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 12345)
    secret.chmod(0o600)
    valid, size = _upload(np.ones(1000))
    try:
        for target in (secret, tmp_path / "missing", SHM_DIR / valid):
            name = f"mesh-up-{secrets.token_hex(12)}"
            (SHM_DIR / name).symlink_to(target)
            try:
                with pytest.raises(UploadError) as info:
                    store.take_upload(Segment(name=name, nbytes=size))
                assert str(info.value) == f"shared-memory upload {name} is not a regular file"
            finally:
                (SHM_DIR / name).unlink(missing_ok=True)
        assert not _files(store.prefix)
    finally:
        (SHM_DIR / valid).unlink(missing_ok=True)  # the link's target, never taken


def test_an_upload_named_for_a_fifo_or_directory_is_refused_at_once(store: ObjectStore) -> None:
    # Regression: open() of a FIFO blocked the node's threads for good.
    for make in (os.mkfifo, os.mkdir):
        name = f"mesh-up-{secrets.token_hex(12)}"
        make(SHM_DIR / name)
        try:
            with pytest.raises(UploadError, match="is not a regular file"):
                store.take_upload(Segment(name=name, nbytes=64))
        finally:
            path = SHM_DIR / name
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file of another user")
def test_an_upload_of_another_user_is_refused(store: ObjectStore) -> None:
    name, size = _upload(np.ones(1000))
    os.chown(SHM_DIR / name, 65534, 65534)
    try:
        with pytest.raises(UploadError, match="belongs to another user"):
            store.take_upload(Segment(name=name, nbytes=size))
    finally:
        (SHM_DIR / name).unlink(missing_ok=True)


def test_a_source_shorter_than_announced_gives_a_short_copy(tmp_path: Any) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"a" * 1000)
    fi, fo = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR | os.O_CREAT)
    try:
        assert _copy_exact(fi, fo, 4096) == 1000
    finally:
        os.close(fi)
        os.close(fo)
    assert dst.read_bytes() == b"a" * 1000


async def test_share_writes_a_segment_once_and_release_removes_it(store: ObjectStore) -> None:
    arr = np.arange(MIB // 2, dtype=np.float64)
    ref = await store.put(arr)
    assert store.segment(ref) is None
    first, second = await asyncio.gather(store.share(ref), store.share(ref))
    assert first == second
    assert first is not None
    assert _files(store.prefix) == {first.name}
    np.testing.assert_array_equal(await store.get(ref), arr)
    np.testing.assert_array_equal(loads(b"".join((await store.encoded(ref))[0])), arr)
    worker_view = attach_shared(first, frozenset({first.name}))
    assert store.release(ref)
    assert first.name not in _files(store.prefix)
    # A process that mapped it keeps its pages after the name is gone.
    np.testing.assert_array_equal(worker_view, arr)


async def test_small_objects_are_not_shared(store: ObjectStore) -> None:
    ref = await store.put(np.ones(100))
    assert await store.share(ref) is None
    assert not _files(store.prefix)


async def test_a_share_racing_a_release_is_lost_and_leaves_nothing(store: ObjectStore) -> None:
    ref = await store.put(np.ones(4 * MIB))
    sharing = asyncio.ensure_future(store.share(ref))
    await asyncio.sleep(0)
    store.release(ref)
    with pytest.raises(ObjectLostError):
        await sharing
    assert not _files(store.prefix)
    with pytest.raises(ObjectNotFoundError):
        await store.share(ref)


def test_close_removes_every_segment_and_owned_ones_go_when_dropped(store: ObjectStore) -> None:
    owned = store.new_segment(MIB)
    owned.buffer[:4] = b"mesh"
    owned.seal()
    assert _files(store.prefix) == {owned.name}
    del owned
    assert not _files(store.prefix)
    kept = store.new_segment(MIB)
    store.close()
    assert not _files(store.prefix)
    del kept


def _dead_pid() -> int:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(dead.stdout)


def test_orphans_of_a_dead_process_are_removed_and_live_ones_kept() -> None:
    pid = _dead_pid()
    orphans = [
        f"{OBJECT_PREFIX}{pid}-{secrets.token_hex(4)}-1",  # a store's object
        f"mesh-{pid}-{secrets.token_hex(4)}-w1-args",  # an executor's worker arguments
    ]
    old_upload = f"mesh-up-{secrets.token_hex(12)}"
    given_back = f"{RETURN_PREFIX}{secrets.token_hex(12)}"  # written long ago, given now
    kept = [
        f"{OBJECT_PREFIX}{os.getppid()}-{secrets.token_hex(4)}-1",
        f"mesh-{os.getppid()}-{secrets.token_hex(4)}-w1-args",
        f"mesh-up-{secrets.token_hex(12)}",  # a fresh upload: its client is about to submit
        given_back,
    ]
    names = [*orphans, old_upload, *kept]
    for name in names:
        (SHM_DIR / name).write_bytes(b"x")
    os.utime(SHM_DIR / old_upload, (1.0, 1.0))
    os.utime(SHM_DIR / given_back, (1.0, 1.0))  # its change time stays now
    try:
        assert remove_orphan_segments() >= 3
        for name in (*orphans, old_upload):
            assert not (SHM_DIR / name).exists(), name
        for name in kept:
            assert (SHM_DIR / name).exists(), name
    finally:
        for name in names:
            (SHM_DIR / name).unlink(missing_ok=True)


async def test_a_running_node_removes_a_dead_nodes_segments_on_a_timer() -> None:
    # Regression: a node killed with SIGKILL left its 64 MiB segment in /dev/shm until some
    # node started again.
    orphan = f"{OBJECT_PREFIX}{_dead_pid()}-{secrets.token_hex(4)}-1"
    async with _node("sweeper", secrets.token_hex(16), sweep_s=0.05):
        (SHM_DIR / orphan).write_bytes(b"x" * MIB)
        try:
            async with asyncio.timeout(20):
                while (SHM_DIR / orphan).exists():  # noqa: ASYNC110 - another task's files
                    await asyncio.sleep(0.02)
        finally:
            (SHM_DIR / orphan).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# What a fetcher and a worker accept
# ---------------------------------------------------------------------------------------


async def test_workers_and_fetchers_refuse_bad_segments(store: ObjectStore) -> None:
    ref = await store.put(np.ones(MIB // 4))
    shared = await store.share(ref)
    assert shared is not None
    with pytest.raises(RemoteProtocolError, match="not 8"):
        map_shared(shared.name, 8)
    with pytest.raises(RemoteProtocolError, match="not 8"):
        check_object(shared.name, 8)
    for foreign in ("mesh-up-0123", "passwd", f"{shared.name}/../x", "../" + shared.name):
        with pytest.raises(RemoteProtocolError):
            map_shared(foreign, shared.nbytes)
        with pytest.raises(RemoteProtocolError):
            check_object(foreign, shared.nbytes)
    store.release(ref)
    with pytest.raises(ObjectLostError, match="cannot be read"):
        map_shared(shared.name, shared.nbytes)
    with pytest.raises(FileNotFoundError):
        check_object(shared.name, shared.nbytes)
    # Only segments the call names are mapped: any other Segment is the task's data.
    assert attach_shared([shared], frozenset()) == [shared]


def test_a_segment_name_that_is_a_link_or_fifo_is_refused_not_followed(tmp_path: Any) -> None:
    # Regression: a holder that answered with a segment name made into a link crashed the
    # fetching node (ELOOP was not among the errors it expected); a FIFO blocked it.
    target = tmp_path / "target"
    target.write_bytes(b"x" * 4096)
    link = f"{OBJECT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-1"
    fifo = f"{OBJECT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-2"
    (SHM_DIR / link).symlink_to(target)
    os.mkfifo(SHM_DIR / fifo)
    try:
        for name in (link, fifo):
            with pytest.raises(RemoteProtocolError, match="not a regular file"):
                check_object(name, 4096)
            with pytest.raises(RemoteProtocolError, match="not a regular file"):
                map_shared(name, 4096)
            with pytest.raises(RemoteProtocolError, match="not a regular file"):
                map_object(name, 4096)
    finally:
        (SHM_DIR / link).unlink(missing_ok=True)
        (SHM_DIR / fifo).unlink(missing_ok=True)


def test_a_holders_segment_answer_must_match_the_reference() -> None:
    ref = ObjectRef(id="o1", holder=NODE, nbytes=4096, dtype="", shape=())
    good = f"{OBJECT_PREFIX}12-0123abcd-7"
    assert _segment_answer(f'{{"segment": "{good}", "nbytes": 4096}}'.encode(), ref) == Segment(
        name=good, nbytes=4096
    )
    for body in (
        f'{{"segment": "{good}", "nbytes": 4095}}',
        '{"segment": "mesh-obj-12-0123abcd-../../x", "nbytes": 4096}',
        '{"segment": "/dev/shm/mesh-obj-12-0123abcd-7", "nbytes": 4096}',
        '{"segment": 7, "nbytes": 4096}',
        "[]",
        "not json",
    ):
        with pytest.raises(RemoteProtocolError):
            _segment_answer(body.encode(), ref)


# ---------------------------------------------------------------------------------------
# Two nodes in this process
# ---------------------------------------------------------------------------------------


@asynccontextmanager
async def _node(
    name: str,
    key: str,
    joins: tuple[str, ...] = (),
    host: str | None = None,
    *,
    sweep_s: float = 30.0,
    store_limit: int | None = None,
    spill_limit: int | None = None,
) -> AsyncIterator[Daemon]:
    config = MeshConfig.test()
    node = dataclasses.replace(
        config.node,
        host_id=host,
        orphan_sweep_interval_s=sweep_s,
        store_memory_target_bytes=store_limit,
        store_spill_limit_bytes=spill_limit,
    )
    config = dataclasses.replace(config, node=node)
    options = NodeOptions(
        key=key,
        host="127.0.0.1",
        port=0,
        name=name,
        joins=joins,
        mdns=False,
        slots=1,
        config=config,
        labels={"name": name},
    )
    async with serving(options) as daemon:
        yield daemon


async def _alive(a: Daemon, b: Daemon) -> None:
    async with asyncio.timeout(20):
        while True:
            ma, mb = a.membership.member(b.node_id), b.membership.member(a.node_id)
            if ma and mb and ma.state == mb.state == MemberState.ALIVE:
                return
            await asyncio.sleep(0.02)


async def test_a_submission_whose_second_upload_does_not_fit_keeps_neither() -> None:
    # Regression: the first upload stayed adopted with no reference left to release it.
    async with _node("full", secrets.token_hex(16), store_limit=3 * MIB, spill_limit=0) as node:
        async with await AsyncClient.connect(f"http://{node.address}", node.options.key) as c:
            first, second = np.ones(MIB // 4), np.ones(MIB // 4)  # 2 MiB each
            with pytest.raises(MeshError, match="object store full"):
                await c.submit_with("array_sum", [first, second])
            assert await c.submit("array_sum", first) == first.sum()  # the node goes on
        assert node.store.used_bytes == 0
        assert len(node.store) == 0
        async with asyncio.timeout(10):
            while _files(node.store.prefix) - node.store.pool.names():  # noqa: ASYNC110
                await asyncio.sleep(0.02)


@asynccontextmanager
async def _pair(b_host: str | None) -> AsyncIterator[tuple[Daemon, Daemon]]:
    key = secrets.token_hex(16)
    async with _node("a", key) as a, _node("b", key, (a.address,), b_host) as b:
        await _alive(a, b)
        yield a, b


async def test_same_host_tasks_map_the_holders_segment_and_no_byte_is_served() -> None:
    async with _pair(None) as (a, b):
        arr = np.arange(MIB // 2, dtype=np.float64)
        ref = await a.store.put(arr)
        async with await AsyncClient.connect(f"http://{a.address}", a.options.key) as c:
            total = await c.submit_with("array_sum", [ref], labels={"name": "b"})
            assert total == float(arr.sum())
            np.testing.assert_array_equal(await c.fetch(ref), arr)
            # The client's own upload is adopted on a and mapped by b's worker.
            up = np.full(MIB // 4, 2.0)
            assert await c.submit_with("array_sum", [up], labels={"name": "b"}) == MIB / 2
        assert a.api.served_bytes == 0
        assert a.api.shared_segments >= 3
        assert b.fetched_bytes == 0
        shared = a.store.segment(ref)
        assert shared is not None
        assert a.store.release(ref)
        assert not (SHM_DIR / shared.name).exists()
        with pytest.raises(ObjectLostError):
            await b._task_arg(ref)
        prefixes = (a.store.prefix, b.store.prefix)
    for prefix in prefixes:
        assert not _files(prefix)


async def test_a_segment_that_spills_after_it_is_lent_is_fetched_as_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The holder lends a name, then spills the object before the fetcher maps it (memory
    pressure between the two): the fetcher takes the bytes, not an error."""
    async with _pair(None) as (a, b):
        arr = np.arange(MIB // 2, dtype=np.float64)
        ref = await a.store.put(arr)
        lend = a.object_segment
        spilled: list[str] = []

        async def lend_then_spill(object_id: str) -> Segment | None:
            segment = await lend(object_id)
            assert segment is not None
            assert await a.store._spill(a.store._objects[object_id]) is None
            assert not (SHM_DIR / segment.name).exists()
            spilled.append(segment.name)
            return segment

        monkeypatch.setattr(a, "object_segment", lend_then_spill)
        np.testing.assert_array_equal(await b.fetch(ref), arr)
        arg = await b._task_arg(ref)
        assert isinstance(arg, OwnedSegment)
        np.testing.assert_array_equal(
            attach_shared(Segment(name=arg.name, nbytes=arg.nbytes), frozenset({arg.name})), arr
        )
        del arg
        assert len(spilled) == 2
        assert a.api.served_bytes == 2 * ref.nbytes
        # A released object is lost, by either path, as before.
        monkeypatch.undo()
        assert a.store.release(ref)
        with pytest.raises(ObjectLostError):
            await b.fetch(ref)
        with pytest.raises(ObjectLostError):
            await b._task_arg(ref)


async def test_a_task_whose_input_spills_before_its_worker_maps_it_runs_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """b checked the name a lent, then a spilled the object before b's worker mapped it:
    that run fails for the machine's sake, and the next one reads the input again."""
    async with _pair(None) as (a, b):
        arr = np.arange(MIB // 2, dtype=np.float64)
        ref = await a.store.put(arr)
        run = b.executor.run
        spilled: list[str] = []

        async def spill_then_run(*args: Any, **kwargs: Any) -> Any:
            if not spilled:
                assert await a.store._spill(a.store._objects[ref.id]) is None
                spilled.append(ref.id)
            return await run(*args, **kwargs)

        monkeypatch.setattr(b.executor, "run", spill_then_run)
        async with await AsyncClient.connect(f"http://{a.address}", a.options.key) as c:
            assert await c.submit_with("array_sum", [ref], labels={"name": "b"}) == arr.sum()
        assert spilled
        assert b.executed["error"] == 1
        assert b.executed["ok"] == 1


async def test_another_host_gets_the_bytes_into_a_segment_of_its_own() -> None:
    async with _pair("elsewhere") as (a, b):
        arr = np.arange(MIB // 2, dtype=np.float64)
        ref = await a.store.put(arr)
        arg = await b._task_arg(ref)
        assert isinstance(arg, OwnedSegment)
        assert arg.name.startswith(b.store.prefix)
        assert a.api.served_bytes == ref.nbytes
        assert a.api.shared_segments == 0
        assert a.store.segment(ref) is None
        np.testing.assert_array_equal(
            attach_shared(Segment(name=arg.name, nbytes=arg.nbytes), frozenset({arg.name})), arr
        )
        del arg
        assert not _files(b.store.prefix)
        async with await AsyncClient.connect(f"http://{a.address}", a.options.key) as c:
            assert await c.submit_with("array_sum", [ref], labels={"name": "b"}) == arr.sum()
        assert a.api.served_bytes == 2 * ref.nbytes
        assert not _files(b.store.prefix)
        # Small objects come as values, not segments.
        small = await a.store.put(np.ones(1000))
        value = await b._task_arg(small)
        np.testing.assert_array_equal(value, np.ones(1000))
        a.store.release(ref)
        with pytest.raises(ObjectLostError):
            await b._task_arg(ref)


async def test_a_fetch_with_a_raw_session_gets_the_segment_answer_only_with_the_host() -> None:
    async with _pair(None) as (a, _):
        ref = await a.store.put(np.ones(MIB))
        async with aiohttp.ClientSession() as http:
            key = key_bytes(a.options.key)
            shared = await fetch_body(http, key, a.address, ref, host=a.host_id)
            body = await fetch_body(http, key, a.address, ref)
        assert isinstance(shared, Segment)
        assert not isinstance(body, Segment)
        np.testing.assert_array_equal(loads(body), np.ones(MIB))
        assert shared.name in _files(a.store.prefix)
