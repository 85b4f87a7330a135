"""Hostile but well-typed values, and the codec hop every fuzzed message takes.

The codec refuses malformed frames and checks every decoded field against its annotation,
so what reaches a core from an authenticated peer (a careless or compromised key holder)
is a message of the right shape whose *values* may be anything the types allow: NaN and
infinities in floats, integers at the edges of 64 bits, empty, long or odd strings,
mismatched parallel tuples, ids nobody issued, payloads nested as deep as the codec lets
them. ``wire_of`` builds any registered wire type from its field annotations with such
values; ``Pools`` lets a test mix in the ids, numbers and addresses a core in a live state
really knows, so that the hostile values get past the first lookups and reach deep code.

``CodecHop`` frames a message with the mesh key for its receiver and decodes it there, so
that a core is only ever fed what the real codec would deliver.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import resource
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.protocol.codec import Codec
from mesh.protocol.messages import (
    REGISTRY,
    Address,
    NodeId,
    ObjectRef,
    TaskCall,
    TaskId,
    Wire,
    field_names,
    field_types,
)

T = TypeVar("T")

FUZZ = settings(
    max_examples=250,
    deadline=None,  # a loaded 2-core CI machine must not turn slowness into failures
    derandomize=True,  # the same examples on every run: CI stays deterministic
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
"""Settings of every fuzz test: bounded, deterministic, no example database."""

KEY = b"fuzz-mesh-key/0123456789abcdef!!"
WALL = 1_700_000_000.0
"""Wall-clock seconds given to the codec on both ends (cores get their own monotonic time)."""
MAX_FRAME = 1 << 24

NAN = math.nan
INF = math.inf
HOSTILE_FLOATS: tuple[float, ...] = (
    NAN,
    INF,
    -INF,
    1e308,
    -1e308,
    sys.float_info.max,
    5e-324,
    -5e-324,
    0.0,
    -0.0,
    -1.0,
    1e-300,
    1e-9,
    1e300,
    2.0**53,
    0.001,
    1.0,
    2.5,
)
HOSTILE_INTS: tuple[int, ...] = (
    0,
    1,
    -1,
    2,
    255,
    2**31,
    2**53 + 1,
    2**62 - 1,
    2**62,
    2**62 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**63),
)
"""Integers the wire carries (msgpack: -2**63 .. 2**64 - 1), at every edge that matters."""
HOSTILE_TEXT: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "é",
    "🦀🦀",
    "\u202e",
    "a" * 129,
    "b" * 257,
    "c" * 5000,
    "../../etc/passwd",
    "%s%n{0}",
    "t",
    "u",
    "cpu",
    "gpu",
    "memory",
    "numpy",
    ">=2.2",
    "===",
    "!=*",
    "~=1",
)
LONG: tuple[int, ...] = (64, 300, 4097)
"""Lengths of the long tuples and maps: past the per-message bounds of both cores."""


def hostile_floats() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(HOSTILE_FLOATS), st.floats())


def hostile_ints() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from(HOSTILE_INTS), st.integers(-3, 10), st.integers(-(2**63), 2**64 - 1)
    )


def hostile_text() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=12))


def pooled(pool: Sequence[T], hostile: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Mostly values from ``pool`` (what a live core knows), sometimes hostile ones."""
    if not pool:
        return hostile
    real = st.sampled_from(tuple(pool))
    return st.one_of(real, real, hostile)


@dataclass(frozen=True)
class Pools:
    """What a core in a live state knows, for the generic strategy to draw from."""

    nodes: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    cfps: tuple[int, ...] = ()
    queries: tuple[int, ...] = ()
    counters: tuple[int, ...] = ()
    """Incarnations, versions and sequence numbers in use (and one either side of them)."""

    def node_ids(self) -> st.SearchStrategy[NodeId]:
        return pooled(self.nodes, hostile_text()).map(NodeId)

    def task_ids(self) -> st.SearchStrategy[TaskId]:
        return pooled(self.tasks, hostile_text()).map(TaskId)

    def address_values(self) -> st.SearchStrategy[Address]:
        return pooled(self.addresses, hostile_text()).map(Address)

    def ints_for(self, field: str) -> st.SearchStrategy[int]:
        if field == "cfp":
            return pooled(self.cfps, hostile_ints())
        if field == "query":
            return pooled(self.queries, hostile_ints())
        if field in ("incarnation", "version", "seq", "entries"):
            near = tuple(c + d for c in self.counters for d in (-1, 0, 1) if c + d >= 0)
            return pooled(near, hostile_ints())
        return hostile_ints()


# ---------------------------------------------------------------------------------------
# Opaque payloads (``Any`` fields): task payloads, results, errors
# ---------------------------------------------------------------------------------------


class Deep(list[Any]):
    """A list that prints as a summary: printing the nest itself (hypothesis does, to report
    an example) would recurse past Python's limit. The codec sends it as a plain list."""

    def __repr__(self) -> str:
        return f"<list nested {nesting(self)} deep>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


class DeepCall(TaskCall):
    """A ``TaskCall`` that prints as a summary, for the same reason as ``Deep``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<TaskCall nested {nesting(self)} deep>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def nest(leaf: Any, depth: int) -> Deep:
    """``leaf`` inside ``depth`` lists."""
    for _ in range(depth - 1):
        leaf = [leaf]
    return Deep([leaf])


def call_chain(levels: int, depth: int = 400) -> DeepCall:
    """Task calls nested ``levels`` deep, each holding the next inside ``depth`` lists.

    The codec bounds nesting per msgpack level, and every wire type inside a value is a
    level of its own, so the decoded value is far deeper than any one level allows. (Ten
    levels and more nest deeper than the recursion limit Hypothesis raises while it runs
    a test, so that what fails in production fails here too.)
    """
    value: Any = "leaf"
    for _ in range(levels):
        value = DeepCall(name="t", args=(nest(value, depth),), kwargs={}, timeout_s=None)
    assert isinstance(value, DeepCall)
    return value


ARRAYS: tuple[np.ndarray[Any, Any], ...] = (
    np.zeros(0),
    np.array([NAN, INF, -INF]),
    np.arange(6, dtype=np.int32).reshape(2, 3),
    np.zeros((0, 7), dtype=np.float32),
    np.array(["x", "yy"]),
)


def object_refs(pools: Pools) -> st.SearchStrategy[ObjectRef]:
    """References whose size, shape and dtype lie about the object."""
    return st.builds(
        ObjectRef,
        id=hostile_text(),
        holder=pools.node_ids(),
        nbytes=hostile_ints(),
        dtype=st.one_of(st.sampled_from(("", "<f8", "|O", "<U999999", "garbage")), hostile_text()),
        shape=st.lists(hostile_ints(), max_size=4).map(tuple),
    )


@functools.cache
def any_values(pools: Pools, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values of an ``Any`` field: plain trees, deep nests, arrays and lying wire values."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        hostile_ints(),
        hostile_floats(),
        hostile_text(),
        st.binary(max_size=16),
        st.sampled_from(ARRAYS),
    )
    tree = st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(hostile_text(), inner, max_size=3),
        ),
        max_leaves=10,
    )
    options: list[st.SearchStrategy[Any]] = [
        tree,
        st.tuples(leaves, st.sampled_from((100, 480))).map(lambda p: nest(p[0], p[1])),
        st.fixed_dictionaries({"message": tree, "exc_type": hostile_text(), "traceback": tree}),
    ]
    if depth < 2:
        options += [
            st.sampled_from((2, 8)).map(call_chain),
            st.sampled_from((4, 12)).map(call_chain),
            object_refs(pools),
            st.builds(
                TaskCall,
                name=hostile_text(),
                args=st.lists(any_values(pools, depth + 1), max_size=3).map(tuple),
                kwargs=st.dictionaries(hostile_text(), any_values(pools, depth + 1), max_size=2),
                timeout_s=st.one_of(st.none(), hostile_floats()),
            ),
        ]
    return st.one_of(options)


# ---------------------------------------------------------------------------------------
# Any wire type, from its annotations
# ---------------------------------------------------------------------------------------


def _distinct(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _sequences(item: st.SearchStrategy[Any], ids: str | None, depth: int) -> st.SearchStrategy[Any]:
    short = st.lists(item, max_size=4).map(tuple)
    if depth > 0:  # long runs only at the top: a long run of long runs costs seconds to decode
        return short
    options: list[st.SearchStrategy[Any]] = [
        short,
        short,
        short,
        st.tuples(item, st.sampled_from(LONG[:2])).map(lambda p: (p[0],) * p[1]),
    ]
    if ids is not None:  # long and all distinct, so that only the length is wrong
        options.append(st.sampled_from(LONG).map(lambda n: tuple(_distinct(ids, n))))
    return st.one_of(options)


def _maps(
    keys: st.SearchStrategy[Any], values: st.SearchStrategy[Any], ids: str | None, depth: int
) -> st.SearchStrategy[Any]:
    short = st.dictionaries(keys, values, max_size=4)
    options: list[st.SearchStrategy[Any]] = [short, short, short]
    if ids is not None and depth == 0:
        options.append(
            st.tuples(values, st.sampled_from(LONG)).map(
                lambda p: dict.fromkeys(_distinct(ids, p[1]), p[0])
            )
        )
    return st.one_of(options)


def _id_prefix(tp: Any) -> str | None:
    """A prefix for long runs of distinct keys of a string-like type, else None."""
    if tp is TaskId:
        return "flood-task-"
    if tp is NodeId:
        return "flood-node-"
    if tp is str or tp is Address:
        return "flood-"
    return None


def for_annotation(
    tp: Any, pools: Pools, field: str = "", depth: int = 0
) -> st.SearchStrategy[Any]:
    """Hostile values of annotation ``tp`` that the codec still accepts as that type.

    Raises TypeError for an annotation it does not know, so that a new kind of field in
    ``mesh.protocol.messages`` fails here loudly instead of going unfuzzed.
    """
    if tp is Any or tp is object:
        return any_values(pools, depth)
    if tp is NodeId:
        return pools.node_ids()
    if tp is TaskId:
        return pools.task_ids()
    if tp is Address:
        return pools.address_values()
    supertype = getattr(tp, "__supertype__", None)
    if supertype is not None:
        return for_annotation(supertype, pools, field, depth)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([for_annotation(a, pools, field, depth) for a in args])
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return pools.ints_for(field)
    if tp is float:
        return hostile_floats()
    if tp is str:
        return hostile_text()
    if tp is bytes:
        return st.binary(max_size=32)
    if isinstance(tp, type) and issubclass(tp, Wire):
        return wire_of(tp, pools, depth + 1)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = for_annotation(args[0], pools, field, depth + 1)
            # A long run of opaque values could repeat a deep payload hundreds of times.
            return _sequences(item, _id_prefix(args[0]), depth + (args[0] is Any))
        return st.tuples(*[for_annotation(a, pools, field, depth + 1) for a in args])
    if origin is dict:
        keys = for_annotation(args[0], pools, field, depth + 1)
        values = for_annotation(args[1], pools, field, depth + 1)
        return _maps(keys, values, _id_prefix(args[0]), depth)
    raise TypeError(f"no hostile strategy for field {field!r} of type {tp!r}")


@functools.cache
def wire_of(cls: type[Wire], pools: Pools, depth: int = 0) -> st.SearchStrategy[Wire]:
    """Instances of ``cls`` whose every field is hostile but of its annotated type.

    Memoised: building a strategy costs more than drawing from it, and tests ask for the
    same ones again and again."""
    hints = field_types(cls)
    fields = {n: for_annotation(hints[n], pools, n, depth) for n in field_names(cls)}
    return st.builds(cls, **fields)


def registered_types() -> list[type[Wire]]:
    """Every wire type of the protocol (test-local types of other suites left out)."""
    return [cls for _, cls in sorted(REGISTRY.items()) if not cls.__module__.startswith("tests.")]


@functools.cache
def any_wire(pools: Pools) -> st.SearchStrategy[Wire]:
    """Any registered wire type, hostile values."""
    return st.sampled_from(registered_types()).flatmap(lambda cls: wire_of(cls, pools))


# ---------------------------------------------------------------------------------------
# The codec hop, the property, and a bound on memory
# ---------------------------------------------------------------------------------------

_ENCODE_NAMES_RECEIVER = "to" in inspect.signature(Codec.encode).parameters


def frame(tx: Codec, msg: Wire, receiver: NodeId) -> bytes:
    """``msg`` framed by ``tx`` for ``receiver`` (frames name their receiver since v2)."""
    options: dict[str, Any] = {"to": receiver} if _ENCODE_NAMES_RECEIVER else {}
    data: bytes = tx.encode_bytes(msg, WALL, **options)
    return data


class CodecHop:
    """Frames messages from any sender to one receiver with the mesh key, decodes them there."""

    def __init__(self, receiver: str) -> None:
        self.receiver = NodeId(receiver)
        self.rx = Codec(KEY, self.receiver, max_frame_bytes=MAX_FRAME, boot=1)
        self._tx: dict[str, Codec] = {}
        self.refused = 0

    def carry(self, src: str, msg: Wire) -> Wire | None:
        """``msg`` as the receiver's codec decodes it, or None if the codec will not carry
        it (a sender id or a value it cannot frame, a frame over the size limit)."""
        try:
            tx = self._tx.get(src)
            if tx is None:
                tx = self._tx[src] = Codec(KEY, NodeId(src), max_frame_bytes=MAX_FRAME, boot=2)
            data = frame(tx, msg, self.receiver)
        except LocalProtocolError:
            self.refused += 1
            return None
        try:
            return self.rx.decode(data, WALL).msg
        except RemoteProtocolError:
            self.refused += 1
            return None


_PAIRS: dict[tuple[str, str], tuple[Codec, Codec]] = {}


def encodes(msg: Wire, sender: str = "me", receiver: str = "peer") -> Wire:
    """What ``msg`` decodes to after a full frame round trip; fails if it cannot be sent.

    The codec pairs are kept between calls (making one costs more than a small frame):
    each frame has a sequence number of its own, so their replay guards never object.
    """
    pair = _PAIRS.get((sender, receiver))
    if pair is None:
        pair = _PAIRS[(sender, receiver)] = (
            Codec(KEY, NodeId(sender), max_frame_bytes=1 << 28, boot=3),
            Codec(KEY, NodeId(receiver), max_frame_bytes=1 << 28, boot=4),
        )
    tx, rx = pair
    return rx.decode(frame(tx, msg, NodeId(receiver)), WALL).msg


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


@contextlib.contextmanager
def memory_cap(headroom: int = 1 << 30) -> Iterator[None]:
    """Bound this process's address space to its current size plus ``headroom``.

    Hostile input can make a core allocate gigabytes in one call; under the cap that fails
    at once with ``MemoryError`` (which the property reports) instead of exhausting a CI
    machine. Linux only; elsewhere nothing is bounded.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    cap = size + headroom
    for limit in (soft, hard):
        if limit != resource.RLIM_INFINITY:
            cap = min(cap, limit)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def nesting(value: Any) -> int:
    """How deep ``value`` nests (lists, tuples, maps, wire types), without recursing."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(v, list | tuple):
            stack.extend((x, d + 1) for x in v)
        elif isinstance(v, dict):
            stack.extend((x, d + 1) for x in (*v.keys(), *v.values()))
        elif isinstance(v, Wire):
            stack.extend((getattr(v, n), d + 1) for n in field_names(type(v)))
    return deepest


def finite_nonneg(x: float) -> bool:
    return math.isfinite(x) and x >= 0.0
