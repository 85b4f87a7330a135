"""Spilling above the store's memory target, and the pool of segments written again.

Store-level tests use a spill directory under ``tmp_path``; the node tests run real daemons
in this process with a memory target of a few MiB, so that every object they make spills.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import node.store
from mesh.client import AsyncClient
from mesh.config import MeshConfig
from mesh.errors import MeshError, ObjectLostError, ObjectStoreFullError, SpillReadError
from mesh.protocol.codec import encode_body, loads
from mesh.protocol.messages import NodeId, ObjectRef
from mesh.runtime.shm import (
    RETURN_PREFIX,
    SHM_DIR,
    UPLOAD_PREFIX,
    UploadFiles,
    map_object,
    unmapped,
)
from node.cli import parser
from node.daemon import Daemon, NodeOptions
from node.store import SPILL_PREFIX, ObjectStore, remove_orphan_spill
from tests.node.conftest import serving

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm")

NODE = NodeId("spiller")
MIB = 1024 * 1024

DTYPES = (
    "?",
    "i1",
    "<i2",
    "<i4",
    "<i8",
    ">i4",
    "u1",
    "<u2",
    "<u4",
    "<u8",
    "<f2",
    "<f4",
    "<f8",
    ">f8",
    "<c8",
    "<c16",
    "S7",
    "<U5",
    "<M8[ns]",
    "<m8[s]",
)
"""Every kind of array the codec carries, both byte orders among them."""


def _array(dtype: str, nbytes: int, seed: int) -> np.ndarray[Any, Any]:
    dt = np.dtype(dtype)
    n = max(1, nbytes // dt.itemsize)
    raw = np.random.default_rng(seed).integers(0, 120, size=n)
    if dt.kind == "b":
        return (raw % 2).astype(dt)
    if dt.kind in "SU":
        return raw.astype(str).astype(dt)
    if dt.kind in "mM":
        return raw.astype(np.int64).view(dt.newbyteorder("=")).astype(dt)
    if dt.kind == "c":
        return (raw + 1j * raw[::-1]).astype(dt)
    return raw.astype(dt)


def _spill_files(store: ObjectStore) -> set[str]:
    try:
        return {n for n in os.listdir(store.spill_dir) if n.startswith(store.spill_prefix)}
    except FileNotFoundError:
        return set()


@pytest.fixture
def spill_dir(tmp_path: Path) -> Path:
    return tmp_path / "spill"


@pytest.fixture
def store(spill_dir: Path) -> Iterator[ObjectStore]:
    s = ObjectStore(NODE, 3 * MIB, segment_min_bytes=MIB, spill_dir=spill_dir)
    yield s
    s.close()
    assert not _spill_files(s)
    assert not {n for n in os.listdir(SHM_DIR) if n.startswith(s.prefix)}


# ---------------------------------------------------------------------------------------
# Spilling in the store
# ---------------------------------------------------------------------------------------


async def test_every_dtype_round_trips_through_spill(store: ObjectStore) -> None:
    arrays = {d: _array(d, MIB // 2 + 1000 * i, i) for i, d in enumerate(DTYPES)}
    refs = {d: await store.put(a) for d, a in arrays.items()}
    # Half of them also in shared memory: those spill from a segment, not from the value.
    for d in DTYPES[::2]:
        await store.share(refs[d])
    assert store.used_bytes + store.pool.nbytes <= store.target_bytes
    assert store.spilled_objects >= len(DTYPES) - 6
    assert store.spilled_bytes == sum(r.nbytes for d, r in refs.items() if store.is_spilled(r.id))
    assert len(_spill_files(store)) == store.spilled_objects
    for d, arr in arrays.items():
        back = loads(b"".join((await store.encoded(refs[d]))[0]))
        assert back.dtype == arr.dtype, d
        np.testing.assert_array_equal(back, arr)
        assert not store.is_spilled(refs[d].id)
    for d, arr in reversed(arrays.items()):
        shared = await store.share(refs[d])
        value = await store.get(refs[d])
        assert value.dtype == arr.dtype
        np.testing.assert_array_equal(value, arr)
        if refs[d].nbytes >= store.segment_min_bytes:
            assert shared is not None
    assert store.readbacks >= store.spills - store.spilled_objects
    assert len(store) == len(DTYPES)


async def test_the_least_recently_used_object_spills_first(store: ObjectStore) -> None:
    a, b, c = [await store.put(np.full(MIB // 10, i, dtype=np.float64)) for i in range(3)]
    await store.get(a)  # a is now more recent than b
    await store.put(np.zeros(MIB // 10))  # 3.2 MiB > 3: one spills
    assert store.is_spilled(b.id)
    assert not store.is_spilled(a.id)
    assert not store.is_spilled(c.id)
    np.testing.assert_array_equal(await store.get(b), np.full(MIB // 10, 1.0))


async def test_a_pinned_object_stays_in_memory_until_unpinned(store: ObjectStore) -> None:
    first = await store.put(np.full(MIB // 10, 1.0))  # the least recently used from here on
    assert store.pin(first.id)
    others = [await store.put(np.full(MIB // 10, 2.0)) for _ in range(5)]
    assert not store.is_spilled(first.id)
    assert store.is_spilled(others[0].id)
    store.unpin(first.id)
    await store.put(np.zeros(MIB // 10))
    assert store.is_spilled(first.id)
    assert not store.pin("never-stored")


async def test_an_object_larger_than_the_target_goes_straight_to_disk(store: ObjectStore) -> None:
    small = await store.put(np.ones(1000))
    big = await store.put(np.arange(MIB // 2, dtype=np.float64))  # 4 MiB
    assert store.is_spilled(big.id)
    assert not store.is_spilled(small.id)
    np.testing.assert_array_equal(await store.get(big), np.arange(MIB // 2, dtype=np.float64))


async def test_release_removes_the_spill_file(store: ObjectStore) -> None:
    refs = [await store.put(np.full(MIB // 4, i, dtype=np.float64)) for i in range(3)]
    assert _spill_files(store)
    for ref in refs:
        assert store.release(ref)
    assert not _spill_files(store)
    assert store.spilled_bytes == store.used_bytes == 0


async def test_a_spill_size_cap_fails_the_put_clearly_and_loses_no_other_object(
    spill_dir: Path,
) -> None:
    store = ObjectStore(NODE, 2 * MIB, spill_dir=spill_dir, spill_limit_bytes=3 * MIB)
    try:
        await _fill_until_full(store, "the spill cap of 3145728 bytes is reached")
    finally:
        store.close()


async def _put_many(store: ObjectStore, kept: dict[str, np.ndarray[Any, Any]]) -> None:
    for i in range(64):
        arr = np.full(MIB // 16, i, dtype=np.float64)  # 0.5 MiB
        kept[(await store.put(arr)).id] = arr


async def _fill_until_full(store: ObjectStore, why: str) -> None:
    kept: dict[str, np.ndarray[Any, Any]] = {}
    with pytest.raises(ObjectStoreFullError) as info:
        await _put_many(store, kept)
    message = str(info.value)
    assert "object store full" in message
    assert f"memory target of {store.target_bytes} bytes is reached" in message
    assert str(store.spill_dir) in message
    assert why in message
    assert len(kept) >= 4
    assert len(store) == len(kept)  # the failed put left nothing behind
    for oid, arr in kept.items():  # and lost nothing: a read-back spills others in turn
        with contextlib.suppress(ObjectStoreFullError):
            np.testing.assert_array_equal(await store.get(oid), arr)
            continue
        pytest.fail(f"object {oid} could not be read back")


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB file system to spill into: mounting one needs root."""
    where = tmp_path / "tiny"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_a_full_spill_disk_fails_the_put_clearly_and_loses_no_other_object(
    tiny_tmpfs: Path,
) -> None:
    store = ObjectStore(NODE, 2 * MIB, spill_dir=tiny_tmpfs)
    try:
        await _fill_until_full(store, os.strerror(28))  # ENOSPC
        assert not any(
            n.startswith(store.spill_prefix) and (tiny_tmpfs / n).stat().st_size == 0
            for n in os.listdir(tiny_tmpfs)
        )
    finally:
        store.close()


async def test_a_spill_file_that_is_gone_is_a_lost_object(store: ObjectStore) -> None:
    refs = [await store.put(np.full(MIB // 4, i, dtype=np.float64)) for i in range(3)]
    spilled = next(r for r in refs if store.is_spilled(r.id))
    for name in _spill_files(store):
        (store.spill_dir / name).write_bytes(b"cut")
    with pytest.raises(SpillReadError) as info:
        await store.get(spilled)
    assert isinstance(info.value, ObjectLostError)
    assert f"object {spilled.id} spilled to" in str(info.value)
    assert spilled.id not in store
    assert not store.release(spilled)


def _orphan(spill_dir: Path) -> Path:
    """A spill file of a process that is gone, in ``spill_dir``."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    spill_dir.mkdir(exist_ok=True)
    orphan = spill_dir / f"{SPILL_PREFIX}{dead.pid}-0badc0de-1"
    orphan.write_bytes(b"left by a node killed with SIGKILL")
    return orphan


def test_spill_files_of_dead_processes_go_and_a_live_ones_stay(spill_dir: Path) -> None:
    orphan = _orphan(spill_dir)
    alive = spill_dir / f"{SPILL_PREFIX}{os.getppid()}-0badc0de-1"
    other = spill_dir / "notes.txt"
    for path in (alive, other):
        path.write_bytes(b"x")
    assert remove_orphan_spill(spill_dir) == 1
    assert not orphan.exists()
    assert alive.exists()
    assert other.exists()


# ---------------------------------------------------------------------------------------
# Spill and read-back off the event loop, and what may happen meanwhile
# ---------------------------------------------------------------------------------------


class _HeldWriter:
    """Spill writes that wait in their thread until ``go`` is set: ``started`` is set
    once one is under way."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        write = node.store._write_spill

        def held(path: Path, chunks: Any) -> None:
            self.started.set()
            if not self.go.wait(timeout=30):
                raise OSError(errno.ETIMEDOUT, "the event loop never let the writer go")
            write(path, chunks)

        monkeypatch.setattr(node.store, "_write_spill", held)

    async def under_way(self) -> None:
        async with asyncio.timeout(10):
            while not self.started.is_set():  # noqa: ASYNC110 - set from the store's thread
                await asyncio.sleep(0.001)


async def test_the_event_loop_runs_while_a_spill_is_written(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = _HeldWriter(monkeypatch)
    big = np.arange(MIB // 2, dtype=np.float64)  # 4 MiB, over the target: straight to disk
    turns = 0

    async def meanwhile() -> None:
        nonlocal turns
        await writer.under_way()
        for _ in range(3):  # the loop goes round while the writer waits
            await asyncio.sleep(0)
            turns += 1
        writer.go.set()  # only this coroutine lets the write finish

    async with asyncio.TaskGroup() as tg:
        putting = tg.create_task(store.put(big))
        tg.create_task(meanwhile())
    assert turns == 3
    ref = putting.result()
    assert store.is_spilled(ref.id)
    assert [n for n in _spill_files(store) if n.endswith(".part")] == []
    np.testing.assert_array_equal(await store.get(ref), big)


async def test_a_read_back_makes_room_before_it_reads(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = [np.full(MIB // 8 + 1000, i, dtype=np.float64) for i in range(4)]  # 1 MiB each
    refs = [await store.put(a) for a in arrays]  # two fit in 3 MiB, two spill
    assert sum(store.is_spilled(r.id) for r in refs) == 2
    seen: list[int] = []
    read = ObjectStore._read_spill

    def reading(self: ObjectStore, path: Path, size: int) -> Any:
        seen.append(self.used_bytes)  # objects in memory while it reads
        return read(self, path, size)

    monkeypatch.setattr(ObjectStore, "_read_spill", reading)
    for ref, arr in zip(refs, arrays, strict=True):  # every one read back in turn
        np.testing.assert_array_equal(await store.get(ref), arr)
        assert store.used_bytes <= store.target_bytes
    assert len(seen) == store.readbacks == 4
    assert all(used + refs[0].nbytes <= store.target_bytes for used in seen)


async def test_concurrent_gets_of_a_spilled_object_read_it_once(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    arr = np.arange(MIB // 8, dtype=np.float64)
    ref = await store.put(arr)
    await store.put(np.zeros(MIB // 16 * 5))  # 2.5 MiB: ref spills
    assert store.is_spilled(ref.id)
    reads = 0
    read = ObjectStore._read_spill

    def counted(self: ObjectStore, path: Path, size: int) -> Any:
        nonlocal reads
        reads += 1
        return read(self, path, size)

    monkeypatch.setattr(ObjectStore, "_read_spill", counted)
    values = await asyncio.gather(
        store.get(ref), store.encoded(ref), store.share(ref), store.get(ref.id)
    )
    assert reads == 1
    assert store.readbacks == 1
    np.testing.assert_array_equal(values[0], arr)
    np.testing.assert_array_equal(loads(b"".join(values[1][0])), arr)
    np.testing.assert_array_equal(values[3], arr)


async def test_a_lent_segment_does_not_spill(store: ObjectStore) -> None:
    lent_arr = np.full(MIB // 8, 1.0)
    lent = await store.put(lent_arr)  # the least recently used from here on
    segment = await store.share(lent, lend_s=3600)
    assert segment is not None
    other = await store.put(np.full(MIB // 8, 2.0))
    assert await store.share(other) is not None  # shared, but not lent
    for i in range(4):
        await store.put(np.full(MIB // 8, 3.0 + i))
    assert not store.is_spilled(lent.id)
    assert store.is_spilled(other.id)
    mapping = map_object(segment.name, segment.nbytes)  # the borrower maps it late
    np.testing.assert_array_equal(loads(memoryview(mapping)), lent_arr)


async def test_a_spill_gives_way_to_a_segment_finished_before_its_lend_is_marked(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interleaving a busy machine makes now and then: the segment for a borrower is
    # whole, the spill that was under way ends, and only then is the lend marked.
    arr = np.full(MIB // 8, 1.0)
    ref = await store.put(arr)
    other = await store.put(np.full(MIB // 8, 2.0))
    writer = _HeldWriter(monkeypatch)
    write_segment = ObjectStore._write_segment

    async def then_the_spill_ends(self: ObjectStore, entry: Any) -> None:
        await write_segment(self, entry)
        spilling = entry.moving
        writer.go.set()
        if spilling is not None:
            await asyncio.shield(spilling)

    monkeypatch.setattr(ObjectStore, "_write_segment", then_the_spill_ends)
    async with asyncio.TaskGroup() as tg:
        putting = tg.create_task(store.put(np.full(MIB // 8 - 16, 3.0)))
        await writer.under_way()
        segment = await store.share(ref, lend_s=3600)
    assert segment is not None
    assert not store.is_spilled(ref.id)
    assert store.is_spilled(other.id)
    assert store.spills == 1
    np.testing.assert_array_equal(loads(memoryview(map_object(segment.name, ref.nbytes))), arr)
    assert not store.is_spilled(putting.result().id)


async def test_a_segment_lent_while_its_object_spills_stays(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    arr = np.full(MIB // 8, 1.0)  # 1 MiB, the least recently used
    ref = await store.put(arr)
    other = await store.put(np.full(MIB // 8, 2.0))
    writer = _HeldWriter(monkeypatch)
    async with asyncio.TaskGroup() as tg:
        # 1 MiB less 128 bytes: with the headers the store is over its 3 MiB by a few
        # bytes, and ref (the least recently used) starts to spill.
        putting = tg.create_task(store.put(np.full(MIB // 8 - 16, 3.0)))
        await writer.under_way()
        sharing = tg.create_task(store.share(ref, lend_s=3600))
        await asyncio.sleep(0)
        writer.go.set()
    segment = sharing.result()
    assert segment is not None
    # Its spill was given up (its file removed), and the next object spilled instead.
    assert not store.is_spilled(ref.id)
    assert store.is_spilled(other.id)
    assert store.spills == 1
    assert len(_spill_files(store)) == 1
    assert store.used_bytes <= store.target_bytes
    np.testing.assert_array_equal(loads(memoryview(map_object(segment.name, ref.nbytes))), arr)
    assert not store.is_spilled(putting.result().id)


async def test_an_object_released_while_it_spills_leaves_no_file(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = await store.put(np.full(MIB // 8, 1.0))
    writer = _HeldWriter(monkeypatch)
    async with asyncio.TaskGroup() as tg:
        putting = tg.create_task(store.put(np.full(MIB // 4, 2.0)))  # ref spills
        await writer.under_way()
        assert np.all(await store.get(ref) == 1.0)  # read from memory while it is written
        assert store.release(ref)
        writer.go.set()
    assert not store.release(ref)
    assert not _spill_files(store)
    assert store.spilled_bytes == 0
    assert store.used_bytes == putting.result().nbytes


# ---------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------


async def _shared(store: ObjectStore, arr: np.ndarray[Any, Any]) -> tuple[ObjectRef, str]:
    ref = await store.put(arr)
    segment = await store.share(ref)
    assert segment is not None
    return ref, segment.name


async def _pooled(store: ObjectStore, n: int) -> None:
    async with asyncio.timeout(10):
        while len(store.pool) < n:  # noqa: ASYNC110 - given back from the store's thread
            await asyncio.sleep(0.01)


async def _unmapped(store: ObjectStore) -> None:
    """Wait until no mapping of the pooled segments is left (the store's own go in its
    disposal thread, a moment after they are pooled)."""
    async with asyncio.timeout(10):
        for name in store.pool.names():
            while True:
                fd = os.open(SHM_DIR / name, os.O_RDONLY)
                try:
                    if unmapped(fd):
                        break
                finally:
                    os.close(fd)
                await asyncio.sleep(0.01)


async def test_a_released_segment_is_written_again_for_the_next_object(
    spill_dir: Path,
) -> None:
    store = ObjectStore(NODE, 64 * MIB, spill_dir=spill_dir)
    try:
        ref, first = await _shared(store, np.ones(MIB // 4))
        store.release(ref)
        assert not (SHM_DIR / first).exists()  # gone by its name at once
        await _pooled(store, 1)
        await _unmapped(store)
        ref2, second = await _shared(store, np.full(MIB // 4, 2.0))
        assert second != first
        assert store.pool.reused == 1
        assert len(store.pool) == 0
        np.testing.assert_array_equal(await store.get(ref2), np.full(MIB // 4, 2.0))
        mapping = map_object(second, ref2.nbytes)
        np.testing.assert_array_equal(loads(memoryview(mapping)), np.full(MIB // 4, 2.0))
    finally:
        store.close()


async def test_a_segment_a_reader_still_maps_is_not_written_again(spill_dir: Path) -> None:
    store = ObjectStore(NODE, 64 * MIB, spill_dir=spill_dir)
    try:
        ref, first = await _shared(store, np.ones(MIB // 4))
        reader = map_object(first, ref.nbytes)
        store.release(ref)
        await _pooled(store, 1)
        _, second = await _shared(store, np.full(MIB // 4, 2.0))
        assert store.pool.reused == 0  # a new segment: the reader's pages stay as they were
        np.testing.assert_array_equal(loads(memoryview(reader)), np.ones(MIB // 4))
        reader.close()
        await _unmapped(store)
        ref3, _ = await _shared(store, np.full(MIB // 4, 3.0))
        assert store.pool.reused == 1  # now nothing maps it
        np.testing.assert_array_equal(await store.get(ref3), np.full(MIB // 4, 3.0))
        assert second != first
    finally:
        store.close()


async def test_a_reader_that_opened_the_old_name_finds_it_gone(spill_dir: Path) -> None:
    store = ObjectStore(NODE, 64 * MIB, spill_dir=spill_dir)
    try:
        ref, first = await _shared(store, np.ones(MIB // 4))
        store.release(ref)
        with pytest.raises(FileNotFoundError):
            map_object(first, ref.nbytes)
    finally:
        store.close()


async def test_the_pool_yields_to_objects_and_idle_segments_go(spill_dir: Path) -> None:
    store = ObjectStore(NODE, 4 * MIB, spill_dir=spill_dir)
    try:
        refs = [(await _shared(store, np.full(MIB // 8, i, dtype=np.float64)))[0] for i in range(3)]
        for ref in refs:
            store.release(ref)
        await _pooled(store, 3)
        assert store.pool.nbytes > 2 * MIB
        await store.put(np.zeros(MIB // 4))  # 2 MiB: the pool gives up what it takes
        assert store.used_bytes + store.pool.nbytes <= store.target_bytes
        assert store.spilled_objects == 0
        assert store.trim_pool(idle_s=0.0) > 0
        assert len(store.pool) == 0
    finally:
        store.close()


def test_a_clients_upload_is_written_into_a_file_the_node_gave_back() -> None:
    files = UploadFiles(keep=2)
    try:
        chunks, size = encode_body(np.ones(MIB // 8))
        first = files.write(chunks, size)
        assert first.startswith(UPLOAD_PREFIX)
        assert os.stat(SHM_DIR / first).st_nlink == 1  # no name left to the client
        assert not {n for n in os.listdir(SHM_DIR) if n.startswith(files._prefix)}
        second = files.write(chunks, size)  # nothing given back yet: a new file
        assert files.reused == 0
        back = SHM_DIR / first.replace(UPLOAD_PREFIX, RETURN_PREFIX)
        os.rename(SHM_DIR / first, back)  # what the node does once it has copied it
        inode = os.stat(back).st_ino
        third = files.write(encode_body(np.full(MIB // 8, 3.0))[0], size)
        assert files.reused == 1
        assert not back.exists()
        assert os.stat(SHM_DIR / third).st_ino == inode
        assert loads((SHM_DIR / third).read_bytes())[0] == 3.0
        assert loads((SHM_DIR / second).read_bytes())[0] == 1.0
        given = [SHM_DIR / n.replace(UPLOAD_PREFIX, RETURN_PREFIX) for n in (second, third)]
        for name, path in zip((second, third), given, strict=True):
            os.rename(SHM_DIR / name, path)
    finally:
        files.close()
    assert not any(path.exists() for path in given)  # close removes what was not taken back


# ---------------------------------------------------------------------------------------
# Real nodes
# ---------------------------------------------------------------------------------------


@asynccontextmanager
async def _node(
    spill_dir: Path, target: int, spill_limit: int | None = None
) -> AsyncIterator[Daemon]:
    config = MeshConfig.test()
    node = dataclasses.replace(
        config.node,
        store_memory_target_bytes=target,
        store_spill_dir=str(spill_dir),
        store_spill_limit_bytes=spill_limit,
    )
    options = NodeOptions(
        key=secrets.token_hex(16),
        host="127.0.0.1",
        port=0,
        name="spiller",
        mdns=False,
        slots=1,
        config=dataclasses.replace(config, node=node),
    )
    async with serving(options) as daemon:
        yield daemon


async def test_a_node_serves_spilled_objects_of_every_dtype_and_frees_their_files(
    spill_dir: Path,
) -> None:
    orphan = _orphan(spill_dir)
    async with _node(spill_dir, 3 * MIB) as node:
        assert orphan.name not in os.listdir(spill_dir)  # removed at start
        async with await AsyncClient.connect(f"http://{node.address}", node.options.key) as c:
            arrays = {d: _array(d, MIB // 2 + 1000 * i, i) for i, d in enumerate(DTYPES)}
            refs: dict[str, ObjectRef] = {}
            for d, arr in arrays.items():
                ref = await c.submit("echo", arr)
                assert isinstance(ref, ObjectRef), d
                refs[d] = ref
            store = node.store
            assert store.spilled_objects >= len(DTYPES) - 6
            status = await c.status()
            assert status["spilled_objects"] == store.spilled_objects
            assert status["spilled_bytes"] == store.spilled_bytes > 0
            assert len(_spill_files(store)) == store.spilled_objects
            for d, arr in arrays.items():  # through the client's fetch: segment or bytes
                back = await c.fetch(refs[d])
                assert back.dtype == arr.dtype, d
                np.testing.assert_array_equal(back, arr)
            spilled = [d for d in DTYPES if store.is_spilled(refs[d].id) and "f" in d]
            assert spilled
            for d in spilled:  # as a task's argument: read back into a segment the worker maps
                assert await c.submit("array_sum", refs[d]) == pytest.approx(
                    float(arrays[d].astype(np.float64).sum()), rel=1e-3
                )
            for ref in refs.values():
                assert await c.release(ref)
            assert len(store) == 0
            assert not _spill_files(store)
            assert store.spilled_bytes == 0


async def _make_many(c: AsyncClient, kept: list[ObjectRef]) -> None:
    for _ in range(16):
        kept.append(await c.submit("make_array", MIB // 2))


async def test_a_node_whose_spill_is_full_fails_that_task_only(spill_dir: Path) -> None:
    async with (
        _node(spill_dir, 2 * MIB, spill_limit=2 * MIB) as node,
        await AsyncClient.connect(f"http://{node.address}", node.options.key) as c,
    ):
        kept: list[ObjectRef] = []
        with pytest.raises(MeshError, match="object store full") as info:
            await _make_many(c, kept)
        assert "and the spill directory" in str(info.value)
        assert len(kept) >= 4
        for ref in kept:  # everything stored before is still there
            value = await c.fetch(ref)
            assert value.nbytes == MIB // 2
        assert len(node.store) == len(kept)


def test_the_store_settings_on_the_command_line() -> None:
    ns = parser().parse_args(
        ["start", "--store-memory", "256M", "--spill-dir", "/d", "--spill-limit", "1.5G"]
    )
    assert ns.store_memory == 256 * MIB
    assert ns.spill_dir == "/d"
    assert ns.spill_limit == 3 * 512 * MIB
    assert parser().parse_args(["start", "--spill-limit", "0"]).spill_limit == 0
    assert parser().parse_args(["start", "--store-memory", "4096"]).store_memory == 4096
    for bad in ("lots", "-1M", "2X"):
        with pytest.raises(SystemExit):
            parser().parse_args(["start", "--store-memory", bad])
