"""Sealing: the per-connection key exchange, sealed messages and sealed object bodies.

No sockets: two ``Exchange`` objects play the two ends, and the tests pass what one seals
to the other, altered, replayed, reordered or cut where a test says so.
"""

from __future__ import annotations

import os
import random

import pytest

from mesh.errors import RemoteProtocolError
from mesh.protocol.codec import Codec
from mesh.protocol.framing import (
    KIND_BATCH,
    KIND_SEALED,
    Budget,
    Link,
    Received,
    Refused,
    hello_message,
    read_hello,
)
from mesh.protocol.messages import Address, NodeId
from mesh.protocol.sealing import (
    OBJECT_CONTEXT,
    PEER_CONTEXT,
    PIECE_BYTES,
    BodyOpener,
    Exchange,
    Opener,
    Sealer,
    seal_body,
    sealed_size,
)
from tests.unit.test_framing import CONFIG, batch, chunk, sign

KEY = b"mesh-test-key-0123456789abcdef"
OTHER_KEY = b"another-mesh-key-0123456789abc"
NOW = 1_700_000_000.0
A, B = Address("10.0.0.1:7000"), Address("10.0.0.2:7000")


def pair(key_a: bytes = KEY, key_b: bytes = KEY) -> tuple[tuple[Sealer, Opener], ...]:
    """The (sealer, opener) of a dialer and of its listener after a fresh exchange."""
    a, b = Exchange(), Exchange()
    return (
        a.keys(key_a, b.public, initiator=True, context=PEER_CONTEXT),
        b.keys(key_b, a.public, initiator=False, context=PEER_CONTEXT),
    )


def reason(exc: pytest.ExceptionInfo[RemoteProtocolError]) -> str:
    return exc.value.reason


def test_both_ends_derive_the_same_keys_one_per_direction() -> None:
    (seal_a, open_a), (seal_b, open_b) = pair()
    for i in range(3):
        assert open_b.open(seal_a.seal(b"to b %d" % i)) == b"to b %d" % i
        assert open_a.open(seal_b.seal(b"to a %d" % i)) == b"to a %d" % i
    # A message sealed for one direction does not open in the other.
    (seal_a, open_a), (seal_b, open_b) = pair()
    with pytest.raises(RemoteProtocolError) as exc:
        open_a.open(seal_a.seal(b"loop"))
    assert reason(exc) == "sealed"


def test_sealed_messages_hide_their_content_and_differ_each_time() -> None:
    (seal_a, _), _ = pair()
    marker = b"MARKER-" + os.urandom(8).hex().encode()
    one, two = seal_a.seal(marker * 10), seal_a.seal(marker * 10)
    assert marker not in one
    assert marker not in two
    assert one != two  # a fresh nonce each time


def test_another_mesh_key_derives_other_keys() -> None:
    (seal_a, _), (_, open_b) = pair(KEY, OTHER_KEY)
    with pytest.raises(RemoteProtocolError) as exc:
        open_b.open(seal_a.seal(b"hello"))
    assert reason(exc) == "sealed"


def test_tampered_replayed_reordered_and_plain_messages_fail_to_open() -> None:
    (seal_a, _), (_, open_b) = pair()
    first, second = seal_a.seal(b"first"), seal_a.seal(b"second")
    tampered = bytearray(first)
    tampered[3] ^= 1
    cases = {
        "tampered": bytes(tampered),
        "reordered": second,
        "plain": b"first" + bytes(16),
        "truncated": first[:-1],
    }
    for what, message in cases.items():
        with pytest.raises(RemoteProtocolError) as exc:
            open_b.open(message)
        assert reason(exc) == "sealed", what
    assert open_b.open(first) == b"first"  # a failed open does not move the counter
    with pytest.raises(RemoteProtocolError):
        open_b.open(first)  # replayed
    assert open_b.open(second) == b"second"


def test_bad_key_shares_are_refused() -> None:
    mine = Exchange()
    for share in (b"", bytes(31), bytes(33), bytes(32)):  # all zeros: a low-order point
        with pytest.raises(RemoteProtocolError) as exc:
            mine.keys(KEY, share, initiator=True, context=PEER_CONTEXT)
        assert reason(exc) == "bad-handshake"


def test_a_recorded_session_does_not_open_with_the_mesh_key_alone() -> None:
    # Everything a recorder with the mesh key has: both public shares and the messages.
    a, b = Exchange(), Exchange()
    seal_a, _ = a.keys(KEY, b.public, initiator=True, context=PEER_CONTEXT)
    _, open_b = b.keys(KEY, a.public, initiator=False, context=PEER_CONTEXT)
    recorded = seal_a.seal(b"secret weights")
    assert open_b.open(recorded) == b"secret weights"
    # Its best try: its own exchange against each recorded share, under the mesh key.
    for share, initiator in ((a.public, False), (b.public, True), (a.public, True)):
        _, guess = Exchange().keys(KEY, share, initiator=initiator, context=PEER_CONTEXT)
        with pytest.raises(RemoteProtocolError):
            guess.open(recorded)


# -- object bodies -------------------------------------------------------------------------


def body_pair() -> tuple[Sealer, Opener]:
    fetcher, holder = Exchange(), Exchange()
    sealer, _ = holder.keys(KEY, fetcher.public, initiator=False, context=OBJECT_CONTEXT)
    _, opener = fetcher.keys(KEY, holder.public, initiator=True, context=OBJECT_CONTEXT)
    return sealer, opener


@pytest.mark.parametrize("size", [1, PIECE_BYTES - 1, PIECE_BYTES, 2 * PIECE_BYTES + 12345])
def test_bodies_open_whole_whatever_the_cuts(size: int) -> None:
    rng = random.Random(size)
    data = rng.randbytes(size)
    cut1 = min(7, size)
    cut2 = max(cut1, size // 2)
    parts = [data[:cut1], data[cut1:cut2], data[cut2:]]
    sealer, opener = body_pair()
    sealed = b"".join(seal_body(sealer, [p for p in parts if p], size))
    assert len(sealed) == sealed_size(size)
    into = bytearray(size)
    body = BodyOpener(opener, size, memoryview(into))
    pos = 0
    while pos < len(sealed):
        step = rng.choice([1, 16, 4096, 65536, 300_000, PIECE_BYTES + 16, 3 * PIECE_BYTES])
        body.feed(sealed[pos : pos + step])
        pos += step
    assert body.finished
    assert into == data


def test_a_body_cut_short_lengthened_or_resized_does_not_open() -> None:
    size = PIECE_BYTES + 100
    data = os.urandom(size)
    sealer, opener = body_pair()
    sealed = b"".join(seal_body(sealer, [data], size))
    # Cut after the first piece: that piece opens, the body never finishes.
    body = BodyOpener(opener, size, memoryview(bytearray(size)))
    body.feed(sealed[: PIECE_BYTES + 16])
    assert body.opened == PIECE_BYTES
    assert not body.finished
    # Announced as one piece long: the first piece is no last piece.
    sealer, opener = body_pair()
    sealed = b"".join(seal_body(sealer, [data], size))
    with pytest.raises(RemoteProtocolError):
        BodyOpener(opener, PIECE_BYTES, memoryview(bytearray(PIECE_BYTES))).feed(sealed)
    # A piece altered on the way.
    sealer, opener = body_pair()
    altered = bytearray(b"".join(seal_body(sealer, [data], size)))
    altered[PIECE_BYTES + 50] ^= 1
    body = BodyOpener(opener, size, memoryview(bytearray(size)))
    with pytest.raises(RemoteProtocolError):
        body.feed(altered)
    assert body.opened == PIECE_BYTES
    # Bytes after the end.
    sealer, opener = body_pair()
    sealed = b"".join(seal_body(sealer, [data], size))
    with pytest.raises(RemoteProtocolError):
        BodyOpener(opener, size, memoryview(bytearray(size))).feed(sealed + b"x")


# -- sealed links and hellos ---------------------------------------------------------------


def sealed_link(opener: Opener, *, mac: bool = True) -> Link:
    """A link to "a" at "b" that opens with ``opener``; ``mac``: whether it also checks the
    frames' MACs (``Codec.authenticate``) or not (``Codec.check``, as a sealing transport)."""
    codec_b = Codec(KEY, NodeId("b"), max_frame_bytes=CONFIG.max_frame_bytes)
    hello = read_hello(
        codec_b,
        hello_message(
            Codec(KEY, NodeId("a"), max_frame_bytes=CONFIG.max_frame_bytes),
            A,
            NOW,
            to=NodeId("b"),
            package="1.0",
            share=Exchange().public,
        ),
        NOW,
        package="1.0",
        sealed=True,
    )
    return Link(
        hello,
        peer=A,
        local=B,
        outbound=False,
        addressed=True,
        serial=1,
        authenticate=codec_b.authenticate if mac else codec_b.check,
        budget=Budget(CONFIG.ws_reassembly_bytes, lambda: None),
        max_frame_bytes=CONFIG.max_frame_bytes,
        opener=opener,
    )


def test_a_sealed_link_opens_sealed_messages_and_refuses_a_downgrade() -> None:
    (seal_a, _), (_, open_b) = pair()
    link = sealed_link(open_b)
    message = batch(sign(b"payload"))
    [event] = list(link.receive(bytes((KIND_SEALED,)) + seal_a.seal(message)))
    assert isinstance(event, Received)
    assert bytes(event.frames[0]).endswith(b"payload")
    assert message[0] == KIND_BATCH
    with pytest.raises(RemoteProtocolError) as exc:
        list(link.receive(message))  # the same message, unsealed: a downgrade
    assert reason(exc) == "unsealed"
    replayed = bytes((KIND_SEALED,)) + seal_a.seal(message)
    list(link.receive(replayed))
    with pytest.raises(RemoteProtocolError) as exc:
        list(link.receive(replayed))
    assert reason(exc) == "sealed"


def test_the_seal_stands_for_the_mac_and_the_frame_is_still_checked() -> None:
    """Under the seal a frame's MAC proves nothing more (only holders of the mesh key can
    seal), so a sealing transport leaves it out; size, magic and version still count, in
    batches and in frames of several pieces alike."""
    (seal_a, _), (_, open_b) = pair()
    link = sealed_link(open_b, mac=False)

    def sealed(message: bytes) -> bytes:
        return bytes((KIND_SEALED,)) + seal_a.seal(message)

    unsigned = sign(b"payload", key=OTHER_KEY)  # its MAC fails under KEY
    [event] = list(link.receive(sealed(batch(unsigned))))
    assert isinstance(event, Received)
    assert event.authenticated
    assert bytes(event.frames[0]) == unsigned
    big = sign(bytes(3000), key=OTHER_KEY)
    events = [
        e for part in (big[:1000], big[1000:]) for e in link.receive(sealed(chunk(len(big), part)))
    ]
    [event] = events
    assert isinstance(event, Received)
    assert event.authenticated
    assert bytes(event.frames[0]) == big
    with pytest.raises(RemoteProtocolError) as exc:
        list(link.receive(sealed(batch(b"\x00" + unsigned[1:]))))
    assert reason(exc) == "malformed"
    # Checking the MAC as well (a transport given its own check) still refuses it.
    (seal_a, _), (_, open_b) = pair()
    with pytest.raises(RemoteProtocolError):
        list(sealed_link(open_b).receive(bytes((KIND_SEALED,)) + seal_a.seal(batch(unsigned))))


def test_a_sealing_node_refuses_a_hello_without_a_share() -> None:
    a, b = (Codec(KEY, NodeId(n), max_frame_bytes=CONFIG.max_frame_bytes) for n in "ab")
    plain = hello_message(a, A, NOW, to=NodeId("b"), package="1.0", share=b"")
    with pytest.raises(Refused) as exc:
        read_hello(b, plain, NOW, package="1.0", sealed=True)
    assert exc.value.reason == "unsealed"
    assert exc.value.node == "a"
    bad = hello_message(a, A, NOW, to=NodeId("b"), package="1.0", share=bytes(31))
    with pytest.raises(RemoteProtocolError) as exc2:
        read_hello(b, bad, NOW, package="1.0", sealed=True)
    assert reason(exc2) == "bad-handshake"


def test_compatible_packages_talk_and_another_protocol_is_named() -> None:
    a, b = (Codec(KEY, NodeId(n), max_frame_bytes=CONFIG.max_frame_bytes) for n in "ab")
    share = Exchange().public
    older = hello_message(a, A, NOW, to=NodeId("b"), package="0.9.1", share=share)
    assert read_hello(b, older, NOW, package="1.0", sealed=True).package == "0.9.1"
    future = Codec(KEY, NodeId("f"), max_frame_bytes=CONFIG.max_frame_bytes, version=9)
    hello = hello_message(future, A, NOW, to=NodeId("b"), package="9.0", share=share)
    with pytest.raises(Refused) as exc:
        read_hello(b, hello, NOW, package="1.0", sealed=True)
    assert exc.value.reason == "version"
    assert (exc.value.node, exc.value.protocol, exc.value.package) == ("f", 9, "9.0")
    assert "upgrade this node" in str(exc.value)
    # The same hello once more is a replay, not a second refusal.
    with pytest.raises(RemoteProtocolError) as exc2:
        read_hello(b, hello, NOW, package="1.0", sealed=True)
    assert reason(exc2) == "replay"
    # A forged hello of another version is a forgery, not an incompatible peer.
    forged = Codec(OTHER_KEY, NodeId("f"), max_frame_bytes=CONFIG.max_frame_bytes, version=9)
    with pytest.raises(RemoteProtocolError) as exc3:
        read_hello(
            b,
            hello_message(forged, A, NOW, to=NodeId("b"), package="9.0", share=share),
            NOW,
            package="1.0",
            sealed=True,
        )
    assert reason(exc3) == "bad-mac"
