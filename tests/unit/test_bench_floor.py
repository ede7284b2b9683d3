"""bench/floor.py measures what it says: fsynced LMDB transactions of the size asked for, and
ZeroMQ messages that reach another process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import floor  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("putmulti", [False, True])
def test_batches_are_fsynced_transactions_of_the_size_asked(tmp_path: Path, putmulti: bool) -> None:
    env = floor.open_env(tmp_path)
    try:
        assert env.flags()["sync"] and env.flags()["metasync"] and not env.flags()["writemap"]
        before = env.info()["last_txnid"]
        n = floor.write_batches(env, 0.2, 10, b"v" * 100, putmulti)
        assert n > 0 and n % 10 == 0
        assert env.stat()["entries"] == n
        assert env.info()["last_txnid"] - before == n // 10  # one transaction per batch
        with env.begin() as txn:
            assert txn.get(b"key:%0252d" % (n - 1)) == b"v" * 100
    finally:
        env.close()


def test_zeromq_rates_count_messages_another_process_received() -> None:
    assert floor.zmq_push_rate(0.2, 1) > 0
    assert floor.zmq_push_rate(0.2, 4) > 0
    assert floor.zmq_roundtrip_rate(0.2, window=20) > 0


def test_lmdb_gets_read_every_key_they_wrote(tmp_path: Path) -> None:
    assert floor.lmdb_get_rate(tmp_path, 0.1, keys=100, per_txn=10) > 0  # (raises on a missing key)
