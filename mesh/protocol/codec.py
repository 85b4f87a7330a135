"""The wire format: msgpack bodies, out-of-band array buffers, HMAC-SHA256 envelopes.

A *body* is a msgpack header followed by raw array buffers::

    u32 header_len | u32 n_buffers | u64 buffer_len * n | header | pad | buffer | pad | ...

Each buffer starts on a 64-byte boundary counted from the start of the enclosing frame (the
``offset`` of the body in it), so that arrays decoded from a received ``bytes`` object are
aligned. numpy arrays and torch tensors in a value become msgpack ext types naming dtype,
shape and buffer index; their bytes are never copied into the msgpack stream, and on decode
they are views into the received frame (``np.frombuffer``, ``torch.from_numpy``), so a
256 MiB array is not copied by the codec on either side (the one unavoidable copy on send is
making a non-contiguous array contiguous). Decoded arrays share the frame's memory and are
read-only when the frame is ``bytes``.

A *frame* is what crosses the network between peers::

    b"M" | version | HMAC-SHA256(key, b"M" | version | body) [32] | body

where the body's header is ``[sender, boot, seq, wall_ts, to, tag, fields]``. ``ReplayGuard``
rejects frames whose (sender, boot, seq) was already seen, and frames whose timestamp is
further from the receiver's clock than the allowed skew, so that its memory stays bounded.

``to`` names the node the frame is for (frame version 2). Each node's replay guard is its
own, so without it a frame captured on its way to one node could be replayed to another
that never saw it. A codec refuses a frame for another node (reason ``wrong-receiver``)
before its replay guard records it. ``to`` is a node id, not an address: an id is what a
node is, while one node is reached under several addresses (a seed typed as
``localhost:7000`` advertises itself as ``192.168.1.5:7000``) and an address passes to
another node when one restarts in another's place.

A sender that does not yet know who listens at an address (a seed known only as
``HOST:PORT``, the first dial to it) leaves ``to`` blank (``UNADDRESSED``). A blank ``to``
is accepted only on ``PeerHello`` and ``Join`` (``BLANK_TO_TAGS``), the two messages that
go to an address before an id can be known; every other frame without a receiver is
refused as ``wrong-receiver``. Replaying either to another node tells it only what their
genuine sender said of itself under its MAC: a Join merges the sender's own record (only
if newer than what the receiver holds, so it revives nobody) and is answered with a Delta
to the sender's own address; a hello opens a connection on which the replayer can then
send nothing that is accepted, since every later frame names its receiver and the
replayer cannot change it, and which never displaces a connection whose hello named its
receiver (``node.transport_ws``). A dialer that knows the id (from membership, or from an
earlier hello) names it in its hello too, so only first contact with a seed carries blank
hellos at all.

The version byte and the magic are under the MAC (fed to it once per ``Codec``, so free
per frame): a later version can be negotiated without a frame being relabelled to another
version's parser. A frame of another version is refused with reason ``version`` and a
message naming both versions; a version-1 frame (whose MAC covered the body alone) is
told apart from a forgery by that MAC, so "upgrade it" is only said of a key holder.

Anything wrong with a received frame raises ``RemoteProtocolError`` (with a ``reason`` for
metrics) and nothing else. Asking to encode something the format cannot carry raises
``LocalProtocolError``. This module does no I/O and reads no clock: ``now`` is an argument.
A ``Codec`` is not thread-safe (it reuses one packer and one replay table).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import re
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
from mesh.protocol.messages import REGISTRY, Join, NodeId, PeerHello, Wire, field_names, field_types

MAGIC: Final = 0x4D  # "M"
VERSION: Final = 3
"""Frame format version, which is the protocol version peers announce and compare. 2 added
the receiver (``to``) and put the prefix under the MAC; 3 seals the wire
(``mesh.protocol.sealing``: the hello carries a key share and the package version)."""
MAC_LEN: Final = 32
FRAME_PREFIX: Final = 2 + MAC_LEN
ALIGN: Final = 64

EXT_STRUCT: Final = 1
EXT_NDARRAY: Final = 2
EXT_TENSOR: Final = 3

MAX_EXT_DEPTH: Final = 32
"""Structs and arrays nest at most this deep. Each level is a nested msgpack unpack that
takes tens of KiB of C stack, so without a bound a crafted frame could overflow the stack."""

MAX_DIMS: Final = 32
"""numpy 1.x refuses more dimensions than this; a mesh may mix numpy versions."""

MAX_BUFFERS: Final = 65536
MAX_SENDER_LEN: Final = 256
"""A node id longer than this is refused: the replay table keeps one per stream."""

UNADDRESSED: Final = NodeId("")
"""The ``to`` of a frame whose sender does not know the receiver's id yet."""

BLANK_TO_TAGS: Final = frozenset({int(PeerHello.TAG), int(Join.TAG)})
"""Wire types accepted with a blank ``to`` (see the module docstring for why it is safe)."""

_U32x2 = struct.Struct("<II")
_PACKER_BUF: Final = 4096  # msgpack's default is 1 MiB, which costs ~20 us per fresh packer

# dtype strings as numpy writes them (``arr.dtype.str``): byte order, kind, item size and an
# optional datetime unit. Anything else (structured, subarray, object, aliases) is refused
# before numpy parses it.
_DTYPE_RE: Final = re.compile(r"[<>|][biufcSUmM][0-9]{1,6}(\[[0-9]{0,4}[a-zA-Z]{1,2}\])?")
_ARRAY_KINDS: Final = "biufcSUmM"

# torch dtype name -> dtype of its little-endian raw bytes on the wire. bfloat16 has no
# numpy twin: its bits travel as int16 and are viewed back on arrival.
_TORCH_WIRE: Final[dict[str, np.dtype[Any]]] = {
    name: np.dtype(code)
    for name, code in {
        "bool": "|b1",
        "uint8": "|u1",
        "int8": "|i1",
        "int16": "<i2",
        "int32": "<i4",
        "int64": "<i8",
        "uint16": "<u2",
        "uint32": "<u4",
        "uint64": "<u8",
        "float16": "<f2",
        "bfloat16": "<i2",
        "float32": "<f4",
        "float64": "<f8",
        "complex64": "<c8",
        "complex128": "<c16",
    }.items()
}

Buffer = bytes | bytearray | memoryview
Chunks = list[Buffer]


def _pad(n: int) -> int:
    return -n % ALIGN


def _bytes_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except TypeError as exc:  # a non-contiguous view: the caller's mistake
            raise LocalProtocolError(f"cannot decode from this buffer: {exc}") from None
    return view


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


def _exact(tp: type, name: str) -> Check:
    def check(v: Any) -> Any:
        if type(v) is not tp:
            raise _fail(name, v)
        return v

    return check


def _check_float(v: Any) -> Any:
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)
    raise _fail("float", v)


def _check_any(v: Any) -> Any:
    return v


def _check_none(v: Any) -> Any:
    if v is not None:
        raise _fail("None", v)
    return v


def _check_array(v: Any) -> Any:
    if not isinstance(v, np.ndarray):
        raise _fail("ndarray", v)
    return v


def _is_torch_tensor_type(tp: Any) -> bool:
    return (
        isinstance(tp, type)
        and tp.__name__ == "Tensor"
        and tp.__module__.split(".", 1)[0] == "torch"
    )


def _check_for(tp: Any) -> Check:
    """A function that validates (and normalises) a decoded value of annotation ``tp``."""
    if tp is Any or tp is object:
        return _check_any
    supertype = getattr(tp, "__supertype__", None)
    if supertype is not None:  # NewType
        return _check_for(supertype)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _check_union(tp, args)
    if tp is type(None):
        return _check_none
    if tp is bool:
        return _exact(bool, "bool")
    if tp is int:
        return _exact(int, "int")
    if tp is float:
        return _check_float
    if tp is str:
        return _exact(str, "str")
    if tp is bytes:
        return _exact(bytes, "bytes")
    if isinstance(tp, type) and issubclass(tp, Enum):
        return _check_enum(tp)
    if isinstance(tp, type) and issubclass(tp, Wire):
        return _check_wire(tp)
    if tp is tuple:
        return _check_tuple((Any, Ellipsis))
    if origin is tuple:
        return _check_tuple(args)
    if origin is frozenset or tp is frozenset:
        return _check_frozenset(_check_for(args[0]) if args else _check_any)
    if origin in (dict, typing.Mapping) or tp is dict:
        kc = _check_for(args[0]) if args else _check_any
        vc = _check_for(args[1]) if args else _check_any
        return _check_dict(kc, vc)
    if origin is np.ndarray or tp is np.ndarray:
        return _check_array
    if _is_torch_tensor_type(tp):
        return _check_tensor(tp)
    if origin is typing.Literal:
        return _check_literal(args)
    raise LocalProtocolError(f"wire field type {tp!r} is not supported by the codec")


def _check_union(tp: Any, args: tuple[Any, ...]) -> Check:
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


def _check_enum(enum_tp: type[Enum]) -> Check:
    def check_enum(v: Any) -> Any:
        # bool is an int to Python: an IntEnum must not accept True for 1.
        if type(v) not in (int, str, float, bytes):
            raise _fail(enum_tp.__name__, v)
        try:
            return enum_tp(v)
        except (ValueError, TypeError):
            raise _fail(enum_tp.__name__, v) from None

    return check_enum


def _check_wire(wire_tp: type[Wire]) -> Check:
    def check_wire(v: Any) -> Any:
        if not isinstance(v, wire_tp):
            raise _fail(wire_tp.__name__, v)
        return v

    return check_wire


def _check_tuple(args: tuple[Any, ...]) -> Check:
    if len(args) == 2 and args[1] is Ellipsis:
        item = _check_for(args[0])

        def check_seq(v: Any) -> Any:
            if type(v) is not list:
                raise _fail("sequence", v)
            return tuple([item(x) for x in v])

        return check_seq
    if args == ((),):  # tuple[()] on Pythons that spell the empty tuple this way
        args = ()
    items = [_check_for(a) for a in args]

    def check_fixed(v: Any) -> Any:
        if type(v) is not list or len(v) != len(items):
            raise _fail(f"tuple of {len(items)}", v)
        return tuple([c(x) for c, x in zip(items, v, strict=True)])

    return check_fixed


def _check_frozenset(item: Check) -> Check:
    def check_frozenset(v: Any) -> Any:
        if type(v) is not list:
            raise _fail("set", v)
        try:
            return frozenset([item(x) for x in v])
        except TypeError:  # an unhashable item
            raise _fail("set of hashable items", v) from None

    return check_frozenset


def _check_dict(kc: Check, vc: Check) -> Check:
    def check_dict(v: Any) -> Any:
        if type(v) is not dict:
            raise _fail("map", v)
        try:
            return {kc(k): vc(x) for k, x in v.items()}
        except TypeError:  # a key made unhashable by its check (a tuple of lists)
            raise _fail("map with hashable keys", v) from None

    return check_dict


def _check_tensor(tensor_tp: type) -> Check:
    def check_tensor(v: Any) -> Any:
        if not isinstance(v, tensor_tp):
            raise _fail("tensor", v)
        return v

    return check_tensor


def _check_literal(args: tuple[Any, ...]) -> Check:
    allowed = {(type(a), a) for a in args}

    def check_literal(v: Any) -> Any:
        try:
            ok = (type(v), v) in allowed
        except TypeError:  # unhashable: certainly not one of the literals
            ok = False
        if not ok:
            raise _fail(f"one of {sorted(map(repr, args))}", v)
        return v

    return check_literal


def _plan(cls: type[Wire]) -> tuple[tuple[str, ...], tuple[Check, ...]]:
    """Field names and validators of a wire type (memoised: a pure function of the class)."""
    return _plan_cached(typing.cast(Any, cls))  # classes hash; typeshed's Hashable disagrees


@functools.cache
def _plan_cached(cls: Any) -> tuple[tuple[str, ...], tuple[Check, ...]]:
    hints = field_types(cls)
    names = field_names(cls)
    return names, tuple(_check_for(hints[n]) for n in names)


def _build_struct(tag: Any, fields: Any) -> Wire:
    cls = REGISTRY.get(tag) if type(tag) is int else None
    if cls is None:
        raise RemoteProtocolError(f"unknown wire type {tag!r}", reason="unknown-type")
    names, checks = _plan(cls)
    if type(fields) is not list or len(fields) != len(names):
        raise RemoteProtocolError(
            f"{cls.__name__}: expected {len(names)} fields", reason="bad-field"
        )
    try:
        values = {n: c(v) for n, c, v in zip(names, checks, fields, strict=True)}
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(f"{cls.__name__}: {exc}", reason=exc.reason) from None
    try:
        return cls(**values)
    except RemoteProtocolError:
        raise
    except (TypeError, ValueError) as exc:  # __post_init__ validation of a wire type
        raise RemoteProtocolError(f"{cls.__name__}: {exc}", reason="bad-field") from None


# ---------------------------------------------------------------------------------------
# Bodies: msgpack header + out-of-band buffers
# ---------------------------------------------------------------------------------------


def _new_packer(default: Callable[[Any], Any]) -> Any:
    return msgpack.Packer(default=default, use_bin_type=True, autoreset=True, buf_size=_PACKER_BUF)


class _Packer:
    """Packs one value at a time, collecting array buffers out of band.

    A msgpack Packer is not reentrant, and ext payloads (structs, arrays) are packed from
    inside ``default``: each nesting level gets a Packer of its own, kept for reuse.
    """

    __slots__ = ("_depth", "_packers", "buffers")

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []
        self._packers: list[Any] = [_new_packer(self._default)]
        self._depth = 0

    def _add_buffer(self, arr: np.ndarray[Any, Any]) -> int:
        # A uint8 view makes every dtype (datetime64 too) exportable as plain bytes.
        self.buffers.append(arr.reshape(-1).view(np.uint8).data)
        return len(self.buffers) - 1

    def _default(self, obj: Any) -> Any:
        if isinstance(obj, Wire):
            names, _ = _plan(type(obj))
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
        depth = self._depth + 1
        if depth >= MAX_EXT_DEPTH:
            raise LocalProtocolError(f"value nests structs or arrays over {MAX_EXT_DEPTH} deep")
        if depth == len(self._packers):
            self._packers.append(_new_packer(self._default))
        self._depth = depth
        try:
            data: bytes = self._packers[depth].pack(value)
        except BaseException:
            # A failed pack leaves the packer's buffer half-filled: start that level afresh.
            self._packers[depth] = _new_packer(self._default)
            raise
        finally:
            self._depth = depth - 1
        return data

    def _array_payload(self, arr: np.ndarray[Any, Any]) -> bytes:
        dtype = arr.dtype
        if dtype.kind not in _ARRAY_KINDS or dtype.names is not None or dtype.subdtype:
            raise LocalProtocolError(f"cannot encode arrays of dtype {dtype}")
        if arr.ndim > MAX_DIMS:
            raise LocalProtocolError(f"cannot encode arrays of over {MAX_DIMS} dimensions")
        shape = list(arr.shape)  # before ascontiguousarray, which turns 0-d into 1-d
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        index = self._add_buffer(arr) if arr.size else -1
        return self._nested([dtype.str, shape, index])

    def _tensor_payload(self, torch: Any, t: Any) -> bytes:
        try:
            t = t.detach()
            if t.layout is not torch.strided:
                raise LocalProtocolError(f"cannot encode {t.layout} tensors; densify first")
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.resolve_conj().resolve_neg().contiguous()
            name = str(t.dtype).removeprefix("torch.")
            wire_dtype = _TORCH_WIRE.get(name)
            if wire_dtype is None:
                raise LocalProtocolError(f"cannot encode tensors of dtype {t.dtype}")
            if t.dim() > MAX_DIMS:
                raise LocalProtocolError(f"cannot encode tensors of over {MAX_DIMS} dimensions")
            raw = (t.view(torch.int16) if name == "bfloat16" else t).numpy()
            # A no-op on little-endian hosts, a byte swap on big-endian ones.
            raw = raw.astype(wire_dtype, copy=False)
        except LocalProtocolError:
            raise
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            raise LocalProtocolError(f"cannot encode tensor: {exc}") from exc
        index = self._add_buffer(raw) if raw.size else -1
        return self._nested([name, list(t.shape), index])

    def pack(self, value: Any) -> bytes:
        """Pack ``value``; its array buffers are left in ``buffers``."""
        self.buffers = []
        self._depth = 0
        try:
            data: bytes = self._packers[0].pack(value)
        except LocalProtocolError:
            self._packers[0] = _new_packer(self._default)
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            self._packers[0] = _new_packer(self._default)
            raise LocalProtocolError(f"cannot encode value: {exc}") from exc
        return data


def _encode_body(p: _Packer, value: Any, offset: int) -> tuple[Chunks, int]:
    header = p.pack(value)
    bufs = p.buffers
    p.buffers = []  # do not keep a large array alive in a reused packer
    if not bufs:
        return [_U32x2.pack(len(header), 0) + header], _U32x2.size + len(header)
    prefix = _U32x2.pack(len(header), len(bufs)) + struct.pack(
        f"<{len(bufs)}Q", *(b.nbytes for b in bufs)
    )
    chunks: Chunks = [prefix + header]
    size = len(prefix) + len(header)
    for b in bufs:
        pad = _pad(offset + size)
        if pad:
            chunks.append(bytes(pad))
            size += pad
        chunks.append(b)
        size += b.nbytes
    return chunks, size


def encode_body(value: Any, *, offset: int = 0) -> tuple[Chunks, int]:
    """Encode ``value`` as a body; returns its chunks (not joined) and their total length.

    ``offset`` is where the body will sit in the buffer the receiver decodes from; array
    buffers are aligned relative to that buffer's start.
    """
    return _encode_body(_Packer(), value, offset)


class _Unpacker:
    __slots__ = ("body", "depth", "offsets")

    def __init__(self, body: memoryview, offsets: list[tuple[int, int]]) -> None:
        self.body = body
        self.offsets = offsets
        self.depth = 0

    def _buffer(self, index: Any, nbytes: int) -> memoryview:
        if type(index) is not int or not 0 <= index < len(self.offsets):
            raise RemoteProtocolError("array buffer index out of range", reason="bad-array")
        start, length = self.offsets[index]
        if length != nbytes:
            raise RemoteProtocolError("array size does not match its buffer", reason="bad-array")
        return self.body[start : start + length]

    @staticmethod
    def _shape(shape: Any) -> tuple[int, ...]:
        if type(shape) is not list or len(shape) > MAX_DIMS:
            raise RemoteProtocolError("bad array shape", reason="bad-array")
        for d in shape:
            if type(d) is not int or not 0 <= d < 2**62:
                raise RemoteProtocolError("bad array shape", reason="bad-array")
        return tuple(shape)

    def ext_hook(self, code: int, data: bytes) -> Any:
        if self.depth >= MAX_EXT_DEPTH:
            raise RemoteProtocolError("value nested too deeply", reason="malformed")
        self.depth += 1
        try:
            if code == EXT_STRUCT:
                parts = self.unpack(data)
                if type(parts) is not list or len(parts) != 2:
                    raise RemoteProtocolError("malformed struct", reason="malformed")
                return _build_struct(parts[0], parts[1])
            if code in (EXT_NDARRAY, EXT_TENSOR):
                parts = self.unpack(data)
                if type(parts) is not list or len(parts) != 3:
                    raise RemoteProtocolError("malformed array", reason="bad-array")
                dtype_name, shape, index = parts
                if code == EXT_TENSOR:
                    return self._tensor(dtype_name, self._shape(shape), index)
                return self._array(_parse_dtype(dtype_name), self._shape(shape), index)
            raise RemoteProtocolError(f"unknown ext type {code}", reason="unknown-type")
        finally:
            self.depth -= 1

    def _array(self, dtype: np.dtype[Any], shape: tuple[int, ...], index: Any) -> Any:
        count = math.prod(shape)
        if count == 0:
            if index != -1 or type(index) is not int:
                raise RemoteProtocolError("empty array with a buffer", reason="bad-array")
            try:
                return np.empty(shape, dtype=dtype)
            except ValueError:  # zero-sized, but the other dimensions overflow numpy
                raise RemoteProtocolError("bad array shape", reason="bad-array") from None
        buf = self._buffer(index, count * dtype.itemsize)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def _tensor(self, dtype_name: Any, shape: tuple[int, ...], index: Any) -> Any:
        wire_dtype = _TORCH_WIRE.get(dtype_name) if type(dtype_name) is str else None
        if wire_dtype is None:
            raise RemoteProtocolError(f"bad tensor dtype {dtype_name!r}", reason="bad-array")
        arr = self._array(wire_dtype, shape, index)
        torch = _torch()
        if torch is None:
            return arr  # a node without torch sees the same data as an ndarray
        if not arr.dtype.isnative:  # only on big-endian hosts: torch needs native order
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.flags.writeable:
            t = torch.from_numpy(arr)
        else:
            with warnings.catch_warnings():
                # A read-only frame: the tensor shares it rather than copying it.
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(arr)
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


def _parse_dtype(name: Any) -> np.dtype[Any]:
    if type(name) is not str or len(name) > 20 or _DTYPE_RE.fullmatch(name) is None:
        raise RemoteProtocolError(f"bad dtype {name!r}", reason="bad-array")
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError):
        raise RemoteProtocolError(f"bad dtype {name!r}", reason="bad-array") from None
    if dtype.kind not in _ARRAY_KINDS or dtype.itemsize == 0:
        raise RemoteProtocolError(f"dtype {name!r} not allowed", reason="bad-array")
    return dtype


def decode_body(body: Buffer, *, offset: int = 0) -> Any:
    """Decode a body made by ``encode_body``; arrays are views into ``body``.

    ``offset`` must be the one the body was encoded with.
    """
    view = _bytes_view(body)
    n = view.nbytes
    if n < _U32x2.size:
        raise RemoteProtocolError("truncated body", reason="truncated")
    header_len, nbuf = _U32x2.unpack_from(view, 0)
    table_end = _U32x2.size + 8 * nbuf
    if nbuf > MAX_BUFFERS or table_end + header_len > n:
        raise RemoteProtocolError("truncated body", reason="truncated")
    offsets: list[tuple[int, int]] = []
    if nbuf:
        lengths = struct.unpack_from(f"<{nbuf}Q", view, _U32x2.size)
        pos = table_end + header_len
        for length in lengths:
            pos += _pad(offset + pos)
            offsets.append((pos, length))
            pos += length
    else:
        pos = table_end + header_len
    if pos != n:
        raise RemoteProtocolError("body length does not match its table", reason="truncated")
    u = _Unpacker(view, offsets)
    try:
        return u.unpack(view[table_end : table_end + header_len])
    except RemoteProtocolError:
        raise
    except RecursionError:
        raise RemoteProtocolError("value nested too deeply", reason="malformed") from None
    except (ValueError, TypeError, OverflowError, MemoryError, KeyError, IndexError) as exc:
        # msgpack raises a family of unrelated types on garbage (ExtraData, StackError,
        # FormatError, UnicodeDecodeError, unhashable map keys, ...).
        raise RemoteProtocolError(f"malformed msgpack: {exc}", reason="malformed") from None


def dumps(value: Any) -> bytes:
    """Encode a value (messages, arrays, tensors, plain data) to one bytes object."""
    chunks, _ = encode_body(value)
    return b"".join(chunks)  # a single chunk is returned as is, not copied


def loads(data: Buffer) -> Any:
    """Decode what ``dumps`` made. Arrays are views into ``data``."""
    return decode_body(data)


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
    to: NodeId
    """This node's id, or ``UNADDRESSED`` on the wire types that may come without one."""
    msg: Wire


class ReplayGuard:
    """Remembers (sender, boot, seq) triples long enough to reject replays.

    Frames older or newer than ``max_skew_s`` are refused outright, so state for a
    (sender, boot) stream is only needed while its frames can still be fresh. Within a
    stream a sliding window of ``window`` sequence numbers tolerates reordering; older
    sequence numbers are refused.

    The table is an LRU capped at ``max_streams``. Forgetting a stream must not reopen it
    to replays, so each forgotten stream leaves its newest timestamp as a floor in one of
    ``max_streams`` buckets (chosen by hash); a stream the guard does not know is accepted
    only with a timestamp above its bucket's floor. Under a flood of streams this may turn
    away a new stream whose clock lags one it shares a bucket with, for at most twice the
    skew; it never lets a replay through, and its memory is fixed.
    """

    __slots__ = ("_floors", "_mask", "_streams", "max_skew_s", "max_streams", "window")

    def __init__(self, *, max_skew_s: float, max_streams: int = 4096, window: int = 1024) -> None:
        if not max_skew_s > 0 or max_streams < 1 or window < 1:
            raise LocalProtocolError("ReplayGuard needs a positive skew, table size and window")
        self.max_skew_s = max_skew_s
        self.max_streams = max_streams
        self.window = window
        self._mask = (1 << window) - 1
        # (sender, boot) -> [highest seq, bitmap of seen seqs below it, newest timestamp]
        self._streams: OrderedDict[tuple[str, int], list[Any]] = OrderedDict()
        self._floors = [-math.inf] * max_streams

    def __len__(self) -> int:
        return len(self._streams)

    def check(self, sender: str, boot: int, seq: int, sent_at: float, now: float) -> None:
        """Record the frame, or raise ``RemoteProtocolError`` if it is stale or a replay."""
        # Written so that a NaN timestamp fails the test instead of passing it.
        if not abs(now - sent_at) <= self.max_skew_s:
            raise RemoteProtocolError(
                f"frame from {sender} is {now - sent_at:+.1f}s off this clock", reason="stale"
            )
        key = (sender, boot)
        state = self._streams.get(key)
        if state is None:
            if sent_at <= self._floors[hash(key) % self.max_streams]:
                raise RemoteProtocolError(
                    f"frame from {sender} is no newer than a forgotten stream", reason="replay"
                )
            self._streams[key] = [seq, 1, sent_at]
            if len(self._streams) > self.max_streams:
                old_key, old = self._streams.popitem(last=False)
                bucket = hash(old_key) % self.max_streams
                self._floors[bucket] = max(self._floors[bucket], old[2])
            return
        self._streams.move_to_end(key)
        top, bits, newest = state
        if seq > top:
            shift = seq - top
            state[0] = seq
            state[1] = ((bits << shift) | 1) & self._mask if shift < self.window else 1
        else:
            age = top - seq
            if age >= self.window or bits >> age & 1:
                raise RemoteProtocolError(f"replayed frame from {sender}", reason="replay")
            state[1] = bits | (1 << age)
        if sent_at > newest:
            state[2] = sent_at


def _envelope(view: memoryview) -> list[Any]:
    """A frame's header, its fields checked for type: [sender, boot, seq, sent_at, to,
    tag, fields]."""
    header = decode_body(view[FRAME_PREFIX:], offset=FRAME_PREFIX)
    if type(header) is not list or len(header) != 7:
        raise RemoteProtocolError("malformed envelope", reason="malformed")
    sender, boot, seq, sent_at, to, _, _ = header
    if not (
        type(sender) is str
        and 0 < len(sender) <= MAX_SENDER_LEN
        and type(boot) is int
        and boot >= 0
        and type(seq) is int
        and seq >= 0
        and type(sent_at) is float
        and type(to) is str
    ):
        raise RemoteProtocolError("malformed envelope", reason="malformed")
    return header


@dataclass(frozen=True, slots=True)
class ForeignHello:
    """What a node of another frame version said in its hello: enough to name it."""

    version: int
    sender: NodeId
    boot: int
    address: str
    package: str


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
        version: int = VERSION,
    ) -> None:
        """``version`` is the frame version spoken; only a test playing an older or newer
        node gives another."""
        if not isinstance(key, bytes | bytearray) or len(key) < 16:
            raise LocalProtocolError("the mesh key must be at least 16 bytes")
        if not isinstance(sender, str) or not 0 < len(sender) <= MAX_SENDER_LEN:
            raise LocalProtocolError(f"a node id is 1 to {MAX_SENDER_LEN} characters")
        if max_frame_bytes <= FRAME_PREFIX + _U32x2.size:
            raise LocalProtocolError(f"max_frame_bytes {max_frame_bytes} is too small")
        self.sender = sender
        self.boot = secrets.randbits(63) if boot is None else boot
        if not 0 <= self.boot < 2**64:
            raise LocalProtocolError("boot must fit in 64 unsigned bits")
        self.max_frame_bytes = max_frame_bytes
        # The prefix is under the MAC; feeding it here costs nothing per frame.
        self.version = version
        self._key = bytes(key)
        self._mac = hmac.new(key, bytes((MAGIC, version)), digestmod=hashlib.sha256)
        self._mac_v1 = hmac.new(key, digestmod=hashlib.sha256)  # only to name old peers
        self._prefix = bytes((MAGIC, version))
        self._seq = 0
        self._packer = _Packer()
        self.replay = ReplayGuard(max_skew_s=max_skew_s)

    @property
    def mesh_key(self) -> bytes:
        """The mesh key (what connection keys are derived with)."""
        return self._key

    def encode(self, msg: Wire, now: float, *, to: NodeId) -> tuple[Chunks, int]:
        """Frame ``msg`` for node ``to``; returns the chunks to write back to back and their
        total size. ``to`` is ``UNADDRESSED`` only where the receiver's id is not known, and
        the receiver accepts that only on the wire types in ``BLANK_TO_TAGS``."""
        if not isinstance(msg, Wire):
            raise LocalProtocolError(f"{type(msg).__name__} is not a wire message")
        if type(to) is not str or len(to) > MAX_SENDER_LEN:
            raise LocalProtocolError(f"a receiver is a node id of at most {MAX_SENDER_LEN}")
        names, _ = _plan(type(msg))
        self._seq += 1
        header = [
            self.sender,
            self.boot,
            self._seq,
            float(now),
            to,
            int(msg.TAG),
            [getattr(msg, n) for n in names],
        ]
        chunks, size = _encode_body(self._packer, header, FRAME_PREFIX)
        total = FRAME_PREFIX + size
        if total > self.max_frame_bytes:
            raise LocalProtocolError(
                f"{type(msg).__name__} is {total} bytes, over the {self.max_frame_bytes} limit"
            )
        mac = self._mac.copy()
        for c in chunks:
            mac.update(c)
        chunks.insert(0, self._prefix + mac.digest())
        return chunks, total

    def encode_bytes(self, msg: Wire, now: float, *, to: NodeId) -> bytes:
        """Frame ``msg`` for ``to`` as one bytes object (a copy of every array in it)."""
        chunks, _ = self.encode(msg, now, to=to)
        return b"".join(chunks)

    def authenticate(self, frame: Buffer) -> None:
        """Check size, magic, version and MAC; raise ``RemoteProtocolError`` if any is wrong.

        A transport calls this on arrival to drop a connection that sends forgeries; the
        frame is then decoded with ``decode(..., authenticated=True)`` so the MAC is computed
        once.
        """
        view = self._checked(frame)
        mac = self._mac.copy()
        mac.update(view[FRAME_PREFIX:])
        if not hmac.compare_digest(mac.digest(), view[2:FRAME_PREFIX]):
            raise AuthenticationError("frame failed authentication")

    def check(self, frame: Buffer) -> None:
        """``authenticate`` without the MAC: for frames that arrived under an AEAD whose
        key only holders of the mesh key can derive (a sealed peer connection), where the
        MAC proves nothing more."""
        self._checked(frame)

    def _checked(self, frame: Buffer) -> memoryview:
        view = _bytes_view(frame)
        n = view.nbytes
        if n > self.max_frame_bytes:
            raise RemoteProtocolError(f"frame of {n} bytes is over the limit", reason="oversized")
        if n < FRAME_PREFIX + _U32x2.size:
            raise RemoteProtocolError("truncated frame", reason="truncated")
        if view[0] != MAGIC:
            raise RemoteProtocolError("not a mesh frame", reason="malformed")
        if view[1] != self.version:
            self._refuse_version(view)
        return view

    def _refuse_version(self, view: memoryview) -> typing.NoReturn:
        version = view[1]
        if version == 1:
            # Version 1 put the body alone under the MAC: a frame that fails that check
            # is a forgery, not an old peer, and is counted as one.
            mac = self._mac_v1.copy()
            mac.update(view[FRAME_PREFIX:])
            if not hmac.compare_digest(mac.digest(), view[2:FRAME_PREFIX]):
                raise AuthenticationError("frame failed authentication")
        which = "it" if version < self.version else "this node"
        raise RemoteProtocolError(
            f"peer speaks frame version {version}, this node {self.version}: upgrade {which}",
            reason="version",
        )

    def foreign_hello(self, frame: Buffer, now: float) -> ForeignHello:
        """The sender, address and package of a ``PeerHello`` in a frame of another version
        (2 or later: the MAC covers the prefix and the body, the envelope and the hello's
        first fields keep their place). The MAC, receiver and replay are checked as for any
        frame. Raises ``RemoteProtocolError`` if the frame is no such hello; a version-1
        frame is refused with reason ``version`` (its hello names nothing more)."""
        view = _bytes_view(frame)
        if not FRAME_PREFIX + _U32x2.size <= view.nbytes <= self.max_frame_bytes:
            raise RemoteProtocolError("hello of a bad size", reason="malformed")
        if view[0] != MAGIC:
            raise RemoteProtocolError("not a mesh frame", reason="malformed")
        version = view[1]
        if version < 2:
            self._refuse_version(view)
        mac = hmac.new(self._key, bytes((MAGIC, version)), digestmod=hashlib.sha256)
        mac.update(view[FRAME_PREFIX:])
        if not hmac.compare_digest(mac.digest(), view[2:FRAME_PREFIX]):
            raise AuthenticationError("frame failed authentication")
        sender, boot, seq, sent_at, to, tag, fields = _envelope(view)
        if tag != int(PeerHello.TAG) or type(fields) is not list or not fields:
            raise RemoteProtocolError("first frame is not a hello", reason="no-hello")
        if to not in (self.sender, UNADDRESSED):
            raise RemoteProtocolError(
                f"hello from {sender} is for another node", reason="wrong-receiver"
            )
        self.replay.check(sender, boot, seq, sent_at, now)
        address = fields[0]
        package = fields[1] if len(fields) > 1 else ""
        if type(address) is not str or type(package) is not str:
            raise RemoteProtocolError("malformed hello", reason="bad-field")
        return ForeignHello(version, NodeId(sender), boot, address, package[:64])

    def decode(self, frame: Buffer, now: float, *, authenticated: bool = False) -> Frame:
        """Authenticate (unless ``authenticate`` already passed), check the receiver and
        replay, decode. A frame for another node is refused before the replay guard
        records it."""
        if not authenticated:
            self.authenticate(frame)
        view = _bytes_view(frame)
        if view.nbytes < FRAME_PREFIX:
            raise RemoteProtocolError("truncated frame", reason="truncated")
        sender, boot, seq, sent_at, to, tag, fields = _envelope(view)
        if to != self.sender and (to or type(tag) is not int or tag not in BLANK_TO_TAGS):
            raise RemoteProtocolError(
                f"frame from {sender} is for {to[:64]!r}, not this node"
                if to
                else f"frame from {sender} names no receiver",
                reason="wrong-receiver",
            )
        self.replay.check(sender, boot, seq, sent_at, now)
        msg = _build_struct(tag, fields)
        return Frame(NodeId(sender), boot, seq, sent_at, NodeId(to), msg)
