"""The dashboard's parts without a node: the event ring, a subscriber's bounded buffer,
tokens, sessions and the Host and Origin checks."""

from __future__ import annotations

import asyncio

import pytest

from node.dashboard.access import TOKEN_TTL_S, Access, Denied
from node.dashboard.events import EventLog, clip
from node.dashboard.hub import PING, Subscriber


def test_event_log_numbers_and_forgets() -> None:
    log = EventLog(capacity=3, clock=lambda: 5.0)
    log.node = "a"
    for i in range(5):
        log.publish("start", task_id=str(i))
    assert log.seq == 5
    assert [e["seq"] for e in log.since(0)] == [3, 4, 5]  # 1 and 2 are forgotten
    assert [e["task_id"] for e in log.since(3)] == ["3", "4"]
    assert log.since(5) == []
    assert log.since(0)[0] | {"task_id": "x"} == {
        "task_id": "x",
        "seq": 3,
        "t": 5.0,
        "node": "a",
        "kind": "start",
    }


def test_event_log_member_since_and_clip() -> None:
    log = EventLog(clock=lambda: 7.0)
    log.publish("member", peer="b", state="suspect")
    assert log.since_by_peer == {"b": 7.0}
    assert len(clip("x" * 100_000)) == 8192


async def test_event_log_wait() -> None:
    log = EventLog()
    assert await log.wait(0, 0.05) == []
    waiting = asyncio.ensure_future(log.wait(0, 5.0))
    await asyncio.sleep(0.01)
    log.publish("submit", task_id="t")
    log.publish("submit", task_id="u")  # same burst: one answer
    events = await waiting
    assert [e["task_id"] for e in events] == ["t", "u"]


async def test_subscriber_is_dropped_past_its_limit() -> None:
    sub = Subscriber(limit=100)
    assert sub.push(b"x" * 60)
    assert await sub.take(0.01) == b"x" * 60
    assert sub.push(b"y" * 60)
    assert not sub.push(b"z" * 60)  # 120 bytes waiting: over the limit
    assert sub.dropped
    assert await sub.take(0.01) == b""
    assert await Subscriber().take(0.01) == PING


def test_token_is_one_time_and_expires() -> None:
    access = Access(node_id="n")
    token = access.new_token(now=100.0)
    session = access.redeem(token, now=101.0)
    assert access.has_session({access.cookie: session}, now=102.0)
    with pytest.raises(Denied) as used:
        access.redeem(token, now=102.0)
    assert used.value.status == 401
    late = access.new_token(now=100.0)
    with pytest.raises(Denied, match="expired"):
        access.redeem(late, now=100.0 + TOKEN_TTL_S + 1)
    with pytest.raises(Denied):
        access.redeem("forged", now=100.0)
    assert not access.has_session({access.cookie: "forged"}, now=102.0)
    assert Access(node_id="other").cookie != access.cookie


@pytest.mark.parametrize(
    ("host", "origin", "ok"),
    [
        ("127.0.0.1:7470", None, True),
        ("[::1]:7470", None, True),
        ("localhost:7470", "http://localhost:7470", True),
        ("192.168.1.20:7470", "http://192.168.1.20:7470", True),
        ("evil.example:7470", None, False),  # DNS rebinding: a foreign name
        ("", None, False),
        ("127.0.0.1:7470", "http://evil.example", False),
        ("127.0.0.1:7470", "null", False),
    ],
)
def test_host_and_origin(host: str, origin: str | None, ok: bool) -> None:
    headers = {"Host": host} if host else {}
    if origin is not None:
        headers["Origin"] = origin
    access = Access(node_id="n")
    if ok:
        access.check_site(headers)
    else:
        with pytest.raises(Denied) as refused:
            access.check_site(headers)
        assert refused.value.status == 403
