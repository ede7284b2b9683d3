"""The client protocol on raw frames (a bare pyzmq DEALER): bad input of every kind gets a clear
error reply and touches nothing, MMI, and exactly-once writes by (client id, request number)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from protocol.errors import ErrorCode, ValueTooLarge
from protocol.frames import C_FINAL, C_PARTIAL, C_REQUEST, MDPC, MMI_SERVICE, SERVICE, pack, unpack
from tests.support.cluster import Cluster
from tests.support.helpers import RawPeer, error_header

pytestmark = pytest.mark.timeout(120)

BAD = ErrorCode.BAD_REQUEST.value


def reply_header(reply: list[bytes]) -> dict[str, Any]:
    assert reply[:3] == [MDPC, C_FINAL, SERVICE], reply[:3]
    return unpack(reply[3])


def _hdr(op: str, rid: int, **kw: Any) -> bytes:
    return pack({"op": op, "id": rid, **kw})


def test_bad_input_gets_clear_errors_and_touches_nothing(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(broker_args=["--max-value", "1024"]).start()
    good = cluster.client()
    good.put(b"known", b"value")
    committed = cluster.status()["committed_writes"]
    bad_count = cluster.status()["bad_requests"]

    # (what, frames, expected code, expected id in the reply)
    cases: list[tuple[str, list[bytes], str, Any]] = [
        ("no MDP header", [b"hello"], BAD, None),
        ("one empty frame", [b""], BAD, None),
        ("wrong protocol header", [b"MDPC01", C_REQUEST, SERVICE, _hdr("get", 1, key=b"k")], BAD, None),
        ("garbage header", [b"\xff\x00garbage", C_REQUEST, SERVICE, _hdr("get", 1, key=b"k")], BAD, None),
        ("PARTIAL from a client", [MDPC, C_PARTIAL, SERVICE, _hdr("get", 1, key=b"k")], BAD, None),
        ("FINAL from a client", [MDPC, C_FINAL, SERVICE, _hdr("get", 1, key=b"k")], BAD, None),
        ("header and command only", [MDPC, C_REQUEST], BAD, None),
        ("no kv header frame", [MDPC, C_REQUEST, SERVICE], BAD, None),
        ("header not msgpack", [MDPC, C_REQUEST, SERVICE, b"\xc1"], BAD, None),
        ("header truncated msgpack", [MDPC, C_REQUEST, SERVICE, b"\x83\xa2op"], BAD, None),
        ("header empty", [MDPC, C_REQUEST, SERVICE, b""], BAD, None),
        ("header an array", [MDPC, C_REQUEST, SERVICE, pack(["get", 1, b"k"])], BAD, None),
        ("header a string", [MDPC, C_REQUEST, SERVICE, pack("get")], BAD, None),
        ("missing id", [MDPC, C_REQUEST, SERVICE, pack({"op": "get", "key": b"k"})], BAD, None),
        ("id a string", [MDPC, C_REQUEST, SERVICE, pack({"op": "get", "id": "7", "key": b"k"})], BAD, None),
        ("id a bool", [MDPC, C_REQUEST, SERVICE, pack({"op": "get", "id": True, "key": b"k"})], BAD, None),
        ("unknown op", [MDPC, C_REQUEST, SERVICE, _hdr("frobnicate", 21, key=b"k")],
         ErrorCode.UNKNOWN_COMMAND.value, 21),
        ("missing op", [MDPC, C_REQUEST, SERVICE, pack({"id": 23, "key": b"k"})],
         ErrorCode.UNKNOWN_COMMAND.value, 23),
        ("op not a string", [MDPC, C_REQUEST, SERVICE, _hdr(b"get", 24, key=b"k")],  # type: ignore[arg-type]
         ErrorCode.UNKNOWN_COMMAND.value, 24),
        ("op in capitals", [MDPC, C_REQUEST, SERVICE, _hdr("PUT", 22, key=b"k"), b"v"],
         ErrorCode.UNKNOWN_COMMAND.value, 22),
        ("empty key put", [MDPC, C_REQUEST, SERVICE, _hdr("put", 31, key=b""), b"v"], BAD, 31),
        ("empty key get", [MDPC, C_REQUEST, SERVICE, _hdr("get", 32, key=b"")], BAD, 32),
        ("empty key in mset", [MDPC, C_REQUEST, SERVICE, _hdr("mset", 33, keys=[b"bad-a", b""]), b"1", b"2"],
         BAD, 33),
        ("missing key", [MDPC, C_REQUEST, SERVICE, _hdr("get", 34)], BAD, 34),
        ("key an integer", [MDPC, C_REQUEST, SERVICE, _hdr("delete", 35, key=5)], BAD, 35),
        ("key over 4 KiB", [MDPC, C_REQUEST, SERVICE, _hdr("put", 41, key=b"k" * 4097), b"v"],
         ErrorCode.KEY_TOO_LARGE.value, 41),
        ("key over 4 KiB in mget", [MDPC, C_REQUEST, SERVICE, _hdr("mget", 42, keys=[b"known", b"k" * 5000])],
         ErrorCode.KEY_TOO_LARGE.value, 42),
        ("key of 1 MiB", [MDPC, C_REQUEST, SERVICE, _hdr("get", 43, key=b"k" * (1 << 20))],
         ErrorCode.KEY_TOO_LARGE.value, 43),
        ("mget keys not a list", [MDPC, C_REQUEST, SERVICE, _hdr("mget", 44, keys=b"known")], BAD, 44),
        ("mget no keys", [MDPC, C_REQUEST, SERVICE, _hdr("mget", 45, keys=[])], BAD, 45),
        ("mget 10,001 keys", [MDPC, C_REQUEST, SERVICE, _hdr("mget", 46, keys=[b"k%d" % i for i in range(10_001)])],
         BAD, 46),
        ("value over the limit", [MDPC, C_REQUEST, SERVICE, _hdr("put", 51, key=b"bad-v"), b"x" * 1025],
         ErrorCode.VALUE_TOO_LARGE.value, 51),
        ("value over the limit in mset",
         [MDPC, C_REQUEST, SERVICE, _hdr("mset", 52, keys=[b"bad-m1", b"bad-m2"]), b"ok", b"x" * 2000],
         ErrorCode.VALUE_TOO_LARGE.value, 52),
        ("put without a value frame", [MDPC, C_REQUEST, SERVICE, _hdr("put", 61, key=b"bad-n")], BAD, 61),
        ("put with two value frames", [MDPC, C_REQUEST, SERVICE, _hdr("put", 62, key=b"bad-n"), b"a", b"b"],
         BAD, 62),
        ("mset two keys one value", [MDPC, C_REQUEST, SERVICE, _hdr("mset", 63, keys=[b"bad-o1", b"bad-o2"]),
                                     b"a"], BAD, 63),
        ("mset one key three values", [MDPC, C_REQUEST, SERVICE, _hdr("mset", 64, keys=[b"bad-o3"]),
                                       b"a", b"b", b"c"], BAD, 64),
        ("negative ttl", [MDPC, C_REQUEST, SERVICE, _hdr("put", 71, key=b"bad-t", ttl=-5), b"v"], BAD, 71),
        ("zero ttl", [MDPC, C_REQUEST, SERVICE, _hdr("put", 72, key=b"bad-t", ttl=0), b"v"], BAD, 72),
        ("ttl a string", [MDPC, C_REQUEST, SERVICE, _hdr("put", 73, key=b"bad-t", ttl="100"), b"v"], BAD, 73),
        ("ttl a float", [MDPC, C_REQUEST, SERVICE, _hdr("put", 74, key=b"bad-t", ttl=1.5), b"v"], BAD, 74),
        ("cid not bytes", [MDPC, C_REQUEST, SERVICE, _hdr("put", 75, key=b"bad-c", cid=12), b"v"], BAD, 75),
        ("packed not a bool", [MDPC, C_REQUEST, SERVICE, _hdr("mset", 81, keys=[b"bad-p1", b"bad-p2"], packed=1),
                               pack([b"1", b"2"])], BAD, 81),
        ("packed values not msgpack", [MDPC, C_REQUEST, SERVICE,
                                       _hdr("mset", 82, keys=[b"bad-p1", b"bad-p2"], packed=True), b"\xc1"], BAD, 82),
        ("packed values one short", [MDPC, C_REQUEST, SERVICE,
                                     _hdr("mset", 83, keys=[b"bad-p1", b"bad-p2"], packed=True), pack([b"1"])],
         BAD, 83),
        ("packed large value's frame missing", [MDPC, C_REQUEST, SERVICE,
                                                _hdr("mset", 84, keys=[b"bad-p1", b"bad-p2"], packed=True),
                                                pack([b"1", None])], BAD, 84),
        ("packed value over the limit", [MDPC, C_REQUEST, SERVICE,
                                         _hdr("mset", 85, keys=[b"bad-p1", b"bad-p2"], packed=True),
                                         pack([b"1", b"x" * 2000])], ErrorCode.VALUE_TOO_LARGE.value, 85),
    ]
    with RawPeer(cluster.frontend) as raw:
        for name, frames, code, rid in cases:
            reply = raw.call(*frames)
            hdr = error_header(reply)  # answered on the service named, kv when too broken to name one
            assert hdr["code"] == code, (name, hdr)
            assert hdr.get("id") == rid, (name, hdr)
            # Everyone else is still served, and so is the sender.
            assert good.get(b"known") == b"value", name
        rh, values = raw.kv({"op": "get", "id": 99, "key": b"known"})
        assert rh["ok"] is True and rh["id"] == 99 and values == [b"value"]

        # An unknown service: an error that names it.
        reply = raw.call(MDPC, C_REQUEST, b"no-such-service", _hdr("get", 81, key=b"k"))
        hdr = error_header(reply, service=b"no-such-service")
        assert hdr["code"] == BAD and "no-such-service" in hdr["message"], hdr
        assert hdr["id"] is None

        # A value exactly at the limit is fine; over it, the client raises ValueTooLarge.
        rh, _ = raw.kv({"op": "put", "id": 100, "key": b"at-limit"}, [b"y" * 1024])
        assert rh["ok"] is True
    with pytest.raises(ValueTooLarge):
        good.put(b"bad-client", b"z" * 1025)

    st = cluster.status()
    assert st["committed_writes"] == committed + 1, "a refused request changed data"
    assert st["bad_requests"] >= bad_count + len(cases) + 1
    bad_keys = [b"k", b"bad-a", b"bad-v", b"bad-m1", b"bad-m2", b"bad-n", b"bad-o1", b"bad-o2", b"bad-o3",
                b"bad-t", b"bad-c", b"bad-client", b"bad-p1", b"bad-p2"]
    assert good.mget(bad_keys) == [None] * len(bad_keys)
    assert good.get(b"at-limit") == b"y" * 1024
    assert all(p.running for p in cluster.procs.values())


def test_packed_mset_and_mget_hold_the_same_values_as_frames(cluster: Cluster) -> None:
    """docs/protocol.md §1.2 ``packed``: an MSET written packed reads back the same unpacked and
    packed, a value of 64 KiB or more travelling as a frame of its own either way, and so does
    one written a frame per value; a packed MGET's answer says it is packed."""
    small, empty, large = b"s" * 100, b"", b"L" * (70 * 1024)
    with RawPeer(cluster.frontend) as raw:
        keys = [b"pk-small", b"pk-empty", b"pk-large"]
        rh, _ = raw.kv({"op": "mset", "id": 1, "keys": keys, "packed": True},
                       [pack([small, empty, None]), large])
        assert rh == {"id": 1, "ok": True, "count": 3}
        rh, values = raw.kv({"op": "mget", "id": 2, "keys": [*keys, b"pk-missing"], "packed": True})
        assert rh["packed"] is True and rh["found"] == [True, True, True, False]
        assert len(values) == 2 and unpack(values[0]) == [small, empty, None, b""] and values[1] == large
        rh, values = raw.kv({"op": "mget", "id": 3, "keys": keys})
        assert "packed" not in rh and values == [small, empty, large]
        rh, _ = raw.kv({"op": "mset", "id": 4, "keys": [b"pk-a", b"pk-b"]}, [b"A", b"B"])
        assert rh["ok"] is True
        rh, values = raw.kv({"op": "mget", "id": 5, "keys": [b"pk-a", b"pk-b"], "packed": True})
        assert rh["packed"] is True and values == [pack([b"A", b"B"])]
    client = cluster.client()
    assert client.mget([*keys, b"pk-a", b"pk-missing"]) == [small, empty, large, b"A", None]


def test_ttl_out_of_range_is_refused(cluster: Cluster) -> None:
    """A TTL that is a valid msgpack integer but puts the expiry past what a record can hold."""
    good = cluster.client()
    committed = cluster.status()["committed_writes"]
    with RawPeer(cluster.frontend) as raw:
        for rid, ttl in ((1, 2**64 - 1), (2, 2**64 - 2**20)):
            reply = raw.call(MDPC, C_REQUEST, SERVICE, _hdr("put", rid, key=b"ttl-huge", ttl=ttl), b"v")
            hdr = error_header(reply)
            assert hdr["code"] == BAD and hdr["id"] == rid, hdr
    good.put(b"after", b"fine")
    assert good.get(b"after") == b"fine"
    assert good.get(b"ttl-huge") is None
    assert cluster.status()["committed_writes"] == committed + 1
    assert all(p.running for p in cluster.procs.values())


def test_frame_far_over_the_limit_does_not_hurt_others(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(broker_args=["--max-value", "1024"]).start()
    good = cluster.client()
    good.put(b"known", b"value")
    with RawPeer(cluster.frontend) as raw:
        raw.send(MDPC, C_REQUEST, SERVICE, _hdr("put", 1, key=b"huge"), b"h" * (3 << 20))
        # Whatever happens to that sender, the broker goes on serving everyone else.
        assert good.get(b"known") == b"value"
        good.put(b"other", b"fine")
    with RawPeer(cluster.frontend) as raw2:
        rh, values = raw2.kv({"op": "get", "id": 2, "key": b"other"})
        assert rh["ok"] and values == [b"fine"]
    assert good.get(b"huge") is None
    assert cluster.procs["broker"].running


def test_mmi(cluster: Cluster) -> None:
    with RawPeer(cluster.frontend) as raw:
        assert raw.call(MDPC, C_REQUEST, MMI_SERVICE, SERVICE) == [MDPC, C_FINAL, MMI_SERVICE, b"200"]
        assert raw.call(MDPC, C_REQUEST, MMI_SERVICE, b"nope") == [MDPC, C_FINAL, MMI_SERVICE, b"404"]
        assert raw.call(MDPC, C_REQUEST, b"mmi.nothing") == [MDPC, C_FINAL, b"mmi.nothing", b"501"]
        assert raw.call(MDPC, C_REQUEST, b"mmi.nothing", b"x") == [MDPC, C_FINAL, b"mmi.nothing", b"501"]
    assert cluster.client().service_available() is True


def test_retried_write_is_applied_once(cluster: Cluster) -> None:
    c = cluster.client()
    cid = uuid.uuid4().bytes
    c.put(b"warm", b"up")
    base = cluster.status()["committed_writes"]

    with RawPeer(cluster.frontend) as raw:
        put = {"op": "put", "id": 7, "cid": cid, "key": b"once"}
        rh1, _ = raw.kv(put, [b"first"])
        assert rh1["ok"] is True and rh1["id"] == 7
        version = rh1["version"]
        assert cluster.status()["committed_writes"] == base + 1
        # The same (cid, id) again, even carrying another value: the first result, nothing applied.
        rh2, _ = raw.kv(put, [b"first"])
        rh3, _ = raw.kv(put, [b"second"])
        assert rh2 == rh1 and rh3 == rh1
        assert c.get_versioned(b"once") == (b"first", version)
        assert cluster.status()["committed_writes"] == base + 1

        # Same request number under another client id is another write.
        other = {"op": "put", "id": 7, "cid": uuid.uuid4().bytes, "key": b"once"}
        rh4, _ = raw.kv(other, [b"other client"])
        assert rh4["version"] > version
        assert cluster.status()["committed_writes"] == base + 2
        assert c.get(b"once") == b"other client"

        # A retried delete answers what the first attempt did (it existed), and deletes once.
        c.put(b"gone", b"x")
        dele = {"op": "delete", "id": 8, "cid": cid, "key": b"gone"}
        d1, _ = raw.kv(dele)
        c.put(b"gone", b"back")  # written again after the delete
        d2, _ = raw.kv(dele)
        assert d1["deleted"] is True and d2 == d1
        assert c.get(b"gone") == b"back", "the retried delete was applied a second time"

        # A retried MSET is applied once.
        before = cluster.status()["committed_writes"]
        mset = {"op": "mset", "id": 9, "cid": cid, "keys": [b"ms-a", b"ms-b"]}
        m1, _ = raw.kv(mset, [b"A", b"B"])
        after_first = cluster.status()["committed_writes"]
        assert after_first > before
        m2, _ = raw.kv(mset, [b"A2", b"B2"])
        assert m2 == m1
        assert cluster.status()["committed_writes"] == after_first
        assert c.mget([b"ms-a", b"ms-b"]) == [b"A", b"B"]

        # Two copies sent back to back, the second before the first is answered.
        quick = {"op": "put", "id": 10, "cid": cid, "key": b"quick"}
        before = cluster.status()["committed_writes"]
        raw.send(MDPC, C_REQUEST, SERVICE, pack(quick), b"q")
        raw.send(MDPC, C_REQUEST, SERVICE, pack(quick), b"q")
        q1 = reply_header(raw.recv())
        assert q1["ok"] is True
    with RawPeer(cluster.frontend) as raw2:  # a fresh connection: exactly one reply to read
        q2, _ = raw2.kv(quick, [b"q"])
        assert q2["version"] == q1["version"]
    assert cluster.status()["committed_writes"] == before + 1
    assert c.get_versioned(b"quick") == (b"q", q1["version"])

    # The de-duplication survives a broker restart.
    committed = cluster.status()["committed_writes"]
    cluster.procs["broker"].kill()
    cluster.start_broker()
    cluster.wait_ready()
    with RawPeer(cluster.frontend) as raw3:
        rh5, _ = raw3.kv(put, [b"third"], timeout=15)
        assert rh5["version"] == version
        m3, _ = raw3.kv(mset, [b"A3", b"B3"], timeout=15)
        assert m3 == m1
    assert cluster.status()["committed_writes"] == committed
    assert c.get(b"once") == b"other client"
    assert c.mget([b"ms-a", b"ms-b"]) == [b"A", b"B"]
