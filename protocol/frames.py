"""Frame layouts of the two Majordomo conversations, and the msgpack codec of their headers.

1. Client <-> broker: MDP/0.2 client framing, service ``kv``.
   request  ``[MDPC02, 0x01, service, header, *values]``
   reply    ``[MDPC02, 0x03, service, header, *values]`` (0x02, PARTIAL, for streamed answers)
2. Worker <-> broker: MDP/0.2 worker framing plus zkv extension commands (>= 0x10).

Headers are msgpack maps. Between clients and the broker values travel as frames of their own,
so that the broker never decodes or copies them, except an MSET's or an MGET's when the client
asks for them packed (docs/protocol.md §1.2). Where many small values go together inside the
cluster (a worker's answer to an MGET, a replication message: protocol/replication.py) they go
packed (``pack_values``): a frame costs a Python-level send and receive, about 1 us each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from protocol.sockets import ZERO_COPY_BYTES

MDPC = b"MDPC02"
MDPW = b"MDPW02"

# Client commands (RFC 18).
C_REQUEST = b"\x01"
C_PARTIAL = b"\x02"
C_FINAL = b"\x03"

# Worker commands (RFC 18).
W_READY = b"\x01"
W_REQUEST = b"\x02"
W_PARTIAL = b"\x03"
W_FINAL = b"\x04"
W_HEARTBEAT = b"\x05"
W_DISCONNECT = b"\x06"
# zkv extensions, worker -> broker.
W_ACK = b"\x10"  # cumulative applied positions (and results of conditional ops)
W_NACK = b"\x11"  # "I am at (epoch, seq) in this slot and need what follows"
W_SNAPSHOT_PART = b"\x12"  # a part of a slot snapshot, sent by the donor
W_EXPIRED = b"\x13"  # keys whose TTL ran out by the broker's clock: the broker sequences their reaping
W_LEASE_REQUEST = b"\x14"  # "grant me read leases on the slots I may serve" (docs/architecture.md, lease reads)
# zkv extensions, broker -> worker.
W_ASSIGN = b"\x20"  # the slots this worker holds
W_REPLAY = b"\x21"  # a replication message resent point-to-point (gap repair)
W_SNAPSHOT_REQUEST = b"\x22"  # donor: send a snapshot of this slot
W_SNAPSHOT_DELIVER = b"\x23"  # receiver: a snapshot part (forwarded from the donor)
W_LEASE_GRANT = b"\x24"  # the read leases granted for one W_LEASE_REQUEST
W_COMMITTED = b"\x25"  # a lease holder's slots whose committed seq rose this turn

SERVICE = b"kv"
MMI_SERVICE = b"mmi.service"
MMI_STATUS = b"mmi.status"
MMI_ADMIN = b"mmi.admin"
MMI_SLOTS = b"mmi.slots"  # active brokers: which broker leads each slot group (docs/protocol.md §1.14)
MMI_LEASES = b"mmi.leases"  # which worker answers reads of each slot directly (docs/protocol.md §1.15)


# msgspec's msgpack codec: the same bytes as msgpack-python's packb(use_bin_type=True) and the same
# objects as its unpackb(raw=False, strict_map_key=False) for every header zkv sends, 3-7 times
# faster (bench/decode.py). str stays str, bin stays bytes, arrays are lists.
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def pack(obj: Any) -> bytes:
    return _encoder.encode(obj)


def unpack(data: bytes) -> Any:
    """Raises ``msgspec.DecodeError`` (a ValueError) on malformed, truncated or trailing input."""
    return _decoder.decode(data)



_decode_values = msgspec.msgpack.Decoder(list[bytes | None]).decode


def pack_values(values: Sequence[bytes]) -> list[bytes]:
    """Values as frames: one msgpack array of them, except that a value of ``ZERO_COPY_BYTES`` or
    more, which packing would copy, is nil in the array and a frame of its own after it, in order."""
    large = [v for v in values if len(v) >= ZERO_COPY_BYTES]
    if not large:
        return [_encoder.encode(values)]
    return [_encoder.encode([None if len(v) >= ZERO_COPY_BYTES else v for v in values]), *large]


def pack_request_values(values: Sequence[bytes]) -> list[bytes] | None:
    """An MSET's values as the frames of a ``packed: true`` request (docs/protocol.md §1.2), or
    None when packing would not save frames. Packed only when the frames are then fewer than the
    keys: a broker older than ``packed`` ignores the field and counts one value frame per key, so
    it refuses such a request (BAD_REQUEST, nothing written) and never reads the array as a value."""
    if len(values) < 2:
        return None
    frames = pack_values(values)
    return frames if len(frames) < len(values) else None


def unpack_values(frames: Sequence[bytes]) -> list[bytes]:
    """The values of ``pack_values``'s frames; ValueError if they are not such frames."""
    if not frames:
        raise ValueError("packed values: no frame")
    try:
        values: list[Any] = _decode_values(frames[0])
    except msgspec.DecodeError as e:
        raise ValueError(f"packed values: {e}") from None
    large = frames[1:]
    if large or None in values:
        if values.count(None) != len(large):
            raise ValueError("packed values: large value frames do not match the packed array")
        it = iter(large)
        values = [next(it) if v is None else v for v in values]
    return values
