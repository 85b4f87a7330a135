"""The wire format: msgpack bodies, out-of-band array buffers, HMAC-SHA256 envelopes.

A *body* is a msgpack header followed by raw array buffers::

    u32 header_len | u32 n_buffers | u64 buffer_len * n | header | pad | buffer | pad | ...

Each buffer starts on a 64-byte boundary of the body. numpy arrays and torch tensors in a
value become msgpack ext types naming dtype, shape and buffer index; their bytes are never
copied into the msgpack stream, and on decode they are views into the received frame
(``np.frombuffer``), so a 256 MiB array is not copied by the codec on either side (the one
unavoidable copy on send is making a non-contiguous array contiguous).

A *frame* is what crosses the network between peers::

    b"M" | version | HMAC-SHA256(key, rest) [32] | body

where the body's header is ``[sender, boot, seq, wall_ts, tag, fields]``. ``ReplayGuard``
rejects frames whose (sender, boot, seq) was already seen, and frames whose timestamp is
further from the receiver's clock than the allowed skew, so that its memory stays bounded.

Anything wrong with a received frame raises ``RemoteProtocolError`` (with a ``reason`` for
metrics) and nothing else. Asking to encode something the format cannot carry raises
``LocalProtocolError``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import sys
import types
import typing
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Union

import msgpack
import numpy as np

from mesh.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from mesh.messages import REGISTRY, NodeId, Wire, field_names, field_types

MAGIC: Final = 0x4D  # "M"
VERSION: Final = 1
MAC_LEN: Final = 32
FRAME_PREFIX: Final = 2 + MAC_LEN
ALIGN: Final = 64

EXT_STRUCT: Final = 1
EXT_NDARRAY: Final = 2
EXT_TENSOR: Final = 3

_U32 = struct.Struct("<I")
_U32x2 = struct.Struct("<II")

Buffer = bytes | bytearray | memoryview
Chunks = list[Buffer]


def _pad(n: int) -> int:
    return -n % ALIGN


def _torch() -> Any:
    """torch if it is importable, else None. Imported lazily: a node without ML stays lean."""
    mod = sys.modules.get("torch")
    if mod is not None:
        return mod
    try:
        import torch
    except ImportError:
        return None
    return torch


# ---------------------------------------------------------------------------------------
# Field validation: decoded values are checked against the wire type's annotations, so a
# core never sees a str where it expects a float. Validators are built once per type.
# ---------------------------------------------------------------------------------------

Check = Callable[[Any], Any]


def _fail(expected: str, value: Any) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"expected {expected}, got {type(value).__name__}", reason="bad-field"
    )


def _check_for(tp: Any) -> Check:
    if tp is Any or tp is object:
        return lambda v: v
    supertype = getattr(tp, "__supertype__", None)
    if supertype is not None:  # NewType
        return _check_for(supertype)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        checks = [_check_for(a) for a in args]
        allows_none = type(None) in args

        def check_union(v: Any) -> Any:
            if v is None and allows_none:
                return None
            for c in checks:
                try:
                    return c(v)
                except RemoteProtocolError:
                    continue
            raise _fail(str(tp), v)

        return check_union
    if tp is type(None):

        def check_none(v: Any) -> Any:
            if v is not None:
                raise _fail("None", v)
            return v

        return check_none
    if tp is bool:

        def check_bool(v: Any) -> Any:
            if type(v) is not bool:
                raise _fail("bool", v)
            return v

        return check_bool
    if tp is int:

        def check_int(v: Any) -> Any:
            if type(v) is not int:
                raise _fail("int", v)
            return v

        return check_int
    if tp is float:

        def check_float(v: Any) -> Any:
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            raise _fail("float", v)

        return check_float
    if tp is str:

        def check_str(v: Any) -> Any:
            if type(v) is not str:
                raise _fail("str", v)
            return v

        return check_str
    if tp is bytes:

        def check_bytes(v: Any) -> Any:
            if type(v) is not bytes:
                raise _fail("bytes", v)
            return v

        return check_bytes
    if isinstance(tp, type) and issubclass(tp, Enum):
        enum_tp = tp

        def check_enum(v: Any) -> Any:
            try:
                return enum_tp(v)
            except (ValueError, TypeError):
                raise _fail(enum_tp.__name__, v) from None

        return check_enum
    if isinstance(tp, type) and issubclass(tp, Wire):
        wire_tp = tp

        def check_wire(v: Any) -> Any:
            if not isinstance(v, wire_tp):
                raise _fail(wire_tp.__name__, v)
            return v

        return check_wire
    if origin is tuple or tp is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = _check_for(args[0]) if args else _check_for(Any)

            def check_seq(v: Any) -> Any:
                if not isinstance(v, list | tuple):
                    raise _fail("sequence", v)
                return tuple(item(x) for x in v)

            return check_seq
        items = [_check_for(a) for a in args]

        def check_fixed(v: Any) -> Any:
            if not isinstance(v, list | tuple) or len(v) != len(items):
                raise _fail(f"tuple of {len(items)}", v)
            return tuple(c(x) for c, x in zip(items, v, strict=True))

        return check_fixed
    if origin in (dict, typing.Mapping) or tp is dict or origin is typing.Mapping:
        kc = _check_for(args[0]) if args else _check_for(Any)
        vc = _check_for(args[1]) if args else _check_for(Any)

        def check_dict(v: Any) -> Any:
            if not isinstance(v, dict):
                raise _fail("map", v)
            return {kc(k): vc(x) for k, x in v.items()}

        return check_dict
    if origin is np.ndarray or tp is np.ndarray:

        def check_array(v: Any) -> Any:
            if not isinstance(v, np.ndarray):
                raise _fail("ndarray", v)
            return v

        return check_array
    if origin is typing.Literal:
        allowed = set(args)

        def check_literal(v: Any) -> Any:
            if v not in allowed:
                raise _fail(f"one of {sorted(map(str, allowed))}", v)
            return v

        return check_literal
    raise LocalProtocolError(f"wire field type {tp!r} is not supported by the codec")


_STRUCT_CHECKS: dict[type[Wire], tuple[tuple[str, ...], tuple[Check, ...]]] = {}


def _struct_checks(cls: type[Wire]) -> tuple[tuple[str, ...], tuple[Check, ...]]:
    cached = _STRUCT_CHECKS.get(cls)
    if cached is None:
        hints = field_types(cls)
        names = field_names(cls)
        cached = (names, tuple(_check_for(hints[n]) for n in names))
        _STRUCT_CHECKS[cls] = cached
    return cached


def _build_struct(tag: Any, fields: Any) -> Wire:
    cls = REGISTRY.get(tag) if type(tag) is int else None
    if cls is None:
        raise RemoteProtocolError(f"unknown wire type {tag!r}", reason="unknown-type")
    names, checks = _struct_checks(cls)
    if not isinstance(fields, list) or len(fields) != len(names):
        raise RemoteProtocolError(
            f"{cls.__name__}: expected {len(names)} fields", reason="bad-field"
        )
    try:
        values = {n: c(v) for n, c, v in zip(names, checks, fields, strict=True)}
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(f"{cls.__name__}: {exc}", reason=exc.reason) from None
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # __post_init__ validation of a wire type
        raise RemoteProtocolError(f"{cls.__name__}: {exc}", reason="bad-field") from None


# ---------------------------------------------------------------------------------------
# Bodies: msgpack header + out-of-band buffers
# ---------------------------------------------------------------------------------------


class _Packer:
    """Packs one value, collecting array buffers out of band."""

    __slots__ = ("buffers", "packer")

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []
        self.packer = msgpack.Packer(default=self._default, use_bin_type=True, autoreset=True)

    def _add_buffer(self, arr: np.ndarray[Any, Any]) -> int:
        self.buffers.append(memoryview(arr).cast("B"))
        return len(self.buffers) - 1

    def _default(self, obj: Any) -> Any:
        if isinstance(obj, Wire):
            names = field_names(type(obj))
            return msgpack.ExtType(
                EXT_STRUCT, self._nested([int(obj.TAG), [getattr(obj, n) for n in names]])
            )
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(EXT_NDARRAY, self._array_payload(obj))
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, Enum):
            return obj.value
        if isinstance(obj, tuple | frozenset | set):
            return list(obj)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            return msgpack.ExtType(EXT_TENSOR, self._tensor_payload(torch, obj))
        raise LocalProtocolError(f"cannot encode {type(obj).__name__}: not a wire value")

    def _nested(self, value: Any) -> bytes:
        # A Packer is not reentrant: ext payloads packed from inside ``default`` need their own.
        data: bytes = msgpack.packb(value, default=self._default, use_bin_type=True)
        return data

    def _array_payload(self, arr: np.ndarray[Any, Any]) -> bytes:
        if arr.dtype.kind in "OV" or arr.dtype.hasobject:
            raise LocalProtocolError(f"cannot encode arrays of dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr)
        index = self._add_buffer(arr.reshape(-1)) if arr.size else -1
        return self._nested([arr.dtype.str, list(arr.shape), index])

    def _tensor_payload(self, torch: Any, t: Any) -> bytes:
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.detach().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if t.dtype is torch.bfloat16:
            raw = t.view(torch.int16).numpy()
        else:
            raw = t.numpy()
        index = self._add_buffer(raw.reshape(-1)) if t.numel() else -1
        return self._nested([name, list(t.shape), index])

    def pack(self, value: Any) -> bytes:
        try:
            return bytes(self.packer.pack(value))
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError(f"cannot encode value: {exc}") from exc


def encode_body(value: Any) -> tuple[Chunks, int]:
    """Encode ``value`` as a body; returns its chunks (not joined) and their total length."""
    p = _Packer()
    header = p.pack(value)
    bufs = p.buffers
    prefix = _U32x2.pack(len(header), len(bufs)) + struct.pack(
        f"<{len(bufs)}Q", *(b.nbytes for b in bufs)
    )
    chunks: Chunks = [prefix, header]
    size = len(prefix) + len(header)
    for b in bufs:
        pad = _pad(size)
        if pad:
            chunks.append(bytes(pad))
            size += pad
        chunks.append(b)
        size += b.nbytes
    return chunks, size


class _Unpacker:
    __slots__ = ("body", "offsets")

    def __init__(self, body: memoryview, offsets: list[tuple[int, int]]) -> None:
        self.body = body
        self.offsets = offsets

    def _buffer(self, index: Any, nbytes: int) -> memoryview:
        if type(index) is not int or not 0 <= index < len(self.offsets):
            raise RemoteProtocolError("array buffer index out of range", reason="bad-array")
        start, length = self.offsets[index]
        if length != nbytes:
            raise RemoteProtocolError("array size does not match its buffer", reason="bad-array")
        return self.body[start : start + length]

    @staticmethod
    def _shape(shape: Any) -> tuple[int, ...]:
        if not isinstance(shape, list) or len(shape) > 64:
            raise RemoteProtocolError("bad array shape", reason="bad-array")
        if not all(type(d) is int and 0 <= d < 2**62 for d in shape):
            raise RemoteProtocolError("bad array shape", reason="bad-array")
        return tuple(shape)

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == EXT_STRUCT:
            try:
                tag, fields = self.unpack(data)
            except (ValueError, TypeError):
                raise RemoteProtocolError("malformed struct", reason="malformed") from None
            return _build_struct(tag, fields)
        if code in (EXT_NDARRAY, EXT_TENSOR):
            try:
                dtype_name, shape, index = self.unpack(data)
            except (ValueError, TypeError):
                raise RemoteProtocolError("malformed array", reason="bad-array") from None
            shape = self._shape(shape)
            if code == EXT_TENSOR:
                return self._tensor(dtype_name, shape, index)
            return self._array(dtype_name, shape, index)
        raise RemoteProtocolError(f"unknown ext type {code}", reason="unknown-type")

    def _array(self, dtype_name: Any, shape: tuple[int, ...], index: Any) -> Any:
        if type(dtype_name) is not str or len(dtype_name) > 32:
            raise RemoteProtocolError("bad dtype", reason="bad-array")
        try:
            dtype = np.dtype(dtype_name)
        except TypeError:
            raise RemoteProtocolError(f"bad dtype {dtype_name!r}", reason="bad-array") from None
        if dtype.kind in "OV" or dtype.hasobject or dtype.itemsize == 0:
            raise RemoteProtocolError(f"dtype {dtype_name!r} not allowed", reason="bad-array")
        count = 1
        for d in shape:
            count *= d
        if count == 0:
            if index != -1:
                raise RemoteProtocolError("empty array with a buffer", reason="bad-array")
            return np.empty(shape, dtype=dtype)
        buf = self._buffer(index, count * dtype.itemsize)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def _tensor(self, dtype_name: Any, shape: tuple[int, ...], index: Any) -> Any:
        if type(dtype_name) is not str or len(dtype_name) > 32:
            raise RemoteProtocolError("bad tensor dtype", reason="bad-array")
        torch = _torch()
        np_name = "int16" if dtype_name == "bfloat16" else dtype_name
        if np_name == "bool":
            np_name = "bool"
        try:
            arr = self._array(np.dtype(np_name).str, shape, index)
        except TypeError:
            raise RemoteProtocolError(
                f"bad tensor dtype {dtype_name!r}", reason="bad-array"
            ) from None
        if torch is None:
            return arr  # a node without torch sees the same data as an ndarray
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: shared, not copied
            t = torch.from_numpy(arr) if arr.size else torch.from_numpy(arr.copy())
        if dtype_name == "bfloat16":
            t = t.view(torch.bfloat16)
        return t

    def unpack(self, data: bytes | memoryview) -> Any:
        return msgpack.unpackb(
            data,
            ext_hook=self.ext_hook,
            raw=False,
            strict_map_key=False,
            use_list=True,
        )


def decode_body(body: memoryview) -> Any:
    """Decode a body made by ``encode_body``; arrays are views into ``body``."""
    n = body.nbytes
    if n < _U32x2.size:
        raise RemoteProtocolError("truncated body", reason="truncated")
    header_len, nbuf = _U32x2.unpack_from(body, 0)
    table_end = _U32x2.size + 8 * nbuf
    if nbuf > 65536 or table_end + header_len > n:
        raise RemoteProtocolError("truncated body", reason="truncated")
    lengths = struct.unpack_from(f"<{nbuf}Q", body, _U32x2.size)
    pos = table_end + header_len
    offsets: list[tuple[int, int]] = []
    for length in lengths:
        pos += _pad(pos)
        offsets.append((pos, length))
        pos += length
    if pos != n:
        raise RemoteProtocolError("body length does not match its table", reason="truncated")
    u = _Unpacker(body, offsets)
    try:
        return u.unpack(body[table_end : table_end + header_len])
    except RemoteProtocolError:
        raise
    except RecursionError:
        raise RemoteProtocolError("value nested too deeply", reason="malformed") from None
    except Exception as exc:  # msgpack raises a family of unrelated types on garbage
        raise RemoteProtocolError(f"malformed msgpack: {exc}", reason="malformed") from None


def dumps(value: Any) -> bytes:
    """Encode a value (messages, arrays, tensors, plain data) to one bytes object."""
    chunks, _ = encode_body(value)
    return b"".join(chunks)


def loads(data: Buffer) -> Any:
    """Decode what ``dumps`` made. Arrays are views into ``data`` when it is a buffer."""
    return decode_body(memoryview(data).cast("B"))


# ---------------------------------------------------------------------------------------
# Frames: authenticated, replay-protected envelopes between peers
# ---------------------------------------------------------------------------------------


def key_fingerprint(key: bytes) -> str:
    """First 16 hex digits of SHA-256 over the key: tells meshes apart, reveals nothing."""
    return hashlib.sha256(key).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded, authenticated frame."""

    sender: NodeId
    boot: int
    seq: int
    sent_at: float
    msg: Wire


class ReplayGuard:
    """Remembers (sender, boot, seq) triples long enough to reject replays.

    Frames older or newer than ``max_skew_s`` are refused outright, so state for a
    (sender, boot) is only needed while its frames can still be fresh; the table is an LRU
    capped at ``max_streams`` entries. Within a stream a sliding window of ``window``
    sequence numbers tolerates reordering.
    """

    def __init__(self, *, max_skew_s: float, max_streams: int = 4096, window: int = 1024):
        self.max_skew_s = max_skew_s
        self.max_streams = max_streams
        self.window = window
        self._streams: OrderedDict[tuple[str, int], list[int]] = OrderedDict()

    def check(self, sender: str, boot: int, seq: int, sent_at: float, now: float) -> None:
        if abs(now - sent_at) > self.max_skew_s:
            raise RemoteProtocolError(
                f"frame from {sender} is {now - sent_at:+.1f}s off this clock", reason="stale"
            )
        key = (sender, boot)
        state = self._streams.get(key)
        if state is None:
            self._streams[key] = [seq, 1]
            if len(self._streams) > self.max_streams:
                self._streams.popitem(last=False)
            return
        self._streams.move_to_end(key)
        top, bits = state
        if seq > top:
            shift = seq - top
            state[0] = seq
            state[1] = (
                ((bits << shift) | 1) & ((1 << self.window) - 1) if shift < self.window else 1
            )
            return
        age = top - seq
        if age >= self.window or bits >> age & 1:
            raise RemoteProtocolError(f"replayed frame from {sender}", reason="replay")
        state[1] = bits | (1 << age)


class Codec:
    """Encodes and authenticates frames from one node; checks and decodes frames to it.

    ``now`` arguments are wall-clock seconds (``time.time()`` in a driver); they are
    compared across machines only within ``max_skew_s``.
    """

    def __init__(
        self,
        key: bytes,
        sender: NodeId,
        *,
        max_frame_bytes: int,
        max_skew_s: float = 120.0,
        boot: int | None = None,
    ) -> None:
        if len(key) < 16:
            raise LocalProtocolError("the mesh key must be at least 16 bytes")
        self.sender = sender
        self.boot = secrets.randbits(63) if boot is None else boot
        self.max_frame_bytes = max_frame_bytes
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self._seq = 0
        self.replay = ReplayGuard(max_skew_s=max_skew_s)

    def encode(self, msg: Wire, now: float) -> tuple[Chunks, int]:
        """Frame ``msg``; returns the chunks to write back to back and their total size."""
        if not isinstance(msg, Wire):
            raise LocalProtocolError(f"{type(msg).__name__} is not a wire message")
        self._seq += 1
        names = field_names(type(msg))
        header = [
            self.sender,
            self.boot,
            self._seq,
            now,
            int(msg.TAG),
            [getattr(msg, n) for n in names],
        ]
        chunks, size = encode_body(header)
        total = FRAME_PREFIX + size
        if total > self.max_frame_bytes:
            raise LocalProtocolError(
                f"{type(msg).__name__} is {total} bytes, over the {self.max_frame_bytes} limit"
            )
        mac = self._mac.copy()
        for c in chunks:
            mac.update(c)
        chunks.insert(0, bytes((MAGIC, VERSION)) + mac.digest())
        return chunks, total

    def encode_bytes(self, msg: Wire, now: float) -> bytes:
        chunks, _ = self.encode(msg, now)
        return b"".join(chunks)

    def authenticate(self, frame: Buffer) -> None:
        """Check size, magic, version and MAC; raise ``RemoteProtocolError`` if any is wrong.

        A transport calls this on arrival to drop a connection that sends forgeries; the
        frame is then decoded with ``decode(..., authenticated=True)`` so the MAC is computed
        once.
        """
        view = memoryview(frame).cast("B")
        n = view.nbytes
        if n > self.max_frame_bytes:
            raise RemoteProtocolError(f"frame of {n} bytes is over the limit", reason="oversized")
        if n < FRAME_PREFIX + _U32x2.size:
            raise RemoteProtocolError("truncated frame", reason="truncated")
        if view[0] != MAGIC:
            raise RemoteProtocolError("not a mesh frame", reason="malformed")
        if view[1] != VERSION:
            raise RemoteProtocolError(f"unsupported frame version {view[1]}", reason="version")
        mac = self._mac.copy()
        mac.update(view[FRAME_PREFIX:])
        if not hmac.compare_digest(mac.digest(), view[2:FRAME_PREFIX]):
            raise AuthenticationError("frame failed authentication")

    def decode(self, frame: Buffer, now: float, *, authenticated: bool = False) -> Frame:
        """Authenticate (unless ``authenticate`` already passed), check replay, decode."""
        if not authenticated:
            self.authenticate(frame)
        view = memoryview(frame).cast("B")
        header = decode_body(view[FRAME_PREFIX:])
        if not (isinstance(header, list) and len(header) == 6):
            raise RemoteProtocolError("malformed envelope", reason="malformed")
        sender, boot, seq, sent_at, tag, fields = header
        if not (
            type(sender) is str
            and type(boot) is int
            and type(seq) is int
            and type(sent_at) is float
        ):
            raise RemoteProtocolError("malformed envelope", reason="malformed")
        self.replay.check(sender, boot, seq, sent_at, now)
        msg = _build_struct(tag, fields)
        return Frame(NodeId(sender), boot, seq, sent_at, msg)
