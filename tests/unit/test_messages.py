"""Wire types: the registry's invariants, and every registered type round-trips.

Hypothesis strategies are derived from each wire type's annotations, so a message added to
``mesh.protocol.messages`` is covered without touching this file. ``test_codec`` reuses them.

A few test-local wire types (tags 230+) cover field kinds the real messages do not use yet
(arrays, tensors, enums, literals, sets, recursion). They are kept out of ``REGISTRY``
except while a test of this module or ``test_codec`` runs (``local_wire_types``), so other
suites see only the real protocol.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import struct
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mesh.protocol import codec, messages
from mesh.protocol.codec import Codec, dumps, loads
from mesh.protocol.messages import (
    REGISTRY,
    Load,
    NodeId,
    Wire,
    WireType,
    field_names,
    field_types,
    wire,
)

SETTINGS = settings(
    deadline=None,  # a loaded 2-core machine must not turn slowness into failures
    max_examples=80,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PER_TYPE = settings(SETTINGS, max_examples=25)
"""Per-type runs are many and add up; the all-types tests draw more examples."""
MAX_DEPTH = 3
"""Nested wire types and containers deeper than this are generated as their smallest value."""


# ---------------------------------------------------------------------------------------
# Test-local wire types
# ---------------------------------------------------------------------------------------


def _tag(n: int) -> WireType:
    return typing.cast(WireType, n)


class Color(enum.IntEnum):
    RED = 1
    GREEN = 2


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@wire(_tag(230))
class Scalars(Wire):
    """Every scalar and container annotation the codec validates."""

    flag: bool
    count: int
    ratio: float
    name: str
    blob: bytes
    maybe: int | None
    color: Color
    mode: Mode
    pair: tuple[str, int]
    names: frozenset[str]
    load: Load | None
    table: dict[NodeId, tuple[float, ...]]
    kind: Literal["a", "b"]
    anything: Any
    nothing: tuple[()]


@wire(_tag(231))
class Arrays(Wire):
    """Array and tensor fields."""

    array: np.ndarray[Any, Any]
    arrays: tuple[np.ndarray[Any, Any], ...]
    tensor: torch.Tensor
    maybe: np.ndarray[Any, Any] | None


@wire(_tag(232))
class Chain(Wire):
    """A wire type that contains itself."""

    payload: int
    child: Chain | None


LOCAL_TYPES: tuple[type[Wire], ...] = (Scalars, Arrays, Chain)
for _cls in LOCAL_TYPES:
    del REGISTRY[int(_cls.TAG)]


@pytest.fixture(scope="module", autouse=True)
def local_wire_types() -> Iterator[None]:
    """Registers the test-local wire types for one module's tests, then removes them."""
    for cls in LOCAL_TYPES:
        REGISTRY[int(cls.TAG)] = cls
    try:
        yield
    finally:
        for cls in LOCAL_TYPES:
            REGISTRY.pop(int(cls.TAG), None)


# ---------------------------------------------------------------------------------------
# Strategies built from annotations
# ---------------------------------------------------------------------------------------

U64 = 2**64 - 1
I64_MIN = -(2**63)

json_like: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(I64_MIN, U64)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)
"""Plain values that msgpack carries as they are (lists, not tuples; str keys)."""


def array_dtypes() -> st.SearchStrategy[np.dtype[Any]]:
    """Every dtype kind the codec carries, in both byte orders."""
    return st.one_of(
        hnp.boolean_dtypes(),
        hnp.integer_dtypes(endianness="?"),
        hnp.unsigned_integer_dtypes(endianness="?"),
        hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64)),
        hnp.complex_number_dtypes(endianness="?"),
        hnp.datetime64_dtypes(endianness="?"),
        hnp.timedelta64_dtypes(endianness="?"),
        hnp.byte_string_dtypes(max_len=6),
        hnp.unicode_string_dtypes(endianness="?", max_len=6),
        st.just(np.dtype(np.longdouble)),
    )


@st.composite
def ndarrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    """Arrays of any carried dtype and shape (0-d, empty), often not C-contiguous."""
    dtype = draw(array_dtypes())
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    arr: np.ndarray[Any, Any] = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(["c", "transpose", "fortran", "strided", "reversed"]))
    if layout == "transpose":
        arr = arr.T
    elif layout == "fortran":
        arr = np.asfortranarray(arr)
    elif layout == "strided" and arr.ndim:
        arr = arr[::2]
    elif layout == "reversed" and arr.ndim:
        arr = arr[::-1]
    return arr


TORCH_DTYPES = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """CPU tensors of every carried dtype, some non-contiguous, conjugated or with grad."""
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    n = math.prod(shape)
    values = draw(st.lists(st.integers(-100, 100), min_size=n, max_size=n))
    t = torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)
    layout = draw(st.sampled_from(["c", "transpose", "strided", "conj", "grad"]))
    if layout == "transpose" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif layout == "strided" and t.dim():
        t = t[::2]
    elif layout == "conj" and t.is_complex():
        t = t.conj()
    elif layout == "grad" and t.is_floating_point():
        t = t.clone().requires_grad_(True)
    return t


def strategy_for(tp: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Valid values of annotation ``tp``; fails the test for an annotation it cannot cover."""
    deep = depth >= MAX_DEPTH
    if tp is Any or tp is object:
        return json_like
    supertype = getattr(tp, "__supertype__", None)
    if supertype is not None:
        return strategy_for(supertype, depth)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if deep and type(None) in args:
            return st.none()
        return st.one_of([strategy_for(a, depth) for a in args])
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(I64_MIN, U64)
    if tp is float:
        return st.floats()
    if tp is str:
        return st.text(max_size=12)
    if tp is bytes:
        return st.binary(max_size=12)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    if isinstance(tp, type) and issubclass(tp, Wire):
        return wire_values(tp, depth + 1)
    size = 0 if deep else 4
    if tp is tuple:
        return st.lists(json_like, max_size=size).map(tuple)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(strategy_for(args[0], depth + 1), max_size=size).map(tuple)
        if args in ((), ((),)):  # tuple[()]
            return st.just(())
        return st.tuples(*(strategy_for(a, depth + 1) for a in args))
    if origin is frozenset:
        return st.frozensets(strategy_for(args[0], depth + 1), max_size=size)
    if origin is dict or tp is dict:
        key = strategy_for(args[0], depth + 1) if args else st.text(max_size=4)
        value = strategy_for(args[1], depth + 1) if args else json_like
        return st.dictionaries(key, value, max_size=size)
    if origin is np.ndarray or tp is np.ndarray:
        return ndarrays()
    if tp is torch.Tensor:
        return tensors()
    if origin is Literal:
        return st.sampled_from(args)
    pytest.fail(f"no strategy for wire field type {tp!r}: teach strategy_for and the codec")


def wire_values(cls: type[Wire], depth: int = 0) -> st.SearchStrategy[Wire]:
    """Valid instances of ``cls``; values its own validation refuses are skipped."""
    hints = field_types(cls)
    fields = {n: strategy_for(hints[n], depth) for n in field_names(cls)}

    @st.composite
    def build(draw: st.DrawFn) -> Wire:
        kwargs = {n: draw(s) for n, s in fields.items()}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError):  # a __post_init__ check: not a valid message
            assume(False)
            raise

    return build()


def registered_types() -> list[type[Wire]]:
    return [REGISTRY[tag] for tag in sorted(REGISTRY)]


any_message: st.SearchStrategy[Wire] = st.deferred(
    lambda: st.sampled_from(registered_types()).flatmap(wire_values)
)
"""Any registered wire type (looked up when drawn, so types added later are covered)."""


def as_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # same item size: a view that works on any strides
    return np.ascontiguousarray(t.numpy()).tobytes()


def same(a: Any, b: Any) -> bool:
    """Structural equality for decoded values: exact types, bit-exact floats and arrays."""
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.dtype.byteorder == b.dtype.byteorder
            and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
        )
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and as_bytes(a) == as_bytes(b)
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, Wire):
        return all(same(getattr(a, n), getattr(b, n)) for n in field_names(type(a)))
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    return bool(a == b)


# ---------------------------------------------------------------------------------------
# Registry invariants
# ---------------------------------------------------------------------------------------

PINNED = {
    "OBJECT_REF": 64,
    "PEER_HELLO": 80,
    "CAPABILITIES": 96,
    "LOAD": 97,
    "REQUIREMENTS": 98,
}
"""Numbers already on the wire. Members may be added; these may never change."""


def test_pinned_wire_numbers_never_change() -> None:
    for name, number in PINNED.items():
        assert WireType[name] == number


def test_wire_numbers_are_unique_and_in_range() -> None:
    values = [m.value for m in WireType]
    assert len(values) == len(set(values)) == len(WireType.__members__)  # no aliases
    assert all(1 <= v <= 127 for v in values)


def test_every_protocol_type_is_registered_under_a_wiretype_member() -> None:
    protocol = {tag: cls for tag, cls in REGISTRY.items() if cls not in LOCAL_TYPES}
    assert protocol, "mesh.protocol.messages registers no wire types"
    for tag, cls in protocol.items():
        assert isinstance(cls.TAG, WireType)
        assert int(cls.TAG) == tag
        assert cls.__module__ == messages.__name__ or cls.__module__.startswith("mesh.")


@pytest.mark.parametrize("cls", registered_types(), ids=lambda c: c.__name__)
def test_wire_types_are_frozen_slotted_keyword_only(cls: type[Wire]) -> None:
    assert dataclasses.is_dataclass(cls)
    params = cls.__dataclass_params__
    assert params.frozen
    assert "__slots__" in cls.__dict__
    assert all(f.kw_only for f in dataclasses.fields(cls))
    with pytest.raises(TypeError):
        cls(*range(len(field_names(cls))))


@pytest.mark.parametrize("cls", registered_types(), ids=lambda c: c.__name__)
def test_codec_can_validate_every_field_type(cls: type[Wire]) -> None:
    names, checks = codec._plan(cls)
    assert names == field_names(cls)
    assert len(checks) == len(names)


def test_registering_a_tag_twice_is_refused() -> None:
    with pytest.raises(TypeError, match="registered twice"):

        @wire(WireType.LOAD)
        class Again(Wire):
            x: int


def test_messages_cannot_be_mutated() -> None:
    load = Load(running=1, queued=2, backlog_s=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        load.running = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------


@SETTINGS
@given(any_message)
def test_every_message_round_trips_through_dumps(msg: Wire) -> None:
    assert same(_canonical(msg), loads(dumps(msg)))


@SETTINGS
@given(any_message, st.floats(0, 2e9))
def test_every_message_round_trips_through_a_frame(msg: Wire, now: float) -> None:
    key = b"m" * 32
    tx = Codec(key, NodeId("tx"), max_frame_bytes=1 << 24, boot=3)
    rx = Codec(key, NodeId("rx"), max_frame_bytes=1 << 24)
    frame = rx.decode(tx.encode_bytes(msg, now, to=NodeId("rx")), now)
    assert (frame.sender, frame.boot, frame.seq, frame.sent_at) == ("tx", 3, 1, now)
    assert same(_canonical(msg), frame.msg)


@pytest.mark.parametrize("cls", registered_types(), ids=lambda c: c.__name__)
def test_each_type_round_trips(cls: type[Wire]) -> None:
    @PER_TYPE
    @given(wire_values(cls))
    def check(msg: Wire) -> None:
        assert same(_canonical(msg), loads(dumps([msg, {"k": msg}]))[1]["k"])

    check()


def _canonical(value: Any) -> Any:
    """What a value decodes to: tensors resolved (conjugation applied, grad dropped)."""
    if isinstance(value, torch.Tensor):
        return value.detach().resolve_conj().resolve_neg()
    if isinstance(value, Wire):
        cls = type(value)
        return cls(**{n: _canonical(getattr(value, n)) for n in field_names(cls)})
    if isinstance(value, tuple):
        return tuple(_canonical(v) for v in value)
    if isinstance(value, frozenset):
        return value
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def test_int_in_a_float_field_becomes_a_float() -> None:
    fields = [1, 2, 3]  # backlog_s arrives as an int from a peer that packed 3.0 tightly
    msg = codec._build_struct(int(WireType.LOAD), fields)
    assert msg == Load(running=1, queued=2, backlog_s=3.0)
    assert isinstance(msg, Load)
    assert type(msg.backlog_s) is float


def test_decoded_sequences_are_tuples_and_sets_frozensets() -> None:
    msg = Scalars(
        flag=True,
        count=-5,
        ratio=0.25,
        name="n",
        blob=b"\x00",
        maybe=None,
        color=Color.GREEN,
        mode=Mode.SLOW,
        pair=("x", 1),
        names=frozenset({"a", "b"}),
        load=Load(running=0, queued=1, backlog_s=2.0),
        table={NodeId("n1"): (1.0, 2.0)},
        kind="b",
        anything=[1, {"z": None}],
        nothing=(),
    )
    out = loads(dumps(msg))
    assert out == msg
    assert hash(out.pair) == hash(("x", 1))
    assert out.color is Color.GREEN
    assert out.mode is Mode.SLOW
