"""The hostile strategies themselves: every wire type has one, and the codec carries it.

If the codec's encoder frames a hostile message, its decoder must give it back (or refuse it
with ``RemoteProtocolError``, never anything else); otherwise the core suites below would
be fed nothing for that type and prove nothing.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import LocalProtocolError
from mesh.protocol.codec import Codec
from mesh.protocol.messages import NodeId, Wire

from .hostile import FUZZ, KEY, MAX_FRAME, WALL, Pools, frame, only_remote_errors, registered_types
from .hostile import wire_of as hostile_wire_of


@pytest.mark.parametrize("cls", registered_types(), ids=lambda c: c.__name__)
def test_every_registered_type_has_a_hostile_strategy(cls: type[Wire]) -> None:
    hostile_wire_of(cls, Pools())  # raises TypeError for a field kind it does not know


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_what_the_encoder_frames_the_decoder_accepts(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(registered_types()), label="type")
    msg = data.draw(hostile_wire_of(cls, Pools(nodes=("a",), tasks=("t-0",))), label="msg")
    tx = Codec(KEY, NodeId("a"), max_frame_bytes=MAX_FRAME, boot=1)
    rx = Codec(KEY, NodeId("me"), max_frame_bytes=MAX_FRAME, boot=2)
    try:
        framed = frame(tx, msg, NodeId("me"))
    except LocalProtocolError:
        return  # too big or too deep to send: nobody can deliver it
    decoded: list[Wire] = []
    err = only_remote_errors(lambda: decoded.append(rx.decode(framed, WALL).msg))
    assert err is None, f"the decoder refused what the encoder framed: {err}"
    assert type(decoded[0]) is cls
