"""Which role each client request needs (docs/protocol.md §1.12), and the refusal of one that
its client's role does not allow.

The server passes the role of the key that sent the message (broker/zap.py); without a key
directory it passes None and everything is allowed, as before keys existed.
"""

from __future__ import annotations

from typing import Any

from broker.messages import WRITE_OPS, KvRequest, MmiRequest
from broker.ready import Ready
from protocol.frames import C_FINAL, MDPC, MMI_ADMIN, MMI_SERVICE, pack

READ, WRITE, ADMIN = "read", "write", "admin"


def needed_role(msg: Any) -> str:
    """read: every read, scan, watch, dump (backup), status; write: every write; admin: mmi.admin
    (drain, undrain, remove, rebalance, move, reload_keys)."""
    if isinstance(msg, MmiRequest):
        return ADMIN if msg.service == MMI_ADMIN else READ
    if isinstance(msg, KvRequest) and msg.op in WRITE_OPS:
        return WRITE
    return READ


def what(msg: Any) -> str:
    if isinstance(msg, MmiRequest):
        return msg.service.decode(errors="replace")
    if isinstance(msg, KvRequest):
        return msg.op
    return type(msg).__name__.removesuffix("Request").lower()


def forbidden_message(msg: Any, role: str) -> str:
    held = f"this client's key has role {role}" if role else "this client's key is not registered (revoked?)"
    return f"{what(msg)} needs role {needed_role(msg)}; {held}"


def refuse_mmi(ready: Ready, identity: bytes, msg: MmiRequest, message: str) -> None:
    """An MMI request's refusal in that service's own reply form: 403 for mmi.service, a map
    with ``code: FORBIDDEN`` for the others."""
    body = b"403" if msg.service == MMI_SERVICE else pack({"ok": False, "code": "FORBIDDEN", "message": message})
    ready.reply(identity, [MDPC, C_FINAL, msg.service, body])
