"""The typed task path's own values: the failure record (``mesh.errors.ErrorInfo``), the
client session's messages (``mesh.protocol.session``) and the worker pipe's (``node.pipe``).

Each encodes to what crosses its wire and decodes back to an equal value; anything else
is refused with ``RemoteProtocolError``, never believed and never an unexpected exception.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mesh.errors import (
    ErrorInfo,
    FailureKind,
    LocalProtocolError,
    NoCapablePeerError,
    RemoteProtocolError,
    TaskError,
    TaskLostError,
)
from mesh.protocol.codec import decode_body, dumps, encode_body, loads
from mesh.protocol.contract_shared import FAILED_LOST, FAILED_NO_BIDS, FAILED_NO_PEER, FAILED_TASK
from mesh.protocol.messages import ObjectRef, Segment
from mesh.protocol.session import (
    BadTask,
    Outcome,
    Results,
    SessionError,
    Submission,
    Submit,
    decode_reply,
)
from node.pipe import (
    INLINE,
    Done,
    Ready,
    Run,
    Stop,
    Threads,
    decode_call,
    decode_frame,
    parse_segment,
    segment_frame,
)
from node.pipe import (
    decode_reply as decode_pipe_reply,
)

BOOM = ErrorInfo(
    kind=FailureKind.TASK, message="boom", exc_type="ValueError", traceback="Traceback ..."
)
NO_PEER = ErrorInfo(
    kind=FailureKind.NO_PEER,
    message="no peer can run t: missing gpu=1",
    task="t",
    missing={"gpu": "1"},
)


def wire(value: Any) -> Any:
    """``value`` as it arrives at the other end (a ``mesh.protocol.codec`` body)."""
    return loads(dumps(value))


# ---------------------------------------------------------------------------------------
# ErrorInfo and FailureKind
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        BOOM,
        NO_PEER,
        *(ErrorInfo(kind=kind, message=f"{kind} happened") for kind in FailureKind),
    ],
    ids=lambda e: str(e.kind),
)
def test_an_error_record_round_trips(error: ErrorInfo) -> None:
    assert ErrorInfo.decode(wire(error.encode())) == error


def test_one_spelling_per_kind_agrees_with_the_contract_net() -> None:
    assert FailureKind(FAILED_TASK) is FailureKind.TASK
    assert FailureKind(FAILED_NO_PEER) is FailureKind.NO_PEER
    assert FailureKind(FAILED_NO_BIDS) is FailureKind.NO_BIDS
    assert FailureKind(FAILED_LOST) is FailureKind.LOST


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "boom",
        ["task-error", "boom"],
        {"message": "no kind"},
        {"kind": "task", "message": "a kind of another spelling"},
        {"kind": 3, "message": "x"},
        {"kind": np.array(["task-error"]), "message": "x"},
        {"kind": "task-error"},
        {"kind": "task-error", "message": 5},
        {"kind": "task-error", "message": "x", "exc_type": ["ValueError"]},
        {"kind": "task-error", "message": "x", "traceback": None},
        {"kind": "no-capable-peer", "message": "x", "missing": ["gpu"]},
        {"kind": "no-capable-peer", "message": "x", "missing": {"gpu": 1}},
        {"kind": "no-capable-peer", "message": "x", "missing": {1: "gpu"}},
    ],
)
def test_a_malformed_error_record_is_refused(raw: Any) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        ErrorInfo.decode(raw)
    assert info.value.reason == "bad-field"


def test_each_kind_becomes_its_exception() -> None:
    err = BOOM.exception("t1", "n1")
    assert isinstance(err, TaskError)
    assert (err.exc_type, err.remote_traceback, err.task_id, err.node) == (
        "ValueError",
        "Traceback ...",
        "t1",
        "n1",
    )
    no_peer = NO_PEER.exception("t1", "")
    assert isinstance(no_peer, NoCapablePeerError)
    assert (no_peer.task, no_peer.missing) == ("t", {"gpu": "1"})
    for kind in (FailureKind.LOST, FailureKind.NO_BIDS):
        lost = ErrorInfo(kind=kind, message="gone").exception("t1", "")
        assert isinstance(lost, TaskLostError)
        assert str(lost) == "task t1: gone"
    refused = ErrorInfo(kind=FailureKind.BAD_REQUEST, message="too deep").exception("", "")
    assert isinstance(refused, LocalProtocolError)
    internal = ErrorInfo(kind=FailureKind.INTERNAL, message="bug", exc_type="InternalError")
    assert isinstance(internal.exception("", ""), TaskError)


def test_a_failure_the_contract_net_reported_keeps_what_is_well_formed() -> None:
    details = {"exc_type": "ValueError", "traceback": 7, "task": "t", "missing": "gpu"}
    error = ErrorInfo.reported(FAILED_TASK, "boom", details)
    assert error == ErrorInfo(
        kind=FailureKind.TASK, message="boom", exc_type="ValueError", task="t"
    )
    assert ErrorInfo.reported("from-a-newer-peer", "?", {}).kind is FailureKind.LOST
    no_peer = ErrorInfo.reported(
        FAILED_NO_PEER, NO_PEER.message, {"task": "t", "missing": {"gpu": 1}}
    )
    assert no_peer == NO_PEER


def test_a_raised_exception_becomes_a_task_error() -> None:
    error = ErrorInfo.of(KeyError("k"), traceback="tb")
    assert error == ErrorInfo(
        kind=FailureKind.TASK, message="'k'", exc_type="KeyError", traceback="tb"
    )


# ---------------------------------------------------------------------------------------
# The client session
# ---------------------------------------------------------------------------------------


def test_a_submit_round_trips() -> None:
    ref = ObjectRef(id="o1", holder="n1", nbytes=8)  # type: ignore[arg-type]
    tasks = (
        Submission(cid=1, name="echo", args=(1, "a", ref), kwargs={}, options=None),
        Submission(
            cid=2,
            name="array_sum",
            args=(Segment(name="mesh-up-" + "0" * 24, nbytes=64),),
            kwargs={"scale": 2.0},
            options={"timeout": 5.0, "labels": {"gpu": "yes"}},
        ),
    )
    body = wire(Submit(tasks=tasks).encode())
    assert body["op"] == "submit"
    assert Submit.decode(body) == tasks


def test_arrays_in_a_submission_stay_arrays() -> None:
    arr = np.arange(4.0)
    sub = Submission(cid=1, name="array_sum", args=(arr,), kwargs={})
    (back,) = Submit.decode(wire(Submit(tasks=(sub,)).encode()))
    assert isinstance(back, Submission)
    np.testing.assert_array_equal(back.args[0], arr)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, "expected {'op': 'submit'"),
        ([], "expected {'op': 'submit'"),
        ({"tasks": []}, "expected {'op': 'submit'"),
        ({"op": "SUBMIT", "tasks": []}, "expected {'op': 'submit'"),
        ({"op": np.array([1, 2]), "tasks": []}, "expected {'op': 'submit'"),
        ({"op": "submit"}, "tasks must be a list"),
        ({"op": "submit", "tasks": {"1": "echo"}}, "tasks must be a list"),
        ({"op": "submit", "tasks": [[1, "echo", [], {}]]}, "each task is"),
        ({"op": "submit", "tasks": [[1, "echo", [], {}, None], "echo"]}, "each task is"),
    ],
)
def test_a_message_that_is_no_batch_is_refused_whole(body: Any, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        Submit.decode(body)


def test_a_task_with_wrong_fields_is_refused_alone() -> None:
    body = {
        "op": "submit",
        "tasks": [
            [1, 7, [], {}, None],
            ["two", "echo", "not a list", {}, None],
            [3, "echo", [], ["not", "a", "map"], None],
            [4, "echo", [1], {"k": 2}, {"timeout": 1.0}],
        ],
        "extra": "ignored",
    }
    decoded = Submit.decode(wire(body))
    assert decoded == (
        BadTask(cid=1, reason="task name or args malformed"),
        BadTask(cid="two", reason="task name or args malformed"),
        BadTask(cid=3, reason="kwargs must be a map"),
        Submission(cid=4, name="echo", args=(1,), kwargs={"k": 2}, options={"timeout": 1.0}),
    )


def test_results_round_trip() -> None:
    items = (
        (1, Outcome(task_id="a-1", node="n1", value=[1, 2])),
        (2, Outcome(task_id="a-2", node="n2", error=BOOM)),
        ("x", Outcome(task_id="", error=ErrorInfo(kind=FailureKind.BAD_REQUEST, message="?"))),
    )
    body = wire(Results(items=items).encode())
    assert body["items"][1] == [2, "a-2", False, None, "n2", BOOM.encode()]
    assert decode_reply(body) == Results(items=items)
    assert [o.ok for _, o in items] == [True, False, False]


def test_a_session_error_round_trips() -> None:
    error = SessionError(message="tasks must be a list")
    assert decode_reply(wire(error.encode())) == error


@pytest.mark.parametrize(
    "body",
    [
        None,
        {"op": "submit", "tasks": []},
        {"op": "results"},
        {"op": "results", "items": {"1": []}},
        {"op": "results", "items": [[1, "a-1", True, 1, "n1"]]},
        {"op": "results", "items": [[1, 5, True, 1, "n1", None]]},
        {"op": "results", "items": [[1, "a-1", 1, 1, "n1", None]]},
        {"op": "results", "items": [[1, "a-1", True, 1, None, None]]},
        {"op": "results", "items": [[1, "a-1", False, None, "n1", None]]},
        {"op": "results", "items": [[1, "a-1", False, None, "n1", {"kind": "??"}]]},
    ],
)
def test_a_reply_the_client_cannot_read_is_refused(body: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_reply(body)


# ---------------------------------------------------------------------------------------
# The worker pipe
# ---------------------------------------------------------------------------------------


def pipe(value: Any) -> Any:
    chunks, _ = encode_body(value)
    return decode_body(memoryview(b"".join(chunks)))


@pytest.mark.parametrize(
    "call",
    [
        Run(seq=1, task_id="a-1", name="echo", args=[1, [2]], kwargs={"k": "v"}),
        Run(
            seq=2,
            task_id="a-2",
            name="array_sum",
            args=[Segment(name="mesh-obj-1-0123abcd-1", nbytes=64)],
            kwargs={},
            shared=("mesh-obj-1-0123abcd-1",),
        ),
        Threads(threads=4),
        Stop(),
    ],
    ids=lambda c: type(c).__name__,
)
def test_a_call_round_trips(call: Any) -> None:
    assert decode_call(pipe(call.encode())) == call


@pytest.mark.parametrize(
    "reply",
    [
        Ready(pid=1234),
        Done(seq=1, value={"a": [1, 2]}, runtime_s=0.25),
        Done(seq=2, error=BOOM, runtime_s=1.5),
    ],
    ids=lambda r: type(r).__name__,
)
def test_a_reply_round_trips(reply: Any) -> None:
    assert decode_pipe_reply(pipe(reply.encode())) == reply


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        [1, 2],
        ["run", 1, "a-1", "echo", [], {}],
        ["run", "1", "a-1", "echo", [], {}, []],
        ["run", True, "a-1", "echo", [], {}, []],
        ["run", 1, "a-1", "echo", "args", {}, []],
        ["run", 1, "a-1", "echo", [], [], []],
        ["run", 1, "a-1", "echo", [], {}, [7]],
        ["threads", "4"],
        ["stop", 1],
        ["done", 1, None, None, 0.0],
        ["teleport"],
    ],
)
def test_a_call_that_is_none_is_refused(raw: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_call(raw)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        ["done", 1, None, None],
        ["done", 1, None, None, 0],
        ["done", None, None, None, 0.0],
        ["done", 1, None, {"kind": "task"}, 0.0],
        ["done", 1, None, "boom", 0.0],
        ["ready"],
        ["ready", "1234"],
        ["run", 1, "a-1", "echo", [], {}, []],
    ],
)
def test_a_reply_that_is_none_is_refused(raw: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_pipe_reply(raw)


def test_frames_carry_a_body_or_the_segment_that_holds_it() -> None:
    chunks, size = encode_body(Stop().encode())
    assert decode_frame(INLINE, b"".join(chunks)) == ["stop"]
    assert len(b"".join(chunks)) == size
    _, payload = segment_frame("mesh-1-ab-w1-args", 4096)
    assert parse_segment(payload) == ("mesh-1-ab-w1-args", 4096)
    with pytest.raises(RemoteProtocolError):
        parse_segment(payload[:8])
    with pytest.raises(RemoteProtocolError):
        decode_frame(7, b"")
