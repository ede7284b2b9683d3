"""etcd, at the edge (etcd mode): the leader election loop and the metadata a successor needs.

The client is etcd3gw (OpenStack's, maintained): it speaks etcd's JSON gateway (``/v3/...``)
over HTTP with ``requests``, synchronously, which suits a loop of its own in a thread and needs
no gRPC or protobuf (the ``etcd3`` package is unmaintained and often breaks on protobuf
versions; ``aetcd`` is asyncio, while the broker's loop is a plain ZeroMQ poll). We use its
lease objects and raw transactions; keys and values are base64 in the gateway's JSON.

Keys, under a prefix (``--etcd-prefix``, default ``/zkv/``)::

    leader                 the leader's LeaderInfo (JSON) on its lease; its create revision is the epoch
    brokers/NAME           every running broker (JSON) on its own lease: status lists the standbys
    meta/cluster           the cluster record (msgpack): id, slots, rf, formed
    meta/workers/ID        each worker's membership (msgpack): data id, draining
    meta/slots/NNNNN       each slot's replicas and its history of epochs (msgpack)

Slot positions (last, committed) are not kept here: they change with every write, and a new
leader learns them from the workers (broker/recovery.py). Every metadata write is a transaction
guarded by ``create_revision(leader) == epoch``: a deposed leader cannot write.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

import structlog
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception

from broker.leadership import LeaderInfo, Leadership
from broker.ready import Metadata
from broker.state import Restored
from protocol.frames import pack, unpack

log = structlog.get_logger("zkv.broker")

MAX_TXN_OPS = 100  # etcd's --max-txn-ops is 128 by default
STANDBY_POLL = 0.25  # s between a standby's looks at the leader key
BROKERS_REFRESH = 2.0  # s between reads of every broker's registration (status only: no need per turn)
DEDUP_MEMORY = 200_000  # remembered writes of this term (see EtcdMeta)


class EtcdUnavailable(Exception):
    """No etcd endpoint answered (or every one refused the request); the message says why."""


class Deposed(Exception):
    """A guarded write found the leader key is no longer ours: this broker must stop leading."""


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


class Etcd:
    """Several etcd endpoints behind one call: a request that cannot reach one tries the next."""

    def __init__(self, endpoints: list[str], timeout: float) -> None:
        self.endpoints = endpoints
        self.clients = []
        for url in endpoints:
            u = urlsplit(url if "://" in url else f"http://{url}")
            if not u.hostname:
                raise ValueError(f"etcd endpoint {url!r}: expected http://HOST:PORT")
            self.clients.append(Etcd3Client(host=u.hostname, port=u.port or 2379, protocol=u.scheme or "http",
                                            timeout=timeout, api_path="/v3/"))
        self.current = 0

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for i in range(len(self.clients)):
            c = self.clients[(self.current + i) % len(self.clients)]
            try:
                result = c.post(c.get_url(path), json=body)
            except Etcd3Exception as e:
                errors.append(f"{c.host}:{c.port}: {type(e).__name__} {str(e)[:200]}")
                continue
            self.current = (self.current + i) % len(self.clients)
            return result
        raise EtcdUnavailable("; ".join(errors))

    # -- the few operations zkv needs ----------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return int(self.post("/lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's TTL after renewal; <= 0 if it had expired."""
        return int(self.post("/lease/keepalive", {"ID": lease}).get("result", {}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        self.post("/lease/revoke", {"ID": lease})

    def get(self, key: str) -> tuple[bytes, int] | None:
        """(value, create revision) of ``key``, or None."""
        kvs = self.post("/kv/range", {"key": _b64(key)}).get("kvs", [])
        return (_unb64(kvs[0].get("value")), int(kvs[0].get("create_revision", 0))) if kvs else None

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return {key: value for key, (value, _, _) in self.get_prefix_entries(prefix).items()}

    def get_prefix_entries(self, prefix: str) -> dict[str, tuple[bytes, int, int]]:
        """Every key under ``prefix``: (value, create revision, lease id; 0 for none)."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        kvs = self.post("/kv/range", {"key": _b64(prefix), "range_end": _b64(end)}).get("kvs", [])
        return {_unb64(kv["key"]).decode(): (_unb64(kv.get("value")), int(kv.get("create_revision", 0)),
                                            int(kv.get("lease", 0))) for kv in kvs}

    def delete_if_created(self, key: str, create_revision: int) -> bool:
        """Delete ``key`` only if it is still the one created at ``create_revision``."""
        r = self.post("/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "CREATE",
                         "create_revision": create_revision}],
            "success": [{"request_delete_range": {"key": _b64(key)}}]})
        return bool(r.get("succeeded"))

    def put(self, key: str, value: bytes, lease: int = 0) -> None:
        self.post("/kv/put", {"key": _b64(key), "value": _b64(value), "lease": lease})

    def create(self, key: str, value: bytes, lease: int) -> int | None:
        """Put ``key`` only if it does not exist; the revision that created it, or None."""
        r = self.post("/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value), "lease": lease}}]})
        return int(r["header"]["revision"]) if r.get("succeeded") else None

    def guarded(self, guard_key: str, create_revision: int, puts: dict[str, bytes], deletes: list[str]) -> bool:
        """Apply ``puts`` and ``deletes`` only while ``guard_key`` has this create revision; False
        if it has not (nothing applied). Split into transactions of at most MAX_TXN_OPS."""
        ops: list[dict[str, Any]] = [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in puts.items()]
        ops += [{"request_delete_range": {"key": _b64(k)}} for k in deletes]
        for i in range(0, len(ops), MAX_TXN_OPS):
            r = self.post("/kv/txn", {
                "compare": [{"key": _b64(guard_key), "result": "EQUAL", "target": "CREATE",
                             "create_revision": create_revision}],
                "success": ops[i:i + MAX_TXN_OPS]})
            if not r.get("succeeded"):
                return False
        return True


class Election(threading.Thread):
    """The loop that holds this broker's lease, campaigns for the leader key, and keeps
    ``leadership`` (broker/leadership.py) up to date. It never touches the broker's sockets."""

    def __init__(self, etcd: Etcd, prefix: str, me: LeaderInfo, leadership: Leadership) -> None:
        super().__init__(name="zkv-election", daemon=True)
        self.etcd, self.prefix, self.me, self.leadership = etcd, prefix, me, leadership
        self.leader_key = prefix + "leader"
        self.stopped = threading.Event()
        self.resign_requested = threading.Event()
        self.lease = 0
        self.brokers: dict[str, dict[str, Any]] = {}  # every broker registered, as last read
        self.brokers_read = -BROKERS_REFRESH  # monotonic
        self.etcd_ok = True
        self.last_error = ""
        self.campaign_after = 0.0  # monotonic; no campaign before (after giving way)

    def stop(self) -> None:
        self.stopped.set()

    def resign(self, hold_off: float = 0.0) -> None:
        """The server loop stopped leading (its deadline passed, a guarded write failed, it lost
        its workers): give the key up, so that a successor need not wait for the lease to run out,
        and never lead again in this epoch. With ``hold_off``, do not campaign for that long
        (seconds): another broker should win the next election."""
        self.campaign_after = time.monotonic() + hold_off
        self.leadership.lost()
        self.resign_requested.set()

    def run(self) -> None:
        rules = self.leadership.rules
        while not self.stopped.is_set():
            try:
                self._turn()
                if not self.etcd_ok:
                    log.info("etcd_reachable_again")
                self.etcd_ok = True
            except EtcdUnavailable as e:
                if self.etcd_ok:
                    log.warning("etcd_unreachable", error=str(e)[:300],
                                leading_for_s=round(self.leadership.remaining(time.monotonic()), 2))
                self.etcd_ok, self.last_error = False, str(e)[:300]
            except Exception:  # never let the thread die: the broker would lead blind
                log.exception("election_turn_failed")
            wait = rules.renew_every if self.leadership.epoch else STANDBY_POLL
            self.stopped.wait(wait)
        if self.leadership.epoch and self.lease:
            try:
                self.etcd.revoke(self.lease)  # a clean stop hands over at once
            except EtcdUnavailable:
                pass
        self.leadership.lost()

    def _turn(self) -> None:
        ld = self.leadership
        if self.resign_requested.is_set():
            self.resign_requested.clear()
            lease, self.lease = self.lease, 0
            ld.lost()
            if lease:
                self.etcd.revoke(lease)
                log.info("leadership_resigned")
        sent = time.monotonic()
        if self.lease and self.etcd.keepalive(self.lease) <= 0:
            if ld.epoch:
                log.warning("lease_expired", epoch=ld.epoch)
            ld.lost()
            self.lease = 0
        if not self.lease:
            sent = time.monotonic()
            self.lease = self.etcd.grant(ld.rules.ttl)
            self.etcd.put(self.prefix + "brokers/" + self.me.name, json.dumps(self.me.record()).encode(), self.lease)
        elif ld.epoch:
            ld.renewed(sent)
        current = self.etcd.get(self.leader_key)
        if current is None:
            if sent < self.campaign_after:
                return  # giving way: another broker should win this election
            # The epoch is the key's create revision, known once it is created: it is not in the value.
            epoch = self.etcd.create(self.leader_key, json.dumps(self.me.record()).encode(), self.lease)
            if epoch is None:
                return  # another broker was faster
            me = LeaderInfo(self.me.name, epoch, self.me.frontend, self.me.backend, self.me.replication)
            ld.elected(epoch, self.lease, sent, me)
            log.info("leader_elected", epoch=epoch, lease=hex(self.lease), ttl=ld.rules.ttl)
        else:
            value, created = current
            info = leader_info(value, created)
            if ld.epoch and created != ld.epoch:
                log.warning("leader_key_lost", epoch=ld.epoch, now=created)
                ld.lost()
            if info is not None:
                ld.leader = info
        if sent - self.brokers_read >= BROKERS_REFRESH:
            self.brokers_read = sent
            registered = self.etcd.get_prefix(self.prefix + "brokers/")
            self.brokers = {k.rsplit("/", 1)[-1]: _json(v) for k, v in registered.items()}

    def describe(self, now: float) -> dict[str, Any]:
        """What `zkv status` shows of the election."""
        ld = self.leadership
        leader = ld.leader
        return {"leader": leader.record() if leader else None,
                "standbys": sorted(n for n in self.brokers if not leader or n != leader.name),
                "lease": {"id": hex(ld.lease_id) if ld.lease_id else None, "ttl": ld.rules.ttl,
                          "remaining": round(ld.remaining(now), 2)},
                "etcd": {"endpoints": self.etcd.endpoints, "reachable": self.etcd_ok,
                         **({"error": self.last_error} if not self.etcd_ok else {})}}


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def leader_info(raw: bytes, created: int) -> LeaderInfo | None:
    v = _json(raw)
    if not v.get("name"):
        return None
    return LeaderInfo(str(v["name"]), created, str(v.get("frontend", "")), str(v.get("backend", "")),
                      str(v.get("replication", "")))


class EtcdMeta:
    """The broker's metadata in etcd, for one leadership term (epoch): what ``MetaStore`` is in
    the embedded mode, with the same methods the server loop and ``execute`` call.

    Only what changes rarely is written, and only when it changed: a worker's membership, a
    slot's replicas and epoch history, the cluster record, the open streams (so that a successor
    aborts those their clients left). Positions come from the workers.
    De-duplication of retried writes is kept in memory for the term (a retry that reaches this
    leader while the write is in flight or just answered); across terms it is the replicas'
    business (docs/architecture.md)."""

    def __init__(self, etcd: Etcd, prefix: str, epoch: int) -> None:
        self.etcd, self.prefix, self.epoch = etcd, prefix, epoch
        self.written: dict[str, bytes] = {}
        self.dedup: OrderedDict[tuple[bytes, int], tuple[list[list[int]], list[Any] | None]] = OrderedDict()

    def load(self) -> Restored:
        raw = self.etcd.get_prefix(self.prefix + "meta/")
        self.written = dict(raw)
        cluster: dict[str, Any] = {}
        workers: dict[str, dict[str, Any]] = {}
        slots: dict[int, dict[str, Any]] = {}
        streams: dict[bytes, dict[str, Any]] = {}
        for key, value in raw.items():
            name = key[len(self.prefix + "meta/"):]
            record = unpack(value)
            if name == "cluster":
                cluster = record
            elif name.startswith("workers/"):
                workers[name[len("workers/"):]] = record
            elif name.startswith("slots/"):
                slots[int(name[len("slots/"):])] = record
            elif name.startswith("streams/"):
                streams[bytes.fromhex(name[len("streams/"):])] = record
        return Restored(cluster, workers, slots, streams, positions_known=False)

    def apply(self, md: Metadata, sync: bool) -> None:
        puts: dict[str, bytes] = {}
        deletes: list[str] = []
        if md.cluster is not None:
            puts[self.prefix + "meta/cluster"] = pack(md.cluster)
        for wid, info in md.workers.items():
            puts[self.prefix + f"meta/workers/{wid}"] = pack({"data_id": info["data_id"],
                                                               "draining": bool(info.get("draining", False))})
        for wid in md.removed_workers:
            deletes.append(self.prefix + f"meta/workers/{wid}")
        for sid, info in md.slots.items():
            puts[self.prefix + f"meta/slots/{sid:05d}"] = pack({"replicas": info["replicas"], "epochs": info["epochs"]})
        # Open streams: a successor aborts those their clients left, as a restarted broker does
        # (one put when a stream's first chunk is sequenced, one delete when it closes).
        for stream, info in md.streams.items():
            if info is None:
                deletes.append(self.prefix + f"meta/streams/{stream.hex()}")
            else:
                puts[self.prefix + f"meta/streams/{stream.hex()}"] = pack(info)
        puts = {k: v for k, v in puts.items() if self.written.get(k) != v}
        deletes = [k for k in deletes if k in self.written]
        for cid, rid, parts, results in md.dedup:
            self.dedup[(cid, rid)] = (parts, results)
            self.dedup.move_to_end((cid, rid))
        while len(self.dedup) > DEDUP_MEMORY:
            self.dedup.popitem(last=False)
        if not puts and not deletes:
            return
        if not self.etcd.guarded(self.prefix + "leader", self.epoch, puts, deletes):
            raise Deposed(f"the leader key is no longer epoch {self.epoch}'s")
        self.written.update(puts)
        for k in deletes:
            self.written.pop(k, None)

    def lookup_dedup(self, cid: bytes, rid: int) -> tuple[list[list[int]], list[Any] | None] | None:
        return self.dedup.get((cid, rid))

    def sync(self) -> None:
        """Every write is already durable in etcd (a quorum of its members fsynced it)."""

    def prune_dedup(self) -> int:
        return 0  # bounded by count (DEDUP_MEMORY)

    def close(self) -> None:
        pass


class ClusterShapeError(Exception):
    """The etcd prefix holds a cluster of another shape (one leader vs slot groups, or another
    number of groups or slots): leading it would split or corrupt it."""


def check_cluster_shape(etcd: Etcd, prefix: str, groups: int, slots: int) -> None:
    """Raise ClusterShapeError when the prefix's cluster does not match ``groups`` and ``slots``;
    nothing when it matches, is new, or etcd cannot be read now (checked again by the leaders)."""
    try:
        single = etcd.get(prefix + "meta/cluster")
        grouped = etcd.get(prefix + "cluster")
    except EtcdUnavailable:
        return
    if groups > 1 and single is not None:
        raise ClusterShapeError(f"etcd prefix {prefix} holds a cluster with one leader: --groups {groups} cannot "
                                "lead it (give --groups 1, or another --etcd-prefix for a new cluster)")
    if grouped is not None:
        record = unpack(grouped[0])
        if groups == 1 or record.get("groups") != groups or record.get("slots") != slots:
            raise ClusterShapeError(f"etcd prefix {prefix} holds a cluster of {record.get('groups')} slot groups "
                                    f"and {record.get('slots')} slots: give --groups {record.get('groups')} "
                                    f"--slots {record.get('slots')}, or another --etcd-prefix for a new cluster")
