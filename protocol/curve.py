"""CURVE keys: the cluster's key directory (``zkv keys``) and the one-file credentials of a worker
or a client.

The key directory, made by ``zkv keys init DIR`` (docs/operations.md "Keys")::

    DIR/broker.key              the broker's public key (zmq.auth certificate format)
    DIR/broker.key_secret       the broker's key pair                                  0600
    DIR/public/workers/ID.key   each registered worker's public key                    (the broker reads these)
    DIR/public/clients/NAME.key each client's public key and role                      (the broker reads these)
    DIR/workers/ID.key          a worker's credentials: its key pair + the broker's public key   0600
    DIR/clients/NAME.key        a client's credentials: its key pair, role + the broker's public key 0600

The broker needs ``broker.key_secret`` and ``public/`` only (``zkv broker --keys DIR``); a worker
or a client needs its one credentials file. Every file is a ZeroMQ certificate that
``zmq.auth.load_certificate`` reads; zkv's own fields are in its ``metadata`` section. Keys are
Z85 text (40 characters). This module does no I/O on sockets and imports zmq only to make keys.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("read", "write", "admin")  # each includes the ones before it (docs/protocol.md §1.12)
CLIENT, WORKER = "client", "worker"
KINDS = {CLIENT: "clients", WORKER: "workers"}  # kind -> its sub-directory
CREDENTIALS_ENV = "ZKV_CREDENTIALS"  # a client's credentials file (the library and every zkv client command)
BROKER_KEY = "broker.key"
BROKER_SECRET = "broker.key_secret"
PUBLIC = "public"
INIT_ADMIN = "admin"  # the admin client ``zkv keys init`` makes
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LINE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*"([^"]*)"\s*')
Z85_KEY_CHARS = 40


class KeysError(Exception):
    """A key directory or a credentials file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Credentials:
    """All a worker or a client needs to connect: its name, its key pair, the broker's public key."""

    name: str
    kind: str
    public: bytes
    secret: bytes
    broker_public: bytes
    role: str = ""  # a client's role

    def apply(self, sock: Any) -> None:
        """Make ``sock`` (before it connects) a CURVE client of the broker with these keys."""
        sock.curve_serverkey = self.broker_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


@dataclass(frozen=True)
class Peer:
    """A registered worker or client as the broker knows it: no secret."""

    name: str
    kind: str
    public: bytes
    role: str = ""


@dataclass
class KeyDirectory:
    """What the broker reads from a key directory: its own key pair and every registered peer,
    by public key (the ZAP handler looks peers up by the key they present)."""

    path: Path
    public: bytes
    secret: bytes
    workers: dict[bytes, Peer] = field(default_factory=dict)
    clients: dict[bytes, Peer] = field(default_factory=dict)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise KeysError(f"bad name {name!r}: letters, digits, '.', '_', '-' (at most 64, not starting with a sign)")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise KeysError(f"bad role {role!r}: one of {', '.join(ROLES)}")
    return role


def role_includes(role: str, needed: str) -> bool:
    """Does ``role`` allow what ``needed`` allows (admin > write > read)?"""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


# -- files -----------------------------------------------------------------------------------------


def _render(title: str, metadata: dict[str, str], public: bytes, secret: bytes | None) -> str:
    lines = [f"#   ****  {title}  ****", "#   ZeroMQ CURVE certificate; written by zkv keys", "metadata"]
    lines += [f'    {k} = "{v}"' for k, v in metadata.items()]
    lines += ["curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _parse(path: Path) -> dict[str, str]:
    """Every ``name = "value"`` line of a certificate, sections flattened (the names differ)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise KeysError(f"cannot read {path}: {e.strerror}") from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = _LINE.fullmatch(line)
        if m:
            fields[m.group(1)] = m.group(2)
    return fields


def _key(fields: dict[str, str], name: str, path: Path) -> bytes:
    value = fields.get(name, "")
    if len(value) != Z85_KEY_CHARS:
        raise KeysError(f"{path}: no valid {name} (40 Z85 characters)")
    return value.encode()


def _write(path: Path, text: str, secret: bool) -> None:
    """Write ``text`` to ``path`` (which must not exist), 0600 if ``secret``, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _keypair() -> tuple[bytes, bytes]:
    import zmq  # only here: reading keys needs no zmq

    return zmq.curve_keypair()


def load_credentials(path: str | os.PathLike[str]) -> Credentials:
    p = Path(path)
    f = _parse(p)
    kind = f.get("kind", "")
    if kind not in KINDS:
        raise KeysError(f"{p}: not a zkv credentials file (no kind = worker or client)")
    return Credentials(name=f.get("name", ""), kind=kind, public=_key(f, "public-key", p),
                       secret=_key(f, "secret-key", p), broker_public=_key(f, "broker-public-key", p),
                       role=f.get("role", ""))


def load_directory(path: str | os.PathLike[str]) -> KeyDirectory:
    """The broker's view of key directory ``path`` (its key pair and every public key)."""
    root = Path(path)
    f = _parse(root / BROKER_SECRET)
    keys = KeyDirectory(root, _key(f, "public-key", root / BROKER_SECRET), _key(f, "secret-key", root / BROKER_SECRET))
    for kind, sub in KINDS.items():
        table = keys.clients if kind == CLIENT else keys.workers
        for cert in sorted((root / PUBLIC / sub).glob("*.key")):
            c = _parse(cert)
            role = c.get("role", "") if kind == CLIENT else ""
            if kind == CLIENT:
                check_role(role)
            table[_key(c, "public-key", cert)] = Peer(cert.stem, kind, _key(c, "public-key", cert), role)
    return keys


# -- what ``zkv keys`` does ------------------------------------------------------------------------


def init(path: str | os.PathLike[str]) -> Path:
    """Make a key directory: the broker's key pair and an admin client. Returns the admin's
    credentials file. Refuses a directory that already has a broker key."""
    root = Path(path)
    if (root / BROKER_SECRET).exists():
        raise KeysError(f"{root} already holds a broker key ({BROKER_SECRET}); nothing changed")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    public, secret = _keypair()
    meta = {"name": "broker", "kind": "broker"}
    _write(root / BROKER_SECRET, _render("zkv broker key pair", meta, public, secret), secret=True)
    _write(root / BROKER_KEY, _render("zkv broker public key", meta, public, None), secret=False)
    return add(root, CLIENT, INIT_ADMIN, "admin")


def add(path: str | os.PathLike[str], kind: str, name: str, role: str = "") -> Path:
    """Register a worker (``name`` = its id) or a client (with ``role``); returns its credentials
    file. A name is used once, by one worker or one client."""
    root = Path(path)
    check_name(name)
    if kind == CLIENT:
        check_role(role)
    try:
        broker_public = _key(_parse(root / BROKER_KEY), "public-key", root / BROKER_KEY)
    except KeysError as e:
        raise KeysError(f"{e} (make the directory with zkv keys init)") from None
    for sub in KINDS.values():
        if (root / PUBLIC / sub / f"{name}.key").exists() or (root / sub / f"{name}.key").exists():
            raise KeysError(f"{name!r} is registered already ({sub}); revoke it first")
    public, secret = _keypair()
    meta = {"name": name, "kind": kind, **({"role": role} if kind == CLIENT else {})}
    what = f'{kind} "{name}"' + (f" (role {role})" if role else "")
    cred = root / KINDS[kind] / f"{name}.key"
    _write(cred, _render(f"zkv credentials of {what}: keep secret",
                         {**meta, "broker-public-key": broker_public.decode()}, public, secret), secret=True)
    os.chmod(cred.parent, 0o700)
    _write(root / PUBLIC / KINDS[kind] / f"{name}.key", _render(f"zkv public key of {what}", meta, public, None),
           secret=False)
    return cred


def revoke(path: str | os.PathLike[str], name: str) -> list[Path]:
    """Unregister worker or client ``name``: its public key and its credentials file are deleted.
    Returns the files removed (none: no such name)."""
    root = Path(path)
    check_name(name)
    removed = []
    for sub in KINDS.values():
        for p in (root / PUBLIC / sub / f"{name}.key", root / sub / f"{name}.key"):
            if p.exists():
                p.unlink()
                removed.append(p)
    return removed


def listing(path: str | os.PathLike[str]) -> list[Peer]:
    """Every registered worker and client, workers first."""
    keys = load_directory(path)
    return sorted([*keys.workers.values(), *keys.clients.values()], key=lambda p: (p.kind != WORKER, p.name))
