"""protocol.sockets.send_frames on a real pair of ZeroMQ sockets (inproc): a bad frame is refused
before any frame of the message is sent."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from protocol.sockets import send_frames


def test_send_frames_refuses_a_bad_frame_before_sending_any(tmp_path: Path) -> None:
    """A frame after the first that raised used to leave the SNDMORE frames queued, and the next
    message sent on the socket (on the broker's ROUTER: another peer's reply) was glued to them."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://r3")
        b.connect("inproc://r3")
        with pytest.raises(TypeError):
            send_frames(a, [b"first", "not bytes"])  # type: ignore[list-item]
        send_frames(a, [b"next"])
        assert b.poll(1000)
        assert b.recv_multipart() == [b"next"]
    finally:
        a.close(0)
        b.close(0)
        ctx.term()
