"""What a new user meets first (issue 13), on real processes: a port in use, a worker started
twice on one data directory, a worker that crashes under supervision, no broker at all, a
cluster that has not formed, and the configuration the CLI shows."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.cluster import ZKV, Cluster, free_port, wait_for

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def _listening_on(endpoint: str) -> socket.socket:
    """A plain TCP listener on ``endpoint``'s port: the port is in use."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    s = socket.socket()
    s.bind((host, int(port)))
    s.listen()
    return s


# -- a port in use (defect 4) ----------------------------------------------------------------------


@pytest.mark.parametrize("role", ["frontend", "backend", "replication"])
def test_broker_on_a_port_in_use_says_so_in_one_line_and_keeps_its_epoch(cluster_factory, role: str) -> None:
    c: Cluster = cluster_factory(workers=0)
    endpoint = getattr(c, role)
    with _listening_on(endpoint):
        p = c.start_broker()
        assert p.popen is not None
        assert p.popen.wait(timeout=30) != 0
        out = p.log_path.read_text().strip().splitlines()
    assert out == [f"Error: cannot listen on {endpoint} ({role}): Address already in use; "
                   f"choose another with --{role} (ZKV_BROKER_{role.upper()})"], out
    # No epoch was used up: the first start that can listen is incarnation 1.
    c.start_broker()
    st = wait_for(lambda: _status_or_none(c), 20, 0.1, "broker up")
    assert st["epoch"] == 1


def _status_or_none(c: Cluster) -> dict | None:
    try:
        return c.status()
    except Exception:
        return None


# -- one worker per data directory (defect 3) ------------------------------------------------------


def _lock_lines(data: Path) -> list[str]:
    return (data / "worker.lock").read_text().split()


def _serving_pid(data: Path) -> int:
    """The serving process's pid, from the first line of the data directory's lock file."""
    return int(_lock_lines(data)[0])


def test_a_second_worker_on_the_same_data_is_refused_at_once_naming_the_holder(cluster: Cluster) -> None:
    holder = cluster.procs["w1"]
    assert holder.popen is not None
    t0 = time.monotonic()
    again = cluster.start_worker("w1", name="w1-again")
    assert again.popen is not None
    assert again.popen.wait(timeout=20) == 1
    assert time.monotonic() - t0 < 10
    out = again.log_path.read_text().strip().splitlines()
    assert out == [f"Error: data directory {cluster.worker_dir('w1')} is in use by zkv worker pid "
                   f"{holder.popen.pid}: stop it first, or give another --data"], out
    # The first one was not displaced: still running, still serving.
    time.sleep(1.0)
    assert holder.running and "w1" in cluster.alive_workers()
    c = cluster.client()
    c.put(b"k", b"v")
    assert c.get(b"k") == b"v"


# -- a supervised worker (defect 2) ---------------------------------------------------------------


def test_supervised_worker_restarts_its_serving_process_and_stops_on_sigterm(cluster_factory) -> None:
    c: Cluster = cluster_factory()
    c.start(worker_extra={"w3": ["--supervise"]})
    sup = c.procs["w3"]
    assert sup.popen is not None
    data = c.worker_dir("w3")
    first = _serving_pid(data)
    assert first != sup.popen.pid and _lock_lines(data)[1:] == ["supervisor", str(sup.popen.pid)]
    kv = c.client()
    kv.put(b"before", b"1")

    # A crash of the serving process: it comes back, rejoins and serves; the supervisor stays.
    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: _serving_pid(data) != first and _serving_pid(data), 20, 0.05, "a new serving pid")
    c.wait_worker_state("w3", "alive")
    c.wait_ready()
    assert sup.running
    kv.put(b"after", b"2")
    assert kv.get(b"before") == b"1" and kv.get(b"after") == b"2"

    # A second worker on its directory is refused, naming both processes.
    again = c.start_worker("w3", name="w3-again")
    assert again.popen is not None and again.popen.wait(timeout=20) == 1
    assert f"in use by zkv worker pid {second} (supervised by pid {sup.popen.pid})" in again.log_path.read_text()

    # SIGTERM to the supervisor alone: the serving process stops cleanly, then the supervisor.
    os.kill(sup.popen.pid, signal.SIGTERM)
    assert sup.popen.wait(timeout=20) == 0
    wait_for(lambda: not _alive(second), 10, 0.05, "the serving process gone")
    log = sup.log_path.read_text()
    assert "worker_stopped" in log and "supervisor_stopped" in log and "Traceback" not in log


def test_supervised_worker_stopped_cleanly_is_not_restarted_and_its_supervisor_stays(cluster_factory) -> None:
    c: Cluster = cluster_factory()
    c.start(worker_extra={"w3": ["--supervise"]})
    sup = c.procs["w3"]
    assert sup.popen is not None
    serving = _serving_pid(c.worker_dir("w3"))
    os.kill(serving, signal.SIGTERM)  # "stop it" of drain / stop / remove
    wait_for(lambda: not _alive(serving), 20, 0.05, "the serving process gone")
    c.wait_worker_state("w3", "dead")
    time.sleep(1.5)  # longer than the first restart delay: it must not come back
    assert _serving_pid(c.worker_dir("w3")) == serving and sup.running
    assert sup.terminate(timeout=10) == 0


def test_supervisor_killed_takes_its_serving_process_with_it(cluster_factory) -> None:
    c: Cluster = cluster_factory()
    c.start(worker_extra={"w3": ["--supervise"]})
    sup = c.procs["w3"]
    assert sup.popen is not None
    serving = _serving_pid(c.worker_dir("w3"))
    os.kill(sup.popen.pid, signal.SIGKILL)  # the supervisor alone, not its process group
    sup.popen.wait(timeout=10)
    wait_for(lambda: not _alive(serving), 10, 0.05, "the orphaned serving process gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_quickstart_under_honcho_survives_a_crash_and_a_stopped_worker(tmp_path: Path) -> None:
    """The repository's Procfile under honcho (ports and heartbeat changed, nothing else): a
    SIGKILLed worker comes back, a cleanly stopped one stays down, honcho keeps the others; the
    HTTP gateway serves the same cluster."""
    c = Cluster(tmp_path / "unused", workers=0)  # for its free ports and its client helpers
    python = f"exec {sys.executable} -m client.cli"
    http = f"127.0.0.1:{free_port()}"
    extra = {"broker": f"--frontend {c.frontend} --backend {c.backend} --replication {c.replication} "
                       "--slots 64 --heartbeat 0.3 --request-timeout 3",
             "worker": f"--broker {c.backend} --replication {c.replication} --heartbeat 0.3 --map-size {1 << 30}",
             "gateway": f"--listen {http} --url {c.frontend}"}
    lines = []
    metrics: dict[str, str] = {}
    for line in (REPO / "Procfile").read_text().splitlines():
        name, command = line.split(": ", 1)
        assert command.startswith("exec zkv "), line
        role = command.split()[2]
        # Metrics on free ports too (the last --metrics given wins), one per process.
        metrics[name] = f"127.0.0.1:{free_port()}"
        own = f" --metrics {metrics[name]}" if "--metrics" in command else ""
        if "--reads" in command:  # (read leases: each worker's reads endpoint on a free port too)
            own += f" --reads tcp://127.0.0.1:{free_port()}"
        lines.append(f"{name}: {command.replace('exec zkv', python, 1)} {extra[role]}{own}")
    (tmp_path / "Procfile").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "honcho.log", "wb")
    honcho = subprocess.Popen([sys.executable, "-m", "honcho", "start"], cwd=tmp_path, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        c.wait_ready(30)
        w1, w2 = tmp_path / "data" / "w1", tmp_path / "data" / "w2"
        crashed = _serving_pid(w1)
        os.kill(crashed, signal.SIGKILL)
        wait_for(lambda: _serving_pid(w1) != crashed, 20, 0.05, "w1 restarted")
        c.wait_ready(30)
        stopped = _serving_pid(w2)
        os.kill(stopped, signal.SIGTERM)
        c.wait_worker_state("w2", "dead")
        assert honcho.poll() is None, (tmp_path / "honcho.log").read_text()
        assert c.alive_workers() == {"w1", "w3"}
        with c.client() as kv:
            kv.put(b"still", b"serving")
            assert kv.get(b"still") == b"serving"
        with urllib.request.urlopen(f"http://{http}/v1/kv/still", timeout=15) as r:
            assert r.read() == b"serving"
        def scraped(name: str) -> bool:
            with urllib.request.urlopen(f"http://{metrics[name]}/metrics", timeout=15) as r:
                return b"zkv_" in r.read()

        for name in ("broker", "w1", "w3"):  # every process of the Procfile serves its metrics
            wait_for(lambda name=name: scraped(name), 10, 0.2, f"{name}'s metrics")
        with urllib.request.urlopen(f"http://{http}/metrics", timeout=15) as r:
            assert b"zkv_gateway_requests_total" in r.read()
        os.kill(honcho.pid, signal.SIGTERM)
        honcho.wait(timeout=30)  # honcho's own code is 128+15; what counts is how each process stopped
        out = (tmp_path / "honcho.log").read_text()
        for name in ("broker", "w1", "w2", "w3", "gateway"):
            assert f"{name}.1 stopped (rc=0)" in out, out
    finally:
        # honcho starts each process in a session of its own: killing honcho's process group does
        # not reach them, and a failed run used to leave the gateway and a worker running.
        started = _zkv_descendants(honcho.pid)
        c.stop_all()
        if honcho.poll() is None:
            honcho.send_signal(signal.SIGTERM)  # honcho stops every process it started
            try:
                honcho.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(honcho.pid, signal.SIGKILL)
                honcho.wait(timeout=10)
        for pid in started:  # whatever honcho did not stop
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()


def _zkv_processes() -> dict[int, int]:
    """pid -> parent pid of every running zkv process (``python -m client.cli ...``)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if b"client.cli" not in (d / "cmdline").read_bytes():
                continue
            out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return out


def _zkv_descendants(root: int) -> list[int]:
    """The zkv processes below ``root`` (children, the supervisors' serving processes, ...)."""
    parents = _zkv_processes()
    found, frontier = [], {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in found}
        found += sorted(frontier)
    return found



# -- no broker, no cluster: fast and clear (defect 5) ----------------------------------------------


def _zkv(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([*ZKV, *args], capture_output=True, timeout=30, env=env or {**os.environ}, cwd=REPO)
    return r, time.monotonic() - t0


FAST = 4.0  # s: a process start (under load) plus the one-second probe; a request would wait --timeout


@pytest.mark.parametrize("command", [["get", "k"], ["put", "k", "v"], ["del", "k"], ["scan"], ["watch"],
                                     ["status"], ["drain", "w1"], ["ping"]])
def test_without_a_broker_every_command_says_so_within_a_second(command: list[str]) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    r, took = _zkv(*command, "--url", url, "--timeout", "10")
    assert r.returncode == 5, r
    assert r.stderr.decode().strip() == f"Error: no broker at {url}: is it running? (ZKV_URL, --url)"
    assert took < FAST, took


def test_without_a_broker_the_url_comes_from_zkv_url() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    r, took = _zkv("get", "k", env={**os.environ, "ZKV_URL": url})
    assert r.returncode == 5 and f"no broker at {url}" in r.stderr.decode()


def test_before_the_cluster_forms_data_commands_say_unavailable_at_once(cluster_factory) -> None:
    c: Cluster = cluster_factory(workers=1)
    c.start_broker()
    c.start_worker("w1")
    wait_for(lambda: (_status_or_none(c) or {}).get("workers"), 20, 0.1, "w1 registered")
    for command in (["put", "k", "v"], ["get", "k"], ["scan"], ["watch"]):
        r, took = _zkv(*command, "--url", c.frontend, "--timeout", "10")
        assert r.returncode == 5, r
        assert r.stderr.decode().strip() == ("Error: UNAVAILABLE: cluster not formed: 1 worker registered, "
                                             "at least 3 needed (zkv status)"), r
        assert took < FAST, (command, took)
    # What works before the cluster forms still does.
    r, _ = _zkv("status", "--url", c.frontend)
    assert r.returncode == 0 and b"formed no" in r.stdout
    r, _ = _zkv("ping", "--url", c.frontend)
    assert r.returncode == 0 and r.stdout.decode().endswith("ms (not serving yet)\n"), r


def test_ping_times_a_round_trip(cluster: Cluster) -> None:
    r, _ = _zkv("ping", "-c", "2", env={**os.environ, "ZKV_URL": cluster.frontend})
    lines = r.stdout.decode().splitlines()
    assert r.returncode == 0 and len(lines) == 2, r
    assert all(line.startswith(f"PONG from {cluster.frontend} in ") and line.endswith(" ms (serving)")
               for line in lines), lines


# -- configuration (defect 6) ----------------------------------------------------------------------


def test_ttl_durations_and_zkv_url(cluster: Cluster) -> None:
    env = {**os.environ, "ZKV_URL": cluster.frontend}
    for ttl, ms in (("90s", 90_000), ("5m", 300_000), ("1h", 3_600_000), ("250000", 250_000), ("1.5h", 5_400_000)):
        r, _ = _zkv("put", f"t:{ttl}", "v", "--ttl", ttl, env=env)
        assert r.returncode == 0, r
        left = cluster.client().ttl(f"t:{ttl}")
        assert left is not None and ms - 10_000 < left <= ms, (ttl, left)
    r, _ = _zkv("put", "t:bad", "v", "--ttl", "5 minutes", env=env)
    assert r.returncode == 2 and b"is not a duration" in r.stderr
    # The library reads ZKV_URL too.
    code = "from client import Client; c = Client(timeout=5); print(c.url, c.get(b't:90s'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, cwd=REPO, timeout=30)
    assert out.stdout.decode().strip() == f"{cluster.frontend} b'v'", out
