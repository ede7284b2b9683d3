"""The worker's socket loop: SUB for the replication stream, DEALER to the broker.

One thread. Each turn: take everything waiting on both sockets, answer reads, commit the write
batch (group commit: one transaction, one fsync), send one cumulative ACK, heartbeat. With
credentials (``--credentials``) both sockets are CURVE clients of the broker.

With several brokers (``--broker A,B --replication PA,PB``, etcd mode) both sockets are connected
to one pair at a time, chosen by worker/brokers.py: the loop moves on when the broker is silent,
when the DEALER's socket monitor reports it disconnected or not listening, when a standby names
the leader, and when an ASSIGN comes from a deposed leader (worker/core.py).
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol.curve import load_credentials
from protocol.frames import MDPW, W_DISCONNECT, W_HEARTBEAT, pack
from protocol.limits import DEFAULT_BACKEND, DEFAULT_REPLICATION
from protocol.process import dump_stacks_on_sigusr1, tune_gc
from protocol.replication import decode_replication, worker_topic
from protocol.sockets import send_frames
from worker import faults
from worker.brokers import AGAIN, FOLLOW, NEXT, BrokerList, BrokerPair
from worker.core import WorkerCore, flush_together
from worker.metrics import WorkerMetrics
from worker.store import SlotStore

log = structlog.get_logger("zkv.worker")

DRAIN_LIMIT = 2000  # messages taken from one socket per turn, so neither starves the other
RECLAIM_INTERVAL = 1.0
REAP_FALLBACK_MS = 600_000  # ms past its expiry before a key is reclaimed locally, outside the log
REREGISTER_PAUSE = 0.2  # s before READY again after a DISCONNECT (a refusal, a standby), or a move
# The DEALER's monitor events that mean "this broker is gone" (several brokers only).
GONE_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED


@dataclass
class WorkerConfig:
    worker_id: str
    data_dir: str
    broker: str = DEFAULT_BACKEND  # one backend, or several comma-separated (etcd mode)
    replication: str = DEFAULT_REPLICATION  # the replication PUB of each, in the same order
    heartbeat: float = 1.0
    liveness: int = 3
    map_size: int = 1 << 36
    credentials: str = ""  # a worker credentials file (zkv keys add-worker); empty: no CURVE
    metrics: str = ""  # HOST:PORT of the Prometheus metrics (worker/metrics.py); empty: none
    reads: str = ""  # the reads endpoint (lease reads, worker/leases.py); empty: none
    # Test options, set only by tests; worker/faults.py turns them into hooks for the loop.
    drop_replication: str = ""
    clock_skew_ms: int = 0


# Called with each replication message's frames before it is decoded; False drops it.
ReplicationFilter = Callable[[list[bytes]], bool]


def system_wall_ms() -> int:
    """The wall clock the worker reports to the broker, which shows the skew in status; it decides
    nothing: expiry follows the broker's clock alone."""
    return int(time.time() * 1000)


class Session:
    """One registration with a broker: a DEALER (and its monitor), a SUB, and the core that decides
    (worker/core.py). With one leader there is one session, for every slot; with active brokers
    (slot groups) one per group, each following that group's leader (worker/brokers.py), all
    sharing the worker's store."""

    def __init__(self, server: WorkerServer, core: WorkerCore, brokers: BrokerList) -> None:
        self.server, self.core, self.brokers = server, core, brokers
        self.pair = brokers.current  # the pair both sockets are connected to
        cfg = server.cfg
        self.sub = server.ctx.socket(zmq.SUB)
        if server.credentials is not None:
            server.credentials.apply(self.sub)
        self.sub.setsockopt(zmq.RCVHWM, 0)  # queue at the subscriber rather than drop at the PUB
        self.sub.setsockopt(zmq.SNDHWM, 100_000)  # >1000 subscriptions resent on reconnect
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(self.pair.replication)
        # Every replication message for this worker (and this session's group), whatever slots it
        # carries; the core applies only what the registered broker incarnation sent for its slots.
        self.sub.setsockopt(zmq.SUBSCRIBE, worker_topic(cfg.worker_id, core.group))
        server.poller.register(self.sub, zmq.POLLIN)
        self.dealer: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None  # the DEALER's monitor, with several brokers
        self.broker_seen = 0.0
        self.connected_at = 0.0
        self.broker_gone = False  # the monitor saw the connection drop or fail
        self.tried: set[BrokerPair] = set()  # moved to since the last registration (logged at info)
        self.groups_announced = 0  # a broker said the cluster has this many slot groups

    @property
    def label(self) -> dict[str, int]:
        return {} if self.core.group is None else {"group": self.core.group}

    # -- connection to the broker ---------------------------------------------------------------

    def connect(self) -> None:
        """A new DEALER to the current pair's backend (the SUB follows in ``switch``), and READY."""
        server = self.server
        ready = self.core.reconnect()
        first = self.dealer is None
        self._close_dealer()
        self.dealer = server.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.SNDHWM, 100_000)
        self.dealer.setsockopt(zmq.RCVHWM, 0)
        if server.credentials is not None:
            server.credentials.apply(self.dealer)
        if self.brokers.several:
            self.monitor = self.dealer.get_monitor_socket(GONE_EVENTS | zmq.EVENT_CONNECTED)
            server.poller.register(self.monitor, zmq.POLLIN)
        self.dealer.connect(self.pair.backend)
        server.poller.register(self.dealer, zmq.POLLIN)
        self.send(ready)
        self.broker_seen = self.connected_at = time.monotonic()
        self.broker_gone = False
        # With several brokers, after the first: broker_switched says where (standbys are retried).
        (log.info if not self.brokers.several or first else log.debug)(
            "ready_sent", broker=self.pair.backend, id=server.cfg.worker_id,
            slots_with_data=len(server.store.positions), **self.label)

    def _close_dealer(self) -> None:
        poller = self.server.poller
        if self.monitor is not None:
            assert self.dealer is not None
            poller.unregister(self.monitor)
            self.dealer.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        if self.dealer is not None:
            poller.unregister(self.dealer)
            self.dealer.close(linger=0)
            self.dealer = None

    def switch(self, pair: BrokerPair, reason: str) -> None:
        """Talk to ``pair`` from now on (both sockets), and register there."""
        if pair != self.pair:
            # At info the first move to each broker since the last registration; while the worker
            # keeps going round (every broker down, an election under way) at debug.
            (log.debug if pair in self.tried else log.info)(
                "broker_switched", **{"from": self.pair.backend}, to=pair.backend, reason=reason, **self.label)
            self.tried.add(pair)
            try:
                self.sub.disconnect(self.pair.replication)
            except zmq.ZMQError:
                pass  # not connected (yet): nothing to undo
            self.sub.connect(pair.replication)  # the subscription is sent again on the new connection
            self.pair = pair
        self.connect()

    def send(self, frames: list[bytes]) -> None:
        assert self.dealer is not None
        send_frames(self.dealer, [MDPW, *frames])

    def flush_outbox(self) -> None:
        out, self.core.outbox = self.core.outbox, []
        for frames in out:
            self.send(frames)

    def close(self, goodbye: bool) -> None:
        try:
            self.flush_outbox()
            if goodbye and self.dealer is not None:
                self.send([W_DISCONNECT])
        except zmq.ZMQError:
            pass
        poller = self.server.poller
        if self.monitor is not None:
            assert self.dealer is not None
            poller.unregister(self.monitor)
            self.dealer.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        if self.dealer is not None:
            poller.unregister(self.dealer)
            self.dealer.close(linger=100 if goodbye else 0)
            self.dealer = None
        poller.unregister(self.sub)
        self.sub.close(linger=0)

    # -- a turn ---------------------------------------------------------------------------------

    def check_broker(self, now: float) -> None:
        cfg = self.server.cfg
        if now - self.broker_seen > cfg.heartbeat * cfg.liveness:
            if not self.brokers.several:  # with several, broker_switched says it
                log.warning("broker_silent_reconnecting", silent_s=round(now - self.broker_seen, 1), **self.label)
            self.switch(self.brokers.leave(now), "silent")  # with one broker: that one again
        elif self.broker_gone and now - self.connected_at >= REREGISTER_PAUSE:
            self.switch(self.brokers.leave(now), "disconnected")

    def drain_sub(self, now: float) -> None:
        server = self.server
        for _ in range(DRAIN_LIMIT):
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if server.replication_filter is not None and not server.replication_filter(frames):
                continue
            try:
                batches = decode_replication(frames)
            except Exception as e:  # a malformed message must not stop the worker
                log.warning("bad_replication_message", error=str(e))
                continue
            for rep in batches:
                self.core.on_replicate(rep, now)

    def drain_monitor(self) -> None:
        assert self.monitor is not None
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            # Acted on in the loop, at most every REREGISTER_PAUSE: a cluster with every broker
            # down is tried in turn, not spun through.
            self.broker_gone = bool(event & GONE_EVENTS)

    def drain_dealer(self, now: float) -> None:
        assert self.dealer is not None
        for _ in range(DRAIN_LIMIT):
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.broker_seen = now
            if len(frames) < 2 or frames[0] != MDPW:
                log.warning("bad_broker_message", frames=len(frames))
                continue
            try:
                self._on_command(frames[1], frames[2:], now)
            except Exception as e:
                log.exception("broker_command_failed", command=frames[1].hex(), error=str(e))
            if self.dealer is None or self.groups_announced:
                return

    def _on_command(self, cmd: bytes, body: list[bytes], now: float) -> None:
        self.core.on_broker(cmd, body, now)
        self.flush_outbox()
        if self.core.broker_epoch is not None:
            self.tried.clear()
        if self.core.deposed_broker:
            time.sleep(REREGISTER_PAUSE)  # with one broker: the same one again, not in a spin
            self.switch(self.brokers.next(), "deposed")
        elif self.core.reconnect_requested:
            info = self.core.disconnect_info
            if info.get("reason") == "groups" and self.core.group is None:
                groups = info.get("groups")
                if isinstance(groups, int) and not isinstance(groups, bool) and groups > 1:
                    self.groups_announced = groups  # the server makes a session per group
                    return
            action = self.brokers.on_disconnect(info, now)
            if action == AGAIN:
                log.warning("broker_disconnected_us_reconnecting", **self.label)
            elif action == FOLLOW and self.brokers.outside is not None:
                log.info("leader_not_in_broker_list", leader=self.brokers.current.backend,
                         replication=self.brokers.current.replication, **self.label)
            elif action == NEXT:
                log.info("standby_knows_no_leader_trying_next", to=self.brokers.current.backend, **self.label)
            # Also before following a leader: two standbys naming each other (stale hints) must
            # not spin. A standby without a leader is asked again (at debug): it may be elected.
            time.sleep(REREGISTER_PAUSE if self.core.group is None else REREGISTER_PAUSE / 4)
            self.switch(self.brokers.current, "standby")


class WorkerServer:
    def __init__(self, cfg: WorkerConfig, replication_filter: ReplicationFilter | None = None,
                 wall_ms: Callable[[], int] = system_wall_ms) -> None:
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.store = SlotStore(cfg.data_dir, map_size=cfg.map_size)
        self.replication_filter = replication_filter
        self.wall_ms = wall_ms
        self.credentials = load_credentials(cfg.credentials) if cfg.credentials else None
        BrokerList.parse(cfg.broker, cfg.replication)  # checked before anything is connected
        self.poller = zmq.Poller()
        self.process_id = uuid.uuid4().bytes  # one for every session: the same process
        self.sessions = [Session(self, WorkerCore(cfg.worker_id, self.store, self.process_id, reads=cfg.reads),
                                 BrokerList.parse(cfg.broker, cfg.replication))]
        # Clients' direct reads of the slots this worker holds read leases on (one leader only:
        # with slot groups no broker grants leases, so the socket answers NOT_LEASED).
        self.reads_sock: zmq.Socket | None = None
        if cfg.reads:
            self.reads_sock = self.ctx.socket(zmq.ROUTER)
            self.reads_sock.setsockopt(zmq.LINGER, 0)
            self.reads_sock.bind(cfg.reads)
            self.poller.register(self.reads_sock, zmq.POLLIN)
        self.last_lease_request = 0.0
        self.last_heartbeat = 0.0
        self.stopping = False
        # The signal that asked for the stop, named in the last log line. On a shared CI machine
        # a broker and workers were once stopped mid-test by a signal from outside the suite;
        # the log then said only "stopped", which reads like a stop of the process's own.
        self.stop_signal: str | None = None

    @property
    def core(self) -> WorkerCore:
        """The first session's core (with one leader, the only one)."""
        return self.sessions[0].core

    def split_into_groups(self, groups: int) -> None:
        """A broker said the cluster has slot groups (active brokers): one session per group, each
        starting at the broker that said so and following its group's leader from there."""
        first = self.sessions[0]
        log.info("slot_groups", groups=groups, broker=first.pair.backend)
        start = first.pair
        first.close(goodbye=False)
        self.sessions = []
        for group in range(groups):
            core = WorkerCore(self.cfg.worker_id, self.store, self.process_id, group=group)
            core.groups = groups
            brokers = BrokerList.parse(self.cfg.broker, self.cfg.replication)
            if start not in brokers.pairs:
                brokers.follow(start.backend, start.replication)
            else:
                brokers.index = brokers.pairs.index(start)
            session = Session(self, core, brokers)
            self.sessions.append(session)
            session.connect()

    # -- loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        tune_gc()
        dump_stacks_on_sigusr1()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.sessions[0].connect()
        metrics = WorkerMetrics(self.cfg.metrics) if self.cfg.metrics else None
        if metrics is not None:
            log.info("metrics_listening", listen=self.cfg.metrics)
        last_reclaim = time.monotonic()
        try:
            while not self.stopping:
                try:
                    events = dict(self.poller.poll(int(self.cfg.heartbeat * 1000 / 4)))
                except zmq.ZMQError as e:
                    if e.errno == zmq.EINTR:
                        continue
                    raise
                now = time.monotonic()
                for session in self.sessions:
                    if session.sub in events:
                        session.drain_sub(now)
                    if session.dealer in events:
                        session.drain_dealer(now)
                    if session.monitor is not None and session.monitor in events:
                        session.drain_monitor()
                if self.sessions[0].groups_announced:
                    self.split_into_groups(self.sessions[0].groups_announced)
                    continue
                if self.reads_sock is not None and self.reads_sock in events:
                    self._drain_reads(now)  # after the broker's messages: the commit notices are in
                cores = [s.core for s in self.sessions]
                began = time.perf_counter()
                if (applied := flush_together(cores)) and metrics is not None:
                    metrics.committed(time.perf_counter() - began, applied, self.store.last_commit_seconds)
                if self.reads_sock is not None:
                    self._lease_turn(now)
                for session in self.sessions:
                    session.flush_outbox()
                if metrics is not None and now - self.last_heartbeat >= self.cfg.heartbeat:
                    metrics.snapshot.publish({**self.store.stats(), "applied": sum(c.applied_total for c in cores),
                                              "commits": sum(c.commits for c in cores),
                                              "retries_absorbed": sum(c.retries_absorbed for c in cores),
                                              "direct_reads": self.core.leases.served,
                                              "leased_slots": self.core.leases.held_now(now),
                                              "slots": sum(len(c.assigned) for c in cores),
                                              "registered": any(c.broker_epoch is not None for c in cores)})
                if now - self.last_heartbeat >= self.cfg.heartbeat:
                    # Every interval, busy or idle: it carries the stats `zkv status` shows.
                    self.last_heartbeat = now
                    beat = pack({**self.store.stats(), "clock_ms": self.wall_ms(),
                                 "direct_reads": self.core.leases.served,
                                 "applied": sum(c.applied_total for c in cores),
                                 "commits": sum(c.commits for c in cores),
                                 "retries_absorbed": sum(c.retries_absorbed for c in cores)})
                    for session in self.sessions:
                        session.send([W_HEARTBEAT, beat])
                for session in self.sessions:
                    session.check_broker(now)
                if now - last_reclaim >= RECLAIM_INTERVAL:
                    last_reclaim = now
                    self._reclaim(now)
        finally:
            self.shutdown()

    def _drain_reads(self, now: float) -> None:
        assert self.reads_sock is not None
        leases = self.core.leases
        for _ in range(DRAIN_LIMIT):
            try:
                frames = self.reads_sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            leases.on_read(frames[0], frames[1:], now, time.monotonic)

    def _lease_turn(self, now: float) -> None:
        """Answer the direct reads that can be answered, and renew the leases at a quarter of their time."""
        assert self.reads_sock is not None
        core = self.core
        leases = core.leases
        if leases.held:
            leases.expire_held(now)
        if leases.replies:
            out, leases.replies = leases.replies, []
            for identity, frames in out:
                try:
                    send_frames(self.reads_sock, [identity, *frames])
                except zmq.ZMQError:
                    pass  # the client went away
        interval = leases.lease / 4 if leases.lease else self.cfg.heartbeat / 2
        if now - self.last_lease_request >= interval:
            self.last_lease_request = now
            core.request_leases(now)

    def _reclaim(self, now: float) -> None:
        broker_now = 0
        for session in self.sessions:
            core = session.core
            core.retry_stalled_repairs(now)
            session.flush_outbox()
            if core.broker_now:
                core.report_expired()
                session.flush_outbox()
                broker_now = max(broker_now, core.broker_now)
        if broker_now:
            # Expired keys are deleted through the log (OP_REAP); this local pass is the fallback
            # for keys the broker could not reap for a long time.
            n = self.store.reclaim_expired(broker_now - REAP_FALLBACK_MS)
            if n:
                log.debug("expired_reclaimed", keys=n)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True
        self.stop_signal = self.stop_signal or signal.Signals(signum).name

    def shutdown(self) -> None:
        try:
            flush_together([s.core for s in self.sessions])
        except zmq.ZMQError:
            pass
        for session in self.sessions:
            session.close(goodbye=True)
        if self.reads_sock is not None:
            self.poller.unregister(self.reads_sock)
            self.reads_sock.close(linger=0)
        self.store.close()
        self.ctx.term()
        log.info("worker_stopped", id=self.cfg.worker_id, signal=self.stop_signal)


def run_worker(cfg: WorkerConfig) -> None:
    hooks = faults.hooks(cfg.drop_replication, cfg.clock_skew_ms)
    WorkerServer(cfg, replication_filter=hooks.replication_filter,
                 wall_ms=hooks.wall_ms or system_wall_ms).run()
