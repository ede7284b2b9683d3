"""A worker's LMDB environment and its seven databases, opened once and passed to the units that
read and write them (their keys and values: worker/records.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import lmdb


@dataclass(frozen=True, slots=True)
class Tables:
    env: lmdb.Environment
    data: lmdb._Database  # records
    meta: lmdb._Database  # positions, install markers, ids
    expiry: lmdb._Database  # the TTL index
    blobs: lmdb._Database  # chunks of streamed values
    staged: lmdb._Database  # streams not yet committed
    dedup: lmdb._Database  # the client requests each slot's writes came from (exactly-once)
    dedup_age: lmdb._Database  # that table by age, for forgetting
    # Per slot, no entry of ``dedup_age`` is older than this (broker clock, ms): lets the forgetting
    # skip a cursor walk that would find nothing (worker/dedup.py). Missing: not known. True of the
    # open write transaction's view, so cleared whole when a write transaction is aborted.
    dedup_floor: dict[int, int] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str, map_size: int, sync: bool) -> Tables:
        os.makedirs(path, exist_ok=True)
        env = lmdb.open(path, map_size=map_size, max_dbs=8, sync=sync, metasync=sync, writemap=False)
        return cls(env, env.open_db(b"data"), env.open_db(b"meta"), env.open_db(b"expiry"),
                   env.open_db(b"blobs"), env.open_db(b"staged"), env.open_db(b"dedup"),
                   env.open_db(b"dedup_age"))
