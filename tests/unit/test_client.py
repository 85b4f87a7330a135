"""The client's pure parts: key lookup, request proofs, result conversion, error mapping."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from mesh.client import (
    DEFAULT_URL,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIME,
    error_from,
    key_bytes,
    key_file,
    normalise_url,
    resolve_key,
    sign_request,
)
from mesh.errors import (
    LocalProtocolError,
    MeshError,
    NoCapablePeerError,
    TaskError,
    TaskLostError,
)
from mesh.messages import NodeId, ObjectRef
from node.api import BadRequest, RequestAuth, from_json, jsonable, parse_options

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


def test_a_signed_request_passes_once() -> None:
    a = auth()
    h = sign_request(KEY, "POST", "/v1/tasks?x=1", b'{"task": "noop"}', 1000.0)
    assert set(h) == {HEADER_TIME, HEADER_NONCE, HEADER_SIGNATURE}
    now = 1000.5
    assert a._check(
        "POST",
        "/v1/tasks?x=1",
        b'{"task": "noop"}',
        h[HEADER_TIME],
        h[HEADER_NONCE],
        h[HEADER_SIGNATURE],
        now,
    )
    # The same proof again is a replay.
    assert not a._check(
        "POST",
        "/v1/tasks?x=1",
        b'{"task": "noop"}',
        h[HEADER_TIME],
        h[HEADER_NONCE],
        h[HEADER_SIGNATURE],
        now,
    )


@pytest.mark.parametrize(
    ("method", "path", "body", "now", "key"),
    [
        ("GET", "/v1/tasks?x=1", b'{"task": "noop"}', 1000.5, KEY),  # method changed
        ("POST", "/v1/tasks?x=2", b'{"task": "noop"}', 1000.5, KEY),  # path changed
        ("POST", "/v1/tasks?x=1", b'{"task": "fail"}', 1000.5, KEY),  # body changed
        ("POST", "/v1/tasks?x=1", b'{"task": "noop"}', 1100.0, KEY),  # too old
        ("POST", "/v1/tasks?x=1", b'{"task": "noop"}', 900.0, KEY),  # from the future
        ("POST", "/v1/tasks?x=1", b'{"task": "noop"}', 1000.5, key_bytes("other")),
    ],
)
def test_any_change_to_a_signed_request_fails(
    method: str, path: str, body: bytes, now: float, key: bytes
) -> None:
    h = sign_request(key, "POST", "/v1/tasks?x=1", b'{"task": "noop"}', 1000.0)
    assert not auth()._check(
        method, path, body, h[HEADER_TIME], h[HEADER_NONCE], h[HEADER_SIGNATURE], now
    )


def test_missing_or_garbage_headers_fail() -> None:
    a = auth()
    assert not a.check("GET", "/v1/status", b"", {})
    assert not a.check(
        "GET", "/v1/status", b"", {HEADER_TIME: "soon", HEADER_NONCE: "n", HEADER_SIGNATURE: "s"}
    )
    assert a.failures == 2


def test_nonce_memory_is_bounded_and_forgetting_never_reopens_a_replay() -> None:
    a = auth()
    proofs = [sign_request(KEY, "GET", "/p", b"", 1000.0 + i) for i in range(10)]
    for h in proofs:
        assert a._check(
            "GET", "/p", b"", h[HEADER_TIME], h[HEADER_NONCE], h[HEADER_SIGNATURE], 1010.0
        )
    assert len(a._nonces) <= 4
    for h in proofs:
        assert not a._check(
            "GET", "/p", b"", h[HEADER_TIME], h[HEADER_NONCE], h[HEADER_SIGNATURE], 1010.0
        )


def test_json_conversion_of_results_and_arguments() -> None:
    ref = ObjectRef(id="abc", holder=NodeId("n1"), nbytes=80, dtype="<f8", shape=(10,))
    value = {"a": np.arange(3), "r": ref, "b": b"\x00\x01", "t": (1, 2.5), "g": np.float32(2)}
    out = jsonable(value)
    assert out["a"] == [0, 1, 2]
    assert out["r"]["$ref"] == "abc"
    assert out["t"] == [1, 2.5]
    assert out["g"] == 2.0
    back = from_json(out)
    assert back["r"] == ref
    assert back["b"] == b"\x00\x01"
    with pytest.raises(BadRequest):
        from_json({"$ref": "x", "holder": "n", "nbytes": "many"})


def test_options_are_validated() -> None:
    assert parse_options(None) == {}
    assert parse_options({"timeout": 2, "labels": {"zone": "a"}, "resources": {"gpu": 1}}) == {
        "timeout": 2.0,
        "labels": {"zone": "a"},
        "resources": {"gpu": 1.0},
    }
    bad: object
    for bad in ({"timeout": 0}, {"timeout": True}, {"labels": {"a": 1}}, {"resources": []}, 5):
        with pytest.raises(BadRequest):
            parse_options(bad)


def test_error_records_become_the_right_exceptions() -> None:
    err = error_from(
        {"kind": "task", "message": "boom", "type": "RuntimeError", "traceback": "tb"}, "t1", "n1"
    )
    assert isinstance(err, TaskError)
    assert err.remote_traceback == "tb"
    assert "RuntimeError: boom" in str(err)
    assert "n1" in str(err)
    no_peer = error_from({"kind": "no-peer", "task": "x", "missing": {"task": "x"}}, "t", "")
    assert isinstance(no_peer, NoCapablePeerError)
    assert "no peer can run x" in str(no_peer)
    assert isinstance(error_from({"kind": "lost", "message": "gone"}, "t", ""), TaskLostError)
    assert isinstance(
        error_from({"kind": "bad-request", "message": "?"}, "t", ""), LocalProtocolError
    )
