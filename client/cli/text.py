"""Keys and values as command-line text: one escaping scheme, used both ways.

What the CLI prints (scan, watch, mget, --json fields) and what it reads (KEY and PREFIX
arguments, mset's values) use the same scheme, so any key printed can be pasted back:

- ``\\\\`` is a backslash; ``\\n``, ``\\t``, ``\\r`` are line feed, tab and carriage return;
- ``\\xHH`` (two hex digits) is one byte: every byte that is not part of printable UTF-8 text
  (NUL and the other control characters, invalid UTF-8, non-printable characters) is written so;
- every other character is itself, in UTF-8.

``unescape(escape(b)) == b`` for any bytes. ``--hex`` replaces all of this with plain hex.
"""

from __future__ import annotations

import re

_NAMED = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_UNNAMED = {v[1]: k for k, v in _NAMED.items()}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[\\ntr])")


def escape(b: bytes) -> str:
    """Bytes as one printable, unambiguous field (no tab or line break in it)."""
    out = []
    for ch in b.decode("utf-8", errors="surrogateescape"):
        if ch in _NAMED:
            out.append(_NAMED[ch])
        elif "\udc80" <= ch <= "\udcff":  # a byte that is not UTF-8
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif not ch.isprintable():
            out.extend(f"\\x{byte:02x}" for byte in ch.encode())
        else:
            out.append(ch)
    return "".join(out)


def unescape(s: str) -> bytes:
    """The bytes a field written by ``escape`` (or typed by a user in that syntax) stands for.
    Raises ValueError on a backslash that starts no escape."""
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(s):
        out += _raw(s[pos:m.start()])
        esc = m.group(1)
        out += bytes([int(esc[1:], 16)]) if esc[0] == "x" else _UNNAMED[esc].encode()
        pos = m.end()
    out += _raw(s[pos:])
    return bytes(out)


def _raw(s: str) -> bytes:
    if "\\" in s:
        raise ValueError(f"a backslash must start \\\\, \\n, \\t, \\r or \\xHH (at {s[s.index(chr(92)):][:6]!r})")
    return s.encode("utf-8", errors="surrogateescape")  # argv bytes that were not UTF-8 come back as they were
