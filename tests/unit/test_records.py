"""The worker's stored key and record layout (protocol/wire.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.records import KEY_INLINE_MAX, decode_record, encode_record, key_suffix, storage_key


@given(st.binary(min_size=1, max_size=4096), st.integers(0, 2**63), st.integers(0, 2**63), st.binary(max_size=2048))
def test_record_roundtrip(key: bytes, version: int, expire_at: int, value: bytes) -> None:
    r = decode_record(encode_record(version, expire_at, key, value))
    assert (r.version, r.expire_at, r.value) == (version, expire_at, value)
    assert r.long_key == (key if len(key) > KEY_INLINE_MAX else b"")


@given(st.binary(min_size=1, max_size=4096))
def test_storage_keys_fit_lmdb_and_the_expiry_index(key: bytes) -> None:
    sk = storage_key(1023, key)
    assert len(sk) <= 511 - 8  # the expiry index adds 8 bytes of time in front
    assert sk[:2] == b"\x03\xff"


def test_short_and_long_forms_never_collide() -> None:
    long_key = b"a" * 500
    forged = key_suffix(long_key)  # a short key spelled like the long key's stored form
    assert len(forged) > KEY_INLINE_MAX  # ... is itself too long to be stored inline
    assert key_suffix(forged) != key_suffix(long_key)
    assert key_suffix(b"x" * KEY_INLINE_MAX) == b"x" * KEY_INLINE_MAX
