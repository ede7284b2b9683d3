"""Streamed values in the cores (tests/support/sim.py): a slot moved while a stream is open, aborts
and commits naming another key, a chunk for a committed stream, a learner's bounded memory, and
the upload's flow control."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.sim import SimCluster

pytestmark = pytest.mark.timeout(60)


def _replica_state(sim, wid: str, slot: int):  # noqa: ANN001, ANN202
    from tests.support.sim import replica_state
    return replica_state(sim, wid, slot)


def test_move_during_open_stream_commits_everywhere(tmp_path: Path) -> None:
    """Chunks written on the old replica set, the slot moved, the commit on the new set: the
    learner must have received the staged chunks (snapshot or replay) and all replicas agree."""
    from protocol.replication import slot_for_key
    from tests.support.sim import SimCluster

    sim = SimCluster(tmp_path, n_workers=4, slots=4, auto_rebalance=False)
    try:
        key = b"moving"
        s = slot_for_key(key, 4)
        stream = b"M" * 16
        parts = [bytes([i]) * 100 for i in range(4)]
        for i, p in enumerate(parts[:2]):
            hdr, _ = sim.call("put_chunk", [p], key=key, stream=stream, index=i)
            assert hdr["ok"], hdr
        slot = sim.broker.slots[s]
        src = slot.replicas[0]
        spare = next(w for w in sim.workers if w not in slot.replicas)
        assert sim.broker.admin({"cmd": "move", "slot": s, "from": src, "to": spare})["ok"]
        sim.advance(3.0)
        assert spare in sim.broker.slots[s].replicas and src not in sim.broker.slots[s].replicas
        for i, p in enumerate(parts[2:], start=2):
            hdr, _ = sim.call("put_chunk", [p], key=key, stream=stream, index=i)
            assert hdr["ok"], hdr
        value = b"".join(parts)
        hdr, _ = sim.call("put_commit", key=key, stream=stream, chunks=4, size=len(value))
        assert hdr["ok"], hdr
        sim.advance(2.0)
        states = [_replica_state(sim, w, s) for w in sim.broker.slots[s].replicas]
        assert states[0] == states[1] == states[2]
        assert states[0][2] == set()
        assert len(states[0][1]) == 4
        assert _replica_state(sim, src, s) == ({}, {}, set())  # the old replica dropped everything
    finally:
        sim.close()


def assert_idle_stream_aborted(sim: SimCluster, s: int) -> None:
    """The one open stream, left idle past --stream-idle, is aborted: no replica of slot ``s``
    keeps a staged chunk."""
    assert sim.broker.status()["open_streams"] == 1
    sim.advance(70.0)
    assert sim.broker.status()["open_streams"] == 0
    for w in sim.broker.slots[s].replicas:
        _records, chunks, staged = _replica_state(sim, w, s)
        assert staged == set() and chunks == {}, (w, "staged chunks leaked")


def test_an_abort_or_commit_naming_another_key_cannot_leak_staged_chunks(tmp_path: Path) -> None:
    """put_abort (or put_commit) naming a key of another slot than the stream's chunks used to close
    the broker's OpenStream (so the idle abort never ran) while the OP_ABORT_STREAM went to the
    other slot: the chunks stayed staged on every replica forever. Now the broker refuses it, the
    stream stays open, and the idle abort frees its chunks."""
    from protocol.replication import slot_for_key
    from tests.support.sim import SimCluster

    sim = SimCluster(tmp_path, slots=4)
    try:
        key = b"a"
        other = next(b"o%d" % i for i in range(100) if slot_for_key(b"o%d" % i, 4) != slot_for_key(key, 4))
        s = slot_for_key(key, 4)
        stream = b"L" * 16
        for i in range(3):
            hdr, _ = sim.call("put_chunk", [b"x" * 50], key=key, stream=stream, index=i)
            assert hdr["ok"], hdr
        for op, fields in (("put_abort", {}), ("put_commit", {"chunks": 3, "size": 150}), ("put_chunk", {"index": 3})):
            hdr, _ = sim.call(op, [b"y"] if op == "put_chunk" else [], key=other, stream=stream, **fields)
            assert hdr["ok"] is False and hdr["code"] == "BAD_REQUEST", (op, hdr)
        assert_idle_stream_aborted(sim, s)
    finally:
        sim.close()


def test_a_chunk_for_a_committed_stream_id_changes_nothing(tmp_path: Path) -> None:
    """Stream ids are shown to every reader (get's `stream` field). A put_chunk naming a committed
    stream id overwrites that committed value's chunk in place (OP_CHUNK puts blindly and re-stages
    the id): the value changes with no new version and no watch event; a later idle abort of the
    re-opened stream then frees every chunk of the committed value."""
    from tests.support.sim import SimCluster

    sim = SimCluster(tmp_path, slots=4)
    try:
        key, stream = b"k", b"C" * 16
        parts = [b"a" * 10, b"b" * 10]
        for i, p in enumerate(parts):
            assert sim.call("put_chunk", [p], key=key, stream=stream, index=i)[0]["ok"]
        hdr, _ = sim.call("put_commit", key=key, stream=stream, chunks=2, size=20)
        assert hdr["ok"], hdr
        version = hdr["version"]
        hdr, _ = sim.call("get", key=key)
        assert hdr["stream"]["stream"] == stream  # what any reader learns
        # Another client (or a buggy retry) writes a chunk under that id.
        assert sim.call("put_chunk", [b"Z" * 10], client=b"c2", key=key, stream=stream, index=0)[0]["ok"]
        rid = sim.send(b"c1", "get_chunks", key=key, stream=stream, first=0, count=2)
        sim.settle()
        got = [v[0] for h, v in zip(sim.replies[b"c1"], sim.reply_values[b"c1"], strict=True)
               if h.get("id") == rid and "index" in h]
        hdr, _ = sim.call("get", key=key)
        assert hdr["version"] == version
        problems = []
        if b"".join(got) != b"".join(parts):
            problems.append(("committed value changed without a new version", b"".join(got)))
        sim.advance(70.0)  # the re-opened stream goes idle and is aborted
        rid = sim.send(b"c1", "get_chunks", key=key, stream=stream, first=0, count=2)
        sim.settle()
        final = [h for h in sim.replies[b"c1"] if h.get("id") == rid and "next" in h]
        if not (final and final[0]["next"] == 2):
            problems.append(("committed chunks freed by the idle abort", final))
        assert not problems, problems
    finally:
        sim.close()


def test_a_learner_holds_a_bounded_number_of_bytes_while_its_snapshot_is_pending(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk replies wait only for in-sync *replicas*: a learner (or a replica receiving a
    snapshot) keeps every replication message of the slot in HeldMessages (limit: 10,000
    messages, whatever their size: up to 10,000 x 8 MiB) while the client streams at full speed."""
    import worker.held
    from protocol.frames import W_SNAPSHOT_PART
    from protocol.replication import slot_for_key
    from tests.support.sim import SimCluster

    monkeypatch.setattr(worker.held, "MAX_HELD_BYTES", 16 * 100_000)  # 64 MiB in production

    sim = SimCluster(tmp_path, n_workers=4, slots=4, auto_rebalance=False)
    try:
        key = b"big"
        s = slot_for_key(key, 4)
        seed = next(b"seed%d" % i for i in range(100) if slot_for_key(b"seed%d" % i, 4) == s)
        sim.put(seed, b"x")
        slot = sim.broker.slots[s]
        spare = next(w for w in sim.workers if w not in slot.replicas)
        sim.intercept = lambda wid, frames: frames[0] == W_SNAPSHOT_PART  # the copy is slow
        assert sim.broker.admin({"cmd": "move", "slot": s, "from": slot.replicas[0], "to": spare})["ok"]
        sim.settle()
        stream, chunk = b"H" * 16, b"y" * 100_000
        for i in range(40):
            hdr, _ = sim.call("put_chunk", [chunk], key=key, stream=stream, index=i)
            assert hdr["ok"], hdr  # nothing slows the client down
        core = sim.workers[spare].core
        assert core is not None
        held = sum(len(v) for r in core.held.by_slot.get(s, {}).values() for v in r.values)
        assert held <= 16 * len(chunk), f"learner holds {held} bytes of chunks in memory"
    finally:
        sim.intercept = None
        sim.close()


def test_a_chunk_is_answered_only_once_every_in_sync_replica_has_it(sim) -> None:  # type: ignore[no-untyped-def]
    """The upload's flow control: a chunk committed by W replicas is not answered while a third,
    live and in sync, has not applied it (so a slow replica holds the stream back instead of
    chunks piling up in queues); it is answered once that replica acknowledges, or is declared
    dead."""
    from protocol.frames import W_ACK
    from protocol.replication import slot_for_key

    key = b"flow"
    slot = sim.broker.slots[slot_for_key(key, sim.slots)]
    slow = slot.replicas[2]
    sim.intercept = lambda wid, frames: wid == slow and frames[0] == W_ACK  # its ACKs are late
    stream = b"F" * 16
    rid = sim.send(b"c1", "put_chunk", [b"x" * 1000], key=key, stream=stream, index=0)
    sim.settle()
    assert slot.committed == slot.last.seq, "two replicas committed the chunk"
    assert sim.reply(b"c1", rid) is None, "answered before the third, in-sync replica had it"
    sim.intercept = None
    sim.release()
    got = sim.reply(b"c1", rid)
    assert got is not None and got[0] == {"id": rid, "ok": True, "index": 0}, got

    # A replica that stops answering holds a chunk back only until it is declared dead.
    sim.intercept = lambda wid, frames: wid == slow and frames[0] == W_ACK
    rid = sim.send(b"c1", "put_chunk", [b"y" * 1000], key=key, stream=stream, index=1)
    sim.settle()
    assert sim.reply(b"c1", rid) is None
    sim.kill_worker(slow)
    sim.advance(4.0)  # past the heartbeat liveness: the broker declares it dead
    got = sim.reply(b"c1", rid)
    assert got is not None and got[0]["ok"] is True, got
    sim.intercept = None


def test_malformed_stream_fields_are_refused_at_decode(sim: SimCluster) -> None:
    """get_chunks' count must be an integer (it was converted with int(), or crashed the handler:
    no reply), and put_commit's chunk count must fit the manifest's 32 bits (struct.error: no reply)."""
    stream = b"s" * 16
    for count in (None, {}, [1], "", "3", 2.5, True):
        hdr, _ = sim.call("get_chunks", key=b"k", stream=stream, first=0, count=count)
        assert hdr["ok"] is False and hdr["code"] == "BAD_REQUEST" and "count" in hdr["message"], (count, hdr)
    hdr, _ = sim.call("put_commit", key=b"k", stream=stream, size=2**32, chunks=2**32)
    assert hdr["ok"] is False and hdr["code"] == "BAD_REQUEST" and "chunks" in hdr["message"], hdr


def test_a_chunk_after_the_over_limit_refusal_cannot_reopen_the_stream(sim) -> None:  # type: ignore[no-untyped-def]
    """A client with several chunks in flight (put_stream's window) has some sent after the one
    the broker refused over --max-stream (which aborts the stream). Those used to re-open the
    stream in the broker: their chunks stayed staged on every replica until the 60 s idle abort
    unless the client's own put_abort came after them (issue 13, 8b). Now a chunk (or a retry)
    of an aborted stream is refused and the refusal frees everything at once."""
    from protocol.replication import slot_for_key

    sim.broker.state.cfg.max_stream = 300
    key, stream = b"huge", b"O" * 16
    s = slot_for_key(key, sim.slots)
    rids = [sim.send(b"c1", "put_chunk", [b"x" * 100], key=key, stream=stream, index=i) for i in range(3)]
    over = sim.send(b"c1", "put_chunk", [b"x" * 100], key=key, stream=stream, index=3)
    in_flight = [sim.send(b"c1", "put_chunk", [b"x" * 100], key=key, stream=stream, index=i) for i in (4, 5)]
    retry = sim.send(b"c1", "put_chunk", [b"x" * 100], key=key, stream=stream, index=1, rid=rids[1], retry=True)
    sim.settle()
    sim.advance(1.0)  # well inside --stream-idle
    got = sim.reply(b"c1", over)
    assert got is not None and got[0]["code"] == "VALUE_TOO_LARGE", got
    for rid in [*in_flight, retry]:
        got = sim.reply(b"c1", rid)
        assert got is not None and got[0]["ok"] is False, ("a chunk of an aborted stream was taken", got)
    assert sim.broker.status()["open_streams"] == 0
    for w in sim.broker.slots[s].replicas:
        _records, chunks, staged = _replica_state(sim, w, s)
        assert staged == set() and chunks == {}, (w, "chunks of the refused stream still staged")


def test_a_client_abort_is_counted_and_final(sim) -> None:  # type: ignore[no-untyped-def]
    """`streams_aborted` counted only the broker's own aborts (issue 13, defect 7); and a chunk
    that reaches the broker after its client's put_abort must not open the stream again."""
    key, stream = b"gone", b"A" * 16
    assert sim.call("put_chunk", [b"x" * 10], key=key, stream=stream, index=0)[0]["ok"]
    before = sim.broker.stats["streams_aborted"]
    assert sim.call("put_abort", key=key, stream=stream)[0]["ok"]
    assert sim.broker.stats["streams_aborted"] == before + 1
    assert sim.call("put_abort", key=key, stream=stream)[0]["ok"]  # a second abort is not another one
    assert sim.broker.stats["streams_aborted"] == before + 1
    hdr, _ = sim.call("put_chunk", [b"x" * 10], key=key, stream=stream, index=1)
    assert hdr["ok"] is False and hdr["code"] == "STREAM_INCOMPLETE", hdr
    assert sim.broker.status()["open_streams"] == 0


def test_open_streams_are_capped_per_client_and_per_broker(sim: SimCluster) -> None:
    """Every open stream holds staged chunks on each replica until its commit, abort or idle
    timeout, and there was no cap on how many: now one per client connection and one per broker,
    each refused with UNAVAILABLE (retryable: room comes back as streams end) before anything is
    written."""
    cfg = sim.broker.state.cfg
    cfg.max_client_streams, cfg.max_streams = 2, 3

    def first_chunk(client: bytes, n: int) -> dict:  # type: ignore[type-arg]
        return sim.call("put_chunk", [b"x"], client=client, key=b"k%d" % n, stream=b"%016d" % n, index=0)[0]

    assert first_chunk(b"c1", 1)["ok"] and first_chunk(b"c1", 2)["ok"]
    hdr = first_chunk(b"c1", 3)
    assert hdr["code"] == "UNAVAILABLE" and "--max-client-streams 2" in hdr["message"], hdr
    more, _ = sim.call("put_chunk", [b"y"], client=b"c1", key=b"k1", stream=b"%016d" % 1, index=1)
    assert more["ok"], more  # a stream already open takes more chunks
    assert first_chunk(b"c2", 4)["ok"]
    hdr = first_chunk(b"c2", 5)
    assert hdr["code"] == "UNAVAILABLE" and "--max-streams 3" in hdr["message"], hdr
    assert sim.broker.status()["open_streams"] == 3
    hdr, _ = sim.call("put_abort", client=b"c1", key=b"k2", stream=b"%016d" % 2)
    assert hdr["ok"], hdr
    assert first_chunk(b"c2", 5)["ok"]  # room again
    assert sim.put(b"plain", b"v")["ok"] and sim.get(b"plain") == b"v"


@pytest.mark.parametrize("etcd_mode", [False, True], ids=["embedded", "failover"])
def test_a_stream_left_open_across_a_restart_or_failover_is_still_aborted(tmp_path: Path, etcd_mode: bool) -> None:
    """The broker that saw the stream open dies; its client is gone too. The next broker (the same
    one restarted on its LMDB, or a successor reading etcd) must abort it once idle, or its chunks
    stay staged on every replica for ever."""
    from protocol.replication import slot_for_key

    sim = SimCluster(tmp_path, slots=4, etcd_mode=etcd_mode)
    try:
        key = b"big"
        s = slot_for_key(key, 4)
        stream = b"S" * 16
        for i in range(3):
            hdr, _ = sim.call("put_chunk", [b"x" * 50], key=key, stream=stream, index=i)
            assert hdr["ok"], hdr
        assert all(_replica_state(sim, w, s)[2] == {stream} for w in sim.broker.slots[s].replicas)
        sim.restart_broker()
        sim.settle()
        assert_idle_stream_aborted(sim, s)
    finally:
        sim.close()
