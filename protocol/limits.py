"""Every limit and default that more than one zkv program knows, defined once.

The broker enforces them; workers and clients size their requests by them; docs/protocol.md
quotes them.
"""

from __future__ import annotations

DEFAULT_SLOTS = 1024
MAX_KEY_BYTES = 4096
DEFAULT_MAX_VALUE_BYTES = 64 * 1024 * 1024  # broker --max-value: one request's value bytes
MAX_KEYS_PER_REQUEST = 10_000  # keys in one mget / mset
MAX_TTL_MS = 100 * 365 * 24 * 3600 * 1000  # a century

# Streamed values (docs/protocol.md §1.8).
STREAM_ID_BYTES = 16
DEFAULT_CHUNK_BYTES = 1 << 20  # what clients send; the broker accepts chunks up to MAX_CHUNK_BYTES
MAX_CHUNK_BYTES = 8 << 20
DEFAULT_MAX_STREAM_BYTES = 4 << 30  # a streamed value's default size limit (broker --max-stream)
MAX_CHUNKS_PER_READ = 16  # credit one get_chunks request may ask for
STREAM_INCOMPLETE = -1  # a replica's answer flag for a stream commit that found chunks missing

# Exactly-once writes: how long (by the broker's clock carried in each write batch) a replica
# remembers the client request a write came from. A write resent later than this after its first
# attempt may be applied again; clients stop resending a write by then (client/retry.py).
DEDUP_RETENTION_MS = 120_000

# Scan pages.
DEFAULT_SCAN_LIMIT = 1000
MAX_SCAN_LIMIT = 10_000  # keys in one scan page
SCAN_MAX_BYTES = 8 << 20  # key and value bytes in one scan page (at least one entry); `more` says the rest

# Ops that read and never write: the broker sends them to one in-sync replica; `zkv bench` writes
# the keys of its read phases first. (broker/core.py still has its own copy of this set.)
READ_OPS = frozenset({"get", "exists", "mget", "ttl"})

# Default endpoints (all on 127.0.0.1): clients, workers, replication. Clients (the library and
# the CLI) take the broker's frontend from URL_ENV when no url is given.
URL_ENV = "ZKV_URL"
DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"
DEFAULT_REPLICATION = "tcp://127.0.0.1:5557"


def split_urls(text: str) -> list[str]:
    """A comma-separated list of endpoints (several brokers, etcd mode) as a list; one endpoint
    is a list of one. Blanks around commas are ignored; an empty list is an error."""
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise ValueError(f"no endpoint in {text!r}")
    return urls
