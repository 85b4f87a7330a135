"""Joining with a one-time code (``node.join``): the exchange between ``Joiner`` and
``Invites`` with no I/O, and every way it refuses."""

from __future__ import annotations

import os
import random
import stat
from collections import Counter
from pathlib import Path

import pytest

from node.join import (
    BAD_MESSAGE,
    EXPIRED_CODE,
    RATE,
    REPLAYED,
    UNKNOWN_CODE,
    USED_CODE,
    BadCode,
    Invites,
    Joiner,
    JoinRefused,
    WrongCode,
    parse_code,
    store_key,
    words,
)

SECRET = "a3" * 32


def invites(**kw: object) -> Invites:
    return Invites(secret=SECRET, rng=random.Random(7), refused=Counter(), **kw)  # type: ignore[arg-type]


def test_the_right_code_gives_the_key() -> None:
    inv = invites()
    code = inv.issue(0.0).code
    joiner = Joiner(code)
    reply, sealed = inv.answer(joiner.nameplate, joiner.message, 1.0, "peer")
    assert joiner.finish(reply, sealed) == SECRET
    assert SECRET.encode() not in sealed
    assert inv.listing(2.0)[0]["state"] == "used"


def test_codes_are_a_number_and_three_words_typed_loosely() -> None:
    code = invites().issue(0.0).code
    number, *rest = code.split("-")
    assert len(rest) == 3
    assert all(w in words() for w in rest)
    assert parse_code("  " + " ".join([number, *rest]).upper()) == (number, code)
    with pytest.raises(BadCode, match="not a code word"):
        parse_code(f"{number}-{rest[0]}-{rest[1]}-qqqq")
    with pytest.raises(BadCode):
        parse_code("apple-river-stone")
    with pytest.raises(BadCode):
        parse_code(f"{number}-{rest[0]}")


def test_a_wrong_code_fails_once_and_burns_the_invite() -> None:
    inv = invites()
    code = inv.issue(0.0).code
    number = code.split("-")[0]
    wrong = Joiner(f"{number}-abandon-abandon-abandon")
    reply, sealed = inv.answer(wrong.nameplate, wrong.message, 1.0, "peer")
    with pytest.raises(WrongCode, match="wrong code"):
        wrong.finish(reply, sealed)
    # The right code, second, is refused: one attempt per code.
    right = Joiner(code)
    with pytest.raises(JoinRefused) as refused:
        inv.answer(right.nameplate, right.message, 2.0, "peer")
    assert refused.value.reason == USED_CODE
    assert refused.value.status == 410
    with pytest.raises(JoinRefused):
        inv.is_open(number, 2.0, "peer")
    assert inv.refused[USED_CODE] == 2


def test_malformed_message_is_refused_and_burns_the_invite() -> None:
    inv = invites()
    code = inv.issue(0.0).code
    number = code.split("-")[0]
    for junk in (b"", b"\x00" * 33, b"A" + b"\xff" * 32, os.urandom(200)):
        with pytest.raises(JoinRefused) as refused:
            inv.answer(number, junk, 1.0, "peer")
        assert refused.value.reason in (BAD_MESSAGE, USED_CODE)
    assert inv.refused[BAD_MESSAGE] == 1
    assert inv.refused[USED_CODE] == 3


def test_a_replayed_message_is_refused_as_a_replay() -> None:
    inv = invites()
    first, second = inv.issue(0.0), inv.issue(0.0)
    joiner = Joiner(first.code)
    inv.answer(joiner.nameplate, joiner.message, 1.0, "peer")
    with pytest.raises(JoinRefused) as refused:
        inv.answer(second.nameplate, joiner.message, 1.0, "attacker")
    assert refused.value.reason == REPLAYED
    assert inv.is_open(second.nameplate, 1.0, "peer")


def test_unknown_expired_and_revoked_codes() -> None:
    inv = invites()
    a = inv.issue(0.0, ttl_s=60)
    b = inv.issue(0.0, ttl_s=600)
    missing = next(str(n) for n in range(10, 1000) if str(n) not in (a.nameplate, b.nameplate))
    assert not inv.is_open(missing, 1.0, "peer")
    with pytest.raises(JoinRefused) as refused:
        inv.answer(missing, Joiner(f"{missing}-abandon-abandon-abandon").message, 1.0, "p")
    assert refused.value.reason == UNKNOWN_CODE
    with pytest.raises(JoinRefused) as refused:
        inv.answer(a.nameplate, Joiner(a.code).message, 61.0, "peer")
    assert refused.value.reason == EXPIRED_CODE
    assert inv.revoke(b.nameplate, 62.0)
    assert not inv.revoke(b.nameplate, 62.0)
    with pytest.raises(JoinRefused) as refused:
        inv.answer(b.nameplate, Joiner(b.code).message, 63.0, "peer")
    assert refused.value.reason == USED_CODE
    states = {i["nameplate"]: i["state"] for i in inv.listing(64.0)}
    assert states == {a.nameplate: "expired", b.nameplate: "revoked"}
    assert all("code" not in i for i in inv.listing(64.0))


def test_join_requests_share_a_rate_budget() -> None:
    inv = invites(rate_per_s=1.0, burst=3)
    for _ in range(3):
        inv.admit(0.0, "peer")
    with pytest.raises(JoinRefused) as refused:
        inv.admit(0.0, "peer")
    assert refused.value.status == 429
    inv.admit(1.0, "peer")  # one token back after a second
    assert inv.refused[RATE] == 1


def test_issue_bounds() -> None:
    inv = invites()
    with pytest.raises(Exception, match="at most"):
        inv.issue(0.0, ttl_s=0)
    nameplates = {inv.issue(0.0).nameplate for _ in range(64)}
    assert len(nameplates) == 64
    with pytest.raises(Exception, match="open already"):
        inv.issue(0.0)


def test_a_refusal_is_logged_once_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    inv = invites()
    code = inv.issue(0.0).code
    number = code.split("-")[0]
    inv.answer(number, Joiner(code).message, 1.0, "peer")
    for _ in range(5):
        with pytest.raises(JoinRefused):
            inv.answer(number, Joiner(code).message, 2.0, "peer")
    assert sum("join refused" in r.message for r in caplog.records) == 1
    assert inv.refused[USED_CODE] == 5


def test_store_key_is_private(tmp_path: Path) -> None:
    path = tmp_path / "mesh" / "key"
    store_key(path, SECRET)
    assert path.read_text().strip() == SECRET
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        store_key(path, SECRET)
