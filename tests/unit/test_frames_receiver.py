"""Frames name their receiver (frame version 2).

A frame for one node is refused by any other, before the other's replay guard records it;
a blank receiver passes only on the messages sent to an address before its node's id can
be known (``PeerHello``, ``Join``); a peer of another frame version is refused with a
reason that names both versions.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from mesh.protocol.codec import BLANK_TO_TAGS, UNADDRESSED, VERSION, Codec
from mesh.protocol.messages import (
    Capabilities,
    Join,
    Load,
    NodeId,
    NodeRecord,
    PeerHello,
    Wire,
    WireType,
)
from tests.unit.test_codec import KEY, NOW, SKEW, body, envelope, mac, only_remote_errors
from tests.unit.test_messages import SETTINGS, any_message, local_wire_types

__all__ = ["local_wire_types"]  # any_message may draw the test-local types: register them

A, B = NodeId("a"), NodeId("b")
LOAD = Load(running=1, queued=2, backlog_s=3.0)
LOAD_TAG = int(WireType.LOAD)


def node(name: str, key: bytes = KEY) -> Codec:
    return Codec(key, NodeId(name), max_frame_bytes=1 << 24, max_skew_s=SKEW)


def refused(frame: bytes, rx: Codec) -> RemoteProtocolError:
    err = only_remote_errors(lambda: rx.decode(frame, NOW))
    assert err is not None, "the frame was accepted"
    return err


def join_of(name: str) -> Join:
    record = NodeRecord(
        node=NodeId(name),
        address="127.0.0.1:7000",  # type: ignore[arg-type]
        incarnation=0,
        version=1,
        capabilities=Capabilities(resources={}, libraries={}, tasks=(), labels={}),
        load=Load(running=0, queued=0, backlog_s=0.0),
    )
    return Join(record=record)


# -- the receiver ------------------------------------------------------------------------


def test_a_frame_for_a_is_refused_by_b_and_not_recorded() -> None:
    tx, a, b = node("tx"), node("a"), node("b")
    frame = tx.encode_bytes(LOAD, NOW, to=A)
    err = refused(frame, b)
    assert err.reason == "wrong-receiver"
    assert "'a'" in str(err)
    assert len(b.replay) == 0  # B's guard never saw it...
    assert refused(frame, b).reason == "wrong-receiver"  # ...so it stays the same refusal
    got = a.decode(frame, NOW)
    assert (got.to, got.msg) == (A, LOAD)
    assert refused(frame, a).reason == "replay"


def test_the_receiver_is_under_the_mac() -> None:
    tx, b = node("tx"), node("b")
    frame = tx.encode_bytes(LOAD, NOW, to=A)
    readdressed = frame.replace(msgpack.packb("a"), msgpack.packb("b"), 1)
    assert readdressed != frame
    err = refused(readdressed, b)
    assert isinstance(err, AuthenticationError)


def test_a_forgery_for_another_node_counts_as_a_forgery() -> None:
    stranger, b = node("tx", key=b"s" * 32), node("b")
    assert refused(stranger.encode_bytes(LOAD, NOW, to=A), b).reason == "bad-mac"


@pytest.mark.parametrize("tag", list(WireType), ids=lambda t: t.name)
def test_a_blank_receiver_passes_only_on_hello_and_join(tag: WireType) -> None:
    # Fields that fit no type: a frame that gets past the receiver check fails on them.
    err = refused(mac(body(envelope([None], tag=int(tag), to=""))), node("rx"))
    if tag in (WireType.PEER_HELLO, WireType.JOIN):
        assert err.reason == "bad-field"
    else:
        assert err.reason == "wrong-receiver"
        assert "names no receiver" in str(err)


def test_blank_hello_and_join_are_accepted_and_say_so() -> None:
    tx, rx = node("tx"), node("rx")
    for msg in (PeerHello(address="127.0.0.1:7000", package="0.0.test", share=b""), join_of("tx")):
        frame = rx.decode(tx.encode_bytes(msg, NOW, to=UNADDRESSED), NOW)
        assert (frame.to, frame.msg) == (UNADDRESSED, msg)
    assert refused(tx.encode_bytes(LOAD, NOW, to=UNADDRESSED), rx).reason == "wrong-receiver"
    assert {int(WireType.PEER_HELLO), int(WireType.JOIN)} == BLANK_TO_TAGS


def test_a_hello_for_another_node_is_refused() -> None:
    tx, b = node("tx"), node("b")
    frame = tx.encode_bytes(
        PeerHello(address="127.0.0.1:7000", package="0.0.test", share=b""), NOW, to=A
    )
    assert refused(frame, b).reason == "wrong-receiver"


@pytest.mark.parametrize("to", [5, None, b"rx", "x" * 300])
def test_encode_refuses_a_receiver_that_is_no_node_id(to: Any) -> None:
    with pytest.raises(LocalProtocolError):
        node("tx").encode(LOAD, NOW, to=to)


# -- fuzz: whatever the receiver says, decode raises only RemoteProtocolError ------------

receivers = st.one_of(
    st.sampled_from(["", "rx", "rx ", "RX", "r", "\x00rx", "tx"]),
    st.text(max_size=300),
    st.integers(-(2**63), 2**64 - 1),
    st.none(),
    st.binary(max_size=8),
    st.lists(st.integers(0, 9), max_size=2),
    st.floats(),
)


@SETTINGS
@given(receivers, st.sampled_from([LOAD_TAG, 80, 9, 5, 230, "80", None, [80]]))
def test_random_receivers_never_crash_decode(to: Any, tag: Any) -> None:
    rx = node("rx")
    frame = mac(body(envelope([1, 2, 3.0], tag=tag, to=to)))
    err = only_remote_errors(lambda: rx.decode(frame, NOW))
    blank_ok = to == "" and type(tag) is int and tag in BLANK_TO_TAGS
    if type(to) is not str:
        assert err is not None
        assert err.reason == "malformed"
    elif to == "rx" or blank_ok:
        assert err is None or err.reason != "wrong-receiver"
    else:
        assert err is not None
        assert err.reason == "wrong-receiver"
        assert len(rx.replay) == 0


@SETTINGS
@given(any_message, st.text(max_size=40))
def test_real_messages_are_accepted_only_by_their_receiver(msg: Wire, to: str) -> None:
    tx, rx = node("tx"), node("rx")
    frame = tx.encode_bytes(msg, NOW, to=NodeId(to))
    err = only_remote_errors(lambda: rx.decode(frame, NOW))
    if to == "rx" or (to == "" and int(msg.TAG) in BLANK_TO_TAGS):
        assert err is None
    else:
        assert err is not None
        assert err.reason == "wrong-receiver"


# -- versions ----------------------------------------------------------------------------


def v1_frame(key: bytes = KEY) -> bytes:
    """A frame as a version-1 node makes it: no receiver, the MAC over the body alone."""
    header = msgpack.packb(["old", 1, 1, NOW, LOAD_TAG, [1, 2, 3.0]], use_bin_type=True)
    return mac(body(header), key=key, version=1)


def test_a_version_1_frame_is_refused_naming_both_versions() -> None:
    err = refused(v1_frame(), node("rx"))
    assert err.reason == "version"
    assert str(err) == f"peer speaks frame version 1, this node {VERSION}: upgrade it"
    assert not isinstance(err, AuthenticationError)


def test_a_version_1_frame_without_the_key_is_a_forgery() -> None:
    err = refused(v1_frame(key=b"s" * 32), node("rx"))
    assert isinstance(err, AuthenticationError)
    assert err.reason == "bad-mac"


def test_a_newer_version_asks_to_upgrade_this_node() -> None:
    err = refused(mac(body(envelope([1, 2, 3.0])), version=VERSION + 1), node("rx"))
    assert err.reason == "version"
    assert str(err).endswith("upgrade this node")


def test_a_frame_relabelled_to_another_version_fails_its_mac() -> None:
    tx, rx = node("tx"), node("rx")
    frame = bytearray(tx.encode_bytes(LOAD, NOW, to=NodeId("rx")))
    frame[1] = 1  # read as version 1: its MAC covered the prefix, which v1 never did
    assert isinstance(refused(bytes(frame), rx), AuthenticationError)
    old = bytearray(v1_frame())
    old[1] = VERSION  # an old frame passed off as a new one
    assert isinstance(refused(bytes(old), rx), AuthenticationError)
