"""How much a client that reads none of its replies makes the broker hold: RssAnon of the broker
before and after ``--gets`` gets of a ``--value-mib`` value from a DEALER that takes nothing off
the wire (tests/support/helpers.py RawPeer(slow=True)).

    python bench/unread_replies.py [--max-client-bytes MIB] [--gets 60] [--value-mib 4] [--tree PATH]

``--tree`` runs the cluster from another source tree (an earlier commit checked out elsewhere),
for a before/after comparison in one run. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from protocol.frames import C_REQUEST, MDPC, SERVICE, pack, unpack  # noqa: E402
from tests.support.cluster import Cluster  # noqa: E402
from tests.support.helpers import RawPeer, rss_anon, settled_rss  # noqa: E402

MIB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-client-bytes", type=int, default=None, help="MiB (default: the broker's)")
    ap.add_argument("--gets", type=int, default=60)
    ap.add_argument("--value-mib", type=int, default=4)
    ap.add_argument("--tree", type=Path, default=None)
    a = ap.parse_args()
    args = [] if a.max_client_bytes is None else ["--max-client-bytes", str(a.max_client_bytes)]
    root = Path(tempfile.mkdtemp(prefix="zkv-unread-"))
    cluster = Cluster(root, broker_args=args, cwd=a.tree)
    try:
        cluster.start()
        value = os.urandom(a.value_mib * MIB)
        with cluster.client() as c:
            c.put(b"big", value)
        pid = cluster.procs["broker"].popen.pid  # type: ignore[union-attr]
        before = settled_rss(pid, quiet=1.5, timeout=60.0)
        peak = before
        with RawPeer(cluster.frontend, slow=True) as peer:
            for rid in range(1, a.gets + 1):
                peer.send(MDPC, C_REQUEST, SERVICE, pack({"op": "get", "id": rid, "key": b"big"}))
            held = settled_rss(pid, quiet=1.5, timeout=60.0)
            served = refused = 0
            deadline = time.monotonic() + 60
            while served + refused < a.gets and time.monotonic() < deadline:
                frames = peer.recv(timeout=30.0)
                hdr = unpack(frames[3])
                served += bool(hdr.get("ok"))
                refused += not hdr.get("ok")
                peak = max(peak, rss_anon(pid))
        print(json.dumps({"max_client_mib": a.max_client_bytes, "gets": a.gets, "value_mib": a.value_mib,
                          "rss_before_mib": round(before / MIB, 1), "rss_unread_mib": round(held / MIB, 1),
                          "grown_mib": round((held - before) / MIB, 1), "served": served, "refused": refused,
                          "tree": str(a.tree or REPO)}))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
