"""Hostile HTTP requests and client-session messages against one real node, drawn by
hypothesis (issue 11, the fuzz suite, for the side that clients and strangers reach).

One ``mesh-node`` (``test`` preset, no peers) serves the whole module. Examples send
requests signed for it as ``mesh.client.sign_request`` signs them, whose bodies, query
strings, ids and methods are hostile: NaN and infinities, numbers past every bound and
past 64 bits, nesting on both sides of ``api_max_nesting`` and past the JSON parser's own
limit, wrong types in every field, unknown fields, long strings, unknown tasks, bogus ids,
object references whose size, dtype and shape lie; and requests without a valid proof
(none, forged, stale, replayed, for another node, over another body). Client sessions
(``/v1/session``) get msgpack batches made by ``mesh.protocol.codec.dumps`` from hostile values,
bodies whose array headers lie about their buffers, shared-memory uploads that lie about
their size, raw bytes and text frames.

Each example knows how it was built, so it knows the answer ``node.api`` documents for it:
202 (or 200 with ``wait``) for an accepted submission, 400 naming the reason, 401 without a
valid proof, 404 for an unknown id or path, 405 for a method a route does not serve, 413
for a body over the route's limit. After every example:

* the status is exactly that one, never a 500, with a JSON ``error`` where the API writes
  one; an accepted task's error record is never an internal error;
* a session message the node cannot take is answered with ``{"op": "error"}`` and ends
  the session; a well-formed batch gets one result per task, none an internal error, each
  readable through ``GET /v1/tasks/{id}``, and the session goes on;
* a refused request changed nothing: it is counted in ``mesh_rejected_frames_total``, no
  task was submitted, no object released;
* the node process is alive, answers ``GET /v1/hello``, and its internal-error counter
  (``mesh_rejected_frames_total{reason="http-internal-error"}``) did not grow (it stays 0
  unless an example fails: each example is blamed for its own only).

The requests that found bugs in ``node.api`` are kept at the end as plain regression cases.
Examples are derandomized and bounded (``hostile.FUZZ``), so CI sees the same ones on
every run; no assertion depends on timing (the only clock is a one-minute bound on any one
example, past which the node counts as hung).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import json
import math
import re
import secrets
import struct
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote

import aiohttp
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from yarl import URL

from mesh.config import NodeConfig
from mesh.errors import LocalProtocolError, MeshError
from mesh.protocol.codec import ALIGN, EXT_NDARRAY, EXT_STRUCT, EXT_TENSOR, dumps, loads
from mesh.protocol.messages import REGISTRY, NodeId, ObjectRef, Segment
from mesh.protocol.sealing import OBJECT_CONTEXT, BodyOpener, Exchange
from mesh.runtime.auth import (
    HEADER_BODY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIME,
    HEADER_TO,
    key_bytes,
    sign_request,
)
from mesh.runtime.http import (
    HELLO_PATH,
    HOST_PARAM,
    OBJECT_CONTENT_TYPE,
    SEAL_HEADER,
    SEAL_PARAM,
    SEGMENT_CONTENT_TYPE,
    SESSION_PATH,
    SIZE_HEADER,
)
from mesh.runtime.shm import SHM_DIR, UPLOAD_PREFIX, host_id
from tests.node.conftest import Cluster, Node

from .hostile import (
    ARRAYS,
    FUZZ,
    HOSTILE_FLOATS,
    Pools,
    any_values,
    call_chain,
    hostile_ints,
    hostile_text,
    memory_cap,
    nest,
)

T = TypeVar("T")

CONFIG: Final = NodeConfig.test()
SMALL_BODY: Final = CONFIG.http_small_body_bytes
"""Body limit of every route but ``POST /v1/tasks`` (whose limit is far above any body here)."""
NEST: Final = CONFIG.api_max_nesting
MAX_WAIT: Final = CONFIG.api_max_wait_s
MAX_TIMEOUT: Final = CONFIG.api_max_task_timeout_s
MAX_AMOUNT: Final = 10**18
"""``node.api._MAX_AMOUNT`` (1e18, exactly): the largest count or resource amount."""
MAX_SHAPE: Final = 32
"""Most dimensions an object reference may claim (``node.api._object_ref``)."""
MAX_URL: Final = 8190
"""aiohttp's bound on a request target: past it, its parser answers 400 by itself."""
HANG_S: Final = 60.0
"""Longest any one example may take: a node that needs longer to answer hangs."""

GET_HEAD: Final = frozenset({"GET", "HEAD"})
ROUTES: Final[dict[str, frozenset[str]]] = {
    "/v1/status": GET_HEAD,
    "/v1/peers": GET_HEAD,
    HELLO_PATH: GET_HEAD,
    "/metrics": GET_HEAD,
    "/openapi.json": GET_HEAD,
    SESSION_PATH: GET_HEAD,
    "/v1/tasks": frozenset({"POST"}),
}
"""The routes without an id, and the methods each serves (``add_get`` serves HEAD too)."""
PUBLIC: Final = frozenset({HELLO_PATH, "/metrics", "/openapi.json"})
UNKNOWN_PATHS: Final = (
    "/",
    "/v1",
    "/v1/",
    "/v2/status",
    "/v1/status/",
    "/V1/STATUS",
    "/v1/objects",
    "/v1/objects/",
    "/v1/tasks/",
    "/v1/tasks/x/y",
    "/v1/tasks/x/why/more",
    "/v1/hello/x",
    "/index.html",
)
METHODS: Final = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
TASKS: Final = ("echo", "noop", "fail", "whoami", "array_sum", "no_such_task")
"""Task names examples submit: quick builtins (never ``sleep``, ``crash`` or ``make_array``,
whose hostile arguments would hold a slot or memory for long) and one nobody runs."""
FIELDS: Final = frozenset({"task", "args", "kwargs", "timeout", "wait", "labels", "resources"})
INTERNAL: Final = "http-internal-error"
_METRIC: Final = re.compile(r'^mesh_rejected_frames_total\{reason="([^"]*)"\} (\S+)$', re.M)


def examples(n: int) -> settings:
    """``hostile.FUZZ`` (derandomized, no deadline, no database) with ``n`` examples."""
    return settings(
        FUZZ,
        max_examples=n,
        suppress_health_check=[*FUZZ.suppress_health_check, HealthCheck.large_base_example],
    )


def weighted(*options: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """Draw from ``options`` in proportion to their weights. (``st.one_of`` flattens nested
    ``one_of`` strategies into one list of branches, so a strategy with many alternatives
    of its own would swamp the others, and repeating one would not weigh it.)"""
    # Indices, not the strategies themselves: hypothesis prints a strategy (reporting a
    # failure) by printing its parts, and nested tables of repeated parts print in gigabytes.
    strategies = tuple(strategy for _, strategy in options)
    table = tuple(i for i, (weight, _) in enumerate(options) for _ in range(weight))
    return st.sampled_from(table).flatmap(lambda i: strategies[i])


def _short(data: bytes | str, limit: int = 300) -> str:
    text = repr(data[:limit])
    return text if len(data) <= limit else f"{text}...({len(data)} in all)"


# ---------------------------------------------------------------------------------------
# The node under test
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> str:
        """The JSON ``error`` the API wrote (fails unless there is one)."""
        doc = self.json()
        assert isinstance(doc, dict), self
        assert isinstance(doc.get("error"), str), self
        return str(doc["error"])

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.content_type!r}, {_short(self.body)})"


@dataclass(frozen=True)
class Known:
    """What the node holds, found once per module; examples mix it into hostile values so
    that they get past the first lookups."""

    node: str
    host: str
    """This machine's ``host_id``: with it as ``?host=`` an object fetch gets a segment."""
    task: str
    """A finished task."""
    kept: str
    """An object under the segment threshold (fetched as bytes); never released."""
    shared: str
    """An object over the segment threshold; never released."""
    victim: str
    """An object examples may release."""

    @property
    def objects(self) -> tuple[str, str, str]:
        return (self.kept, self.shared, self.victim)

    @property
    def prefix(self) -> str:
        return self.task.rsplit("-", 1)[0]


async def _bounded(coro: Coroutine[Any, Any, T]) -> T:
    try:
        async with asyncio.timeout(HANG_S):
            return await coro
    except TimeoutError:
        raise AssertionError(f"no answer within {HANG_S:g} s: the node hangs") from None


class Target:
    """The node, the event loop the examples run on, and one HTTP client for them all
    (kept-alive connections: the per-address connection cap is never approached)."""

    def __init__(self, node: Node, key: str, runner: asyncio.Runner) -> None:
        self.node = node
        self.base = node.url
        self.key = key_bytes(key)
        self.runner = runner
        self.node_id = ""
        self.internal_before = 0.0
        self._http: aiohttp.ClientSession | None = None
        self._known: Known | None = None
        self.uploads: list[Path] = []
        """Shared-memory files this module wrote (the node removes those it takes)."""

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None
        return self._http

    @property
    def known(self) -> Known:
        assert self._known is not None
        return self._known

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(_bounded(coro))

    def log_tail(self) -> str:
        return self.node.output()[-4000:]

    # -- requests ----------------------------------------------------------------------

    def sign(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        return sign_request(self.key, method, path, body, time.time(), to=self.node_id)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        headers: dict[str, str] | None = None,
        signed: bool = True,
    ) -> Reply:
        """One request, its path and query sent exactly as given (already encoded)."""
        if headers is None:
            headers = self.sign(method, path, body) if signed else {}
        url = URL(self.base + path, encoded=True)
        async with self.http.request(method, url, data=body, headers=headers) as r:
            return Reply(r.status, await r.read(), r.content_type, dict(r.headers))

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Submit and wait for the result, which must be a success."""
        reply = await self.request("POST", "/v1/tasks", json.dumps({**body, "wait": 30}).encode())
        assert reply.status == 200, reply
        doc = reply.json()
        assert doc["ok"] is True, doc
        return dict(doc)

    async def open(self) -> None:
        self._http = aiohttp.ClientSession()
        hello = await self.request("GET", HELLO_PATH, signed=False)
        assert hello.status == 200, hello
        self.node_id = str(hello.json()["id"])
        task = await self.submit({"task": "echo", "args": ["fuzz"]})

        async def stored(nbytes: int) -> str:
            doc = await self.submit({"task": "make_array", "args": [nbytes]})
            return str(doc["result"]["$ref"])

        small = 4 * CONFIG.store_threshold_bytes
        self._known = Known(
            node=self.node_id,
            host=host_id(),
            task=str(task["task_id"]),
            kept=await stored(small),
            shared=await stored(2 * CONFIG.store_segment_min_bytes),
            victim=await stored(small),
        )
        assert small < CONFIG.store_segment_min_bytes

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        for path in self.uploads:
            path.unlink(missing_ok=True)

    # -- what every example checks -------------------------------------------------------

    async def counters(self) -> dict[str, float]:
        """``mesh_rejected_frames_total`` by reason (internal errors are one of them)."""
        reply = await self.request("GET", "/metrics", signed=False)
        assert reply.status == 200, reply
        return {m[1]: float(m[2]) for m in _METRIC.finditer(reply.body.decode())}

    async def refused(self) -> float:
        """Requests and frames refused so far, all reasons but internal errors."""
        return sum(n for reason, n in (await self.counters()).items() if reason != INTERNAL)

    async def check_health(self) -> None:
        assert self.node.proc.poll() is None, f"the node died:\n{self.log_tail()}"
        hello = await self.request("GET", HELLO_PATH, signed=False)
        assert hello.status == 200, hello
        assert hello.json()["id"] == self.node_id, hello
        new = await self.internal_errors() - self.internal_before
        assert new == 0, f"{new:g} internal errors on the node:\n{self.log_tail()}"

    async def internal_errors(self) -> float:
        return (await self.counters()).get(INTERNAL, 0.0)

    def begin(self) -> None:
        """Before an example: note the node's internal errors so far (there are none unless
        an earlier example failed), so that its check blames it for its own only."""
        self.internal_before = self.run(self.internal_errors())

    def healthy(self) -> None:
        """After an example: the node is up, answers, and had no internal error."""
        self.run(self.check_health())


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One node for the module; ended by its pid afterwards (also on failure)."""
    cluster = Cluster(tmp_path_factory.mktemp("fuzz-http"))
    runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
    try:
        t = Target(cluster.start("fuzz", join=False), cluster.key, runner)
        # Bounded after the node started (it keeps its own limits): a runaway strategy or
        # decoder fails here with MemoryError instead of exhausting a shared CI machine.
        with memory_cap(2 << 30):
            try:
                t.run(t.open())
                yield t
            finally:
                t.run(t.close())
    finally:
        runner.close()
        cluster.close()


def check_task_reply(reply: Reply) -> None:
    """An accepted submission's answer: 202 with the task's id, or 200 with its outcome;
    a failed task names its kind, which is never an internal error."""
    doc = reply.json()
    assert isinstance(doc, dict), reply
    assert isinstance(doc.get("task_id"), str), reply
    if reply.status == 202:
        assert doc["state"] in ("submitted", "running"), reply
        return
    assert isinstance(doc["ok"], bool), reply
    if not doc["ok"]:
        details = doc["details"]
        assert isinstance(details, dict), reply
        assert details.get("kind") != "internal", reply
        assert details.get("exc_type") != "InternalError", reply


# ---------------------------------------------------------------------------------------
# JSON bodies: text built piece by piece, each piece knowing what the node makes of it
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frag:
    """JSON text of one value and what the node makes of it."""

    text: str
    ok: bool = True
    """Valid where it is put: in its field, or as (part of) task arguments."""
    parses: bool = True
    """The node's parser takes it: no NaN or Infinity, no float past the double range, no
    integer past 4300 digits, no nesting past the interpreter's recursion limit."""
    depth: int = 0
    """Arrays and objects nested in it, itself included, as ``node.api.from_json`` counts
    them (an object reference is one level: its shape is not arguments)."""

    def __repr__(self) -> str:
        return f"Frag({_short(self.text, 200)}, ok={self.ok}, parses={self.parses}, d={self.depth})"


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


def jfrag(value: Any, ok: bool = True) -> Frag:
    return Frag(json.dumps(value, ensure_ascii=False), ok=ok, depth=_depth(value))


def bad(value: Any) -> Frag:
    return jfrag(value, ok=False)


def list_frag(items: Sequence[Frag]) -> Frag:
    return Frag(
        "[" + ", ".join(f.text for f in items) + "]",
        ok=all(f.ok for f in items),
        parses=all(f.parses for f in items),
        depth=1 + max((f.depth for f in items), default=0),
    )


def object_frag(members: dict[str, Frag]) -> Frag:
    return Frag(
        "{" + ", ".join(f"{json.dumps(k)}: {f.text}" for k, f in members.items()) + "}",
        ok=all(f.ok for f in members.values()),
        parses=all(f.parses for f in members.values()),
        depth=1 + max((f.depth for f in members.values()), default=0),
    )


def nested(leaf: Frag, depth: int, *, objects: bool = False) -> Frag:
    """``leaf`` inside ``depth`` arrays (or objects)."""
    head, tail = ('{"n": ', "}") if objects else ("[", "]")
    return Frag(
        head * depth + leaf.text + tail * depth,
        ok=leaf.ok,
        parses=leaf.parses and depth < PARSER_DEPTH,
        depth=depth,
    )


PARSER_DEPTH: Final = 100_000
"""Nesting past the JSON parser's recursion limit (below it, examples stay under 300)."""
DEPTHS: Final = (NEST - 2, NEST - 1, NEST, NEST + 1, 2 * NEST, 250, PARSER_DEPTH)
FINITE_FLOATS: Final = tuple(f for f in HOSTILE_FLOATS if math.isfinite(f))
BIG_INTS: Final = (2**63, 2**64, -(2**63) - 1, 10**30, -(10**30), 4000)
"""Past 64 bits (the last one stands for 10**4000, 4001 digits: Python still parses it)."""
RAW_OK: Final = (
    "1e-400",  # underflows to 0.0: finite
    "-0",
    "-0.0",
    "0E0",
    "1E2",
    "123456789012345678901234567890.5",
    '"\\ud800"',  # a lone surrogate: a str Python holds but UTF-8 cannot carry
    '"\\udfff\\u0000"',
    '"\\u202e"',
)
RAW_UNPARSED: Final = ("NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1e4400")
"""Numbers the parser refuses (the last one stands for 1 and 4400 zeros: too many digits)."""
LONG_TEXTS: Final = st.sampled_from((("x", 70_000), ("é", 30_000))).map(lambda p: p[0] * p[1])
"""Longer than any other route's body limit; fine for a submission. (Built on drawing: a
strategy holding them would print them whole.)"""


def ok_scalars() -> st.SearchStrategy[Frag]:
    values = st.one_of(
        st.none(),
        st.booleans(),
        hostile_ints(),
        st.sampled_from(BIG_INTS).map(lambda n: 10**n if n == 4000 else n),
        st.sampled_from(FINITE_FLOATS),
        st.floats(allow_nan=False, allow_infinity=False),
        hostile_text(),
    )
    return weighted((4, values.map(jfrag)), (1, st.sampled_from(RAW_OK).map(Frag)))


UNPARSED: Final = st.sampled_from(RAW_UNPARSED).map(
    lambda t: Frag("1" + "0" * 4400 if t == "1e4400" else t, ok=False, parses=False)
)
KEYS: Final = hostile_text().filter(lambda k: k not in ("$ref", "$bytes"))


def _count_ok(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_AMOUNT


@st.composite
def ref_frags(draw: st.DrawFn, known: Known) -> Frag:
    """``{"$ref", "holder", ...}``: a real object or not, on this node or not, whose
    ``nbytes``, ``dtype`` and ``shape`` may lie, be out of range or of the wrong type."""
    strings = st.one_of(hostile_text(), st.integers(-1, 1), st.none(), st.just(["x"]))
    members: dict[str, Any] = {
        "$ref": draw(st.one_of(st.sampled_from(known.objects), strings)),
        "holder": draw(st.one_of(st.sampled_from((known.node, "nobody")), strings)),
    }
    ok = all(isinstance(members[k], str) and members[k] for k in ("$ref", "holder"))
    if draw(st.booleans()):
        nbytes = draw(
            st.one_of(
                hostile_ints(),
                st.sampled_from((MAX_AMOUNT, MAX_AMOUNT + 1, 2**64 + 1, 8.0, 1e18, True)),
                hostile_text(),
            )
        )
        members["nbytes"] = nbytes
        ok = ok and _count_ok(nbytes)
    if draw(st.booleans()):
        dtype = draw(
            st.one_of(
                st.sampled_from(("<f8", "", "garbage", "|O", "<U999999", "|V8", "<M8[ns]")),
                hostile_text(),
                st.integers(0, 1),
                st.none(),
            )
        )
        members["dtype"] = dtype
        ok = ok and isinstance(dtype, str)
    if draw(st.booleans()):
        shape = draw(
            st.one_of(
                st.lists(hostile_ints(), max_size=4),
                st.lists(st.integers(0, 3), min_size=MAX_SHAPE, max_size=MAX_SHAPE + 2),
                st.lists(st.sampled_from((1.0, True, None, "1", [1])), min_size=1, max_size=2),
                st.integers(),
                st.none(),
            )
        )
        members["shape"] = shape
        ok = (
            ok
            and isinstance(shape, list)
            and len(shape) <= MAX_SHAPE
            and all(_count_ok(d) for d in shape)
        )
    order = draw(st.permutations(list(members)))
    return Frag(json.dumps({k: members[k] for k in order}), ok=ok, depth=1)


def lying_refs(known: Known) -> st.SearchStrategy[Frag]:
    """Valid references to real objects (or to none) whose size, dtype and shape lie."""
    members = st.fixed_dictionaries(
        {
            "$ref": st.one_of(st.sampled_from(known.objects), hostile_text().filter(bool)),
            "holder": st.sampled_from((known.node, "nobody")),
        },
        optional={
            "nbytes": st.one_of(st.integers(0, 16), st.sampled_from((2**59, MAX_AMOUNT))),
            "dtype": st.sampled_from(("<f8", "", "garbage", "|O", "<U999999", "<i1", "|V8")),
            "shape": st.lists(
                st.one_of(st.integers(0, 4), st.sampled_from((2**59, MAX_AMOUNT))),
                max_size=MAX_SHAPE,
            ),
        },
    )
    return members.map(lambda m: Frag(json.dumps(m), depth=1))


BAD_BASE64: Final = ("!!!!", "abc", "a", "YQ", "YQ=", "Y Q==", 5, 1.5, [1])


def bytes_frags() -> st.SearchStrategy[Frag]:
    good = st.binary(max_size=48).map(
        lambda b: Frag(json.dumps({"$bytes": base64.b64encode(b).decode()}), depth=1)
    )
    wrong = st.sampled_from(BAD_BASE64).map(
        lambda v: Frag(json.dumps({"$bytes": v}), ok=False, depth=1)
    )
    return weighted((2, good), (1, wrong))


@functools.cache
def arg_frags(known: Known) -> st.SearchStrategy[Frag]:
    """Argument values: trees of hostile scalars, references and ``$bytes``, now and then
    a value the parser refuses, a long string, or a nest around ``api_max_nesting``."""
    scalar = ok_scalars()
    leaves = weighted(
        (40, scalar),
        (3, lying_refs(known)),
        (2, ref_frags(known)),
        (3, bytes_frags()),
        (2, UNPARSED),
        (1, LONG_TEXTS.map(jfrag)),
    )
    tree = st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(list_frag),
            st.dictionaries(KEYS, inner, max_size=3).map(object_frag),
        ),
        max_leaves=8,
    )
    deep = st.builds(nested, scalar, st.sampled_from(DEPTHS), objects=st.booleans())
    return weighted((6, tree), (1, deep))


@dataclass(frozen=True)
class Submission:
    """A ``POST /v1/tasks`` body and the verdict the API documents for it."""

    body: bytes
    accepted: bool | None
    """True: 202 (or 200), False: 400, None: junk whose verdict the test does not predict."""
    waits: bool
    """Accepted with a ``wait``: 200 with the outcome, or 202 if it takes longer."""

    def __repr__(self) -> str:
        return f"Submission({_short(self.body, 600)}, accepted={self.accepted}, waits={self.waits})"


def _field(ok: st.SearchStrategy[Any], wrong: st.SearchStrategy[Any]) -> st.SearchStrategy[Frag]:
    return weighted((6, ok.map(jfrag)), (3, wrong.map(bad)), (1, UNPARSED))


TIMEOUTS: Final = _field(
    st.one_of(
        st.sampled_from((None, 1, 0.5, 1e-300, 5e-324, 60, MAX_TIMEOUT, int(MAX_TIMEOUT))),
        st.floats(min_value=5e-324, max_value=MAX_TIMEOUT),
        st.integers(1, int(MAX_TIMEOUT)),
    ),
    st.sampled_from((0, 0.0, -0.0, -1, -5e-324, MAX_TIMEOUT * (1 + 1e-9), 1e308, 10**30, 2**64))
    | st.sampled_from((True, False, "1", "soon", [], {}, [1.0])),
)
OK_WAITS: Final = (0, 0.0, -0.0, 1e-9, 5e-324, 0.01, 0.05)
"""Waits the API accepts, all short: no example waits long for a result."""
WAITS: Final = _field(
    st.sampled_from(OK_WAITS),
    st.sampled_from(
        (-1, -5e-324, MAX_WAIT + 1, MAX_WAIT * 2, 1e308, 10**30, True, False, None, "1", [], {})
    ),
)
LABELS: Final = _field(
    st.one_of(st.none(), st.dictionaries(hostile_text(), hostile_text(), max_size=3)),
    st.one_of(
        st.dictionaries(
            hostile_text(),
            st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=1)),
            min_size=1,
            max_size=2,
        ),
        st.lists(st.text(max_size=3), max_size=2),
        st.text(max_size=5),
        st.integers(),
    ),
)
OK_AMOUNTS: Final = st.one_of(
    st.sampled_from((0, 0.0, -0.0, 1, 0.5, 2**53, MAX_AMOUNT, 1e18, 5e-324)),
    st.floats(0, 1e18),
    st.integers(0, MAX_AMOUNT),
)
BAD_AMOUNTS: Final[st.SearchStrategy[Any]] = st.sampled_from(
    (-1, -5e-324, 1.0000001e18, MAX_AMOUNT + 1, 1e308, 2**64, True, "1", None, [], {})
)
RESOURCES: Final = _field(
    st.one_of(st.none(), st.dictionaries(hostile_text(), OK_AMOUNTS, max_size=3)),
    st.one_of(
        st.dictionaries(hostile_text(), BAD_AMOUNTS, min_size=1, max_size=2),
        st.lists(st.integers(), max_size=2),
        st.text(max_size=5),
        st.floats(),
    ),
)
TASK_NAMES: Final = weighted(
    (8, st.sampled_from(TASKS).map(jfrag)),
    (3, hostile_text().filter(bool).map(jfrag)),
    (1, st.sampled_from(('"\\ud800"', json.dumps("t" * 5000))).map(Frag)),
    (1, st.sampled_from(("", 0, None, True, [], {}, ["echo"], {"name": "echo"})).map(bad)),
)
WRONG_ARGS: Final = st.sampled_from((5, "echo", None, True, 1.5)).map(bad)
WRONG_KWARGS: Final = st.sampled_from(([1], [], 5, "x", None, True)).map(bad)


def _keywords(prefix: str, known: Known) -> st.SearchStrategy[Frag]:
    """An object of keyword arguments (names start with ``prefix``, so that positional
    ``args`` given as an object and ``kwargs`` never share one); or an object that looks
    like a reference or ``$bytes`` but is the keywords themselves."""
    names = KEYS.map(lambda k: prefix + k)
    plain = st.dictionaries(names, arg_frags(known), max_size=3).map(object_frag)
    lookalike = st.one_of(ref_frags(known), lying_refs(known), bytes_frags()).map(
        lambda f: Frag(f.text, depth=2)  # its values are plain keyword values: all valid
    )
    return weighted((4, plain), (1, lookalike))


@functools.cache
def submissions(known: Known) -> st.SearchStrategy[Submission]:
    return weighted((8, _objects(known)), (1, _not_objects()))


@st.composite
def _objects(draw: st.DrawFn, known: Known) -> Submission:
    """A JSON object with hostile values in each field, unknown fields among them."""
    members: dict[str, Frag] = {}
    wrong: list[str] = []  # why the API refuses it (empty: it accepts it)
    if draw(st.integers(0, 19)):
        members["task"] = draw(TASK_NAMES)
    else:
        wrong.append("no task")
    args_kind = draw(st.sampled_from(("absent", *["list"] * 5, "keywords", "wrong")))
    if args_kind == "list":
        members["args"] = draw(st.lists(arg_frags(known), max_size=4).map(list_frag))
    elif args_kind == "keywords":
        members["args"] = draw(_keywords("p", known))
    elif args_kind == "wrong":
        members["args"] = draw(WRONG_ARGS)
    kwargs_kind = draw(st.sampled_from(("absent", "absent", "absent", "keywords", "wrong")))
    if kwargs_kind == "keywords":
        members["kwargs"] = draw(_keywords("k", known))
    elif kwargs_kind == "wrong":
        members["kwargs"] = draw(WRONG_KWARGS)
    if max((members[k].depth for k in ("args", "kwargs") if k in members), default=0) > NEST:
        wrong.append("nested too deeply")
    for name, strategy in (
        ("timeout", TIMEOUTS),
        ("wait", WAITS),
        ("labels", LABELS),
        ("resources", RESOURCES),
    ):
        if draw(st.integers(0, 3)) == 0:
            members[name] = draw(strategy)
    wrong += [k for k, f in members.items() if not (f.ok and f.parses)]
    for _ in range(draw(st.integers(0, 2))):
        unknown = draw(hostile_text().filter(lambda k: k not in FIELDS and k not in members))
        members[unknown] = value = draw(arg_frags(known))
        if not value.parses:  # an unknown field is ignored once it parses
            wrong.append("unknown field")
    order = draw(st.permutations(list(members)))
    text = object_frag({k: members[k] for k in order}).text
    ok = not wrong
    # (Only an accepted wait is read: a refused one may be past what Python parses.)
    waits = ok and "wait" in members and json.loads(members["wait"].text) != 0
    event(f"submission {'accepted' if ok else 'refused: ' + ', '.join(sorted(set(wrong)))}")
    return Submission(text.encode(), ok, waits)


def _junk_verdict(data: bytes) -> bool | None:
    try:
        doc = json.loads(data or b"null")
    except (ValueError, RecursionError):
        return False
    return False if not isinstance(doc, dict) else None


@st.composite
def _not_objects(draw: st.DrawFn) -> Submission:
    """No JSON object: other JSON values, nothing at all, junk, bad UTF-8, a truncation."""
    kind = draw(st.sampled_from(("value", "empty", "junk", "utf8", "truncated")))
    if kind == "value":
        value = draw(st.one_of(st.lists(st.integers(), max_size=3), hostile_text()))
        return Submission(json.dumps(value).encode(), False, False)
    if kind == "empty":
        return Submission(b"", False, False)
    if kind == "utf8":
        return Submission(b'{"task": "echo", "args": ["\xff\xfe"]}', False, False)
    if kind == "truncated":
        full = b'{"task": "echo", "args": [1, {"a": [2, 3]}], "wait": 0}'
        data = full[: draw(st.integers(0, len(full) - 1))]
        return Submission(data, _junk_verdict(data), False)
    data = draw(st.binary(max_size=64))
    return Submission(data, _junk_verdict(data), False)


# ---------------------------------------------------------------------------------------
# Routes with an id, and routes without
# ---------------------------------------------------------------------------------------

WAIT_TEXTS: Final = (
    "0",
    "0.0",
    "-0",
    "1e-9",
    "1e-320",
    "0.01",
    " 0.01 ",
    "1_0",
    "\u0661",  # ARABIC-INDIC DIGIT ONE: float() reads it as 1.0
    "nan",
    "NaN",
    "inf",
    "-inf",
    "Infinity",
    "-1",
    "301",
    "1e308",
    "1e400",
    "1" + "0" * 400,
    "0x10",
    "",
    "soon",
    "\x00",
)
ID_PATHS: Final = {
    "task": "/v1/tasks/{}",
    "why": "/v1/tasks/{}/why",
    "object": "/v1/objects/{}",
}
ID_METHODS: Final = {
    "task": frozenset({"GET", "HEAD", "DELETE"}),
    "why": GET_HEAD,
    "object": frozenset({"GET", "HEAD", "DELETE"}),
}


def _query(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)


def _wait_ok(raw: str | None) -> bool:
    """Whether ``?wait=`` is a number of seconds the API takes (absent is 0)."""
    if raw is None:
        return True
    try:
        value = float(raw)
    except ValueError:
        return False
    return 0 <= value <= MAX_WAIT  # NaN fails both


@dataclass(frozen=True)
class IdRequest:
    """A request to ``/v1/tasks/{id}``, ``/v1/tasks/{id}/why`` or ``/v1/objects/{id}``."""

    method: str
    route: str
    which: str
    """What the id is: ``task`` (finished), ``kept``, ``shared``, ``victim`` or ``bogus``."""
    ident: str
    query: tuple[tuple[str, str], ...]
    body: bytes
    host: str
    """The node's ``host_id``: with it, a shared object is answered with its segment."""

    @property
    def path(self) -> str:
        return ID_PATHS[self.route].format(quote(self.ident, safe="")) + _query(self.query)

    def expected(self) -> frozenset[int]:
        if len(self.path) > MAX_URL:
            return frozenset({400})
        if len(self.body) > SMALL_BODY:
            return frozenset({413})
        if "{" in self.ident or "}" in self.ident:
            return frozenset({404})  # aiohttp's {id} matches no braces: no route at all
        if self.method not in ID_METHODS[self.route]:
            return frozenset({405})
        first: dict[str, str] = {}
        for k, v in self.query:
            first.setdefault(k, v)
        if self.route == "task":
            if self.method == "DELETE":
                return frozenset({404})  # finished or unknown: nothing to cancel
            if not _wait_ok(first.get("wait")):
                return frozenset({400})
            return frozenset({200 if self.which == "task" else 404})
        if self.route == "why":
            return frozenset({200 if self.which == "task" else 404})
        if self.which not in ("kept", "shared", "victim"):
            return frozenset({404})
        if self.method == "DELETE":
            return frozenset({200, 404} if self.which == "victim" else {200})
        if self.which == "shared" and first.get(HOST_PARAM) == self.host:
            return frozenset({200})  # the segment, which never crosses the network
        share = first.get(SEAL_PARAM)
        held = 403 if share is None else 200 if share == SHARE_HEX else 400
        if self.which == "victim":
            return frozenset({held, 404})  # released by an earlier example, or not
        return frozenset({held})

    def __repr__(self) -> str:
        body = _short(self.body, 40)
        return f"IdRequest({self.method} {_short(self.path, 200)}, {self.which}, {body})"


SHARE: Final = Exchange()
"""The fetcher's key share the examples ask for sealed objects with (any other is refused:
a fresh one per example would make failing examples irreproducible)."""
SHARE_HEX: Final = SHARE.public.hex()

BOGUS_IDS: Final = hostile_text().filter(lambda s: s not in ("", ".", ".."))
BODIES: Final = weighted(
    (6, st.just(b"")),
    (2, st.binary(max_size=200)),
    (1, st.sampled_from((SMALL_BODY, SMALL_BODY + 1)).map(lambda n: b"{" * n)),
)


@st.composite
def id_requests(draw: st.DrawFn, known: Known) -> IdRequest:
    route = draw(st.sampled_from(tuple(ID_PATHS)))
    method = draw(st.sampled_from(("GET", "GET", "HEAD", "HEAD", "DELETE", "DELETE", *METHODS)))
    if route == "object":
        which = draw(st.sampled_from(("kept", "shared", "victim", "bogus", "task")))
    else:
        which = draw(st.sampled_from(("task", "task", "bogus", "like", "kept")))
    if method == "DELETE" and which in ("kept", "shared"):
        which = "victim"  # the others stay for later examples
    real = {"task": known.task, "kept": known.kept, "shared": known.shared}
    real["victim"] = known.victim
    if which == "like":  # this node's task ids with numbers it never issued
        n = draw(st.sampled_from(("0", "-1", "01", "1.0", "1 ", str(2**64), "999999999")))
        ident, which = f"{known.prefix}-{n}", "bogus"
    elif which == "bogus":
        ident = draw(BOGUS_IDS)
    else:
        ident = real[which]
    owner = "task" if route in ("task", "why") else "object"
    if (which == "task") != (owner == "task"):
        which = "bogus"  # a task id is no object id, and the other way round
    names = st.one_of(st.sampled_from(("wait", HOST_PARAM, SEAL_PARAM)), hostile_text())
    values = st.one_of(
        st.sampled_from(WAIT_TEXTS), st.just(known.host), st.just(SHARE_HEX), hostile_text()
    )
    query = draw(st.lists(st.tuples(names, values), max_size=3))
    req = IdRequest(method, route, which, ident, tuple(query), draw(BODIES), known.host)
    return _no_head_past_max_url(req)


R = TypeVar("R", "IdRequest", "PlainRequest")


def _no_head_past_max_url(req: R) -> R:
    """aiohttp answers a request target past its bound with a 400 that has a body even
    for HEAD (which its own client then refuses to read): send those as GET."""
    if req.method == "HEAD" and len(req.path) > MAX_URL:
        return dataclasses.replace(req, method="GET")
    return req


def check_id_reply(req: IdRequest, reply: Reply, key: bytes) -> None:
    if req.method == "HEAD":
        assert reply.body == b"", reply
        return
    if len(req.path) > MAX_URL:
        return
    if "{" in req.ident or "}" in req.ident:
        return  # no route matched: aiohttp's own plain 404
    if reply.status in (400, 404, 413):  # every id matches its route: the API's own 404
        reply.error()
    if reply.status != 200:
        return
    if req.route == "object" and req.method == "GET":
        if SEAL_HEADER in reply.headers:  # sealed for SHARE: opened as the fetcher would
            size = int(reply.headers[SIZE_HEADER])
            public = bytes.fromhex(reply.headers[SEAL_HEADER])
            _, opener = SHARE.keys(key, public, initiator=True, context=OBJECT_CONTEXT)
            into = bytearray(size)
            body = BodyOpener(opener, size, memoryview(into))
            body.feed(reply.body)
            assert body.finished, reply
            assert isinstance(loads(into), np.ndarray), reply
        elif reply.content_type == SEGMENT_CONTENT_TYPE:
            seg = reply.json()
            assert req.which == "shared", reply
            assert isinstance(seg["segment"], str), reply
            assert isinstance(seg["nbytes"], int), reply
        else:
            assert reply.content_type == OBJECT_CONTENT_TYPE, reply
            assert isinstance(loads(reply.body), np.ndarray), reply
    elif req.route == "object":
        assert reply.json() == {"released": req.ident}, reply
    else:
        assert reply.json()["task_id"] == req.ident, reply


@dataclass(frozen=True)
class PlainRequest:
    """A request to a route without an id, or to a path that is no route."""

    method: str
    route: str
    query: tuple[tuple[str, str], ...]
    body: bytes
    signed: bool

    @property
    def path(self) -> str:
        return self.route + _query(self.query)

    def expected(self) -> frozenset[int]:
        if len(self.path) > MAX_URL:
            return frozenset({400})
        public = self.route in PUBLIC
        if not public and not self.signed:
            return frozenset({401})
        if len(self.body) > SMALL_BODY:
            return frozenset({413})
        methods = ROUTES.get(self.route)
        if methods is None:
            return frozenset({404})
        if self.method not in methods:
            return frozenset({405})
        if self.route == SESSION_PATH:
            return frozenset({400})  # a plain GET: no websocket handshake
        return frozenset({200})

    def __repr__(self) -> str:
        sign = "signed" if self.signed else "unsigned"
        body = _short(self.body, 40)
        return f"PlainRequest({self.method} {_short(self.path, 200)}, {sign}, {body})"


@st.composite
def plain_requests(draw: st.DrawFn) -> PlainRequest:
    elsewhere = BOGUS_IDS.map(lambda s: "/v1/" + quote(s, safe=""))
    route = draw(
        weighted(
            (4, st.sampled_from(tuple(ROUTES))),
            (1, st.sampled_from(UNKNOWN_PATHS)),
            (1, elsewhere.filter(lambda p: p not in ROUTES)),
        )
    )
    method = draw(st.sampled_from(("GET", "GET", "GET", *METHODS)))
    if route == "/v1/tasks" and method == "POST":
        method = "GET"  # submissions have a test of their own
    pairs = st.tuples(hostile_text(), hostile_text())
    query = tuple(draw(st.lists(pairs, max_size=2)))
    signed = draw(st.integers(0, 3)) > 0
    return _no_head_past_max_url(PlainRequest(method, route, query, draw(BODIES), signed))


def check_plain_reply(req: PlainRequest, reply: Reply, node_id: str) -> None:
    if req.method == "HEAD":
        assert reply.body == b"", reply
        return
    if reply.status in (401, 413):
        reply.error()
    if reply.status != 200:
        return
    if req.route == "/metrics":
        assert b"mesh_rejected_frames_total" in reply.body, reply
        return
    doc = reply.json()
    if req.route in ("/v1/status", HELLO_PATH):
        assert doc["id"] == node_id, reply
    elif req.route == "/v1/peers":
        assert isinstance(doc, list), reply
        assert node_id in [p["id"] for p in doc], reply
    else:
        assert "/v1/tasks" in doc["paths"], reply


# ---------------------------------------------------------------------------------------
# Requests without a valid proof
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forgery:
    """A request to a route whose proof is missing or wrong in one way."""

    route: int
    """Index into ``forgery_routes``."""
    how: str
    header: str = ""
    value: str = ""
    offset: float = 0.0


def forgery_routes(known: Known) -> tuple[tuple[str, str, bytes], ...]:
    """(method, path, body) of requests that, properly signed, the node would serve."""
    return (
        ("GET", "/v1/status", b""),
        ("GET", "/v1/peers", b""),
        ("POST", "/v1/tasks", b'{"task": "noop"}'),
        ("GET", f"/v1/tasks/{known.task}?wait=0", b""),
        ("DELETE", f"/v1/tasks/{known.task}", b""),
        ("GET", f"/v1/tasks/{known.task}/why", b""),
        ("GET", f"/v1/objects/{known.kept}?{SEAL_PARAM}={SHARE_HEX}", b""),
        ("DELETE", f"/v1/objects/{known.kept}", b""),
        ("GET", f"/v1/objects/{known.shared}?{HOST_PARAM}={known.host}", b""),
        ("GET", SESSION_PATH, b""),
        ("GET", "/v1/nowhere", b""),
    )


HEADERS: Final = (HEADER_TIME, HEADER_NONCE, HEADER_BODY, HEADER_TO, HEADER_SIGNATURE)
HEADER_VALUES: Final = st.one_of(
    st.sampled_from(("", "nan", "inf", "-inf", "1e999", "-1", "0", "1.5", "0" * 64, "g" * 64)),
    st.sampled_from(("f" * 64, "x" * 1000)),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=300),
)
SKEW: Final = CONFIG.api_auth_skew_s


@st.composite
def forgeries(draw: st.DrawFn, n_routes: int) -> Forgery:
    route = draw(st.integers(0, n_routes - 1))
    how = draw(
        st.sampled_from(("none", "drop", "set", "set", "key", "to", "time", "body", "method"))
        | st.sampled_from(("path", "replay"))
    )
    if how == "drop":
        return Forgery(route, how, header=draw(st.sampled_from(HEADERS)))
    if how == "set":
        return Forgery(route, how, header=draw(st.sampled_from(HEADERS)), value=draw(HEADER_VALUES))
    if how == "key":
        return Forgery(route, how, value=draw(hostile_text().filter(bool)))
    if how == "to":
        return Forgery(route, how, value=draw(HEADER_VALUES.filter(bool)))
    if how == "time":
        offset = draw(
            # (Past the skew by far more than any delay between signing and checking.)
            st.sampled_from((SKEW + 30, -SKEW - 30, 3600.0, -3600.0, 1e9, -1e9))
            | st.sampled_from((math.nan, math.inf, -math.inf))
        )
        return Forgery(route, how, offset=offset)
    return Forgery(route, how)


# ---------------------------------------------------------------------------------------
# Session messages
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadSpec:
    """A shared-memory upload the test writes just before sending: ``body`` in a file under
    ``/dev/shm``, announced with ``nbytes`` = its size plus ``lie``."""

    body: bytes
    lie: int

    def __repr__(self) -> str:
        return f"UploadSpec({_short(self.body, 60)}, lie={self.lie})"


@dataclass(frozen=True)
class WsMessage:
    """One message of a session: a text frame, raw bytes, or a value ``dumps`` encodes
    when it is sent (after its uploads are written)."""

    text: str | None = None
    data: bytes | None = None
    value: Any = None

    def __repr__(self) -> str:
        if self.text is not None:
            return f"WsMessage(text={_short(self.text, 60)})"
        if self.data is not None:
            return f"WsMessage(data={_short(self.data, 120)})"
        return f"WsMessage(value={_short(repr(self.value), 400)})"


DTYPES: Final = st.one_of(
    st.sampled_from(("<f8", "<i4", "|b1", ">f8", "<c16", "|S3", "<U2", "<M8[s]", "<m8[ns]")),
    st.sampled_from(("|O", "|V8", "<U999999", "garbage", "<f0", "")),
    hostile_text(),
    st.integers(0, 3),
)
TENSOR_DTYPES: Final = st.sampled_from(("float32", "bfloat16", "int64", "bool", "complex64", "x"))
SHAPES: Final = st.one_of(
    st.lists(st.integers(0, 4), max_size=3),
    st.lists(hostile_ints(), max_size=4),
    st.lists(st.integers(0, 1), min_size=33, max_size=34),
    st.integers(0, 3),
)
INDEXES: Final = st.one_of(st.integers(-2, 4), hostile_ints(), st.none())
FIELD_VALUES: Final = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(0, 3), max_size=3),
)


def _packed(code: int, value: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(value))


EXTS: Final = st.one_of(
    st.builds(lambda d, s, i: _packed(EXT_NDARRAY, [d, s, i]), DTYPES, SHAPES, INDEXES),
    st.builds(lambda d, s, i: _packed(EXT_TENSOR, [d, s, i]), TENSOR_DTYPES, SHAPES, INDEXES),
    st.builds(
        lambda tag, fields: _packed(EXT_STRUCT, [tag, fields]),
        st.one_of(st.sampled_from(sorted(REGISTRY)), hostile_ints()),
        st.lists(FIELD_VALUES, max_size=8),
    ),
    st.builds(lambda parts: _packed(EXT_STRUCT, parts), st.lists(FIELD_VALUES, max_size=3)),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)),
)
MSGPACK_ODDITIES: Final = (
    b"\xd6\xff\x00\x00\x00\x00",  # a timestamp (ext -1): the epoch
    b"\xd5\xff\x00\x00",  # a timestamp of a length timestamps never have
    b"\xc7\x03\xff\x00\x00\x00",
    b"\xd4\x80\x00",  # ext -128
    b"\xc1",  # never used
    b"\xdd\xff\xff\xff\xff",  # an array of 2**32 - 1 items, none there
    b"\xdf\xff\xff\xff\xff",  # a map likewise
    b"\x81\x91\x01\x02",  # a map keyed by a list
    b"\xa3\xff\xfe\xfd",  # a string that is no UTF-8
    b"\x82\xa2op\xa6submit\xa5tasks\x91\x95\x01\xa4echo\x91\xc1\x80\xc0",
)
"""msgpack a careful encoder never writes, each a whole header."""


@st.composite
def lying_bodies(draw: st.DrawFn) -> bytes:
    """A ``mesh.protocol.codec`` body built by hand: arrays and structs whose headers may lie about
    dtype, shape and buffer, a buffer table that may lie about count, lengths or padding,
    a header length that may lie. Mostly a submission of ``echo`` with them."""
    buffers = draw(st.lists(st.binary(max_size=48), max_size=3))
    exts = draw(st.lists(EXTS, min_size=1, max_size=3))
    if draw(st.integers(0, 3)):
        value: Any = {"op": "submit", "tasks": [[1, "echo", exts, {}, None]]}
    else:
        value = exts
    header = msgpack.packb(value)
    lengths = [len(b) for b in buffers]
    nbuf, header_len, pad = len(buffers), len(header), True
    lie = draw(st.sampled_from(("none", "none", "length", "count", "header", "pad")))
    if lie == "length" and lengths:
        i = draw(st.integers(0, len(lengths) - 1))
        lengths[i] = draw(st.sampled_from((0, lengths[i] + 1, 2**32, 2**64 - 1)))
    elif lie == "count":
        nbuf = draw(st.sampled_from((nbuf + 1, max(nbuf - 1, 0), 65537, 2**32 - 1)))
    elif lie == "header":
        header_len = draw(st.sampled_from((0, header_len - 1, header_len + 1, 2**32 - 1)))
    elif lie == "pad":
        pad = False
    out = bytearray(struct.pack("<II", header_len, nbuf))
    out += struct.pack(f"<{len(lengths)}Q", *lengths) + header
    for b in buffers:
        if pad:
            out += bytes(-len(out) % ALIGN)
        out += b
    return bytes(out)


def raw_bodies() -> st.SearchStrategy[bytes]:
    """Bytes that are no body, and bodies around msgpack that is none."""
    junk = st.binary(max_size=96)
    framed = st.one_of(junk, st.sampled_from(MSGPACK_ODDITIES)).map(
        lambda j: struct.pack("<II", len(j), 0) + j
    )
    return weighted((1, junk), (2, framed), (3, lying_bodies()))


def _dumps_or_none(value: Any) -> bytes | None:
    try:
        return dumps(value)
    except LocalProtocolError:
        return None


ODD_ARRAYS: Final[tuple[np.ndarray[Any, Any], ...]] = (
    np.array(["2020-01-01", "NaT"], dtype="M8[s]"),
    np.array([1, -2], dtype="m8[ms]"),
    np.array([1 + 2j, complex(math.nan, math.inf)]),
    np.array([b"ab", b""]),
    np.array([True, False]),
    np.array(1.5),
    np.array([1.0, -0.0], dtype=">f8"),
    np.zeros((2, 0, 3)),
    np.array(["\u202e", "é"]),
)
"""Arrays of every kind the codec carries (``hostile.ARRAYS`` has the common ones): their
values are no JSON, yet ``GET /v1/tasks/{id}`` reports them."""
ODD_OPS: Final = ("submit ", "SUBMIT", "results", "error", b"submit", None, 1, ["submit"])


@functools.cache
def session_values(known: Known) -> st.SearchStrategy[Any]:
    """Submissions whose tasks are hostile in every slot, and messages that are none."""
    pools = Pools(nodes=(known.node, "nobody"), tasks=(known.task,))
    anything = any_values(pools)
    refs = st.builds(
        ObjectRef,
        id=st.one_of(st.sampled_from(known.objects), hostile_text()),
        holder=st.sampled_from((NodeId(known.node), NodeId("nobody"))),
        nbytes=hostile_ints(),
        dtype=st.sampled_from(("<f8", "", "|O", "<U999999", "garbage", "<i1")),
        shape=st.lists(hostile_ints(), max_size=3).map(tuple),
    )
    upload_bodies = st.one_of(
        anything.map(_dumps_or_none).map(lambda b: b or b""),
        raw_bodies(),
    )
    uploads = st.builds(UploadSpec, upload_bodies, st.sampled_from((0, 0, 0, 1, -1, 2**40)))
    shm = st.builds(
        Segment,
        name=st.one_of(
            hostile_text(),
            st.just(UPLOAD_PREFIX + "0" * 24),
            st.sampled_from(("../../etc/passwd", "/dev/shm/x", UPLOAD_PREFIX)),
        ),
        nbytes=hostile_ints(),
    )
    arrays = st.sampled_from(ARRAYS + ODD_ARRAYS)
    arg = weighted((8, anything), (2, arrays), (2, refs), (1, shm), (2, uploads))
    amounts = weighted((3, st.sampled_from(HOSTILE_FLOATS)), (1, hostile_ints()))
    chosen = st.fixed_dictionaries(
        {},
        optional={
            "timeout": weighted((3, amounts), (1, anything)),
            "labels": weighted(
                (3, st.dictionaries(hostile_text(), hostile_text(), max_size=2)), (1, anything)
            ),
            "resources": weighted(
                (3, st.dictionaries(hostile_text(), amounts, max_size=2)), (1, anything)
            ),
        },
    )
    options = weighted((3, st.none()), (3, chosen), (1, anything))
    cids = weighted((3, st.integers(0, 2**32)), (1, anything))
    names = weighted((3, st.sampled_from(TASKS)), (1, hostile_text()))
    good = st.tuples(
        cids,
        names,
        st.lists(arg, max_size=3),
        st.dictionaries(st.one_of(hostile_text(), hostile_ints()), arg, max_size=2),
        options,
    ).map(list)
    typed_wrong = st.tuples(
        cids, st.one_of(names, anything), anything, anything, st.one_of(options, anything)
    ).map(list)
    misshaped = st.one_of(
        anything.filter(lambda v: not (isinstance(v, list) and len(v) == 5)),
        st.lists(anything, max_size=7).filter(lambda v: len(v) != 5),
    )
    # ``echo`` of one hostile value runs to the end: its result comes back through the
    # worker, the session and ``GET /v1/tasks/{id}``.
    echo = st.builds(lambda cid, value: [cid, "echo", [value], {}, None], cids, arg)
    item = weighted((8, echo), (8, good), (3, typed_wrong), (1, misshaped))
    extra_keys = hostile_text().filter(lambda k: k not in ("op", "tasks"))
    submit = st.builds(
        lambda tasks, extra: {**extra, "op": "submit", "tasks": tasks},
        st.lists(item, max_size=4),
        st.dictionaries(extra_keys, anything, max_size=2),
    )
    ops = weighted((2, st.sampled_from(ODD_OPS)), (1, arrays), (1, anything))
    wrong = st.one_of(
        st.builds(lambda op, ts: {"op": op, "tasks": ts}, ops, st.lists(good, max_size=2)),
        st.builds(lambda tasks: {"op": "submit", "tasks": tasks}, anything),
        st.just({"op": "submit"}),
        anything,
    )
    return weighted((5, submit), (2, wrong))


@functools.cache
def session_scripts(known: Known) -> st.SearchStrategy[list[WsMessage]]:
    message = weighted(
        (8, session_values(known).map(lambda v: WsMessage(value=v))),
        (1, raw_bodies().map(lambda d: WsMessage(data=d))),
        (1, st.text(max_size=40).map(lambda t: WsMessage(text=t))),
    )
    return st.lists(message, min_size=1, max_size=3)


def session_verdict(data: bytes) -> tuple[bool, int]:
    """How the node answers one binary session message (``node.api`` documents it):
    (True, k) ``{"op": "error"}``, after results of at most the first k tasks, and the
    session ends; (False, n) one result for each of its n tasks, and the session goes on."""
    try:
        body = loads(data)
    except MeshError:
        return True, 0
    op = body.get("op") if isinstance(body, dict) else None
    if not (isinstance(op, str) and op == "submit"):
        return True, 0
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        return True, 0
    for i, item in enumerate(tasks):
        if not (isinstance(item, list) and len(item) == 5):
            return True, i
    return False, len(tasks)


def check_result(item: Any) -> str:
    """A session result ``[cid, task id, ok, value, node, error]``; a failure names its
    kind, never an internal error. Returns the task id ("" for a refused submission)."""
    assert isinstance(item, list), item
    assert len(item) == 6, item
    _, task_id, ok, _, node, error = item
    assert isinstance(task_id, str), item
    assert isinstance(ok, bool), item
    assert isinstance(node, str), item
    if not ok:
        assert isinstance(error, dict), item
        assert isinstance(error.get("kind"), str), item
        assert isinstance(error.get("message"), str), item
        assert error["kind"] != "internal", item
        assert error.get("exc_type") != "InternalError", item
    return task_id


_CLOSED: Final = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


class Session:
    """One signed client session, driven message by message."""

    def __init__(self, target: Target, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.target = target
        self.ws = ws
        self.task_ids: list[str] = []
        self.outcomes: set[str] = set()
        """How its tasks ended: done, or failed and of which kind."""

    def encode(self, msg: WsMessage) -> bytes | None:
        """The bytes of a binary message (None: the codec cannot encode the value)."""
        if msg.data is not None:
            return msg.data
        value = msg.value
        if isinstance(value, dict) and isinstance(value.get("tasks"), list):
            value = {**value, "tasks": [self._with_uploads(item) for item in value["tasks"]]}
        return _dumps_or_none(value)

    def _with_uploads(self, item: Any) -> Any:
        if not (isinstance(item, list) and len(item) == 5):
            return item
        cid, name, args, kwargs, options = item
        if isinstance(args, list):
            args = [self.upload(a) for a in args]
        if isinstance(kwargs, dict):
            kwargs = {k: self.upload(v) for k, v in kwargs.items()}
        return [cid, name, args, kwargs, options]

    def upload(self, value: Any) -> Any:
        """An ``UploadSpec`` written to shared memory, as the ``Segment`` that names it."""
        if not isinstance(value, UploadSpec):
            return value
        name = UPLOAD_PREFIX + secrets.token_hex(12)
        if SHM_DIR.is_dir():
            path = SHM_DIR / name
            self.target.uploads.append(path)
            path.write_bytes(value.body)
        return Segment(name=name, nbytes=len(value.body) + value.lie)

    async def results(self, n: int) -> list[Any]:
        """The next n results; nothing else may come."""
        items: list[Any] = []
        while len(items) < n:
            msg = await self.ws.receive()
            assert msg.type == aiohttp.WSMsgType.BINARY, (
                f"{msg.type!r} {msg.data!r} while {n - len(items)} results were due"
            )
            body = loads(msg.data)
            assert isinstance(body, dict), body
            assert body.get("op") == "results", body
            items.extend(body["items"])
        assert len(items) == n, items
        for item in items:
            tid = check_result(item)
            if tid:
                self.task_ids.append(tid)
            self.outcomes.add("done" if item[2] else f"failed: {item[5]['kind']}")
        return items

    async def error_and_end(self, at_most: int) -> None:
        """``{"op": "error"}`` (after at most ``at_most`` results), then the end."""
        errors: list[Any] = []
        items: list[Any] = []
        while True:
            msg = await self.ws.receive()
            if msg.type in _CLOSED:
                break
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            body = loads(msg.data)
            if isinstance(body, dict) and body.get("op") == "results":
                items.extend(body["items"])
            else:
                errors.append(body)
        assert len(errors) == 1, errors
        assert isinstance(errors[0], dict), errors
        assert errors[0].get("op") == "error", errors
        assert isinstance(errors[0].get("message"), str), errors
        assert len(items) <= at_most, items
        for item in items:
            check_result(item)


# ---------------------------------------------------------------------------------------
# The properties
# ---------------------------------------------------------------------------------------


@examples(150)
@given(data=st.data())
def test_routes_with_an_id_answer_as_documented(target: Target, data: st.DataObject) -> None:
    """``/v1/tasks/{id}``, ``/v1/tasks/{id}/why`` and ``/v1/objects/{id}`` with real and
    bogus ids, hostile ``wait`` and ``host`` parameters, bodies and methods."""
    target.begin()
    req = data.draw(id_requests(target.known), label="request")
    reply = target.run(target.request(req.method, req.path, req.body))
    note(repr(reply))
    event(f"{req.method} {req.route} id of {req.which}: {reply.status}")
    assert reply.status in req.expected(), (req, reply)
    check_id_reply(req, reply, target.key)
    target.healthy()


@examples(150)
@given(req=plain_requests())
def test_routes_without_an_id_answer_as_documented(target: Target, req: PlainRequest) -> None:
    """Status, peers, hello, metrics, openapi, a plain GET of the session route and paths
    that are no route: every method, hostile queries and bodies, signed or not."""
    target.begin()
    reply = target.run(target.request(req.method, req.path, req.body, signed=req.signed))
    note(repr(reply))
    route = req.route if req.route in ROUTES else "no route"
    event(f"{'signed' if req.signed else 'unsigned'} {req.method} {route}: {reply.status}")
    assert reply.status in req.expected(), (req, reply)
    check_plain_reply(req, reply, target.node_id)
    target.healthy()


@examples(300)
@given(data=st.data())
def test_submissions_answer_as_documented(target: Target, data: st.DataObject) -> None:
    """``POST /v1/tasks`` with hostile values in every field: accepted (202, or 200 with
    ``wait``) exactly when every value is valid, else 400 with the reason."""
    target.begin()
    sub = data.draw(submissions(target.known), label="submission")
    reply = target.run(target.request("POST", "/v1/tasks", sub.body))
    note(repr(reply))
    if sub.accepted is None:
        assert reply.status in (200, 202, 400), (sub, reply)
    elif sub.accepted:
        assert reply.status in ((200, 202) if sub.waits else (202,)), (sub, reply)
    else:
        assert reply.status == 400, (sub, reply)
    if reply.status == 400:
        reply.error()
    else:
        check_task_reply(reply)
    target.healthy()


async def _forge(target: Target, forgery: Forgery) -> list[int]:
    """Send the forged request (twice for a replay); the statuses of those meant to fail."""
    method, path, body = forgery_routes(target.known)[forgery.route]
    key, stamp, to = target.key, time.time(), target.node_id
    sign_method, sign_path, sign_body, sent_body = method, path, body, body
    if forgery.how == "key":
        key = key_bytes(forgery.value)
    elif forgery.how == "to":
        to = forgery.value if forgery.value != target.node_id else forgery.value + "x"
    elif forgery.how == "time":
        stamp += forgery.offset
    elif forgery.how == "body":
        sign_body, sent_body = body + b" ", body
    elif forgery.how == "method":
        sign_method = "PUT" if method != "PUT" else "GET"
    elif forgery.how == "path":
        sign_path = path + ("&" if "?" in path else "?") + "x=1"
    headers = sign_request(key, sign_method, sign_path, sign_body, stamp, to=to)
    if forgery.how == "none":
        headers = {}
    elif forgery.how == "drop":
        del headers[forgery.header]
    elif forgery.how == "set":
        if forgery.value == headers[forgery.header]:
            del headers[forgery.header]
        else:
            headers[forgery.header] = forgery.value
    sends = 1
    if forgery.how == "replay":
        sends = 2
        if method == "DELETE":
            sends = 1  # a legitimate DELETE would release the kept object
            headers = {}
    statuses: list[int] = []
    for i in range(sends):
        if path == SESSION_PATH:
            try:
                async with target.http.ws_connect(target.base + path, headers=headers) as ws:
                    await ws.close()
                statuses.append(101)
            except aiohttp.WSServerHandshakeError as exc:
                statuses.append(exc.status)
        else:
            reply = await target.request(method, path, sent_body, headers=headers)
            statuses.append(reply.status)
            if reply.status == 401:
                assert reply.error().startswith("authentication failed"), reply
        if forgery.how == "replay" and sends == 2 and i == 0:
            assert statuses[0] != 401, f"a properly signed request was refused: {statuses}"
    return statuses[1:] if sends == 2 else statuses


async def _next_task_number(target: Target) -> int:
    reply = await target.request("POST", "/v1/tasks", b'{"task": "noop"}')
    assert reply.status == 202, reply
    return int(reply.json()["task_id"].rsplit("-", 1)[1])


@examples(100)
@given(data=st.data())
def test_requests_without_a_valid_proof_are_refused_and_change_nothing(
    target: Target, data: st.DataObject
) -> None:
    """No proof, one header dropped or replaced by junk, another key, another receiver, a
    stale or non-finite time, another body, method or path, a replay: 401, counted, and
    nothing happens (no task submitted, the kept object not released)."""
    target.begin()
    known = target.known
    forgery = data.draw(forgeries(len(forgery_routes(known))), label="forgery")
    method, path, _ = forgery_routes(known)[forgery.route]
    event(f"forged by {forgery.how} {forgery.header}".rstrip())

    async def attempt() -> None:
        before = await target.refused()
        first = await _next_task_number(target) if method == "POST" else 0
        statuses = await _forge(target, forgery)
        assert statuses == [401] * len(statuses), statuses
        assert await target.refused() == before + len(statuses)
        if method == "POST":
            replayed = 1 if forgery.how == "replay" else 0  # its first send was legitimate
            assert await _next_task_number(target) == first + 1 + replayed
        if method == "DELETE" and "objects" in path:
            kept = await target.request("GET", f"/v1/objects/{known.kept}?{SEAL_PARAM}={SHARE_HEX}")
            assert kept.status == 200, kept

    target.run(attempt())
    target.healthy()


# A drawn script's repr (kept for a failure report) runs to hundreds of kB: Hypothesis warns.
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@examples(120)
@given(data=st.data())
def test_session_messages_are_answered_as_documented(target: Target, data: st.DataObject) -> None:
    """A signed session gets hostile messages one after another. One the node cannot take
    gets ``{"op": "error"}`` and ends the session; a batch gets one result per task (none an
    internal error, each task then readable over HTTP), and the session goes on."""
    target.begin()
    script = data.draw(session_scripts(target.known), label="script")

    async def converse() -> Session:
        headers = target.sign("GET", SESSION_PATH)
        url = target.base + SESSION_PATH
        async with target.http.ws_connect(url, headers=headers, max_msg_size=0) as ws:
            session = Session(target, ws)
            for msg in script:
                if msg.text is not None:
                    await ws.send_str(msg.text)  # ignored: the session speaks binary
                    continue
                raw = session.encode(msg)
                if raw is None:
                    event("a value the codec does not encode")
                    continue
                ends, tasks = session_verdict(raw)
                event(f"session message {'ends the session' if ends else 'is a batch'}")
                await ws.send_bytes(raw)
                if ends:
                    await session.error_and_end(tasks)
                    return session
                await session.results(tasks)
            # The session goes on: an honest submission still gets its result.
            honest: dict[str, Any] = {"op": "submit", "tasks": [["last", "echo", [42], {}, None]]}
            await ws.send_bytes(dumps(honest))
            [last] = await session.results(1)
            assert last[0] == "last", last
            assert last[2:5] == [True, 42, target.node_id], last
            return session

    session = target.run(converse())
    for outcome in sorted(session.outcomes):
        event(f"a task {outcome}")
    for task_id in session.task_ids:
        # What a session ran, HTTP reports: its result as JSON, its auction record.
        path = f"/v1/tasks/{quote(task_id, safe='')}"
        info = target.run(target.request("GET", path))
        assert info.status == 200, info
        assert info.json()["task_id"] == task_id, info
        why = target.run(target.request("GET", path + "/why"))
        assert why.status == 200, why
    target.healthy()


# ---------------------------------------------------------------------------------------
# The hostile requests that found bugs, kept as plain regression cases
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"task": "echo", "kwargs": {"$ref": "x", "holder": "fuzz"}}',
        b'{"task": "echo", "args": {"$bytes": "YQ=="}}',
        b'{"task": "echo", "args": {"$ref": "x", "holder": "fuzz"}, "kwargs": {}}',
    ],
)
def test_keywords_that_look_like_a_reference_are_keywords(target: Target, body: bytes) -> None:
    target.begin()
    reply = target.run(target.request("POST", "/v1/tasks", body))
    assert reply.status == 202, reply
    target.healthy()


def test_head_of_an_object_sends_no_body(target: Target) -> None:
    target.begin()

    async def heads() -> None:
        for _ in range(3):  # on one kept-alive connection: a body would be read as an answer
            reply = await target.request(
                "HEAD", f"/v1/objects/{target.known.kept}?{SEAL_PARAM}={SHARE_HEX}"
            )
            assert reply.status == 200, reply
            assert reply.body == b"", reply

    target.run(heads())
    target.healthy()


def test_an_array_as_op_ends_the_session_with_an_error(target: Target) -> None:
    target.begin()

    async def converse() -> None:
        headers = target.sign("GET", SESSION_PATH)
        async with target.http.ws_connect(target.base + SESSION_PATH, headers=headers) as ws:
            await ws.send_bytes(dumps({"op": np.array([1, 2]), "tasks": []}))
            await Session(target, ws).error_and_end(0)

    target.run(converse())
    target.healthy()


@pytest.mark.parametrize(
    "value",
    [
        np.array(["2020-01-01"], dtype="M8[s]"),
        np.array([1 + 2j]),
        np.array([b"ab"]),
        np.array([1], dtype="m8[s]"),
    ],
    ids=["datetime", "complex", "bytes", "timedelta"],
)
def test_results_json_cannot_express_are_still_reported(target: Target, value: Any) -> None:
    target.begin()

    async def converse() -> str:
        headers = target.sign("GET", SESSION_PATH)
        async with target.http.ws_connect(target.base + SESSION_PATH, headers=headers) as ws:
            session = Session(target, ws)
            await ws.send_bytes(dumps({"op": "submit", "tasks": [[1, "echo", [value], {}, None]]}))
            [item] = await session.results(1)
            assert item[2] is True, item
            return str(item[1])

    task_id = target.run(converse())
    info = target.run(target.request("GET", f"/v1/tasks/{task_id}"))
    assert info.status == 200, info
    assert info.json()["state"] == "done", info
    target.healthy()


@pytest.mark.parametrize("inside", ["call", "upload"])
def test_arguments_nested_in_a_call_or_an_upload_are_bounded(target: Target, inside: str) -> None:
    """Nesting the API did not count: a ``TaskCall`` argument's own arguments, and what a
    shared-memory upload holds. Echoed back, it made the node's result handling recurse past
    the interpreter's limit (an internal error); now it is refused like any deep argument."""
    target.begin()

    async def converse() -> Any:
        headers = target.sign("GET", SESSION_PATH)
        async with target.http.ws_connect(target.base + SESSION_PATH, headers=headers) as ws:
            session = Session(target, ws)
            if inside == "call":
                arg: Any = call_chain(2)  # two calls, each around 400 nested lists
            else:
                arg = session.upload(UploadSpec(dumps(nest(1, 480)), 0))
            await ws.send_bytes(dumps({"op": "submit", "tasks": [[1, "echo", [arg], {}, None]]}))
            [item] = await session.results(1)
            return item

    item = target.run(converse())
    assert item[2] is False, item
    assert item[5]["kind"] == "bad-request", item
    assert "nested too deeply" in item[5]["message"], item
    target.healthy()
