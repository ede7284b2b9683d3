"""The broker's socket loop: ROUTER frontend (clients), ROUTER backend (workers), PUB replication.

Each turn: take what is waiting on both ROUTERs, let ``BrokerCore`` decide, tick its timers,
then carry out its Ready (broker/ready.py ``execute``: persist, publish, send to workers, answer
clients). Only this module touches sockets, the clock and the broker's LMDB (with slot groups,
broker/group_leading.py reads the clock too).

With a key directory (``--keys``) every socket is a CURVE server (broker/zap.py); each message is
handed to the core with who sent it: a client's role, a worker's registered id.

In etcd mode (``--etcd``) the broker starts as a standby (broker/standby.py answers everyone)
while its election thread (broker/etcd.py) campaigns; once it holds the leader key it loads the
metadata from etcd and makes a core for its epoch, and it drops that core (standby again) the
moment its lease deadline passes or a guarded metadata write fails (broker/leadership.py).

With slot groups (``--etcd ... --groups N``, active brokers) the cores of the groups this broker
leads, their metadata and their handovers are broker/group_leading.py's; this module calls it
each turn and carries out what its cores produced.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq

from broker import metrics as broker_metrics
from broker.budget import ReplyBudget, Verdict
from broker.core import BrokerCore
from broker.endpoints import BrokerEndpoints, advertised, bind_endpoint, recv_with_user_id
from broker.etcd import ClusterShapeError, Deposed, Election, Etcd, EtcdMeta, EtcdUnavailable, check_cluster_shape
from broker.group_leading import GroupLeading
from broker.leadership import GIVE_WAY_AFTER, LeaderInfo, Leadership, LeaseRules, WorkerReach
from broker.messages import Limits
from broker.meta import MetaStore
from broker.ready import Ready, execute
from broker.standby import Standby
from broker.state import TICK_SECONDS, BrokerConfig
from broker.zap import BACKEND, FRONTEND, REPLICATION, Zap
from protocol.limits import MAX_CHUNK_BYTES
from protocol.metrics import Snapshot, serve
from protocol.process import dump_stacks_on_sigusr1, tune_gc
from protocol.sockets import send_frames

log = structlog.get_logger("zkv.broker")

DRAIN_LIMIT = 1000
TICK = TICK_SECONDS  # s between calls of BrokerCore.tick
SYNC_INTERVAL = 1.0  # s between fsyncs of the metadata written without one
DEDUP_PRUNE_INTERVAL = 300.0
METRICS_INTERVAL = 1.0  # s between the status snapshots a metrics scrape reads


@dataclass
class BrokerServerConfig:
    data_dir: str = "./data/broker"
    endpoints: BrokerEndpoints = field(default_factory=BrokerEndpoints)
    core: BrokerConfig = field(default_factory=BrokerConfig)
    keys: str = ""  # a key directory (zkv keys init): CURVE on every socket; empty: no authentication
    # etcd mode: etcd's client URLs; empty: the embedded default (one broker, metadata in data_dir)
    etcd: list[str] = field(default_factory=list)
    etcd_prefix: str = "/zkv/"
    name: str = ""  # this broker's name among the brokers (default: host and frontend port)
    lease: LeaseRules = field(default_factory=LeaseRules)
    # The endpoints others reach this broker at, as the leader key publishes them (default: the
    # bound ones, with a wildcard host replaced by this machine's name).
    advertise: BrokerEndpoints | None = None
    metrics: str = ""  # HOST:PORT of the Prometheus metrics (broker/metrics.py); empty: none
    # etcd mode: slot groups, each led by one of the live brokers (active brokers, broker/active.py);
    # 1: one leader for every slot, the others standbys. Fixed when the cluster forms.
    groups: int = 1


class BrokerServer:
    def __init__(self, cfg: BrokerServerConfig) -> None:
        self.cfg = cfg
        # Bind first: a broker that cannot listen must stop before it bumps its epoch.
        self.ctx = zmq.Context()
        self.frontend = self.backend = self.pub = None  # type: ignore[assignment]
        self.zap: Zap | None = None
        try:
            # The ZAP handler first: a CURVE socket bound without one would accept every key.
            self.zap = Zap(self.ctx, cfg.keys) if cfg.keys else None
            self.frontend = self._router("frontend", cfg.endpoints.frontend, FRONTEND)
            # A value a little over the limit gets a clear error; a far larger one disconnects its
            # sender before the broker buffers it.
            self.frontend.setsockopt(zmq.MAXMSGSIZE, max(cfg.core.max_value, MAX_CHUNK_BYTES) + (1 << 20))
            self.backend = self._router("backend", cfg.endpoints.backend, BACKEND)
            self.pub = self.ctx.socket(zmq.PUB)
            self.pub.setsockopt(zmq.SNDHWM, 100_000)
            self.pub.setsockopt(zmq.LINGER, 0)
            if self.zap is not None:
                self.zap.secure(self.pub, REPLICATION)  # only registered workers may subscribe
            bind_endpoint(self.pub, "replication", cfg.endpoints.replication)
        except BaseException:
            self._close_sockets()
            raise
        self.election: Election | None = None
        self.standby: Standby | None = None
        self.meta: MetaStore | EtcdMeta | None = None
        self.core: BrokerCore | None = None
        self.served_epoch = 0  # the last epoch this process led in: it never leads in it again
        self.reach = WorkerReach(cfg.core.w, 0.0)  # replaced at each term (etcd mode)
        # Active brokers (--groups): the cores of the slot groups led here (broker/group_leading.py).
        self.group_leading: GroupLeading | None = None
        self.stopping = False
        if cfg.etcd:
            cfg.lease.check()
            self.etcd = Etcd(cfg.etcd, cfg.lease.request_timeout)
            adv = cfg.advertise or advertised(cfg.endpoints)
            name = cfg.name or f"{socket.gethostname()}:{adv.frontend.rsplit(':', 1)[-1]}"
            me = LeaderInfo(name, 0, adv.frontend, adv.backend, adv.replication)
            limits = Limits(cfg.core.max_key, cfg.core.max_value, cfg.core.max_stream)
            if cfg.groups > 1:
                self.group_leading = GroupLeading(self.etcd, cfg.etcd_prefix, me, cfg.core, cfg.groups, cfg.lease,
                                                  limits, self._make_core, stopping=lambda: self.stopping)
            else:
                self.leadership = Leadership(cfg.lease)
                self.election = Election(self.etcd, cfg.etcd_prefix, me, self.leadership)
                self.standby = Standby(limits)
        else:
            self.meta = MetaStore(os.path.join(cfg.data_dir))
            self.core = self._make_core(self.meta, self.meta.load(), self.meta.next_epoch())
        self.poller = zmq.Poller()
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)
        if self.zap is not None:
            self.poller.register(self.zap.sock, zmq.POLLIN)
        # The signal that asked for the stop, named in the last log line. On a shared CI machine
        # a broker and workers were once stopped mid-test by a signal from outside the suite;
        # the log then said only "stopped", which reads like a stop of the process's own.
        self.stop_signal: str | None = None
        self.reload_requested = False
        self.dropped_replies = 0
        self.budget = ReplyBudget(cfg.core.max_client_bytes)

    def _make_core(self, meta: MetaStore | EtcdMeta, restored: Any, epoch: int, cfg: BrokerConfig | None = None,
                   new_id: Callable[[], bytes] | None = None) -> BrokerCore:
        """A core on this process's clock and keys; ``cfg`` and ``new_id``: a slot group's
        (broker/group_leading.py), else the broker's config and a new id at each cluster formed."""
        return BrokerCore(cfg if cfg is not None else dataclasses.replace(self.cfg.core), restored, epoch,
                          clock=time.monotonic, wall_ms=lambda: int(time.time() * 1000),
                          new_id=new_id if new_id is not None else lambda: uuid.uuid4().bytes,
                          lookup_dedup=meta.lookup_dedup,
                          reload_keys=self.zap.reload if self.zap is not None else None,
                          ha_status=self._ha_status if self.election is not None else None)

    # -- etcd mode --------------------------------------------------------------------------------

    def _lead_or_stand_by(self, now: float) -> None:
        """Take the lead when the election won a new epoch; give it up when the lease deadline passed."""
        ld = self.leadership
        if self.core is None and ld.may_act(now) and ld.epoch > self.served_epoch:
            epoch = ld.epoch
            meta = EtcdMeta(self.etcd, self.cfg.etcd_prefix, epoch)
            try:
                restored = meta.load()
            except EtcdUnavailable as e:
                log.warning("metadata_unreadable", epoch=epoch, error=str(e)[:200])
                return  # tried again next turn, while the lease holds
            self.served_epoch = epoch
            self.meta, self.core = meta, self._make_core(meta, restored, epoch)
            self.reach = WorkerReach(self.cfg.core.w, GIVE_WAY_AFTER * ld.rules.ttl)
            self.budget = ReplyBudget(self.cfg.core.max_client_bytes)
            log.info("leading", epoch=epoch, workers=len(restored.workers), slots=len(restored.slots),
                     lease_left_s=round(ld.remaining(now), 2))
        elif self.core is not None and not ld.may_act(now):
            self._step_down("lease deadline passed" if ld.epoch else "lease lost")
        elif self.core is not None:
            live = sum(1 for w in self.core.state.workers.values() if w.alive)
            others = self.election is not None and any(n != self.election.me.name for n in self.election.brokers)
            if self.reach.observe(now, live) and others:
                self._step_down(f"{live} live workers for {self.reach.window:.0f} s, writes need "
                                f"{self.cfg.core.w}: giving way to a broker that may reach them",
                                hold_off=GIVE_WAY_AFTER * ld.rules.ttl)

    def _step_down(self, reason: str, hold_off: float = 0.0) -> None:
        assert self.election is not None and self.core is not None
        # The last moment it may have acted, in wall time: its lease deadline, or now if sooner
        # (a broker paused past its deadline notices only on waking, but sent nothing after it).
        late = max(0.0, time.monotonic() - self.leadership.term_deadline)
        log.warning("leadership_given_up", epoch=self.core.state.epoch, reason=reason,
                    acted_until=round(time.time() - late, 3))
        self.core = self.meta = None
        self.election.resign(hold_off)

    def _ha_status(self) -> dict[str, Any]:
        assert self.election is not None
        return self.election.describe(time.monotonic())

    def _standby_status(self) -> dict[str, Any]:
        ha = self._ha_status()
        return {"role": "standby", "formed": False, "leader": (ha["leader"] or {}).get("frontend"),
                "ha": ha, "workers": [], "slots": 0, "rf": self.cfg.core.rf, "w": self.cfg.core.w}

    def _on_client(self, identity: bytes, frames: list[bytes], **who: Any) -> None:
        if self.group_leading is not None:
            self.group_leading.active.on_client(identity, frames, **who)
        elif self.core is not None:
            self.core.on_client(identity, frames, **who)
        elif self.standby is not None:
            self.standby.on_client(identity, frames, self.leadership.leader, self._standby_status)

    def _on_worker(self, identity: bytes, frames: list[bytes], **who: Any) -> None:
        if self.group_leading is not None:
            self.group_leading.active.on_worker(identity, frames, **who)
        elif self.core is not None:
            self.core.on_worker(identity, frames, **who)
        elif self.standby is not None:
            self.standby.on_worker(identity, frames, self.leadership.leader)

    def _router(self, role: str, endpoint: str, domain: bytes) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        if self.zap is not None:
            self.zap.secure(s, domain)
        try:
            bind_endpoint(s, role, endpoint)
        except BaseException:
            s.close(linger=0)
            raise
        return s

    def _close_sockets(self) -> None:
        for s in (self.frontend, self.backend, self.pub):
            if s is not None:
                s.close(linger=0)
        if self.zap is not None:
            self.zap.close()
        self.ctx.term()

    def run(self) -> None:
        tune_gc()
        dump_stacks_on_sigusr1()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_sighup)
        log.info("broker_listening", frontend=self.cfg.endpoints.frontend, backend=self.cfg.endpoints.backend,
                 replication=self.cfg.endpoints.replication, data=self.cfg.data_dir)
        if self.zap is not None:
            log.info("curve_on", **self.zap.describe())
        if self.cfg.etcd:
            try:
                check_cluster_shape(self.etcd, self.cfg.etcd_prefix, self.cfg.groups, self.cfg.core.slots)
            except ClusterShapeError:
                self._close_sockets()
                raise
        if self.election is not None:
            log.info("standing_by", name=self.election.me.name, etcd=self.cfg.etcd, ttl=self.cfg.lease.ttl)
            self.election.start()
        if self.group_leading is not None:
            log.info("active", name=self.group_leading.election.me.name, etcd=self.cfg.etcd, groups=self.cfg.groups,
                     ttl=self.cfg.lease.ttl)
            self.group_leading.election.start()
        metrics = None
        if self.cfg.metrics:
            metrics = Snapshot(broker_metrics.families)
            serve(self.cfg.metrics, metrics)
            log.info("metrics_listening", listen=self.cfg.metrics)
        last_tick = last_sync = last_prune = time.monotonic()
        last_metrics = last_tick - METRICS_INTERVAL  # the first snapshot at the first turn
        try:
            while not self.stopping:
                if self.election is not None:
                    self._lead_or_stand_by(time.monotonic())
                elif self.group_leading is not None:
                    self.group_leading.lead(time.monotonic())
                try:
                    events = dict(self.poller.poll(int(TICK * 1000)))
                except zmq.ZMQError as e:
                    if e.errno == zmq.EINTR:
                        continue
                    raise
                if self.zap is not None:
                    if self.reload_requested:
                        self.reload_requested = False
                        self.zap.reload()
                    if self.zap.sock in events:
                        self.zap.drain()
                if self.backend in events:
                    self._drain(self.backend, self._on_worker, self._worker_sender)
                if self.frontend in events:
                    self._drain(self.frontend, self._on_client, self._client_sender)
                now = time.monotonic()
                cores = self._cores()
                if now - last_tick >= TICK:
                    last_tick = now
                    for core in cores.values():
                        core.tick()
                if metrics is not None and now - last_metrics >= METRICS_INTERVAL:
                    last_metrics = now
                    metrics.publish(self.core.metrics_state() if self.core is not None else
                                    {"role": "active" if self.group_leading is not None else "standby"})
                self._execute()
                metas = self._metas()
                if now - last_sync >= SYNC_INTERVAL:
                    last_sync = now
                    for meta in metas:
                        meta.sync()
                if now - last_prune >= DEDUP_PRUNE_INTERVAL:
                    last_prune = now
                    for meta in metas:
                        meta.prune_dedup()
        finally:
            self.shutdown()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True
        self.stop_signal = self.stop_signal or signal.Signals(signum).name

    def _on_sighup(self, signum: int, frame: object) -> None:
        if self.zap is None:
            log.warning("sighup_ignored", reason="no key directory (--keys) to reload")
        self.reload_requested = True  # reloaded by the loop, not in the signal handler

    def _drain(self, sock: zmq.Socket, handle, sender) -> None:  # type: ignore[no-untyped-def]
        for _ in range(DRAIN_LIMIT):
            try:
                if self.zap is None:
                    frames, who = sock.recv_multipart(zmq.NOBLOCK), {}
                else:
                    frames, who = sender(sock)
            except zmq.Again:
                return
            if len(frames) < 1:
                continue
            try:
                handle(frames[0], frames[1:], **who)
            except Exception:  # one bad message must never stop the broker
                log.exception("message_handling_failed")

    def _client_sender(self, sock: zmq.Socket) -> tuple[list[bytes], dict[str, str]]:
        """A client's message and its role now ("": its key was revoked since it connected)."""
        frames, user = recv_with_user_id(sock)
        peer = self.zap.client(user) if self.zap is not None else None
        return frames, {"role": peer.role if peer is not None else ""}

    def _worker_sender(self, sock: zmq.Socket) -> tuple[list[bytes], dict[str, str]]:
        """A worker's message and the worker id its key is registered for ("": revoked)."""
        frames, user = recv_with_user_id(sock)
        peer = self.zap.worker(user) if self.zap is not None else None
        return frames, {"key_name": peer.name if peer is not None else ""}

    def _cores(self) -> dict[int, BrokerCore]:
        """Every core this process runs: its groups' (active brokers), or the one (a leader)."""
        if self.group_leading is not None:
            return self.group_leading.cores
        return {0: self.core} if self.core is not None else {}

    def _metas(self) -> list[MetaStore | EtcdMeta]:
        if self.group_leading is not None:
            return list(self.group_leading.metas.values())
        return [self.meta] if self.meta is not None else []

    def _execute(self) -> None:
        if self.group_leading is not None:
            self.group_leading.execute(self._carry_out)
            # The process's own answers (NOT_LEADER, mmi): no metadata, like a standby's.
            self._carry_out(self.group_leading.active.take_ready(), _NO_METADATA)
            return
        if self.core is None or self.meta is None:
            if self.standby is not None:
                self._carry_out(self.standby.take_ready(), _NO_METADATA)
            return
        ready = self.core.ready()
        if self.election is not None and not self.leadership.may_act(time.monotonic()):
            # Checked again just before sending: the turn may have run past the deadline (a pause).
            self._step_down("lease deadline passed during a turn")
            return
        try:
            self._carry_out(ready, self.meta)
        except (Deposed, EtcdUnavailable) as e:
            # Nothing of this turn was sent (the metadata is written first); the core's state
            # assumed it was, so the core cannot go on: a successor recovers from etcd and workers.
            self._step_down(f"metadata write failed: {e}")

    def _carry_out(self, ready: Ready, meta: Any) -> None:
        execute(ready, meta, publish=lambda frames: send_frames(self.pub, frames),
                send_worker=lambda identity, frames: self._route(self.backend, identity, frames),
                send_client=self._reply)

    def _route(self, sock: zmq.Socket, identity: bytes, frames: list[bytes]) -> None:
        try:
            send_frames(sock, [identity, *frames], nonblock=True)
        except zmq.Again:
            self.dropped_replies += 1  # the peer does not read its replies; it is its loss alone
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise

    def _reply(self, identity: bytes, frames: list[bytes]) -> None:
        """A reply to a client, within what it may leave unread (broker/budget.py)."""
        size = sum(len(f) for f in frames)
        verdict = self.budget.admit(identity, size)
        if verdict is Verdict.DROP:
            self.dropped_replies += 1
            return
        if verdict is Verdict.REFUSE:
            frames = self.budget.refusal(identity, frames)
            size = sum(len(f) for f in frames)
        try:
            tracker = send_frames(self.frontend, [identity, *frames], nonblock=True,
                                  track=self.budget.wants_tracker(identity, size))
        except zmq.Again:
            self.dropped_replies += 1
            return
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.budget.forget(identity)  # gone: libzmq holds nothing for it
            return
        self.budget.sent(identity, size, tracker)

    def shutdown(self) -> None:
        epoch = self.core.state.epoch if self.core is not None else None
        try:
            self._execute()
        finally:
            if self.meta is not None:
                self.meta.close()
            if self.group_leading is not None:
                self.group_leading.stop()  # hands every group over, then revokes the lease
            if self.election is not None:
                self.election.stop()  # a leader revokes its lease: a standby takes over at once
                self.election.join(timeout=2 * self.cfg.lease.request_timeout + 1)
            self._close_sockets()
            log.info("broker_stopped", epoch=epoch, signal=self.stop_signal)


class _NoMetadata:
    """A standby's Ready carries no metadata."""

    def apply(self, metadata: Any, sync: bool) -> None:
        pass


_NO_METADATA = _NoMetadata()


def run_broker(cfg: BrokerServerConfig) -> None:
    BrokerServer(cfg).run()
