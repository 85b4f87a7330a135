"""Sealing: what keeps the wire between two machines private. No sockets, no event loop.

Every connection between peers, every object body fetched from another machine and every
client session from another machine is encrypted and authenticated with AES-256-GCM under
keys that exist for that connection only. Both ends make a fresh X25519 key pair
(``Exchange``) and swap the public halves in messages the mesh key authenticates (the
peers' hellos; the signed path of an object request or a session); the keys are then
HKDF-SHA256 of the X25519 secret, salted with the mesh key, over both
public halves and a context that says what they protect. So:

- a sniffer without the mesh key reads nothing and cannot forge or alter a byte;
- the mesh key alone opens no recorded session: the X25519 secrets die with the
  connection (forward secrecy), and each direction of a connection has its own key;
- someone who swaps a public half for their own, without the mesh key, derives other
  keys, so the first sealed message fails.

A ``Sealer`` numbers the messages it seals (the nonce is a 96-bit counter) and an
``Opener`` expects them in that order, which TCP keeps: a message dropped, replayed,
reordered or altered fails to open, and so does anything not sealed at all. Both raise
``RemoteProtocolError`` (reason ``sealed``); what to do with the connection is the
caller's business. Object bodies are sealed in pieces of ``PIECE_BYTES``; the last piece
names the body's size in its associated data, so a body cut short or lengthened fails.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mesh.errors import RemoteProtocolError
from mesh.protocol.codec import Buffer

PUBLIC_BYTES: Final = 32
"""An X25519 public key on the wire."""
TAG_BYTES: Final = 16
"""What sealing adds to each message or piece."""
PIECE_BYTES: Final = 1024 * 1024
"""Object bodies are sealed in pieces of this many plaintext bytes (the last one shorter)."""

PEER_CONTEXT: Final = b"mesh peer wire 3"
OBJECT_CONTEXT: Final = b"mesh object body 3"
SESSION_CONTEXT: Final = b"mesh client session 3"

_LAST: Final = struct.Struct("<BQ")  # the last piece of a body: flag 1, the body's size
_MORE: Final = b"\x00"


class Sealer:
    """Seals one direction's messages, each under the next counter nonce."""

    __slots__ = ("_aead", "_count")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._count = 0

    def seal(self, message: Buffer, aad: bytes | None = None) -> bytes:
        nonce = self._count.to_bytes(12, "little")
        self._count += 1
        return self._aead.encrypt(nonce, message, aad)


class Opener:
    """Opens what the peer's ``Sealer`` sealed, in the order it sealed it."""

    __slots__ = ("_aead", "_count")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._count = 0

    def open(self, sealed: Buffer, aad: bytes | None = None) -> bytes:
        nonce = self._count.to_bytes(12, "little")
        try:
            plain = self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise RemoteProtocolError(
                "sealed message failed to open (altered, replayed, reordered or not sealed)",
                reason="sealed",
            ) from None
        self._count += 1
        return plain

    def open_into(self, sealed: Buffer, into: memoryview, aad: bytes | None = None) -> None:
        """``open``, writing the plaintext into ``into`` (of its exact size) instead. After
        a failure ``into`` holds bytes that must not be used."""
        nonce = self._count.to_bytes(12, "little")
        try:
            self._aead.decrypt_into(nonce, sealed, aad, into)
        except InvalidTag:
            raise RemoteProtocolError(
                "sealed message failed to open (altered, replayed, reordered or not sealed)",
                reason="sealed",
            ) from None
        self._count += 1


class Exchange:
    """One side's ephemeral X25519 key pair for one connection or one object fetch."""

    __slots__ = ("_private", "public")

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes_raw()

    def keys(
        self, mesh_key: bytes, peer_public: bytes, *, initiator: bool, context: bytes
    ) -> tuple[Sealer, Opener]:
        """This side's sealer and opener, given the peer's public half. ``initiator`` says
        whether this side opened the exchange (dialled, or requested the object), so the
        two ends agree on which key is whose."""
        if type(peer_public) is not bytes or len(peer_public) != PUBLIC_BYTES:
            raise RemoteProtocolError("bad key share", reason="bad-handshake")
        try:
            secret = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:  # a low-order point: the shared secret would be all zeros
            raise RemoteProtocolError("bad key share", reason="bad-handshake") from None
        first, second = (self.public, peer_public) if initiator else (peer_public, self.public)
        okm = HKDF(
            algorithm=hashes.SHA256(),
            length=64,
            salt=bytes(mesh_key),
            info=context + first + second,
        ).derive(secret)
        forward, backward = okm[:32], okm[32:]
        if initiator:
            return Sealer(forward), Opener(backward)
        return Sealer(backward), Opener(forward)


def sealed_size(size: int) -> int:
    """The sealed length of an object body of ``size`` (> 0) bytes."""
    return size + -(-size // PIECE_BYTES) * TAG_BYTES


def _piece_aad(size: int, end: int) -> bytes:
    return _LAST.pack(1, size) if end >= size else _MORE


def seal_body(sealer: Sealer, body: list[Buffer], size: int) -> Iterator[bytes]:
    """An object body (``body``'s buffers back to back, ``size`` bytes) as sealed pieces,
    made one at a time as they are asked for."""
    pending: list[memoryview] = []
    room = PIECE_BYTES
    done = 0
    for buffer in body:
        view = memoryview(buffer).cast("B")
        while view.nbytes:
            take = view[:room]
            view = view[take.nbytes :]
            pending.append(take)
            room -= take.nbytes
            done += take.nbytes
            if room == 0:
                piece = pending[0] if len(pending) == 1 else b"".join(pending)
                yield sealer.seal(piece, _piece_aad(size, done))
                pending, room = [], PIECE_BYTES
    if done != size:
        raise ValueError(f"body of {done} bytes, announced {size}")
    if pending:
        yield sealer.seal(b"".join(pending), _piece_aad(size, done))


class BodyOpener:
    """Opens a sealed object body of ``size`` bytes into ``into`` as its pieces arrive, in
    whatever cuts: each piece is opened straight into its place (a piece split between
    cuts is gathered first)."""

    __slots__ = ("_filled", "_into", "_opened", "_opener", "_piece", "size")

    def __init__(self, opener: Opener, size: int, into: memoryview) -> None:
        if size <= 0 or into.nbytes != size:
            raise RemoteProtocolError(f"sealed body of {size} bytes", reason="bad-size")
        self._opener = opener
        self._into = into
        self._piece = memoryview(bytearray(min(PIECE_BYTES, size) + TAG_BYTES))
        self._filled = 0
        self._opened = 0
        self.size = size

    @property
    def opened(self) -> int:
        """Bytes of the body opened so far."""
        return self._opened

    @property
    def finished(self) -> bool:
        return self._opened >= self.size

    def feed(self, data: Buffer) -> None:
        """Take the next received bytes; raises ``RemoteProtocolError`` if a piece fails to
        open or the body runs past its size."""
        view = memoryview(data).cast("B")
        while view.nbytes:
            if self.finished:
                raise RemoteProtocolError("sealed body longer than announced", reason="sealed")
            want = min(PIECE_BYTES, self.size - self._opened) + TAG_BYTES
            if self._filled == 0 and view.nbytes >= want:
                self._open(view[:want])
                view = view[want:]
                continue
            take = min(want - self._filled, view.nbytes)
            self._piece[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == want:
                self._filled = 0
                self._open(self._piece[:want])

    def _open(self, sealed: memoryview) -> None:
        end = self._opened + sealed.nbytes - TAG_BYTES
        self._opener.open_into(sealed, self._into[self._opened : end], _piece_aad(self.size, end))
        self._opened = end
