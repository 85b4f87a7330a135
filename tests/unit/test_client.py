"""The client's pure parts: key lookup, request proofs, result conversion, error mapping."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.config import NodeConfig
from mesh.errors import (
    ErrorInfo,
    FailureKind,
    LocalProtocolError,
    MeshError,
    NoCapablePeerError,
    TaskError,
    TaskLostError,
)
from mesh.protocol.messages import NodeId, ObjectRef
from mesh.runtime.auth import (
    HEADER_BODY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIME,
    HEADER_TO,
    key_bytes,
    key_file,
    resolve_key,
    sign_request,
)
from mesh.runtime.http import DEFAULT_URL, normalise_url
from node.api import (
    BadRequest,
    Refused,
    RequestAuth,
    check_nesting,
    from_json,
    jsonable,
    parse_json,
    parse_options,
    seconds,
)

KEY = key_bytes("correct horse battery staple")


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("MESH_KEY", raising=False)
    return tmp_path


def test_key_comes_from_argument_then_env_then_file(
    config_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert key_file() == config_home / "mesh" / "key"
    with pytest.raises(MeshError, match="no mesh key"):
        resolve_key(None)
    key_file().parent.mkdir(parents=True)
    key_file().write_text("from-file\n")
    assert resolve_key(None) == "from-file"
    monkeypatch.setenv("MESH_KEY", "from-env")
    assert resolve_key(None) == "from-env"
    assert resolve_key("from-arg") == "from-arg"


def test_start_creates_a_private_random_key_file_once(config_home: Path) -> None:
    first = resolve_key(None, create=True)
    assert len(first) == 64
    assert stat.S_IMODE(key_file().stat().st_mode) == 0o600
    assert resolve_key(None, create=True) == first
    assert resolve_key(None) == first


def test_key_bytes_are_derived_and_full_length() -> None:
    assert len(key_bytes("x")) == 32
    assert key_bytes("x") == key_bytes("x")
    assert key_bytes("x") != key_bytes("y")
    with pytest.raises(LocalProtocolError):
        key_bytes("")


def test_normalise_url() -> None:
    assert normalise_url(None) == DEFAULT_URL
    assert normalise_url("10.0.0.2:7470") == "http://10.0.0.2:7470"
    assert normalise_url("http://h:1/") == "http://h:1"


def auth() -> RequestAuth:
    return RequestAuth(KEY, skew_s=60.0, max_nonces=4)


NODE_A = "node-a"


def passes(a: RequestAuth, method: str, path: str, headers: dict[str, str], now: float) -> bool:
    """Whether ``a`` (the auth of node-a) accepts a request on its headers."""
    try:
        a.verify(method, path, headers, node_id=NODE_A, now=now)
    except Refused:
        return False
    return True


def test_a_signed_request_passes_once() -> None:
    a = auth()
    body = b'{"task": "noop"}'
    h = sign_request(KEY, "POST", "/v1/tasks?x=1", body, 1000.0, to=NODE_A)
    assert set(h) == {HEADER_TIME, HEADER_NONCE, HEADER_SIGNATURE, HEADER_BODY, HEADER_TO}
    assert passes(a, "POST", "/v1/tasks?x=1", h, 1000.5)
    a.verify_body(h, body)
    # The same proof again is a replay.
    assert not passes(a, "POST", "/v1/tasks?x=1", h, 1000.5)
    assert a.failures == 1


@pytest.mark.parametrize(
    ("method", "path", "now", "key", "to"),
    [
        ("GET", "/v1/tasks?x=1", 1000.5, KEY, NODE_A),  # method changed
        ("POST", "/v1/tasks?x=2", 1000.5, KEY, NODE_A),  # path changed
        ("POST", "/v1/tasks?x=1", 1100.0, KEY, NODE_A),  # too old
        ("POST", "/v1/tasks?x=1", 900.0, KEY, NODE_A),  # from the future
        ("POST", "/v1/tasks?x=1", 1000.5, key_bytes("other"), NODE_A),
        ("POST", "/v1/tasks?x=1", 1000.5, KEY, "node-b"),  # signed for another node
    ],
)
def test_any_change_to_a_signed_request_fails(
    method: str, path: str, now: float, key: bytes, to: str
) -> None:
    h = sign_request(key, "POST", "/v1/tasks?x=1", b'{"task": "noop"}', 1000.0, to=to)
    assert not passes(auth(), method, path, h, now)


def test_changed_signed_headers_fail() -> None:
    h = sign_request(KEY, "POST", "/v1/tasks", b"{}", 1000.0, to="node-b")
    for name, value in ((HEADER_TO, NODE_A), (HEADER_BODY, "0" * 64), (HEADER_TIME, "1000.1")):
        assert not passes(auth(), "POST", "/v1/tasks", {**h, name: value}, 1000.5)


def test_a_request_for_another_node_is_refused_as_such() -> None:
    a = auth()
    h = sign_request(KEY, "GET", "/v1/status", b"", 1000.0, to="node-b")
    with pytest.raises(Refused, match="this request is for node node-b, not node-a") as info:
        a.verify("GET", "/v1/status", h, node_id=NODE_A, now=1000.5)
    assert info.value.reason == "http-wrong-receiver"
    assert info.value.status == 401


def test_a_body_other_than_the_signed_one_fails() -> None:
    a = auth()
    h = sign_request(KEY, "POST", "/v1/tasks", b'{"task": "noop"}', 1000.0, to=NODE_A)
    assert passes(a, "POST", "/v1/tasks", h, 1000.5)
    with pytest.raises(Refused) as info:
        a.verify_body(h, b'{"task": "fail"}')
    assert info.value.reason == "http-body-hash"
    assert a.failures == 1


def test_missing_or_garbage_headers_fail() -> None:
    a = auth()
    garbage = {
        HEADER_TIME: "nan",
        HEADER_NONCE: "n",
        HEADER_SIGNATURE: "s",
        HEADER_BODY: "0" * 64,
        HEADER_TO: NODE_A,
    }
    assert not passes(a, "GET", "/v1/status", {}, 1000.0)
    assert not passes(a, "GET", "/v1/status", garbage, 1000.0)
    assert not passes(a, "GET", "/v1/status", {**garbage, HEADER_TIME: "soon"}, 1000.0)
    assert a.failures == 3


def test_nonce_memory_is_bounded_and_forgetting_never_reopens_a_replay() -> None:
    a = auth()
    proofs = [sign_request(KEY, "GET", "/p", b"", 1000.0 + i, to=NODE_A) for i in range(10)]
    for h in proofs:
        assert passes(a, "GET", "/p", h, 1010.0)
    assert len(a._nonces) <= 4
    for h in proofs:
        assert not passes(a, "GET", "/p", h, 1010.0)


CONFIG = NodeConfig.lan()
DEPTH = CONFIG.api_max_nesting


def test_json_conversion_of_results_and_arguments() -> None:
    ref = ObjectRef(id="abc", holder=NodeId("n1"), nbytes=80, dtype="<f8", shape=(10,))
    value = {"a": np.arange(3), "r": ref, "b": b"\x00\x01", "t": (1, 2.5), "g": np.float32(2)}
    out = jsonable(value)
    assert out["a"] == [0, 1, 2]
    assert out["r"]["$ref"] == "abc"
    assert out["t"] == [1, 2.5]
    assert out["g"] == 2.0
    back = from_json(out, max_depth=DEPTH)
    assert back["r"] == ref
    assert back["b"] == b"\x00\x01"
    bad_refs: list[dict[str, object]] = [
        {"$ref": "x", "holder": "n", "nbytes": "many"},
        {"$ref": "x", "holder": {"not": "a node"}},
        {"$ref": "x", "holder": "n", "nbytes": -1},
        {"$ref": "x", "holder": "n", "nbytes": 1e300},
        {"$ref": "x", "holder": "n", "shape": [2, -1]},
    ]
    for bad in bad_refs:
        with pytest.raises(BadRequest):
            from_json(bad, max_depth=DEPTH)


def test_json_bodies_refuse_non_finite_numbers_and_deep_nesting() -> None:
    assert parse_json(b'{"a": [1, 2.5e3]}') == {"a": [1, 2500.0]}
    assert parse_json(b"") is None
    for body in (b'{"t": NaN}', b"[Infinity]", b"[-Infinity]", b"[1e400]", b"{oops", b"\xff"):
        with pytest.raises(BadRequest):
            parse_json(body)
    deep = parse_json(b"[" * 600 + b"]" * 600)  # the parser copes; the arguments may not
    with pytest.raises(BadRequest, match="nested too deeply"):
        from_json(deep, max_depth=DEPTH)
    with pytest.raises(BadRequest, match="nested too deeply"):
        parse_json(b"[" * 100_000 + b"]" * 100_000)
    nested: list[object] = []
    for _ in range(DEPTH - 1):
        nested = [nested]
    assert from_json(nested, max_depth=DEPTH) == nested
    check_nesting([nested], DEPTH)
    with pytest.raises(BadRequest):
        check_nesting([[nested]], DEPTH)
    with pytest.raises(BadRequest):
        check_nesting([{"k": (nested,)}], DEPTH)


def test_seconds_must_be_finite_and_in_range() -> None:
    assert seconds(2, "t", maximum=10.0) == 2.0
    assert seconds(0, "w", maximum=10.0, zero=True) == 0.0
    for bad in (0, -1, float("nan"), float("inf"), -float("inf"), 1e300, 10**400, True, "5"):
        with pytest.raises(BadRequest, match="t must be"):
            seconds(bad, "t", maximum=10.0)


def test_options_are_validated() -> None:
    assert parse_options(None, CONFIG) == {}
    assert parse_options(
        {
            "timeout": 2,
            "labels": {"zone": "a"},
            "resources": {"gpu": 1},
            "libraries": {"torch": ">=2.2"},
        },
        CONFIG,
    ) == {
        "timeout": 2.0,
        "labels": {"zone": "a"},
        "resources": {"gpu": 1.0},
        "libraries": {"torch": ">=2.2"},
    }
    bad: object
    for bad in (
        {"timeout": 0},
        {"timeout": True},
        {"timeout": float("nan")},
        {"timeout": float("inf")},
        {"timeout": CONFIG.api_max_task_timeout_s + 1},
        {"labels": {"a": 1}},
        {"resources": []},
        {"resources": {"gpu": float("nan")}},
        {"resources": {"gpu": float("inf")}},
        {"resources": {"gpu": -1}},
        {"resources": {"gpu": 10**400}},
        {"libraries": ["torch"]},
        {"libraries": {"torch": 2}},
        5,
    ):
        with pytest.raises(BadRequest):
            parse_options(bad, CONFIG)


def error_from(record: dict[str, Any], task_id: str, node: str) -> MeshError:
    return ErrorInfo.decode(record).exception(task_id, node)


def test_error_records_become_the_right_exceptions() -> None:
    err = error_from(
        {
            "kind": FailureKind.TASK,
            "message": "boom",
            "exc_type": "RuntimeError",
            "traceback": "tb",
        },
        "t1",
        "n1",
    )
    assert isinstance(err, TaskError)
    assert err.remote_traceback == "tb"
    assert "RuntimeError: boom" in str(err)
    assert "n1" in str(err)
    no_peer = error_from(
        {"kind": FailureKind.NO_PEER, "message": "", "task": "x", "missing": {"task": "x"}}, "t", ""
    )
    assert isinstance(no_peer, NoCapablePeerError)
    assert "no peer can run x" in str(no_peer)
    assert isinstance(error_from({"kind": "lost", "message": "gone"}, "t", ""), TaskLostError)
    assert isinstance(
        error_from({"kind": "bad-request", "message": "?"}, "t", ""), LocalProtocolError
    )
