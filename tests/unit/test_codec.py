"""The codec: arrays without copies, authenticated frames, and hostile input.

Whatever a peer sends, the codec raises ``RemoteProtocolError`` (or its subclass
``AuthenticationError``) and nothing else; whatever it cannot encode, it refuses with
``LocalProtocolError``. Hostile bodies are MACed here with the mesh key, so they reach the
parser: they model a buggy or compromised peer, not an outsider.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from mesh.protocol import codec
from mesh.protocol.codec import (
    ALIGN,
    EXT_NDARRAY,
    EXT_STRUCT,
    EXT_TENSOR,
    FRAME_PREFIX,
    MAX_EXT_DEPTH,
    VERSION,
    Codec,
    ReplayGuard,
    decode_body,
    dumps,
    encode_body,
    key_fingerprint,
    loads,
)
from mesh.protocol.messages import Load, NodeId, Wire, WireType
from tests.unit.test_messages import (
    SETTINGS,
    Arrays,
    Chain,
    any_message,
    local_wire_types,
    ndarrays,
    same,
    tensors,
)

__all__ = ["local_wire_types"]  # the fixture that registers the test-local wire types

KEY = b"k" * 32
RX = NodeId("rx")
NOW = 1_700_000_000.0
SKEW = 120.0
LOAD_TAG = int(WireType.LOAD)


def codecs(max_frame_bytes: int = 1 << 24) -> tuple[Codec, Codec]:
    tx = Codec(KEY, NodeId("tx"), max_frame_bytes=max_frame_bytes, max_skew_s=SKEW, boot=7)
    rx = Codec(KEY, NodeId("rx"), max_frame_bytes=max_frame_bytes, max_skew_s=SKEW, boot=8)
    return tx, rx


def sample_frame() -> tuple[bytes, Codec]:
    tx, rx = codecs()
    msg = Arrays(
        array=np.arange(6, dtype=np.float32).reshape(2, 3),
        arrays=(np.zeros(0),),
        tensor=torch.ones(3, dtype=torch.bfloat16),
        maybe=None,
    )
    return tx.encode_bytes(msg, NOW, to=RX), rx


def mac(body: bytes, key: bytes = KEY, version: int = VERSION) -> bytes:
    """A frame around ``body`` that passes authentication under ``key``: since version 2
    the prefix is under the MAC, in version 1 the body alone was."""
    prefix = bytes((codec.MAGIC, version))
    covered = body if version == 1 else prefix + body
    return prefix + hmac.new(key, covered, hashlib.sha256).digest() + body


def body(
    header: bytes, buffers: tuple[bytes, ...] = (), *, lengths: list[int] | None = None
) -> bytes:
    """A body with a raw msgpack ``header``, laid out as the codec lays out frames."""
    sizes = [len(b) for b in buffers] if lengths is None else lengths
    out = bytearray(struct.pack(f"<II{len(sizes)}Q", len(header), len(sizes), *sizes))
    out += header
    for b in buffers:
        out += bytes(-(FRAME_PREFIX + len(out)) % ALIGN)
        out += b
    return bytes(out)


def envelope(
    fields: Any,
    *,
    tag: Any = LOAD_TAG,
    sender: Any = "peer",
    boot: Any = 1,
    seq: Any = 1,
    sent_at: Any = NOW,
    to: Any = "rx",
) -> bytes:
    packed: bytes = msgpack.packb([sender, boot, seq, sent_at, to, tag, fields], use_bin_type=True)
    return packed


def ext(code: int, value: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(value, use_bin_type=True))


def only_remote_errors(call: Callable[[], Any]) -> RemoteProtocolError | None:
    """Runs ``call``; returns the RemoteProtocolError it raised, None if it succeeded.

    Any other exception propagates and fails the test: that is the property.
    """
    error: RemoteProtocolError | None = None
    try:
        call()
    except RemoteProtocolError as exc:
        error = exc
    assert error is None or error.reason, "every rejection names its reason"
    return error


def reject(frame: bytes, rx: Codec | None = None) -> RemoteProtocolError:
    rx = rx or codecs()[1]
    err = only_remote_errors(lambda: rx.decode(frame, NOW))
    assert err is not None, "a malformed frame was accepted"
    return err


# ---------------------------------------------------------------------------------------
# Arrays and tensors
# ---------------------------------------------------------------------------------------


@SETTINGS
@given(ndarrays())
def test_arrays_round_trip(arr: np.ndarray[Any, Any]) -> None:
    out = loads(dumps({"a": arr, "nested": [arr, (arr,)]}))
    assert same(arr, out["a"])
    assert same(arr, out["nested"][1][0])


def frame_base(frame: bytes) -> tuple[int, int]:
    view = np.frombuffer(frame, dtype=np.uint8)
    return view.ctypes.data, view.ctypes.data + len(frame)


@SETTINGS
@given(ndarrays(), tensors())
def test_arrays_and_tensors_decode_as_aligned_views_into_the_frame(
    arr: np.ndarray[Any, Any], t: torch.Tensor
) -> None:
    tx, rx = codecs()
    msg = Arrays(array=arr, arrays=(arr, arr), tensor=t, maybe=arr)
    frame = tx.encode_bytes(msg, NOW, to=RX)
    out = rx.decode(frame, NOW).msg
    assert isinstance(out, Arrays)
    start, end = frame_base(frame)
    assert out.maybe is not None
    for a in (out.array, *out.arrays, out.maybe):
        assert same(arr, a)
        if a.size:
            assert np.shares_memory(a, np.frombuffer(frame, dtype=np.uint8))
            assert (a.ctypes.data - start) % ALIGN == 0
            assert a.flags.aligned
    assert same(t.detach().resolve_conj().resolve_neg(), out.tensor)
    if out.tensor.numel():
        assert start <= out.tensor.data_ptr() < end


def test_a_large_array_is_not_copied_on_decode() -> None:
    tx, rx = codecs(max_frame_bytes=64 << 20)
    arr = np.random.default_rng(0).standard_normal((1024, 1024))  # 8 MiB
    frame = tx.encode_bytes(
        Arrays(array=arr, arrays=(), tensor=torch.zeros(0), maybe=None), NOW, to=RX
    )
    out = rx.decode(frame, NOW).msg
    assert isinstance(out, Arrays)
    assert np.shares_memory(out.array, np.frombuffer(frame, dtype=np.uint8))
    assert np.array_equal(out.array, arr)
    assert not out.array.flags.writeable  # a view into immutable bytes


def test_encode_sends_array_memory_without_copying() -> None:
    arr = np.arange(1 << 16, dtype=np.int64)
    chunks, size = encode_body({"x": arr})
    assert size == sum(memoryview(c).nbytes for c in chunks)
    assert any(np.shares_memory(np.frombuffer(c, dtype=np.uint8), arr) for c in chunks)


@pytest.mark.parametrize(
    "arr",
    [
        np.array(3.5),
        np.array(True),
        np.zeros((0, 3), dtype=np.complex64),
        np.zeros((2, 0, 2), dtype=">i2"),
        np.array(["2024-01-01T00:00", "NaT"], dtype="M8[m]"),
        np.array([1, -2], dtype="m8[us]"),
        np.array([b"ab", b""], dtype="S3"),
        np.array(["héllo", ""], dtype=">U5"),
        np.arange(24, dtype=">f8").reshape(2, 3, 4).transpose(2, 0, 1),
        np.array([np.nan, -0.0, np.inf], dtype=np.float16),
        np.array([1 + 2j], dtype=np.clongdouble),
    ],
    ids=repr,
)
def test_edge_arrays_round_trip(arr: np.ndarray[Any, Any]) -> None:
    out = loads(dumps(arr))
    assert same(arr, out)
    assert out.shape == arr.shape  # 0-d stays 0-d


def test_bfloat16_round_trips_bit_for_bit() -> None:
    t = torch.tensor([1.5, -2.0, float("inf"), float("nan"), -0.0], dtype=torch.bfloat16)
    out = loads(dumps(t))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))


def test_a_node_without_torch_gets_tensors_as_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    data = dumps([torch.arange(4, dtype=torch.int32), torch.ones(2, dtype=torch.bfloat16)])
    monkeypatch.setattr(codec, "_torch", lambda: None)
    ints, bf16 = loads(data)
    assert isinstance(ints, np.ndarray)
    assert ints.tolist() == [0, 1, 2, 3]
    assert bf16.dtype == np.int16  # the raw bits: a bfloat16 1.0 is 0x3F80
    assert bf16.tolist() == [0x3F80, 0x3F80]


def test_loads_accepts_bytearray_and_memoryview() -> None:
    data = dumps({"a": np.arange(5)})
    for buf in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8).data):
        assert loads(buf)["a"].tolist() == [0, 1, 2, 3, 4]


def test_wire_types_nest_inside_plain_values() -> None:
    load = Load(running=1, queued=0, backlog_s=0.0)
    assert loads(dumps({"l": [load, (load,)]})) == {"l": [load, [load]]}


def test_structs_nest_up_to_the_depth_limit() -> None:
    def chain(n: int) -> Chain:
        node = Chain(payload=0, child=None)
        for i in range(1, n):
            node = Chain(payload=i, child=node)
        return node

    ok = chain(MAX_EXT_DEPTH - 1)
    assert loads(dumps(ok)) == ok
    with pytest.raises(LocalProtocolError):
        dumps(chain(MAX_EXT_DEPTH + 1))


# ---------------------------------------------------------------------------------------
# Encoding what the format cannot carry
# ---------------------------------------------------------------------------------------


class Opaque:
    pass


@pytest.mark.parametrize(
    "value",
    [
        Opaque(),
        1 + 2j,
        2**64,
        -(2**63) - 1,
        "\ud800",  # a lone surrogate: not UTF-8
        np.array([object()], dtype=object),
        np.zeros(2, dtype="i4,f8"),
        np.zeros(2, dtype="V4"),
        np.zeros((1,) * 33),
        np.complex128(1j),
        torch.zeros(2, dtype=torch.float8_e4m3fn),
        torch.zeros(2).to_sparse(),
        torch.zeros(2, device="meta"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_unsupported_values_raise_local_protocol_error(value: Any) -> None:
    with pytest.raises(LocalProtocolError):
        dumps(value)


def test_values_nested_past_the_packing_limit_raise_local_protocol_error() -> None:
    deep: Any = None
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(LocalProtocolError):
        dumps({"deep": deep})


def test_a_packer_recovers_after_a_refused_value() -> None:
    tx, rx = codecs()
    bad = Arrays(array=np.zeros(1, dtype=object), arrays=(), tensor=torch.zeros(0), maybe=None)
    with pytest.raises(LocalProtocolError):
        tx.encode(bad, NOW, to=RX)
    good = Load(running=1, queued=2, backlog_s=3.0)
    assert rx.decode(tx.encode_bytes(good, NOW, to=RX), NOW).msg == good


def test_encode_refuses_non_messages_and_oversized_frames() -> None:
    tx, _ = codecs(max_frame_bytes=4096)
    with pytest.raises(LocalProtocolError):
        tx.encode({"not": "a message"}, NOW, to=RX)  # type: ignore[arg-type]
    big = Arrays(array=np.zeros(1024), arrays=(), tensor=torch.zeros(0), maybe=None)
    with pytest.raises(LocalProtocolError):
        tx.encode(big, NOW, to=RX)


def test_codec_refuses_short_keys() -> None:
    with pytest.raises(LocalProtocolError):
        Codec(b"short", NodeId("a"), max_frame_bytes=1 << 20)


def test_key_fingerprint_is_a_sha256_prefix() -> None:
    assert key_fingerprint(KEY) == hashlib.sha256(KEY).hexdigest()[:16]
    assert key_fingerprint(KEY) != key_fingerprint(b"j" * 32)


# ---------------------------------------------------------------------------------------
# Frames: tampering, replay, staleness, size
# ---------------------------------------------------------------------------------------


def test_a_frame_round_trips_with_its_envelope() -> None:
    tx, rx = codecs()
    msg = Load(running=3, queued=4, backlog_s=1.25)
    first = rx.decode(tx.encode_bytes(msg, NOW, to=RX), NOW + 1)
    second = rx.decode(tx.encode_bytes(msg, int(NOW), to=RX), NOW)  # an int clock is fine
    assert (first.sender, first.boot, first.seq, first.sent_at, first.msg) == ("tx", 7, 1, NOW, msg)
    assert first.to == "rx"
    assert second.seq == 2


def test_authenticate_then_decode_without_a_second_mac() -> None:
    tx, rx = codecs()
    frame = tx.encode_bytes(Load(running=0, queued=0, backlog_s=0.0), NOW, to=RX)
    rx.authenticate(frame)
    assert rx.decode(frame, NOW, authenticated=True).seq == 1


@SETTINGS
@given(st.data())
def test_any_flipped_bit_is_rejected(data: st.DataObject) -> None:
    frame, rx = sample_frame()
    index = data.draw(st.integers(0, len(frame) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(frame)
    damaged[index] ^= 1 << bit
    err = reject(bytes(damaged), rx)
    if index >= 2:
        assert isinstance(err, AuthenticationError)


def test_every_truncation_is_rejected() -> None:
    frame, rx = sample_frame()
    for n in range(len(frame)):
        reject(frame[:n], rx)


@given(st.binary(min_size=1, max_size=64))
def test_appended_bytes_are_rejected(extra: bytes) -> None:
    frame, rx = sample_frame()
    assert isinstance(reject(frame + extra, rx), AuthenticationError)


def test_a_frame_under_another_key_is_rejected() -> None:
    frame, _ = sample_frame()
    other = Codec(b"x" * 32, NodeId("rx"), max_frame_bytes=1 << 24)
    err = reject(frame, other)
    assert isinstance(err, AuthenticationError)
    assert err.reason == "bad-mac"


def test_an_unknown_version_is_rejected() -> None:
    env = envelope([1, 2, 3.0])
    assert reject(mac(body(env), version=VERSION + 1)).reason == "version"


def test_replays_are_rejected() -> None:
    frame, rx = sample_frame()
    rx.decode(frame, NOW)
    assert reject(frame, rx).reason == "replay"


@pytest.mark.parametrize("offset", [-SKEW - 1, SKEW + 1, math.inf, -math.inf])
def test_stale_and_future_frames_are_rejected(offset: float) -> None:
    tx, rx = codecs()
    frame = tx.encode_bytes(Load(running=0, queued=0, backlog_s=0.0), NOW, to=RX)
    err = only_remote_errors(lambda: rx.decode(frame, NOW + offset))
    assert err is not None
    assert err.reason == "stale"
    assert rx.decode(frame, NOW + SKEW - 1).seq == 1  # the refusal did not burn the seq


def test_oversized_frames_are_rejected_before_the_mac() -> None:
    tx, _ = codecs(max_frame_bytes=1 << 20)
    frame = tx.encode_bytes(
        Arrays(array=np.zeros(4096), arrays=(), tensor=torch.zeros(0), maybe=None), NOW, to=RX
    )
    _, small = codecs(max_frame_bytes=len(frame) - 1)
    assert reject(frame, small).reason == "oversized"
    _, exact = codecs(max_frame_bytes=len(frame))
    assert exact.decode(frame, NOW).seq == 1


# ---------------------------------------------------------------------------------------
# Garbage under a valid MAC: a keyed peer sending malformed headers and bodies
# ---------------------------------------------------------------------------------------

F8 = np.arange(2, dtype="<f8").tobytes()  # one 16-byte buffer


def array_ext(dtype: Any = "<f8", shape: Any = (2,), index: Any = 0) -> msgpack.ExtType:
    return ext(EXT_NDARRAY, [dtype, list(shape) if isinstance(shape, tuple) else shape, index])


SCALARS = {
    "flag": True,
    "count": 1,
    "ratio": 1.0,
    "name": "n",
    "blob": b"",
    "maybe": None,
    "color": 1,
    "mode": "fast",
    "pair": ["a", 1],
    "names": ["x", "y"],
    "load": None,
    "table": {"n": [1.0]},
    "kind": "a",
    "anything": None,
    "nothing": [],
}
"""Valid wire fields of the test-local ``Scalars`` type."""


def scalars(buffers: tuple[bytes, ...] = (F8,), **changes: Any) -> bytes:
    """A frame carrying a ``Scalars`` message with some fields replaced."""
    fields = list({**SCALARS, **changes}.values())
    return mac(body(envelope(fields, tag=230), buffers))


def in_any(value: Any, buffers: tuple[bytes, ...] = (F8,)) -> bytes:
    """A frame carrying ``value`` in the ``anything`` field of an otherwise valid message."""
    return scalars(buffers, anything=value)


def in_any_raw(raw: bytes) -> bytes:
    """Like ``in_any``, with raw msgpack bytes (that msgpack would refuse to pack)."""
    marker = "\x00raw-marker"
    frame = in_any(marker)
    header_start = FRAME_PREFIX + 8 + 8  # prefix, u32 pair, one buffer length
    header_len = struct.unpack_from("<I", frame, FRAME_PREFIX)[0]
    header = frame[header_start : header_start + header_len]
    return mac(body(header.replace(msgpack.packb(marker), raw), (F8,)))


def nested_ext(levels: int) -> bytes:
    payload = msgpack.packb(None)
    for _ in range(levels):
        payload = msgpack.packb(msgpack.ExtType(EXT_STRUCT, payload))
    return mac(body(envelope([1, 2, 3.0], tag=payload)))


def nested_lists(levels: int) -> bytes:
    return mac(body(envelope([1, 2, 3.0], tag=b"\x91" * levels + b"\xc0")))


def raw_envelope(header: bytes) -> bytes:
    return mac(body(header))


GARBAGE: dict[str, bytes] = {
    # the body's own table
    "empty body": mac(b""),
    "short table": mac(b"\x01\x00\x00"),
    "header past the end": mac(struct.pack("<II", 1000, 0) + b"\x90"),
    "huge buffer count": mac(struct.pack("<II", 1, 2**32 - 1) + b"\x90"),
    "huge buffer length": mac(body(envelope([1, 2, 3.0]), (F8,), lengths=[2**64 - 1])),
    "buffer table too short": mac(body(envelope([1, 2, 3.0]), (F8,), lengths=[8])),
    "trailing garbage": mac(body(envelope([1, 2, 3.0])) + b"\x00"),
    # the msgpack header
    "not msgpack": raw_envelope(b"\xc1"),
    "two objects": raw_envelope(envelope([1, 2, 3.0]) + b"\x00"),
    "cut msgpack": raw_envelope(envelope([1, 2, 3.0])[:-1]),
    "bad utf-8": raw_envelope(
        envelope([1, 2, 3.0], sender="zzzz").replace(b"zzzz", b"\xff\xfe\xfd\xfc")
    ),
    "list map key": raw_envelope(b"\x81\x91\x01\x02"),
    "deep lists": nested_lists(5000),
    "deep maps": raw_envelope(b"\x81\x01" * 5000 + b"\xc0"),
    "deep ext": nested_ext(3000),
    "ext just past the limit": nested_ext(MAX_EXT_DEPTH + 1),
    # the envelope
    "envelope not a list": raw_envelope(msgpack.packb({"a": 1})),
    "envelope too short": raw_envelope(msgpack.packb(["peer", 1, 1, NOW, "rx", LOAD_TAG])),
    "envelope too long": raw_envelope(
        msgpack.packb(["peer", 1, 1, NOW, "rx", LOAD_TAG, [1, 2, 3.0], 0])
    ),
    "version-1 envelope": raw_envelope(msgpack.packb(["peer", 1, 1, NOW, LOAD_TAG, [1, 2, 3.0]])),
    "to int": mac(body(envelope([1, 2, 3.0], to=5))),
    "to none": mac(body(envelope([1, 2, 3.0], to=None))),
    "to bytes": mac(body(envelope([1, 2, 3.0], to=b"rx"))),
    "sender not str": mac(body(envelope([1, 2, 3.0], sender=5))),
    "sender empty": mac(body(envelope([1, 2, 3.0], sender=""))),
    "sender huge": mac(body(envelope([1, 2, 3.0], sender="x" * 10_000))),
    "boot str": mac(body(envelope([1, 2, 3.0], boot="1"))),
    "boot negative": mac(body(envelope([1, 2, 3.0], boot=-1))),
    "seq float": mac(body(envelope([1, 2, 3.0], seq=1.0))),
    "seq negative": mac(body(envelope([1, 2, 3.0], seq=-5))),
    "time int": mac(body(envelope([1, 2, 3.0], sent_at=int(NOW)))),
    "time nan": mac(body(envelope([1, 2, 3.0], sent_at=math.nan))),
    "time inf": mac(body(envelope([1, 2, 3.0], sent_at=math.inf))),
    "time str": mac(body(envelope([1, 2, 3.0], sent_at="now"))),
    # the message
    "tag str": mac(body(envelope([1, 2, 3.0], tag="97"))),
    "tag bool": mac(body(envelope([1, 2, 3.0], tag=True))),
    "tag unknown": mac(body(envelope([1, 2, 3.0], tag=9999))),
    "tag negative": mac(body(envelope([1, 2, 3.0], tag=-97))),
    "fields a map": mac(body(envelope({"running": 1}))),
    "too few fields": mac(body(envelope([1, 2]))),
    "too many fields": mac(body(envelope([1, 2, 3.0, 4]))),
    "str for int": mac(body(envelope(["1", 2, 3.0]))),
    "bool for int": mac(body(envelope([True, 2, 3.0]))),
    "float for int": mac(body(envelope([1.0, 2, 3.0]))),
    "str for float": mac(body(envelope([1, 2, "3"]))),
    "bool for float": mac(body(envelope([1, 2, False]))),
    "array for int": mac(body(envelope([array_ext(), 2, 3.0]), (F8,))),
    "bad enum value": scalars(mode="sloe"),
    "bool for an int enum": scalars(color=True),
    "unknown int enum": scalars(color=7),
    "enum given a list": scalars(mode=["fast"]),
    "literal not allowed": scalars(kind="c"),
    "literal unhashable": scalars(kind=["a"]),
    "literal bytes for str": scalars(kind=b"a"),
    "set of lists": scalars(names=[["x"]]),
    "set given a map": scalars(names={"x": 1}),
    "fixed tuple short": scalars(pair=["a"]),
    "fixed tuple wrong item": scalars(pair=["a", "b"]),
    "empty tuple not empty": scalars(nothing=[1]),
    "dict given a list": scalars(table=[["n", [1.0]]]),
    "dict bad key": scalars(table={1: [1.0]}),
    "dict bad value": scalars(table={"n": ["x"]}),
    "bytes for str": scalars(name=b"n"),
    "str for bytes": scalars(blob="b"),
    "optional given str": scalars(maybe="1"),
    "wrong struct type": scalars(load=ext(EXT_STRUCT, [96, [{}, {}, [], {}]])),
    "struct given a map": scalars(load={"running": 1}),
    # nested structs
    "struct payload not a list": in_any(ext(EXT_STRUCT, 5)),
    "struct of one": in_any(ext(EXT_STRUCT, [LOAD_TAG])),
    "struct unknown tag": in_any(ext(EXT_STRUCT, [9999, []])),
    "struct bad fields": in_any(ext(EXT_STRUCT, [LOAD_TAG, ["a", "b", "c"]])),
    "struct garbage payload": in_any(msgpack.ExtType(EXT_STRUCT, b"\xc1\xc1")),
    "struct trailing bytes": in_any(
        msgpack.ExtType(EXT_STRUCT, msgpack.packb([LOAD_TAG, [1, 2, 3.0]]) + b"\x00")
    ),
    "unknown ext": in_any(msgpack.ExtType(9, b"")),
    "negative ext": in_any_raw(b"\xd4\xfbx"),
    "bad timestamp ext": in_any_raw(b"\xc7\x03\xffxyz"),
    # arrays
    "array payload not a list": in_any(ext(EXT_NDARRAY, "<f8")),
    "array payload short": in_any(ext(EXT_NDARRAY, ["<f8", [2]])),
    "array garbage payload": in_any(msgpack.ExtType(EXT_NDARRAY, b"\x93\xc1")),
    "dtype object": in_any(array_ext("|O")),
    "dtype O": in_any(array_ext("O")),
    "dtype object name": in_any(array_ext("object")),
    "dtype void": in_any(array_ext("|V16")),
    "dtype structured": in_any(array_ext("<i4,<i4")),
    "dtype subarray": in_any(array_ext("(2,)<f8")),
    "dtype list": in_any(array_ext([["a", "<f8"]])),
    "dtype int": in_any(array_ext(8)),
    "dtype none": in_any(array_ext(None)),
    "dtype huge": in_any(array_ext("<f" + "8" * 100)),
    "dtype zero size": in_any(array_ext("|S0", (0,), -1)),
    "dtype bad unit": in_any(array_ext("<M8[zz]")),
    "dtype nul": in_any(array_ext("<f8\x00")),
    "dtype alias": in_any(array_ext("float64")),
    "shape int": in_any(array_ext(shape=2)),
    "shape negative": in_any(array_ext(shape=(-2,))),
    "shape str": in_any(array_ext(shape=("2",))),
    "shape bool": in_any(array_ext(shape=(True, 2))),
    "shape float": in_any(array_ext(shape=(2.0,))),
    "shape huge": in_any(array_ext(shape=(2**62,))),
    "shape many dims": in_any(array_ext(shape=(1,) * 40 + (2,))),
    "shape overflow": in_any(array_ext(shape=(2**31, 2**31, 2**31))),
    "size mismatch": in_any(array_ext(shape=(3,))),
    "size too small": in_any(array_ext(shape=(1,))),
    "empty with huge dims": in_any(array_ext(shape=(0, 2**61, 2**61), index=-1)),
    "empty with a buffer": in_any(array_ext(shape=(0,), index=0)),
    "empty index str": in_any(array_ext(shape=(0,), index="-1")),
    "index out of range": in_any(array_ext(index=1)),
    "index negative": in_any(array_ext(index=-2)),
    "index str": in_any(array_ext(index="0")),
    "index bool": in_any(array_ext(index=False)),
    "index float": in_any(array_ext(index=0.0)),
    "index without buffers": in_any(array_ext(), ()),
    # tensors
    "tensor dtype unknown": in_any(ext(EXT_TENSOR, ["float8_e4m3fn", [2], 0])),
    "tensor dtype numpy str": in_any(ext(EXT_TENSOR, ["<f8", [2], 0])),
    "tensor dtype object": in_any(ext(EXT_TENSOR, ["object", [2], 0])),
    "tensor dtype int": in_any(ext(EXT_TENSOR, [6, [2], 0])),
    "tensor size mismatch": in_any(ext(EXT_TENSOR, ["float32", [3], 0])),
    "tensor bad shape": in_any(ext(EXT_TENSOR, ["float64", [-2], 0])),
    "tensor index out of range": in_any(ext(EXT_TENSOR, ["float64", [2], 3])),
    # a typed array field given something else
    "array field given a list": mac(
        body(envelope([[1.0, 2.0], [], ext(EXT_TENSOR, ["float64", [2], 0]), None], tag=231), (F8,))
    ),
    "tensor field given an array": mac(
        body(envelope([array_ext(), [], array_ext(), None], tag=231), (F8,))
    ),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_under_a_valid_mac_raises_remote_protocol_error(name: str) -> None:
    reject(GARBAGE[name])


def test_the_garbage_frames_differ_from_a_valid_one_only_where_intended() -> None:
    """The crafted frames are built by helpers that can also build valid frames."""
    _, rx = codecs()
    assert rx.decode(in_any([1, {"x": None}]), NOW).msg.anything == [1, {"x": None}]  # type: ignore[attr-defined]
    _, rx = codecs()
    assert isinstance(rx.decode(in_any(array_ext()), NOW).msg.anything, np.ndarray)  # type: ignore[attr-defined]
    _, rx = codecs()
    assert rx.decode(mac(body(envelope([1, 2, 3.0]))), NOW).msg == Load(
        running=1, queued=2, backlog_s=3.0
    )
    _, rx = codecs()
    assert rx.decode(scalars(), NOW).msg.names == frozenset({"x", "y"})  # type: ignore[attr-defined]


def msgpack_values() -> st.SearchStrategy[Any]:
    """Arbitrary msgpack, ext types included, leaning toward what the codec expects."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.sampled_from([0, -1, 1, 2, 3, LOAD_TAG, 230, 231, 232, 2**62]),
        st.floats(),
        st.text(max_size=6),
        st.sampled_from(["<f8", "|b1", "float32", "bfloat16", "|O", "<M8[s]", "<U2"]),
        st.binary(max_size=6),
    )

    def extend(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.text(max_size=3) | st.integers(0, 3), inner, max_size=3),
            st.tuples(st.sampled_from([EXT_STRUCT, EXT_NDARRAY, EXT_TENSOR, 0, 4]), inner).map(
                lambda p: msgpack.ExtType(p[0], msgpack.packb(p[1], use_bin_type=True))
            ),
        )

    return st.recursive(leaves, extend, max_leaves=20)


@SETTINGS
@given(msgpack_values(), st.sampled_from([LOAD_TAG, 230, 231, 232, 96, 64]))
def test_arbitrary_fields_raise_only_remote_protocol_error(fields: Any, tag: int) -> None:
    _, rx = codecs()
    only_remote_errors(lambda: rx.decode(mac(body(envelope(fields, tag=tag), (F8,))), NOW))


@SETTINGS
@given(msgpack_values())
def test_arbitrary_envelopes_raise_only_remote_protocol_error(header: Any) -> None:
    _, rx = codecs()
    frame = mac(body(msgpack.packb(header, use_bin_type=True), (F8, F8)))
    only_remote_errors(lambda: rx.decode(frame, NOW))


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bodies_raise_only_remote_protocol_error(junk: bytes) -> None:
    _, rx = codecs()
    only_remote_errors(lambda: rx.decode(mac(junk), NOW))
    only_remote_errors(lambda: decode_body(junk))


@SETTINGS
@given(any_message, st.data())
def test_corrupted_bodies_of_real_messages_raise_only_remote_protocol_error(
    msg: Wire, data: st.DataObject
) -> None:
    tx, rx = codecs()
    good = bytearray(tx.encode_bytes(msg, NOW, to=RX)[FRAME_PREFIX:])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(good) - 1))
        good[i] = data.draw(st.integers(0, 255))
    only_remote_errors(lambda: rx.decode(mac(bytes(good)), NOW))


# ---------------------------------------------------------------------------------------
# Replay guard
# ---------------------------------------------------------------------------------------


def test_replay_state_stays_bounded_under_a_flood_of_streams() -> None:
    guard = ReplayGuard(max_skew_s=SKEW, max_streams=100, window=64)
    for i in range(5000):
        # Every frame is fresh: the flood must not lock any of them out.
        guard.check(f"node-{i % 700}", i, 1, NOW + i / 1000, NOW)
        assert len(guard) <= 100


def test_a_forgotten_stream_is_not_reopened_to_replays() -> None:
    guard = ReplayGuard(max_skew_s=SKEW, max_streams=2, window=64)
    guard.check("a", 1, 1, NOW, NOW)
    guard.check("a", 1, 2, NOW + 0.5, NOW)
    guard.check("b", 1, 1, NOW + 1, NOW + 1)
    guard.check("c", 1, 1, NOW + 2, NOW + 2)  # "a" is forgotten here
    for seq, sent_at in ((1, NOW), (2, NOW + 0.5)):
        with pytest.raises(RemoteProtocolError) as info:
            guard.check("a", 1, seq, sent_at, NOW + 3)
        assert info.value.reason == "replay"
    guard.check("a", 1, 3, NOW + 4, NOW + 4)  # its fresh frames still pass
    guard.check("d", 1, 1, NOW + 5, NOW + 5)  # and so do new streams


def test_a_new_boot_is_a_new_stream() -> None:
    guard = ReplayGuard(max_skew_s=SKEW)
    guard.check("a", 1, 5, NOW, NOW)
    guard.check("a", 2, 5, NOW, NOW)
    with pytest.raises(RemoteProtocolError):
        guard.check("a", 1, 5, NOW, NOW)


def test_nan_timestamps_are_stale() -> None:
    guard = ReplayGuard(max_skew_s=SKEW)
    with pytest.raises(RemoteProtocolError) as info:
        guard.check("a", 1, 1, math.nan, NOW)
    assert info.value.reason == "stale"


@given(st.permutations(range(1, 65)), st.integers(0, 10**6))
def test_reordering_within_the_window_is_accepted_and_duplicates_are_not(
    order: list[int], base: int
) -> None:
    guard = ReplayGuard(max_skew_s=SKEW, window=64)
    for seq in order:
        guard.check("a", 1, base + seq, NOW, NOW)
    for seq in order:
        with pytest.raises(RemoteProtocolError):
            guard.check("a", 1, base + seq, NOW, NOW)


@given(st.lists(st.integers(0, 200), max_size=300), st.integers(1, 70))
def test_replay_guard_matches_its_model(seqs: list[int], window: int) -> None:
    """Accepted iff never seen and newer than (highest seen - window)."""
    guard = ReplayGuard(max_skew_s=SKEW, window=window)
    seen: set[int] = set()

    def check(seq: int) -> Callable[[], None]:
        return lambda: guard.check("a", 0, seq, NOW, NOW)

    for seq in seqs:
        expect = seq not in seen and (not seen or seq > max(seen) - window)
        accepted = only_remote_errors(check(seq)) is None
        assert accepted == expect
        if accepted:
            seen.add(seq)


def test_replay_guard_refuses_nonsense_settings() -> None:
    with pytest.raises(LocalProtocolError):
        ReplayGuard(max_skew_s=0)
    with pytest.raises(LocalProtocolError):
        ReplayGuard(max_skew_s=1, window=0)
