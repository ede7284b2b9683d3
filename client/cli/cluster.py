"""``zkv status``, ``drain``, ``undrain``, ``remove``, ``rebalance`` and ``reload-keys``: operating a cluster."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from client.cli.common import NoBroker, ZkvCommandError, connect, credentials, probe, timeout_option, url_option
from client.client import Client
from client.probe import mmi_service
from protocol.errors import ZkvError


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


@click.command()
@url_option
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(url: str, timeout: float, as_json: bool) -> None:
    """Show workers, slots and replication state."""
    with connect(url, timeout, need_cluster=False) as c:
        try:
            st = c.status()
        except ZkvError as e:
            raise ZkvCommandError(e) from None
    if as_json:
        click.echo(json.dumps(st, indent=2, default=lambda b: b.hex()))
        return
    if st.get("role") == "active":
        _active_brokers(st, timeout)
    elif "role" in st or "leader" in st:  # several brokers (etcd mode): which one answered
        leader = st.get("leader")
        click.echo(f"role {st.get('role', '-')}  leader {leader if leader else 'unknown'}")
    if st.get("role") == "standby" or "epoch" not in st:
        # A standby serves nothing and keeps no cluster state of its own to show: whatever
        # else its map says, one field a line (`zkv status --url LEADER` shows the cluster).
        for k, v in st.items():
            if k not in ("role", "leader"):
                click.echo(f"{k} {json.dumps(v, default=lambda b: b.hex())}")
        return
    click.echo(f"epoch {st['epoch']}  slots {st['slots']}  RF {st['rf']}  W {st['w']}  "
               f"formed {'yes' if st['formed'] else 'no'}  committed writes {st['committed_writes']}")
    rows = [("WORKER", "STATE", "LAST HEARTBEAT", "SLOTS", "KEYS", "DISK")]
    for w in st["workers"]:
        ago = "-" if w["last_heartbeat_ago"] is None else f"{w['last_heartbeat_ago']:.1f}s ago"
        state = w["state"] + (" draining" if w.get("draining") else "")
        rows.append((w["id"], state, ago, str(w["slots"]), str(w["keys"]), _human_bytes(w["disk_bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    for m in st["moves"]:
        click.echo(f"move slot {m['slot']}: {m['from']} -> {m['to']} ({m['reason']}, {m['state']})"
                   + _move_progress(m))
    if st["misplaced_slots"]:
        click.echo(f"slots to move: {st['misplaced_slots']}")
    under = st["under_replicated_slots"]
    click.echo(f"under-replicated slots: {len(under)}" + (f" ({_slot_ranges(under)})" if under else ""))
    if st["recovering_slots"]:
        click.echo(f"recovering slots: {st['recovering_slots']} (the broker restarted; they serve once enough "
                   "replicas have reported)")
    for s in st.get("stalled_slots", []):
        click.echo(f"stalled slot {s['slot']}: {s['pending_writes']} writes cannot commit: {s['live_replicas']} live "
                   f"replicas of {', '.join(s['replicas'])}, W={s['w']}")
    for lost in st.get("lost_writes", []):
        click.echo(f"slot {lost['slot']} LOST committed writes {lost['recovered_at'] + 1}..{lost['committed']} "
                   "(more replicas lost than RF - W); it serves what survived")



def _active_brokers(st: dict[str, Any], timeout: float) -> None:
    """Active brokers (--groups): which broker leads which slot groups, and each one's load (its
    own status, asked of it); then the answering broker's view of the workers and its slots."""
    smap = st.get("slot_map") or {}
    groups = int(st.get("groups") or smap.get("groups") or 0)
    by_url: dict[str, list[int]] = {}
    for g, url in (smap.get("leaders") or {}).items():
        by_url.setdefault(url, []).append(int(g))
    leaderless = sorted(set(range(groups)) - {g for gs in by_url.values() for g in gs})
    click.echo(f"role active  broker {st.get('name', '-')}  groups {groups}  map revision {smap.get('revision', 0)}"
               + (f"  groups without a leader: {_slot_ranges(leaderless)}" if leaderless else ""))
    rows = [("BROKER", "FRONTEND", "GROUPS", "SLOTS", "WRITES", "READS", "REDIRECTED")]
    for url, led in sorted(by_url.items()):
        try:
            with Client(url, timeout=min(timeout, 3.0), credentials=credentials()) as c:
                other = c.status()
        except ZkvError:
            rows.append(("?", url, _slot_ranges(sorted(led)), "-", "-", "-", "unreachable"))
            continue
        stats = other.get("stats") or {}
        rows.append((str(other.get("name", "?")), url, _slot_ranges(sorted(led)), str(other.get("slots", "-")),
                     str(stats.get("writes_committed", 0)), str(stats.get("reads_served", 0)),
                     str(other.get("redirected", 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())


def _whole_status(st: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``st``, or with active brokers what moves are left over every group: each group leader's
    slots to move, moves and workers' slots summed (a broker that does not answer counts as
    not done: its groups' slots to move are unknown)."""
    if st.get("role") != "active":
        return st
    urls = sorted(set(((st.get("slot_map") or {}).get("leaders") or {}).values()))
    misplaced, moves, held, learning = 0, [], {}, {}
    for url in urls:
        try:
            with Client(url, timeout=min(timeout, 3.0), credentials=credentials()) as c:
                other = c.status()
        except ZkvError:
            misplaced += 1
            continue
        misplaced += other.get("misplaced_slots", 0)
        moves += other.get("moves", [])
        for w in other.get("workers", []):
            held[w["id"]] = held.get(w["id"], 0) + w["slots"]
            learning[w["id"]] = learning.get(w["id"], 0) + w["learning"]
    workers = [{**w, "slots": held.get(w["id"], 0), "learning": learning.get(w["id"], 0)} for w in st["workers"]]
    return {**st, "misplaced_slots": misplaced, "moves": moves, "workers": workers}


def _move_progress(m: dict[str, Any]) -> str:
    """What a move has copied: nothing before the donor's first part; keys and bytes against the
    snapshot's totals (with rate and ETA) while copying; the totals once copied."""
    if m["state"] == "starting" or (m["state"] == "catching up" and not m["keys_total"] and not m["bytes_total"]):
        return ""
    copied = f"{m['keys_total']} keys {_human_bytes(m['bytes_total'])}"
    if m["state"] != "copying":
        return f" copied {copied}"
    eta = "-" if m["eta_s"] is None else f"{m['eta_s']:.0f}s"
    return (f" {m['keys_copied']}/{m['keys_total']} keys {_human_bytes(m['bytes_copied'])}/"
            f"{_human_bytes(m['bytes_total'])} {_human_bytes(m['rate_bytes_per_s'])}/s ETA {eta}")


def _admin(url: str, timeout: float, cmd: str, worker: str | None = None) -> dict[str, Any]:
    with connect(url, timeout, need_cluster=False) as c:
        try:
            reply = c.admin(cmd, worker)
        except ZkvError as e:
            raise ZkvCommandError(e) from None
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("message")))
    click.echo(reply["message"])
    return reply


def _wait_for_moves(url: str, timeout: float, done: Any, label: str) -> None:
    """Show a progress bar of slots still to move until ``done(status)``."""
    with connect(url, timeout, need_cluster=False) as c:
        st = _whole_status(c.status(), timeout)
        total = max(st["misplaced_slots"], 1)
        with click.progressbar(length=total, label=label, show_eta=True, show_percent=True) as bar:
            shown = 0
            while True:
                st = _whole_status(c.status(), timeout)
                remaining = st["misplaced_slots"]
                if remaining > total:
                    total = bar.length = remaining
                target = total - remaining
                if target > shown:
                    bar.update(target - shown)
                    shown = target
                if done(st):
                    bar.update(total - shown)
                    break
                time.sleep(0.5)


@click.command()
@url_option
@timeout_option
@click.option("--wait", is_flag=True, help="Show progress until every slot has left the worker.")
@click.argument("worker")
def drain(url: str, timeout: float, wait: bool, worker: str) -> None:
    """Move every slot away from WORKER (before taking it out)."""
    _admin(url, timeout, "drain", worker)
    if wait:
        def drained(st: dict[str, Any]) -> bool:
            w = next(w for w in st["workers"] if w["id"] == worker)
            return w["slots"] == 0 and w["learning"] == 0
        _wait_for_moves(url, timeout, drained, f"draining {worker}")
        click.echo(f"{worker} holds no slots: stop it, then `zkv remove {worker}`")


@click.command()
@url_option
@timeout_option
@click.argument("worker")
def undrain(url: str, timeout: float, worker: str) -> None:
    """Let WORKER take slots again."""
    _admin(url, timeout, "undrain", worker)


@click.command()
@url_option
@timeout_option
@click.argument("worker")
def remove(url: str, timeout: float, worker: str) -> None:
    """Take a drained, stopped WORKER out of the cluster's metadata."""
    _admin(url, timeout, "remove", worker)


@click.command()
@url_option
@timeout_option
@click.option("--wait", is_flag=True, help="Show progress until every slot is where placement wants it.")
def rebalance(url: str, timeout: float, wait: bool) -> None:
    """Move slots so that every worker holds its share (minimal movement)."""
    _admin(url, timeout, "rebalance")
    if wait:
        _wait_for_moves(url, timeout, lambda st: st["misplaced_slots"] == 0 and not st["moves"], "rebalancing")
        click.echo("balanced")


def _slot_ranges(slots: list[int]) -> str:
    out: list[str] = []
    start = prev = None
    for s in sorted(slots):
        if start is None:
            start = prev = s
        elif s == prev + 1:  # type: ignore[operator]
            prev = s
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = s
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    text = ",".join(out)
    return text if len(text) < 80 else text[:77] + "..."


@click.command("reload-keys")
@url_option
@timeout_option
def reload_keys(url: str, timeout: float) -> None:
    """Make the broker reread its key directory (as SIGHUP does): a revoked key is refused from
    its next request on, a new one accepted. Needs the admin role."""
    _admin(url, timeout, "reload_keys")


# -- scan and watch ------------------------------------------------------------------------------


@click.command()
@url_option
@timeout_option
@click.option("-c", "--count", default=1, show_default=True, help="Round trips, one a second.")
def ping(url: str, timeout: float, count: int) -> None:
    """Time a round trip to the broker (mmi.service; of several, the first that listens). Exit
    code 5 if no broker answers."""
    creds = credentials()
    url = probe(url, min(timeout, 1.0), creds)
    for i in range(count):
        if i:
            time.sleep(1.0)
        answer = mmi_service(url, timeout, credentials=creds)
        if answer is None:
            raise NoBroker(f"no reply from the broker at {url} within {timeout}s")
        took, serving = answer
        click.echo(f"PONG from {url} in {took * 1000:.2f} ms ({'serving' if serving else 'not serving yet'})")
