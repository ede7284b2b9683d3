"""A worker's answer to a read of several keys: packed (docs/protocol.md §2) only when the broker
asks for it, so that a broker that does not know the packed form still reads one frame per key;
one frame per key otherwise, and for a single key always."""

from __future__ import annotations

import tempfile

import pytest

from protocol.frames import unpack, unpack_values
from protocol.replication import OP_PUT, Replicate, WriteOp
from protocol.sockets import ZERO_COPY_BYTES
from worker.serve import serve_read
from worker.store import SlotStore

pytestmark = pytest.mark.timeout(60)

VALUES = {b"a": b"small", b"b": b"L" * ZERO_COPY_BYTES, b"c": b""}


def read(store: SlotStore, keys: list[bytes], packed: bool | None) -> tuple[dict, list[bytes]]:
    req = {"op": "get", "keys": [[3, k] for k in keys], "now": 1_000}
    if packed is not None:
        req["packed"] = packed
    frames = serve_read(store, req)
    return unpack(frames[0]), frames[1:]


def test_values_are_packed_only_when_asked_and_only_for_several_keys() -> None:
    with tempfile.TemporaryDirectory() as d:
        store = SlotStore(d, map_size=1 << 24, sync=False)
        try:
            store.apply_batch([Replicate(3, 1, 1, 0, 0, 1_000, [WriteOp(OP_PUT, k) for k in VALUES],
                                         list(VALUES.values()))])
            keys = [b"b", b"missing", b"a", b"c", b"a"]
            want = [VALUES[b"b"], b"", VALUES[b"a"], b"", VALUES[b"a"]]
            hdr, frames = read(store, keys, packed=True)
            assert hdr["packed"] is True and hdr["found"] == [True, False, True, True, True]
            assert len(frames) == 2 and frames[1] == VALUES[b"b"]  # the packed array, then the large value
            assert unpack_values(frames) == want
            for packed in (None, False):  # a broker from before the packed form, or one that says no
                hdr, frames = read(store, keys, packed)
                assert "packed" not in hdr and frames == want
            hdr, frames = read(store, [b"a"], packed=True)
            assert "packed" not in hdr and frames == [VALUES[b"a"]]
        finally:
            store.close()
