"""What one client can make the broker hold, in bytes: replies it does not read (--max-client-bytes,
broker/budget.py). Open streams are capped too (--max-streams, --max-client-streams):
tests/sim/test_streams.py."""

from __future__ import annotations

import os

import pytest

from protocol.frames import C_FINAL, C_REQUEST, MDPC, SERVICE, pack, unpack
from tests.support.cluster import Cluster, wait_for
from tests.support.helpers import RawPeer, settled_rss

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def test_replies_a_client_does_not_read_are_bounded_in_bytes(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    """60 gets of a 4 MiB value from a client that reads nothing grew the broker by 270 MiB (the
    queue to a client is bounded in messages, 100,000). Now past --max-client-bytes its replies
    are refused with UNAVAILABLE, each carrying its request's id, and the broker's growth stays
    near the bound; once the client reads, it is served again."""
    # The product's heartbeat (1 s): on a loaded machine 0.3 s loses workers, and the gets with them.
    cluster: Cluster = cluster_factory(broker_args=["--max-client-bytes", "16"], heartbeat=None)
    # Large buffers straight from mmap, so that RssAnon is what the broker holds: glibc's dynamic
    # threshold otherwise keeps freed 4 MiB buffers for reuse (about 40 MiB more here).
    cluster.env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cluster.start()
    value = os.urandom(4 * MIB)
    cluster.client().put(b"big", value)
    pid = cluster.procs["broker"].popen.pid
    before = settled_rss(pid)
    with RawPeer(cluster.frontend, slow=True) as peer:
        for rid in range(1, 61):
            peer.send(MDPC, C_REQUEST, SERVICE, pack({"op": "get", "id": rid, "key": b"big"}))
        wait_for(lambda: "client_replies_unread" in cluster.procs["broker"].log_tail(5000), 30, 0.1,
                 "the broker refusing replies past the bound")
        grown = settled_rss(pid) - before
        # Held: 16 MiB + one reply + 1 MiB + the kernel's socket buffers (12-48 MiB measured,
        # more under load: the workers' answers pass through too); all 60 queued, 236 MiB.
        assert grown < 100 * MIB, f"the broker grew by {grown / MIB:.0f} MiB"
        answers: dict[int, dict] = {}  # type: ignore[type-arg]
        while len(answers) < 60:
            frames = peer.recv(timeout=10.0)
            assert frames[:3] == [MDPC, C_FINAL, SERVICE], frames[:3]
            hdr = unpack(frames[3])
            assert hdr["id"] not in answers, f"two answers to {hdr['id']}"
            if hdr["ok"]:
                assert frames[4] == value
            else:
                assert hdr["code"] == "UNAVAILABLE" and "--max-client-bytes" in hdr["message"], hdr
            answers[hdr["id"]] = hdr
        assert set(answers) == set(range(1, 61))  # every request answered, none dropped
        served = sum(1 for h in answers.values() if h["ok"])
        assert 1 <= served <= 10, f"{served} values of 4 MiB went out to a client reading none"
        hdr, values = peer.kv({"op": "get", "id": 99, "key": b"big"})  # it reads now: served again
        assert hdr["ok"] and values == [value], hdr
    assert cluster.procs["broker"].running
