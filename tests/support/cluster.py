"""Real zkv processes on loopback, for the tests and for bench/: free ports, data directories,
cleanup on failure.

``Cluster`` owns every process it starts (each in its own process group, so a test can SIGKILL,
SIGSTOP or SIGCONT exactly one) and kills whatever is left in ``stop_all``, which the fixture
calls even when the test fails; ``stop`` is the graceful variant (SIGTERM, then SIGKILL).

The defaults suit tests (64 slots, 0.3 s heartbeats, 3 s request timeout, 1 GiB LMDB maps).
bench/core.py's ``bench_cluster`` passes ``None`` for the heartbeat, the request timeout and the
map size (the product's defaults: the flag is not passed), 1024 slots and ``cwd`` = the repository;
bench/whatif.py starts the processes through a wrapper with ``command``.

``keys=True`` runs the cluster with CURVE: a key directory in ``root/keys`` (``zkv keys``), the
broker with ``--keys``, each worker with its own credentials (registered when first started), and
every client, the library's and the CLI's (``zkv``, through ZKV_CREDENTIALS), as the admin client.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import Client
from protocol import curve

ZKV: list[str] = [sys.executable, "-m", "client.cli"]
"""How a zkv process is started: ``ZKV + ["broker", ...]``."""
CURVE_ENV = "ZKV_TEST_CURVE"  # "1": the test fixtures make every cluster with keys=True


def _ephemeral_low() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports are taken below the kernel's ephemeral range: a port the OS hands out for bind(0) lies in
# that range, and between our probe and the broker's bind any outgoing connection (a client's, a
# worker's, etcd's) could be given it (once: "Address already in use" for a broker under load).
# Below it, only another listener can take it; each port is handed out once per process.
_PORTS = list(range(max(1024, _ephemeral_low() - 12_000), _ephemeral_low()))
random.SystemRandom().shuffle(_PORTS)
# The defaults (brokers, the Procfile's reads endpoints, etcd, Redis, the gateway): never in tests.
_RESERVED = {5555, 5556, 5557, 5565, 5566, 5567, 5571, 5572, 5573, 2379, 2380, 6379, 8080}


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that nothing listens on now, and that this process has not handed out."""
    while _PORTS:
        port = _PORTS.pop()
        if port in _RESERVED:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port left below the ephemeral range")


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen | None = None
    command: list[str] = field(default_factory=lambda: list(ZKV))  # the process is command + args
    cwd: Path | None = None
    # Set when the test stops the process through this object (a terminating signal, kill,
    # terminate); ``exit_note`` names an exit nobody here asked for (see Cluster.logs).
    stopped_by_test: bool = False

    def start(self) -> None:
        self.stopped_by_test = False
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            [*self.command, *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, cwd=self.cwd,
        )
        log.close()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.popen is not None
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                self.stopped_by_test = True
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.stopped_by_test = True
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.stopped_by_test = True
            os.killpg(self.popen.pid, signal.SIGCONT)
            os.killpg(self.popen.pid, signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def exit_note(self) -> str:
        """For the header of the process's log: its exit code if it ended on its own or by a signal
        from elsewhere (not through this object), else "". A CI failure once had workers and a
        broker stop mid-test with a clean "worker_stopped" (a SIGTERM from outside the suite), and
        the log alone did not say that the test had not stopped them. (A test that signals a pid
        itself, not through this object, is reported here too.)"""
        if self.popen is None or self.stopped_by_test or self.popen.poll() is None:
            return ""
        return f" (exited with code {self.popen.returncode}, not stopped by this test)"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Cluster:
    root: Path
    workers: int = 3
    rf: int = 3
    w: int = 2
    slots: int = 64
    heartbeat: float | None = 0.3  # None: the product's default (no --heartbeat flag)
    request_timeout: float | None = 3.0  # None: the broker's default
    broker_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    map_size: int | None = 1 << 30  # workers' --map-size; None: the worker's default
    command: list[str] = field(default_factory=lambda: list(ZKV))  # how each process is started
    cwd: Path | None = None  # of every process started; None: this process's
    keys: bool = False  # CURVE on every socket (see the module's docstring)
    # > 0: the broker grants read leases (--read-lease) and every worker has a reads endpoint
    # (--reads, a free port of its own, kept across restarts): clients read from lease holders.
    read_lease: float = 0.0

    def __post_init__(self) -> None:
        self.frontend = f"tcp://{self.host}:{free_port(self.host)}"
        self.backend = f"tcp://{self.host}:{free_port(self.host)}"
        self.replication = f"tcp://{self.host}:{free_port(self.host)}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, Proc] = {}
        self.reads: dict[str, str] = {}  # worker id -> its reads endpoint (read_lease)
        self.clients: list[Client] = []
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.key_dir = self.root / "keys"
        self.credentials: Path | None = None  # the admin client's, when keys is set
        self.env.pop(curve.CREDENTIALS_ENV, None)  # another cluster's, or the caller's
        if self.keys:
            self.credentials = curve.init(self.key_dir)
            self.env[curve.CREDENTIALS_ENV] = str(self.credentials)

    def add_client_key(self, name: str, role: str) -> Path:
        """Register a client with ``role``; its credentials file."""
        return curve.add(self.key_dir, curve.CLIENT, name, role)

    def worker_credentials(self, wid: str) -> Path:
        """Worker ``wid``'s credentials file, registering it first if it is not yet."""
        path = self.key_dir / "workers" / f"{wid}.key"
        return path if path.exists() else curve.add(self.key_dir, curve.WORKER, wid)

    # -- processes ------------------------------------------------------------------------------

    def start_broker(self) -> Proc:
        args = ["broker", "--data", str(self.root / "broker"), "--frontend", self.frontend,
                "--backend", self.backend, "--replication", self.replication, "--slots", str(self.slots),
                "--rf", str(self.rf), "-w", str(self.w),
                *self._flag("--heartbeat", self.heartbeat), *self._flag("--request-timeout", self.request_timeout),
                *(["--keys", str(self.key_dir)] if self.keys else []),
                *(["--read-lease", str(self.read_lease)] if self.read_lease else []), *self.broker_args]
        p = self.procs.get("broker") or Proc("broker", args, self.root / "logs" / "broker.log", self.env,
                                             command=self.command, cwd=self.cwd)
        p.args = args
        self.procs["broker"] = p
        p.start()
        return p

    def start_gateway(self, name: str = "gateway") -> str:
        """Start ``zkv gateway`` on a free port, talking to this cluster; its base URL, once it
        answers /healthz."""
        port = free_port(self.host)
        args = ["gateway", "--listen", f"{self.host}:{port}", "--url", self.frontend]
        p = Proc(name, args, self.root / "logs" / f"{name}.log", self.env, command=self.command, cwd=self.cwd)
        self.procs[name] = p
        p.start()
        base = f"http://{self.host}:{port}"

        def healthy() -> bool:
            if not p.running:
                raise AssertionError(f"{name} exited:\n{p.log_tail()}")
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for(healthy, 20, 0.1, f"{name} answering /healthz")
        return base

    def worker_dir(self, wid: str) -> Path:
        return self.root / wid

    def start_worker(self, wid: str, extra: list[str] | None = None, data: Path | None = None,
                     name: str | None = None) -> Proc:
        """Start ``zkv worker --id wid``; ``name`` (default: the id) names the process in ``procs``."""
        args = ["worker", "--id", wid, "--data", str(data or self.worker_dir(wid)), "--broker", self.backend,
                "--replication", self.replication, *self._flag("--heartbeat", self.heartbeat),
                *self._flag("--map-size", self.map_size), *self.reads_flag(wid, self.host), *(extra or [])]
        if self.keys and "--credentials" not in args:
            args += ["--credentials", str(self.worker_credentials(wid))]
        name = name or wid
        p = Proc(name, args, self.root / "logs" / f"{name}.log", self.env, command=self.command, cwd=self.cwd)
        self.procs[name] = p
        p.start()
        return p

    def reads_flag(self, wid: str, host: str) -> list[str]:
        """``--reads`` with the worker's own endpoint on ``host`` (with read leases only)."""
        if not self.read_lease:
            return []
        # (The port is probed on loopback: a worker in a network namespace of its own binds its
        # own address, where nothing else listens.)
        url = self.reads.setdefault(wid, f"tcp://{host}:{free_port()}")
        return ["--reads", url, *([] if host.startswith("127.") else ["--insecure"])]

    @staticmethod
    def _flag(name: str, value: float | None) -> list[str]:
        return [] if value is None else [name, str(value)]

    def start(self, worker_extra: dict[str, list[str]] | None = None, timeout: float = 30.0) -> Cluster:
        """Start the broker and ``workers`` workers (w1..wN); wait until every slot is fully
        replicated (failing at once, with its log, if a process exits meanwhile)."""
        self.start_broker()
        for i in range(1, self.workers + 1):
            wid = f"w{i}"
            self.start_worker(wid, (worker_extra or {}).get(wid))
        self.wait_ready(timeout, require_running=True)
        return self

    def pids(self) -> dict[str, int]:
        """Process name -> pid of every process started (running or not)."""
        return {name: p.popen.pid for name, p in self.procs.items() if p.popen is not None}

    def client(self, **kw: Any) -> Client:
        kw.setdefault("timeout", 15.0)
        if self.request_timeout is not None:
            kw.setdefault("attempt_timeout", self.request_timeout + 1.0)
        kw.setdefault("credentials", self.credentials)
        c = Client(self.frontend, **kw)
        self.clients.append(c)
        return c

    def status(self) -> dict[str, Any]:
        with Client(self.frontend, timeout=5.0, credentials=self.credentials) as c:
            return c.status()

    def alive_workers(self) -> set[str]:
        return {w["id"] for w in self.status()["workers"] if w["state"] == "alive"}

    def wait_ready(self, timeout: float = 30.0, require_running: bool = False) -> None:
        """Wait until the cluster is formed with every slot fully replicated. With
        ``require_running``, a process that has exited fails the wait at once (with its log)."""

        def ready() -> bool:
            if require_running:
                for name, p in self.procs.items():
                    if p.popen is not None and p.popen.poll() is not None:
                        raise AssertionError(f"{name} exited with code {p.popen.returncode}:\n{p.log_tail()}")
            try:
                st = self.status()
            except Exception:
                return False
            return st["formed"] and st["recovering_slots"] == 0 and not st["under_replicated_slots"]

        wait_for(ready, timeout, 0.1, "cluster formed with every slot fully replicated")

    def wait_worker_state(self, wid: str, state: str, timeout: float = 20.0) -> None:
        wait_for(lambda: any(w["id"] == wid and w["state"] == state for w in self.status()["workers"]),
                 timeout, 0.1, f"{wid} {state}")

    def zkv(self, *args: str, timeout: float = 30.0, input: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*ZKV, *args], capture_output=True, timeout=timeout, env=self.env, input=input,
                              cwd=self.cwd)

    def stop_all(self) -> None:
        """SIGKILL every process left (the fixtures' cleanup, also after a failed test)."""
        for c in self.clients:
            c.close()
        for p in self.procs.values():
            p.kill()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully: SIGTERM every running process (SIGCONT first, in case it is paused),
        wait up to ``timeout`` s in all, then SIGKILL what is left."""
        for c in self.clients:
            c.close()
        for p in self.procs.values():
            if p.running:
                p.signal(signal.SIGCONT)
                p.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            if p.popen is None:
                continue
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()

    def logs(self) -> str:
        return "\n".join(f"----- {name}{p.exit_note()} -----\n{p.log_tail()}" for name, p in self.procs.items())
