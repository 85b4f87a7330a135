"""The object store: put/get, references, encoded bodies, the limit with spilling off, release.

Spilling and the segment pool: ``test_spill.py``."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.config import NodeConfig
from mesh.errors import LocalProtocolError, MeshError, ObjectLostError
from mesh.protocol.codec import dumps, loads
from mesh.protocol.messages import NodeId, ObjectRef
from node.store import (
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreFullError,
    default_limit,
    nbytes_of,
)

NODE = NodeId("holder-1")


async def test_put_and_get_an_array() -> None:
    store = ObjectStore(NODE, 1 << 24)
    arr = np.arange(1000, dtype=np.float32).reshape(10, 100)
    ref = await store.put(arr)
    assert ref.holder == NODE
    assert ref.dtype == "<f4"
    assert ref.shape == (10, 100)
    assert ref.nbytes >= arr.nbytes
    assert ref.id in store
    assert await store.get(ref) is arr
    assert await store.get(ref.id) is arr
    assert store.ref(ref.id) == ref
    assert store.used_bytes == ref.nbytes
    assert list(store) == [ref]
    assert len(store) == 1


async def test_put_plain_values_and_named_ids() -> None:
    store = ObjectStore(NODE, 1 << 20)
    ref = await store.put({"w": [1, 2, 3]}, object_id="task-7")
    assert ref.id == "task-7"
    assert (ref.dtype, ref.shape) == ("", ())
    assert await store.get("task-7") == {"w": [1, 2, 3]}
    with pytest.raises(LocalProtocolError):
        await store.put(1, object_id="task-7")
    other = await store.put(2)
    assert other.id != ref.id


async def test_encoded_body_decodes_to_the_value() -> None:
    store = ObjectStore(NODE, 1 << 24)
    arr = np.linspace(0, 1, 5000)
    ref = await store.put({"a": arr, "n": 3})
    chunks, size = await store.encoded(ref)
    body = b"".join(chunks)
    assert len(body) == size == ref.nbytes
    back = loads(body)
    assert back["n"] == 3
    assert np.array_equal(back["a"], arr)
    chunks.clear()  # the caller's list is a copy: the store still serves the object
    assert (await store.encoded(ref.id))[1] == size


async def test_over_the_target_with_spilling_off_fails_clearly_and_keeps_everything() -> None:
    store = ObjectStore(NODE, 100_000, spill_limit_bytes=0)
    kept = await store.put(np.zeros(8000))  # 64,000 bytes and a header
    used = store.used_bytes
    with pytest.raises(ObjectStoreFullError) as info:
        await store.put(np.zeros(8000))
    err = info.value
    assert isinstance(err, MeshError)
    assert "memory target of 100000 bytes is reached" in str(err)
    assert "spilling is off" in str(err)
    assert err.needed == used
    assert store.used_bytes == used
    assert len(store) == 1
    assert await store.get(kept) is not None


async def test_release_frees_and_unknown_ids_raise() -> None:
    store = ObjectStore(NODE, 100_000, spill_limit_bytes=0)
    ref = await store.put(np.zeros(8000))
    assert store.release(ref)
    assert store.used_bytes == 0
    assert not store.release(ref)
    with pytest.raises(ObjectNotFoundError, match=f"object {ref.id} is not held by {NODE}"):
        await store.get(ref)
    with pytest.raises(ObjectLostError):
        await store.encoded(ref.id)
    again = await store.put(np.zeros(8000))  # the space came back
    assert again.nbytes == ref.nbytes


async def test_unencodable_value_is_refused_and_not_stored() -> None:
    store = ObjectStore(NODE, 1 << 20)
    with pytest.raises(LocalProtocolError):
        await store.put(object())
    assert store.used_bytes == 0
    assert len(store) == 0


def test_object_ref_crosses_the_wire() -> None:
    ref = ObjectRef(id="abc", holder=NODE, nbytes=42, dtype="<f8", shape=(2, 3))
    assert loads(dumps(ref)) == ref
    assert loads(dumps([ref]))[0].shape == (2, 3)


def test_nbytes_of_counts_payloads_as_the_codec_sends_them() -> None:
    a = np.zeros(100, dtype=np.int64)
    ref = ObjectRef(id="x", holder=NODE, nbytes=1)
    assert nbytes_of(a) == 800
    # keys count too: "a", "b", "s"
    assert nbytes_of({"a": a, "b": [a, b"12345"], "s": "abc"}) == 800 + 800 + 5 + 3 + 3
    shared = [a, a]
    assert nbytes_of([shared, shared]) == 3200
    assert nbytes_of(3.5) == 0
    assert nbytes_of(ref) == len("x") + len(NODE)
    looped: list[object] = [a]
    looped.append(looped)
    assert nbytes_of(looped) == 800


def test_limit_from_config() -> None:
    cfg = NodeConfig.test()
    assert ObjectStore.from_config(NODE, cfg).target_bytes == (
        default_limit() if cfg.store_memory_target_bytes is None else cfg.store_memory_target_bytes
    )
    assert default_limit() > 0
    with pytest.raises(LocalProtocolError):
        ObjectStore(NODE, -1)
