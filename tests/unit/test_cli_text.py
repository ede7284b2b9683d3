"""The CLI's escaping of keys and values (client/cli/text.py): one scheme, reversible, the same
for what the CLI prints and what it reads."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.cli.text import escape, unescape

pytestmark = pytest.mark.timeout(60)


@given(st.binary(max_size=64))
def test_any_bytes_round_trip(b: bytes) -> None:
    text = escape(b)
    assert unescape(text) == b
    assert "\n" not in text and "\t" not in text and "\r" not in text


@given(st.text(max_size=32))
def test_any_text_round_trip(s: str) -> None:
    b = s.encode("utf-8", errors="surrogatepass")
    assert unescape(escape(b)) == b


def test_backslashes_and_nuls_are_not_ambiguous() -> None:
    # These printed alike before (a backslash was printed as itself, a NUL raw).
    assert escape(b"a\\x00") == "a\\\\x00"
    assert escape(b"a\x00") == "a\\x00"
    assert escape(b"\xff") == "\\xff"
    assert escape("é\u2028".encode()) == "é\\xe2\\x80\\xa8"  # a printable character, a line separator
    assert escape(b"tab\there\nnl") == "tab\\there\\nnl"
    assert unescape("a\\\\x00") == b"a\\x00" and unescape("a\\x00") == b"a\x00"


def test_plain_text_is_itself() -> None:
    assert escape(b"user:42 caf\xc3\xa9") == "user:42 café"
    assert unescape("user:42 café") == "user:42 café".encode()


@pytest.mark.parametrize("bad", ["a\\", "a\\q", "\\x4", "\\xzz"])
def test_a_backslash_that_starts_no_escape_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        unescape(bad)


def test_progress_shows_bytes_rate_and_eta_and_works_without_a_size() -> None:
    """The upload bar had no bytes or rate, and a stdin upload (no size) showed nothing."""
    from client.cli.progress import progress_line

    assert progress_line("put", 12 << 20, 100 << 20, 2.0) == "put 12.0 MiB/100.0 MiB 12% 6.0 MiB/s ETA 15s"
    assert progress_line("put", 12 << 20, None, 4.0) == "put 12.0 MiB 3.0 MiB/s"
    assert progress_line("get", 0, None, 0.0) == "get 0 B 0 B/s"
