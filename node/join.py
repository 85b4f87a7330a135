"""Joining a machine to the mesh with a short one-time code instead of a copied key file.

A member issues a code such as ``417-orbit-velvet-canyon``: the number (the *nameplate*)
names one open invite among the inviter's, the whole code is the password of a SPAKE2
exchange (the ``spake2`` package). The new machine sends its SPAKE2 message for that
nameplate; the inviter answers with its own and the mesh key sealed (ChaCha20-Poly1305 from
``cryptography``) under a key derived from the SPAKE2 session key. A joiner with the right
code opens the seal; with a wrong one it cannot, and learns nothing it could test other
codes against offline. An invite takes one attempt: the first message naming it burns it,
whatever the outcome, so a code cannot be guessed online either.

``Invites`` is the inviter's side and ``Joiner`` the new machine's. Neither does I/O nor
reads a clock: the time is an argument, and ``node.api`` carries their messages over HTTP.
Refusals raise ``JoinRefused`` with the reason counted beside the API's other refusals.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B
from spake2.ed25519_basic import NotOnCurve
from spake2.spake2 import SPAKEError

from mesh.errors import MeshError

log = logging.getLogger(__name__)

CODE_WORDS: Final = 3
"""Words after the nameplate: 33 bits from a 2048-word list, against one guess per code."""
DEFAULT_TTL_S: Final = 600.0
MAX_TTL_S: Final = 24 * 3600.0
MAX_OPEN: Final = 64
"""Open invites one node holds at once (each needs a nameplate of its own)."""
NAMEPLATES: Final = range(10, 1000)
PAKE_MESSAGE_BYTES: Final = 33
"""A SPAKE2 message on Ed25519: one side byte and one group element."""
MAX_SEALED_BYTES: Final = 4096

_ID_JOINER: Final = b"mesh-join joiner"
_ID_INVITER: Final = b"mesh-join inviter"
_SEAL_INFO: Final = b"mesh-join seal v1"
_NONCE: Final = bytes(12)
"""The seal key is derived afresh from each exchange and used once, so a fixed nonce."""
_SEPARATORS: Final = re.compile(r"[\s\-_.,]+")

# Reasons a join request is refused, counted in ``Invites.refused`` (and the node's
# ``mesh_rejected_frames``).
UNKNOWN_CODE: Final = "join-unknown-code"
USED_CODE: Final = "join-used-code"
EXPIRED_CODE: Final = "join-expired-code"
BAD_MESSAGE: Final = "join-bad-message"
REPLAYED: Final = "join-replayed-message"
RATE: Final = "join-rate-limited"


class JoinRefused(MeshError):
    """A join request the inviter refuses; ``status`` is the HTTP answer."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class WrongCode(MeshError):
    """The joiner's side of a failed exchange: the code was wrong (and is now used)."""


class BadCode(MeshError):
    """A code the joiner typed that cannot be one (checked before any attempt is spent)."""


@cache
def words() -> tuple[str, ...]:
    """The code words: the BIP-39 English list (2048 short, distinct, common words)."""
    from mnemonic import Mnemonic

    return tuple(Mnemonic("english").wordlist)


def parse_code(text: str, vocabulary: Sequence[str] | None = None) -> tuple[str, str]:
    """(nameplate, canonical code) of a typed code: any case, words split by spaces or
    hyphens. ``BadCode`` names what is wrong, so a typo costs no attempt."""
    vocab = set(vocabulary if vocabulary is not None else words())
    parts = [p for p in _SEPARATORS.split(text.strip().lower()) if p]
    if not parts or not parts[0].isdigit() or int(parts[0]) not in NAMEPLATES:
        raise BadCode(f"a code starts with its number ({NAMEPLATES[0]}..{NAMEPLATES[-1]})")
    if len(parts) != 1 + CODE_WORDS:
        raise BadCode(f"a code is a number and {CODE_WORDS} words, e.g. 417-orbit-velvet-canyon")
    unknown = [w for w in parts[1:] if w not in vocab]
    if unknown:
        raise BadCode(f"not a code word: {', '.join(unknown)} (check the spelling)")
    nameplate = str(int(parts[0]))
    return nameplate, "-".join([nameplate, *parts[1:]])


def _seal_key(session_key: bytes, nameplate: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=nameplate.encode(), info=_SEAL_INFO)
    return hkdf.derive(session_key)


@dataclass(slots=True, kw_only=True)
class Invite:
    """One issued code; ``state`` is open, used, revoked or expired."""

    nameplate: str
    code: str
    issued: float
    expires: float
    state: str = "open"

    def public(self, now: float) -> dict[str, object]:
        """What ``mesh-node invite --list`` shows: never the code's words."""
        return {
            "nameplate": self.nameplate,
            "state": self.state,
            "expires_in_s": round(max(0.0, self.expires - now), 1),
        }


class Invites:
    """The codes a node issued, and its side of each exchange. The time is an argument."""

    def __init__(
        self,
        *,
        secret: str,
        rng: random.Random,
        refused: Counter[str],
        vocabulary: Sequence[str] | None = None,
        rate_per_s: float = 1.0,
        burst: int = 20,
        max_seen: int = 4096,
    ) -> None:
        """``secret``: the mesh key text the joiner receives. ``rate_per_s`` and ``burst``
        bound the public join requests (probes and exchanges, all senders together)."""
        self._secret = secret
        self._rng = rng
        self._words = tuple(vocabulary if vocabulary is not None else words())
        self.refused = refused
        self._invites: dict[str, Invite] = {}
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._refilled: float | None = None
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._max_seen = max_seen
        self._logged: set[str] = set()
        self.joined = 0
        """Exchanges answered for an open invite (whether the joiner had the right code is
        known only to it)."""

    # -- the member's commands -------------------------------------------------------------

    def issue(self, now: float, ttl_s: float = DEFAULT_TTL_S) -> Invite:
        """A new code, valid for ``ttl_s`` seconds and one attempt."""
        if not 0 < ttl_s <= MAX_TTL_S:
            raise MeshError(f"an invite lasts more than 0 and at most {MAX_TTL_S:g} seconds")
        self._expire(now)
        open_now = {n for n, i in self._invites.items() if i.state == "open"}
        if len(open_now) >= MAX_OPEN:
            raise MeshError(f"{MAX_OPEN} invites are open already; revoke some first")
        free = [str(n) for n in NAMEPLATES if str(n) not in self._invites]
        if not free:
            # Every nameplate was used once: reuse the ones no longer open, oldest first.
            closed = sorted(
                (i for i in self._invites.values() if i.state != "open"), key=lambda i: i.issued
            )
            free = [closed[0].nameplate]
            del self._invites[free[0]]
        nameplate = self._rng.choice(free)
        chosen = [self._rng.choice(self._words) for _ in range(CODE_WORDS)]
        invite = Invite(
            nameplate=nameplate,
            code="-".join([nameplate, *chosen]),
            issued=now,
            expires=now + ttl_s,
        )
        self._invites[nameplate] = invite
        return invite

    def listing(self, now: float) -> list[dict[str, object]]:
        """Every invite this node remembers, newest first."""
        self._expire(now)
        ordered = sorted(self._invites.values(), key=lambda i: i.issued, reverse=True)
        return [i.public(now) for i in ordered]

    def revoke(self, nameplate: str, now: float) -> bool:
        """Close an open invite; False if there is none by that nameplate."""
        self._expire(now)
        invite = self._invites.get(nameplate)
        if invite is None or invite.state != "open":
            return False
        invite.state = "revoked"
        return True

    # -- the joiner's requests (public: no key proves anything here) -----------------------

    def admit(self, now: float, peer: str) -> None:
        """Spend one token of the public join budget, or raise ``JoinRefused`` (429)."""
        if self._refilled is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1.0:
            self._refuse(429, RATE, f"too many join requests; try again in a minute ({peer})")
        self._tokens -= 1.0

    def is_open(self, nameplate: str, now: float, peer: str) -> bool:
        """Whether an invite by this nameplate waits for its one attempt: False if this node
        has none by it; ``JoinRefused`` (410) if it had one that is used, revoked or expired
        (a second attempt on a used code is refused here, before any exchange)."""
        self._expire(now)
        invite = self._invites.get(nameplate)
        if invite is None:
            return False
        self._check(invite, peer)
        return True

    def _check(self, invite: Invite, peer: str) -> None:
        if invite.state == "expired":
            self._refuse(410, EXPIRED_CODE, f"invite {invite.nameplate} has expired ({peer})")
        if invite.state != "open":
            self._refuse(
                410,
                USED_CODE,
                f"invite {invite.nameplate} is {invite.state}: one attempt only ({peer})",
            )

    def answer(self, nameplate: str, message: bytes, now: float, peer: str) -> tuple[bytes, bytes]:
        """The inviter's SPAKE2 message and the sealed mesh key for one attempt on
        ``nameplate``. The invite is used from here on, whatever happens next."""
        digest = hashlib.sha256(message).digest()
        if digest in self._seen:
            self._refuse(409, REPLAYED, f"a join message was sent twice (from {peer})")
        self._remember(digest)
        self._expire(now)
        invite = self._invites.get(nameplate)
        if invite is None:
            self._refuse(404, UNKNOWN_CODE, f"no invite {nameplate} here (from {peer})")
        self._check(invite, peer)
        invite.state = "used"
        if len(message) != PAKE_MESSAGE_BYTES:
            self._refuse(400, BAD_MESSAGE, f"malformed join message for {nameplate} ({peer})")
        pake = SPAKE2_B(invite.code.encode(), idA=_ID_JOINER, idB=_ID_INVITER)
        outbound: bytes = pake.start()
        try:
            session_key: bytes = pake.finish(message)
        except (SPAKEError, ValueError, NotOnCurve):
            self._refuse(400, BAD_MESSAGE, f"malformed join message for {nameplate} ({peer})")
        plain = json.dumps({"key": self._secret}).encode()
        sealed = ChaCha20Poly1305(_seal_key(session_key, nameplate)).encrypt(
            _NONCE, plain, nameplate.encode()
        )
        self.joined += 1
        log.warning("invite %s: answered a join from %s; the code is now used", nameplate, peer)
        return outbound, sealed

    # -- inside ----------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        for invite in self._invites.values():
            if invite.state == "open" and now >= invite.expires:
                invite.state = "expired"

    def _remember(self, digest: bytes) -> None:
        self._seen[digest] = None
        while len(self._seen) > self._max_seen:
            self._seen.popitem(last=False)

    def _refuse(self, status: int, reason: str, message: str) -> NoReturn:
        self.refused[reason] += 1
        # One line the first time for each reason; after that the counter tells.
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("join refused: %s (further ones are counted as %s)", message, reason)
        raise JoinRefused(status, reason, message)


class Joiner:
    """The new machine's side of one exchange, for one typed code."""

    def __init__(self, code: str, vocabulary: Sequence[str] | None = None) -> None:
        self.nameplate, self.code = parse_code(code, vocabulary)
        self._pake = SPAKE2_A(self.code.encode(), idA=_ID_JOINER, idB=_ID_INVITER)
        self.message: bytes = self._pake.start()
        """What to send to the inviter."""

    def finish(self, reply: bytes, sealed: bytes) -> str:
        """The mesh key from the inviter's answer; ``WrongCode`` if it cannot be opened."""
        if len(reply) != PAKE_MESSAGE_BYTES or len(sealed) > MAX_SEALED_BYTES:
            raise WrongCode("the inviter's answer is malformed")
        try:
            session_key: bytes = self._pake.finish(reply)
        except (SPAKEError, ValueError, NotOnCurve):
            raise WrongCode("the inviter's answer is malformed") from None
        try:
            plain = ChaCha20Poly1305(_seal_key(session_key, self.nameplate)).decrypt(
                _NONCE, sealed, self.nameplate.encode()
            )
        except InvalidTag:
            raise WrongCode(
                f"wrong code for invite {self.nameplate}: it is used now; ask for a new one"
                " (mesh-node invite)"
            ) from None
        try:
            key = json.loads(plain)["key"]
        except (ValueError, KeyError, TypeError):
            raise WrongCode("the inviter sent no key") from None
        if not isinstance(key, str) or not key:
            raise WrongCode("the inviter sent no key")
        return key


def store_key(path: os.PathLike[str] | str, key: str) -> None:
    """Write a received key to a new key file, mode 0600 from its first byte."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
