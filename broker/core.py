"""The broker's entry: messages in, a Ready out. It decodes, routes and does nothing else.

``BrokerCore.on_client`` and ``on_worker`` decode one message (broker/messages.py) and hand it
to the part that owns it, from the tables below; ``tick`` runs the parts' timers in a fixed
order; ``ready`` returns everything the step produced (broker/ready.py), which the caller
executes. Parts never call each other: what one part tells the others is an event
(broker/events.py), handed at once to the handlers listed for it in ``EVENTS``.

The write path of a PUT, by function:
  messages.decode_client -> writes.Writes.start -> sequencer.sequence (-> Ready.replication)
  ... the workers apply, fsync and ACK ...
  messages.decode_worker -> replicas.Replicas.on_ack -> quorum.advance -> Committed
  -> watch.Watches.on_committed, writes.Writes.on_committed -> answers.answer (-> Ready.client)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from broker.dumps import Dumps
from broker.events import (
    ChunkCommitted,
    Committed,
    HistoryRewritten,
    MoveAbandoned,
    PositionReported,
    RepairNeeded,
    ReplicaAdvanced,
    WorkerLost,
)
from broker.expiry import Expiry
from broker.leases import Leases
from broker.membership import Membership
from broker.messages import (
    ClientMessage,
    DumpRequest,
    Invalid,
    KvRequest,
    Limits,
    MmiRequest,
    Refused,
    ScanRequest,
    Unavailable,
    WatchRequest,
    decode_client,
)
from broker.moves import Moves
from broker.reads import Reads
from broker.ready import Ready
from broker.recovery import Recovery
from broker.replicas import Replicas
from broker.replies import error
from broker.requests import RequestTable
from broker.roles import forbidden_message, needed_role, refuse_mmi
from broker.scan import Scans
from broker.state import BrokerConfig, BrokerState, Restored, Worker
from broker.status import report
from broker.streams import Streams
from broker.watch import Watches
from broker.worker_messages import (
    Ack,
    Answer,
    Disconnect,
    Expired,
    Heartbeat,
    LeaseRequest,
    Nack,
    SnapshotPart,
    UnknownCommand,
    decode_worker,
)
from broker.writes import DedupLookup, Writes
from protocol.curve import role_includes
from protocol.errors import ErrorCode
from protocol.frames import (
    C_FINAL,
    MDPC,
    MDPW,
    MMI_ADMIN,
    MMI_LEASES,
    MMI_SERVICE,
    MMI_STATUS,
    SERVICE,
    W_DISCONNECT,
    W_READY,
    pack,
    unpack,
)

log = structlog.get_logger("zkv.broker")

Handler = Callable[[bytes, Any], Any]
KeysReload = Callable[[], dict[str, Any]]


class BrokerCore:
    def __init__(self, cfg: BrokerConfig, restored: Restored, epoch: int, clock: Callable[[], float],
                 wall_ms: Callable[[], int], new_id: Callable[[], bytes], lookup_dedup: DedupLookup,
                 reload_keys: KeysReload | None = None,
                 ha_status: Callable[[], dict[str, Any]] | None = None) -> None:
        """``reload_keys``: rereads the key directory (admin ``reload_keys``); None without one.
        ``ha_status``: the election's state for status (etcd mode); None in the embedded mode."""
        self.reload_keys = reload_keys
        self.ha_status = ha_status
        state = self.state = BrokerState(cfg, epoch, clock, wall_ms, new_id)
        state.restore(restored)
        state.hold_commits_for_leases()
        self.limits = Limits(cfg.max_key, cfg.max_value, cfg.max_stream)
        self.requests = RequestTable(state)
        self.membership = Membership(state)
        self.writes = Writes(state, self.requests, lookup_dedup)
        self.reads = Reads(state, self.requests)
        self.streams = Streams(state, self.requests, restored.streams)
        self.replicas = Replicas(state)
        self.recovery = Recovery(state)
        self.moves = Moves(state, self.replicas.transfer_to)
        self.scans = Scans(state)
        self.watches = Watches(state)
        self.expiry = Expiry(state)
        self.dumps = Dumps(state)
        self.leases = Leases(state)
        self.last_second = 0.0
        # Who handles each event, in this order. Committed: watches keep what the replicas found
        # and deliver before the writes are answered; held reads are released last.
        self.events: dict[type, list[Callable[[Any], None]]] = {
            Committed: [self.watches.on_committed, self.expiry.on_committed, self.scans.on_committed,
                        self.writes.on_committed, self.reads.on_committed, self.dumps.on_committed,
                        self.leases.on_committed],
            ChunkCommitted: [self.streams.on_chunk_committed],
            ReplicaAdvanced: [self.streams.on_replica_advanced, self.moves.on_replica_advanced,
                              self.reads.on_replica_advanced],
            PositionReported: [self.replicas.on_position, self.recovery.on_position],
            RepairNeeded: [self.replicas.on_repair_needed],
            WorkerLost: [self.streams.on_worker_lost, self.replicas.on_worker_lost, self.moves.on_worker_lost,
                         self.reads.on_worker_lost, self.scans.on_worker_lost, self.dumps.on_worker_lost],
            MoveAbandoned: [self.replicas.on_move_abandoned],
            HistoryRewritten: [self.watches.on_history_rewritten, self.reads.on_history_rewritten],
        }
        state.emit = self._emit
        # Who handles each data op, in this order (a stream's chunk is checked, sequenced as a
        # write, then counted in its stream).
        reads, writes, streams = self.reads.start, self.writes.start, self.streams
        self.ops: dict[str, list[Handler]] = {
            "get": [reads], "exists": [reads], "mget": [reads], "ttl": [reads],
            "put": [writes], "delete": [writes], "mset": [writes], "expire": [writes],
            "put_chunk": [streams.check, writes, streams.chunk_sequenced],
            "put_commit": [streams.check, writes, streams.closed],
            "put_abort": [streams.check, writes, streams.closed],
            "get_chunks": [streams.start_read],
        }
        self.worker_messages: dict[type, Callable[[Worker, Any], None]] = {
            Ack: self.replicas.on_ack,
            Answer: self._on_answer,
            Heartbeat: self.membership.on_heartbeat,
            Nack: self.replicas.on_nack,
            SnapshotPart: self.replicas.on_snapshot_part,
            Expired: self.expiry.on_report,
            LeaseRequest: self.leases.on_request,
            Disconnect: lambda w, msg: self.membership.lose(w, "disconnected", clean=True),
            UnknownCommand: self._on_unknown_command,
        }
        log.info("broker_started", epoch=epoch, formed=bool(state.slots), workers=len(state.workers),
                 slots=cfg.slots, rf=cfg.rf, w=cfg.w)

    def _emit(self, event: Any) -> None:
        for handle in self.events[type(event)]:
            handle(event)

    # -- what the state looks like (status, tests) ----------------------------------------------

    @property
    def cfg(self) -> BrokerConfig:
        return self.state.cfg

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def slots(self) -> dict:  # type: ignore[type-arg]
        return self.state.slots

    @property
    def workers(self) -> dict[str, Worker]:
        return self.state.workers

    @property
    def stats(self) -> dict[str, int]:
        return self.state.stats

    def serving(self) -> bool:
        return bool(self.state.slots) and any(w.alive for w in self.state.workers.values())

    def status(self) -> dict[str, Any]:
        st = report(self.state, self.moves.report(), len(self.moves.misplaced(self.state.clock())),
                    len(self.streams.open))
        st["watches"] = len(self.watches.watches)
        st["read_lease"] = self.cfg.read_lease
        st["leased_slots"] = self.leases.leased_slots()
        # Client connections (ROUTER identities) with a request or a watch in flight.
        st["clients"] = len({r.identity for r in self.requests.waiting.values()} | {k[0] for k in self.watches.watches})
        if self.ha_status is not None:
            ha = self.ha_status()
            st.update(role="leader", leader=(ha["leader"] or {}).get("frontend"), ha=ha)
        return st

    def metrics_state(self) -> dict[str, Any]:
        """What the metrics snapshot publishes: the status and the request durations."""
        return {**self.status(), "request_latency": self.state.latency.export()}

    def admin(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd.get("cmd") == "reload_keys":
            if self.reload_keys is None:
                return {"ok": False, "message": "this broker runs without a key directory (--keys)"}
            return self.reload_keys()
        return self.moves.admin(cmd)

    # -- messages in -----------------------------------------------------------------------------

    def on_client(self, identity: bytes, frames: list[bytes], role: str | None = None) -> None:
        """``role``: the role of the key that sent the message ("" if it holds none any more);
        None when the broker authenticates nobody (no key directory): everything is allowed."""
        try:
            msg = decode_client(frames, self.limits)
        except Invalid as e:
            error(self.state, identity, e.rid, e.code, str(e), service=e.service)
            return
        self.on_message(identity, msg, role)

    def on_message(self, identity: bytes, msg: ClientMessage, role: str | None = None) -> None:
        """A decoded client message (``on_client``; with active brokers the process decodes it
        once to find its group's core)."""
        state = self.state
        if role is not None and not role_includes(role, needed_role(msg)):
            message = forbidden_message(msg, role)
            state.stats["rejected_requests"] += 1
            if isinstance(msg, MmiRequest):
                refuse_mmi(state.ready, identity, msg, message)
            else:
                error(state, identity, msg.rid, ErrorCode.FORBIDDEN, message)
            return
        try:
            if isinstance(msg, MmiRequest):
                self._on_mmi(identity, msg)
            elif isinstance(msg, KvRequest):
                state.latency.begin(identity, msg.rid, msg.op)
                if not state.slots:
                    raise Unavailable(ErrorCode.UNAVAILABLE,
                                      f"cluster not formed: waiting for {state.cfg.rf} workers to register")
                for handle in self.ops[msg.op]:
                    handle(identity, msg)
            elif isinstance(msg, ScanRequest):
                state.latency.begin(identity, msg.rid, "scan")
                self.scans.start(identity, msg)
            elif isinstance(msg, WatchRequest):
                self.watches.on_request(identity, msg)
            elif isinstance(msg, DumpRequest):
                self.dumps.start(identity, msg)
        except Refused as e:
            error(state, identity, msg.rid, e.code, str(e))  # type: ignore[union-attr]
        except Exception as e:  # a bug: still an answer with the request's id, not silence
            log.exception("request_handling_failed", op=getattr(msg, "op", None))
            rid = getattr(msg, "rid", None)
            if rid is not None:
                error(state, identity, rid, ErrorCode.INTERNAL, f"internal error: {type(e).__name__}")

    def _on_mmi(self, identity: bytes, msg: MmiRequest) -> None:
        if msg.service == MMI_SERVICE:
            body = b"200" if msg.body == SERVICE and self.serving() else b"404"
        elif msg.service == MMI_STATUS:
            body = pack(self.status())
        elif msg.service == MMI_LEASES:
            body = pack(self.leases.lease_map())
        elif msg.service == MMI_ADMIN:
            try:
                cmd = unpack(msg.body)
                answer = self.admin(cmd) if isinstance(cmd, dict) else {"ok": False, "message": "expected a map"}
            except Exception as e:
                answer = {"ok": False, "message": f"bad admin request: {e}"}
            body = pack(answer)
        else:
            body = b"501"
        self.state.ready.reply(identity, [MDPC, C_FINAL, msg.service, body])

    def on_worker(self, identity: bytes, frames: list[bytes], key_name: str | None = None) -> None:
        """``key_name``: the worker id the sender's key is registered for ("" if revoked since
        it connected); None when the broker authenticates nobody. A worker may speak only as
        the id its key names."""
        state = self.state
        if len(frames) < 2 or frames[0] != MDPW:
            log.warning("bad_worker_message", frames=len(frames))
            return
        cmd, body = frames[1], frames[2:]
        if cmd == W_READY:
            self.membership.on_ready(identity, body, key_name)
            return
        wid = state.by_identity.get(identity)
        if wid is None:
            if cmd != W_DISCONNECT:
                # A worker we do not know (we restarted, or it was declared dead): make it re-register.
                state.ready.to_worker(identity, [W_DISCONNECT])
            return
        w = state.workers[wid]
        if key_name is not None and key_name != wid:
            log.error("worker_key_revoked", worker=wid)  # registered with this key, which is gone now
            self.membership.refuse(w, "its key was revoked")
            return
        self.membership.seen(w)
        try:
            msg = decode_worker(cmd, body)
            self.worker_messages[type(msg)](w, msg)
        except Exception as e:
            log.warning("bad_worker_message", worker=wid, command=cmd.hex(), error=str(e))

    def _on_answer(self, w: Worker, msg: Answer) -> None:
        """A worker's answer goes to the part that asked (the token says which)."""
        if msg.final and msg.token in self.scans.tokens:
            self.scans.on_answer(w.id, msg.token, msg.body)
        elif msg.final and msg.token in self.dumps.tokens:
            self.dumps.on_answer(w.id, msg.token, msg.body)
        elif msg.token in self.streams.chunk_reads:
            self.streams.on_answer(w.id, msg)
        elif msg.final:
            self.reads.on_answer(w.id, msg)

    def _on_unknown_command(self, w: Worker, msg: UnknownCommand) -> None:
        log.warning("unexpected_worker_command", worker=w.id, command=msg.command.hex())
        self.membership.refuse(w, "protocol error")

    # -- time ------------------------------------------------------------------------------------

    def tick(self) -> None:
        now = self.state.clock()
        if now - self.last_second >= 1.0:
            self.last_second = now
            self.moves.rereplicate(now)
            self.moves.plan(now)
            self.replicas.abandon_stalled(now)
        self.replicas.refill()
        self.streams.tick(now)
        self.membership.tick(now)
        self.requests.tick(now)
        self.reads.tick()
        self.replicas.repair_laggards(now)
        self.moves.finish_ready()
        self.scans.tick(now)
        self.watches.tick(now)
        self.expiry.tick(now)
        self.dumps.tick(now)
        self.leases.tick(now)

    # -- a Ready out -----------------------------------------------------------------------------

    def ready(self) -> Ready:
        """End the step: send the reads gathered during it, and return everything it produced."""
        self.reads.end_turn()
        self.leases.end_turn()
        ready, self.state.ready = self.state.ready, Ready()
        ready.group = self.cfg.group if self.cfg.groups > 1 else None
        md = ready.metadata
        md.slots = {s: slot.record() for s, slot in md.slots.items()}
        md.workers = {wid: w.record() for wid, w in md.workers.items()}
        return ready
