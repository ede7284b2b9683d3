"""Is msgspec faster than what the broker does now to decode a client request header and encode a reply?

    pip install msgspec            # not a dependency of zkv; this script alone needs it
    python bench/decode.py         # about a minute on 2 cores; --n 50000 for a quick look

Measured side by side in one run, each ``--reps`` times (interleaved), keeping the best:

1. ``broker.messages.decode_client`` (msgpack.unpackb into a dict, then Python checks into a
   ``KvRequest``) against ``msgspec_decode_client`` below: a ``msgspec.msgpack.Decoder`` over a
   union of ``kw_only`` Structs tagged on ``op`` whose fields carry the broker's constraints
   (``msgspec.Meta``), plus the Python checks msgspec cannot express (value frames per key,
   value bytes, which ops take a condition). It builds the same ``KvRequest``. Anything it does
   not accept (str keys, scan/watch/stream ops, mmi, any error) falls back to ``decode_client``,
   so that the error replies, their codes, messages and ``id`` stay those of docs/protocol.md.
2. Reply headers: ``protocol.frames.pack`` of a dict against ``msgspec.msgpack.Encoder`` of a
   dict and of a Struct (building the dict or Struct included in each).
3. The header unpack alone: ``msgpack.unpackb`` against ``msgspec.msgpack.decode`` into Any.

Then it prints what msgspec itself says about a bool ``id``, a str key and a few bad headers,
next to what the broker answers.
"""

import argparse
import gc
import platform
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Union

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import msgpack  # noqa: E402

try:
    import msgspec
except ImportError:
    sys.exit("bench/decode.py needs msgspec: pip install msgspec")

from broker.messages import Invalid, KvRequest, Limits, decode_client  # noqa: E402
from protocol.frames import C_REQUEST, MDPC, SERVICE, pack, unpack  # noqa: E402
from protocol.limits import (  # noqa: E402
    DEFAULT_MAX_STREAM_BYTES,
    DEFAULT_MAX_VALUE_BYTES,
    MAX_KEY_BYTES,
    MAX_KEYS_PER_REQUEST,
    MAX_TTL_MS,
)
from protocol.replication import COND_ABSENT, COND_NONE, COND_VERSION  # noqa: E402

Meta = msgspec.Meta


def msgspec_decoder(limits: Limits):
    """The Struct types for ``limits`` (``--max-key`` is a broker option, so they are built at
    start-up) and a decode function with the signature and result of ``decode_client``."""
    Key = Annotated[bytes, Meta(min_length=1, max_length=limits.max_key)]

    class Base(msgspec.Struct, kw_only=True, tag_field="op"):
        id: int
        cid: Annotated[bytes, Meta(max_length=64)] = b""
        ttl: Annotated[int, Meta(ge=1, le=MAX_TTL_MS)] | None = None
        if_version: Annotated[int, Meta(ge=1)] | None = None
        if_absent: bool = False
        retry: Any = None  # the broker reads only ``is not False``

    class One(Base, kw_only=True):
        key: Key

    class Many(Base, kw_only=True):
        keys: Annotated[list[Key], Meta(min_length=1, max_length=MAX_KEYS_PER_REQUEST)]

    ones = {op: type(op.title(), (One,), {}, tag=op) for op in ("get", "exists", "delete", "put", "ttl", "expire")}
    manys = {op: type(op.title(), (Many,), {}, tag=op) for op in ("mget", "mset")}
    decoder = msgspec.msgpack.Decoder(Union[tuple(ones.values()) + tuple(manys.values())])  # noqa: UP007 (a union built at run time)
    Put, MSet, Delete = ones["put"], manys["mset"], ones["delete"]
    max_value = limits.max_value
    errors = (msgspec.DecodeError, msgspec.ValidationError, OverflowError)

    def decode(frames: list[bytes], limits: Limits):
        if len(frames) < 4 or frames[0] != MDPC or frames[1] != C_REQUEST or frames[2] != SERVICE:
            return decode_client(frames, limits)  # mmi, bad framing, unknown service, no header
        try:
            h = decoder.decode(frames[3])
        except errors:
            return decode_client(frames, limits)  # its error, or a request msgspec cannot type (str keys, scan, ...)
        values = frames[4:]
        cls = type(h)
        if cls is Put:
            if len(values) != 1 or len(values[0]) > max_value:
                return decode_client(frames, limits)
            keys = [h.key]
        elif cls is MSet:
            keys = h.keys
            if len(values) != len(keys) or sum(map(len, values)) > max_value:
                return decode_client(frames, limits)
        elif isinstance(h, One):
            keys = [h.key]
        else:
            keys = h.keys
        if h.if_version is None and not h.if_absent:
            cond, expected = COND_NONE, 0
        elif h.if_absent:
            if cls is not Put or h.if_version is not None:
                return decode_client(frames, limits)
            cond, expected = COND_ABSENT, 0
        elif cls is Put or cls is Delete:
            cond, expected = COND_VERSION, h.if_version
        else:
            return decode_client(frames, limits)
        return KvRequest(h.id, cls.__struct_config__.tag, keys, values, h.ttl, cond, expected, h.cid,
                         h.retry is not False)

    return decode, decoder


class Reply(msgspec.Struct):
    id: int
    ok: bool
    version: int


def request(header: dict[str, Any], values: list[bytes]) -> list[bytes]:
    return [MDPC, C_REQUEST, SERVICE, pack(header), *values]


def cases() -> list[tuple[str, list[bytes]]]:
    cid = bytes(range(16))
    keys = [b"key:%06d" % i for i in range(100)]
    return [
        ("PUT 1 KiB", request({"op": "put", "id": 7, "key": b"key:000123", "cid": cid}, [b"v" * 1024])),
        ("GET", request({"op": "get", "id": 7, "key": b"key:000123"}, [])),
        ("MGET 100 keys", request({"op": "mget", "id": 7, "keys": keys}, [])),
        ("MSET 100 keys 1 KiB", request({"op": "mset", "id": 7, "keys": keys, "cid": cid}, [b"v" * 1024] * 100)),
        ("PUT if_version ttl", request({"op": "put", "id": 7, "key": b"key:000123", "cid": cid, "ttl": 60_000,
                                         "if_version": 3, "retry": False}, [b"v" * 1024])),
        ("PUT str key (fallback)", request({"op": "put", "id": 7, "key": "key:000123", "cid": cid}, [b"v" * 1024])),
        ("PUT key too large (err)", request({"op": "put", "id": 7, "key": b"k" * 5000, "cid": cid}, [b"v"])),
    ]


def timed(fn, arg, n: int) -> int:
    """ns for n calls of fn(arg)."""
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn(arg)
        return time.perf_counter_ns() - t0
    finally:
        gc.enable()


def race(fns: list, arg, n: int, reps: int) -> list[float]:
    """Best ns per call of each fn, the fns interleaved in each repetition."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], timed(fn, arg, n) / n)
    return best


def swallow(decode, limits):
    def call(frames):
        try:
            return decode(frames, limits)
        except Invalid:
            return None
    return call


def refusal(decode, frames, limits) -> str:
    try:
        r = decode(frames, limits)
        return f"accepted: keys={r.keys!r}"
    except Invalid as e:
        return f"{e.code.name} id={e.rid}: {e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="calls per timing of a small message (100-key ones: n/10)")
    ap.add_argument("--reps", type=int, default=5, help="timings of each case; the best is kept")
    args = ap.parse_args()
    limits = Limits(MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES, DEFAULT_MAX_STREAM_BYTES)
    fast, decoder = msgspec_decoder(limits)

    for name, frames in cases():  # the same answer, or the same refusal
        a, b = refusal(decode_client, frames, limits), refusal(fast, frames, limits)
        if a.startswith("accepted"):
            assert decode_client(frames, limits) == fast(frames, limits), name
        assert a == b, (name, a, b)

    print(f"# Python {platform.python_version()}, msgpack {'.'.join(map(str, msgpack.version))}, "
          f"msgspec {msgspec.__version__}, {platform.machine()}; best of {args.reps}, ns per message")
    rows: list[tuple[str, str, float, str, float]] = []
    old, new = swallow(decode_client, limits), swallow(fast, limits)
    for name, frames in cases():
        n = args.n // 10 if "100" in name else args.n
        a, b = race([old, new], frames, n, args.reps)
        rows.append((f"decode {name}", "decode_client", a, "msgspec Decoder", b))

    enc = msgspec.msgpack.Encoder()
    a, b, c = race([lambda _: pack({"id": 7, "ok": True, "version": 42}),
                    lambda _: enc.encode({"id": 7, "ok": True, "version": 42}),
                    lambda _: enc.encode(Reply(7, True, 42))], None, args.n, args.reps)
    rows.append(("encode reply {id, ok, version}", "frames.pack(dict)", a, "Encoder(dict)", b))
    rows.append(("encode reply {id, ok, version}", "frames.pack(dict)", a, "Encoder(Struct)", c))
    assert pack({"id": 7, "ok": True, "version": 42}) == enc.encode(Reply(7, True, 42))

    anydec = msgspec.msgpack.Decoder()
    for name, frames in cases()[:3]:
        n = args.n // 10 if "100" in name else args.n
        assert unpack(frames[3]) == anydec.decode(frames[3])
        a, b = race([unpack, anydec.decode], frames[3], n, args.reps)
        rows.append((f"unpack header {name} (Any)", "msgpack.unpackb", a, "msgspec decode", b))

    w = max(len(r[0]) for r in rows)
    print(f"{'case':<{w}}  {'current':<18} {'ns':>8}  {'msgspec':<16} {'ns':>8}  {'current/msgspec':>15}")
    for case, an, a, bn, b in rows:
        print(f"{case:<{w}}  {an:<18} {a:>8.0f}  {bn:<16} {b:>8.0f}  {a / b:>14.2f}x")

    print("\n# What msgspec says (Decoder alone) vs what the broker answers (docs/protocol.md)")
    cid = b"c" * 16
    for label, header in [
        ("id = true", {"op": "put", "id": True, "key": b"k"}),
        ("id = 1.0", {"op": "put", "id": 1.0, "key": b"k"}),
        ("id missing", {"op": "put", "key": b"k"}),
        ("key str", {"op": "put", "id": 7, "key": "k"}),
        ("key empty", {"op": "put", "id": 7, "key": b""}),
        ("key 5000 bytes", {"op": "put", "id": 7, "key": b"k" * 5000}),
        ("ttl 0", {"op": "put", "id": 7, "key": b"k", "ttl": 0}),
        ("cid 65 bytes", {"op": "put", "id": 7, "key": b"k", "cid": b"c" * 65}),
        ("op unknown", {"op": "frob", "id": 7, "key": b"k"}),
        ("keys empty", {"op": "mget", "id": 7, "keys": []}),
        ("keys[1] int", {"op": "mget", "id": 7, "keys": [b"a", 3]}),
        ("if_absent = 1", {"op": "put", "id": 7, "key": b"k", "if_absent": 1, "cid": cid}),
    ]:
        frames = request(header, [b"v"])
        try:
            said = f"accepted {decoder.decode(frames[3])!r}"
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            said = f"{type(e).__name__}: {e}"
        print(f"{label:<15} msgspec: {said}\n{'':<15} broker:  {refusal(decode_client, frames, limits)}")


if __name__ == "__main__":
    main()
