"""MSET values and MGET answers packed in one frame (docs/protocol.md §1.2): the client's side,
the broker's decoding, and the rule that keeps a broker from before ``packed`` from misreading one."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.messages import Invalid, KvRequest, Limits, decode_client
from client.retry import UNPACKED_URLS, Attempts
from protocol.errors import ErrorCode, InvalidRequest
from protocol.frames import C_REQUEST, MDPC, SERVICE, pack, pack_request_values, pack_values, unpack, unpack_values
from protocol.sockets import ZERO_COPY_BYTES

pytestmark = pytest.mark.timeout(60)

LIMITS = Limits(max_key=4096, max_value=1 << 20, max_stream=1 << 30)
SMALL, LARGE = b"v" * 100, b"L" * ZERO_COPY_BYTES


def _attempts(op: str, header: dict, values: list[bytes], url: str | None = None) -> Attempts:
    return Attempts(url or f"tcp://packed-{uuid.uuid4().hex}", op, 7, b"cid", header, values,
                    timeout=5.0, attempt_timeout=1.0)


def _decode(header: dict, values: list[bytes]) -> KvRequest:
    msg = decode_client([MDPC, C_REQUEST, SERVICE, pack({"id": 1, **header}), *values], LIMITS)
    assert isinstance(msg, KvRequest)
    return msg


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"", SMALL, LARGE, LARGE + b"+"]), min_size=0, max_size=8))
def test_packed_only_when_fewer_frames_than_values(values: list[bytes]) -> None:
    """A broker from before ``packed`` counts one value frame per key: with fewer frames it
    refuses the MSET; it must never get as many (it would store the packed array as a value)."""
    frames = pack_request_values(values)
    if frames is None:
        assert len(values) < 2 or len(pack_values(values)) >= len(values)
    else:
        assert len(frames) < len(values)
        assert unpack_values(frames) == values


def test_a_client_packs_an_mset_and_asks_for_an_mget_packed() -> None:
    a = _attempts("mset", {"keys": [b"a", b"b", b"c"]}, [SMALL, b"", LARGE])
    body, _ = a.next()
    assert unpack(body[0])["packed"] is True
    assert body[1:] == pack_values([SMALL, b"", LARGE]) and len(body) == 3
    one = _attempts("mset", {"keys": [b"a"]}, [SMALL])
    body, _ = one.next()
    assert "packed" not in unpack(body[0]) and body[1:] == [SMALL]
    mostly_large = _attempts("mset", {"keys": [b"a", b"b"]}, [SMALL, LARGE])  # 2 frames either way
    body, _ = mostly_large.next()
    assert "packed" not in unpack(body[0]) and body[1:] == [SMALL, LARGE]
    mget = _attempts("mget", {"keys": [b"a", b"b"]}, [])
    body, _ = mget.next()
    assert unpack(body[0])["packed"] is True and len(body) == 1
    put = _attempts("put", {"key": b"a"}, [SMALL])
    body, _ = put.next()
    assert "packed" not in unpack(body[0])


def test_a_client_reads_packed_and_unpacked_answers() -> None:
    a = _attempts("mget", {"keys": [b"a", b"b", b"c"]}, [])
    a.next()
    rh, values = a.answer([pack({"id": 7, "ok": True, "packed": True}), *pack_values([SMALL, b"", LARGE])])
    assert values == [SMALL, b"", LARGE]
    rh, values = a.answer([pack({"id": 7, "ok": True}), SMALL, b"", LARGE])  # a broker from before
    assert values == [SMALL, b"", LARGE]
    with pytest.raises(Exception) as e:
        a.answer([pack({"id": 7, "ok": True, "packed": True}), b"\xc1"])
    assert e.value.code == ErrorCode.INTERNAL  # type: ignore[attr-defined]


def test_an_mset_refused_by_a_broker_from_before_packed_goes_again_as_frames() -> None:
    url = f"tcp://old-broker-{uuid.uuid4().hex}"
    values = [SMALL, b"x", b"y"]
    a = _attempts("mset", {"keys": [b"a", b"b", b"c"]}, values, url=url)
    a.next()
    refusal = {"id": 7, "ok": False, "code": "BAD_REQUEST",
               "message": "mset needs one value frame per key (3), got 1"}
    assert a.answer([pack(refusal)]) == 0.0  # at once
    body, _ = a.next()
    hdr = unpack(body[0])
    assert "packed" not in hdr and hdr["retry"] is True and body[1:] == values
    assert url in UNPACKED_URLS
    later = _attempts("mset", {"keys": [b"a", b"b"]}, [SMALL, SMALL], url=url)
    body, _ = later.next()
    assert "packed" not in unpack(body[0]) and body[1:] == [SMALL, SMALL]
    UNPACKED_URLS.discard(url)
    # Any other BAD_REQUEST is the caller's, as before.
    b = _attempts("mset", {"keys": [b"a", b"b"]}, [SMALL, SMALL])
    b.next()
    with pytest.raises(InvalidRequest):
        b.answer([pack({"id": 7, "ok": False, "code": "BAD_REQUEST", "message": "more than 10000 keys"})])


def test_the_broker_decodes_packed_values_and_notes_a_packed_mget() -> None:
    msg = _decode({"op": "mset", "keys": [b"a", b"b", b"c"], "packed": True}, pack_values([SMALL, b"", LARGE]))
    assert msg.values == [SMALL, b"", LARGE] and not msg.packed
    msg = _decode({"op": "mset", "keys": [b"a", b"b"]}, [SMALL, b""])
    assert msg.values == [SMALL, b""]
    assert _decode({"op": "mget", "keys": [b"a", b"b"], "packed": True}, []).packed
    assert not _decode({"op": "mget", "keys": [b"a", b"b"]}, []).packed
    # On a put the field changes nothing: its one value is its frame.
    assert _decode({"op": "put", "key": b"a", "packed": True}, [pack([SMALL])]).values == [pack([SMALL])]


@pytest.mark.parametrize(("header", "values"), [
    ({"packed": 1}, pack_values([SMALL, SMALL])),
    ({"packed": True}, [b"\xc1"]),
    ({"packed": True}, [pack([1, 2])]),
    ({"packed": True}, [pack([SMALL])]),  # one value for two keys
    ({"packed": True}, [pack([SMALL, None])]),  # a large value's frame missing
    ({"packed": True}, [pack([SMALL, SMALL]), LARGE]),  # a frame no nil stands for
    ({"packed": True}, []),
])
def test_the_broker_refuses_malformed_packed_values(header: dict, values: list[bytes]) -> None:
    with pytest.raises(Invalid) as e:
        _decode({"op": "mset", "keys": [b"a", b"b"], **header}, values)
    assert e.value.code == ErrorCode.BAD_REQUEST
