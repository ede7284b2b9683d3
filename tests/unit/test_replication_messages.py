"""The replication message (docs/protocol.md §3): what the broker encodes for a worker decodes to
the same batches, small values packed in one frame and large ones in frames of their own, and
anything that is not such a message is a ValueError (the worker logs and drops it)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.frames import pack, unpack
from protocol.replication import (
    OP_DELETE,
    OP_PUT,
    TOPIC_PREFIX,
    Origin,
    Replicate,
    WriteOp,
    decode_replication,
    encode_replication,
    worker_topic,
)
from protocol.sockets import ZERO_COPY_BYTES

pytestmark = pytest.mark.timeout(60)

LARGE = b"L" * ZERO_COPY_BYTES


def batch(slot: int, seq: int, values: list[bytes], origin: Origin | None = None) -> Replicate:
    ops = [WriteOp(OP_PUT if v else OP_DELETE, b"k%d-%d" % (slot, i), 0, 0, 0) for i, v in enumerate(values)]
    return Replicate(slot, 2, seq, 2 if seq > 1 else 0, seq - 1, 1_000, ops, values, origin)


def same(a: Replicate, b: Replicate) -> bool:
    return a.header() == b.header() and [bytes(v) for v in a.values] == [bytes(v) for v in b.values]


value = st.one_of(st.binary(max_size=40), st.just(LARGE), st.just(LARGE[:-1]), st.just(b""))


@given(st.lists(st.lists(value, min_size=1, max_size=5), min_size=1, max_size=6))
def test_batches_round_trip_with_small_values_packed_and_large_ones_apart(values: list[list[bytes]]) -> None:
    batches = [batch(s, s + 1, v, Origin(b"cid", s, True) if s % 2 else None) for s, v in enumerate(values)]
    frames = encode_replication("w1", [b.frames() for b in batches])
    n_large = sum(v == LARGE for vs in values for v in vs)
    assert frames[0] == worker_topic("w1") and len(frames) == 3 + n_large
    assert all(f == LARGE for f in frames[3:])
    assert unpack(frames[1]) == [unpack(b.header()) for b in batches]  # an array of the headers themselves
    decoded = decode_replication(frames)
    assert len(decoded) == len(batches) and all(same(a, b) for a, b in zip(decoded, batches, strict=True))


def test_a_header_is_byte_for_byte_what_workers_before_msgspec_read() -> None:
    # Hex taken from the dataclass encoder of 66f04a4: REPLAY sends single headers, and a worker of
    # either version must read the other's (docs/protocol.md §3). No origin: 7 elements, no nil.
    plain = Replicate(1, 2, 3, 0, 0, 5, [WriteOp(OP_PUT, b"k")], [b""])
    assert plain.header().hex() == "97010203000005919501c4016b000000"
    full = Replicate(700, 2, 3, 2, 1, 5, [WriteOp(OP_PUT, b"k", 9, 2, 4), WriteOp(OP_DELETE, b"x")], [b"", b""],
                     Origin(b"cid", 7, True))
    assert full.header().hex() == "98cd02bc0203020105929501c4016b0902049502c4017800000093c40363696407c3"
    assert Replicate.decode(bytes.fromhex("97010203000005919501c4016b000000"), [b"v"]).origin is None


def test_a_thousand_key_batch_is_three_frames() -> None:
    frames = encode_replication("w1", [batch(7, 1, [b"v" * 100] * 1000).frames()])
    assert len(frames) == 3
    assert decode_replication(frames)[0].values == [b"v" * 100] * 1000


def test_the_topic_names_the_format_and_keeps_ids_apart() -> None:
    assert worker_topic("w1") == TOPIC_PREFIX + b"w1\0" and TOPIC_PREFIX != b"w"  # the old format's
    assert not worker_topic("w10").startswith(worker_topic("w1"))
    assert worker_topic("w1", 3) == worker_topic("w1") + b"\0\3"


def good() -> list[bytes]:
    return encode_replication("w1", [batch(1, 1, [b"a", LARGE]).frames(), batch(2, 1, [b"b"]).frames()])


@pytest.mark.parametrize("broken", [
    lambda f: f[:2],  # no values frame
    lambda f: f[:3],  # a large value missing
    lambda f: [*f, b"extra"],  # a frame too many
    lambda f: [f[0], f[1], pack([b"a", None]), f[3]],  # fewer values than ops
    lambda f: [f[0], f[1], pack([b"a", None, b"b", b"c"]), f[3]],  # more values than ops
    lambda f: [f[0], f[1], b"\xc1", *f[3:]],  # not msgpack
    lambda f: [f[0], f[1], pack([1, None, b"b"]), f[3]],  # a value that is not bytes
    lambda f: [f[0], pack([b"\x93\x01"]), *f[2:]],  # a header that is not one
    lambda f: [f[0], pack({"a": 1}), *f[2:]],  # headers not an array
])
def test_anything_else_is_a_value_error(broken) -> None:  # type: ignore[no-untyped-def]
    decode_replication(good())  # (the message they break is a good one)
    with pytest.raises(ValueError, match="replication message"):
        decode_replication(broken(good()))
