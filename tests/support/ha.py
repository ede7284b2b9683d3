"""etcd mode for the tests and bench/: a real etcd (Debian's etcd-server) on free ports, and a
cluster of several brokers sharing it.

``EtcdServer`` runs one etcd member in a temporary directory (``members=3`` in ``EtcdCluster``
for the test that kills one). ``HaCluster`` is ``Cluster`` with ``brokers`` brokers (b1, b2, ...),
each with its own three endpoints; ``frontend``, ``backend`` and ``replication`` are the
comma-separated lists that clients and workers take, so every helper of ``Cluster`` (clients,
status, the CLI) follows the leader as a user's would.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.cluster import Cluster, Proc, free_port, wait_for
from tests.support.netns import NetLab
from tests.support.requirements import missing

ETCD_START_TIMEOUT = 20.0


def etcd_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        missing("etcd is not installed (Debian: apt-get install etcd-server); the etcd-mode tests need it")
    return str(path)


@dataclass
class EtcdMember:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    log_path: Path
    popen: subprocess.Popen | None = None

    def start(self, initial_cluster: str, state: str = "new") -> None:
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            [etcd_binary(), "--name", self.name, "--data-dir", str(self.data_dir),
             "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
             "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
             "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
             # One token for every member of this cluster (its directory), never shared with another.
             "--initial-cluster-token", "zkv-test-" + hashlib.blake2b(str(self.data_dir.parent).encode(),
                                                                     digest_size=8).hexdigest()],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class EtcdCluster:
    """``members`` etcd members on loopback free ports, data under ``root``."""

    def __init__(self, root: Path, members: int = 1, host: str = "127.0.0.1") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.host = host  # a NetLab's service address, for brokers in network namespaces
        self.members = [EtcdMember(f"e{i}", f"http://{host}:{free_port(host)}", f"http://{host}:{free_port(host)}",
                                   root / f"e{i}", root / f"e{i}.log") for i in range(1, members + 1)]
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> str:
        return ",".join(m.client_url for m in self.members)

    def start(self) -> EtcdCluster:
        for m in self.members:
            m.start(self.initial)
        wait_for(self.healthy, ETCD_START_TIMEOUT, 0.1, "etcd healthy")
        return self

    def healthy(self) -> bool:
        import requests

        for m in self.members:
            if not m.running:
                continue
            try:
                r = requests.get(m.client_url + "/health", timeout=1)
                if r.ok and json.loads(r.text).get("health") in ("true", True):
                    return True
            except (requests.RequestException, ValueError):
                pass
        return False

    def get(self, key: str) -> dict[str, Any] | None:
        """The JSON value of ``key`` (through etcdctl's wire format: the gateway)."""
        import base64

        import requests

        for m in self.members:
            if not m.running:
                continue
            try:
                r = requests.post(m.client_url + "/v3/kv/range",
                                  json={"key": base64.b64encode(key.encode()).decode()}, timeout=2).json()
            except requests.RequestException:
                continue
            kvs = r.get("kvs", [])
            if not kvs:
                return None
            return {"value": json.loads(base64.b64decode(kvs[0]["value"])),
                    "create_revision": int(kvs[0]["create_revision"])}
        return None

    def stop(self) -> None:
        for m in self.members:
            m.kill()


@dataclass
class HaCluster(Cluster):
    """A zkv cluster in etcd mode: ``brokers`` brokers on one etcd (``etcd``: an EtcdCluster).

    With ``lab`` (a NetLab set up, etcd on its service address) every broker runs in a network
    namespace of its own and binds its endpoints on that namespace's address, so a test can cut a
    broker off from etcd, from its workers, or from everything (NetLab.cut_tcp, link_down); the
    workers, the clients and etcd stay in the host's namespace."""

    brokers: int = 2
    etcd: EtcdCluster | None = None
    lease_ttl: int = 3
    prefix: str = "/zkv-test/"
    broker_endpoints: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    lab: NetLab | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        assert self.etcd is not None, "HaCluster needs an EtcdCluster"
        for i in range(1, self.brokers + 1):
            name = f"b{i}"
            host = self.lab.add_host(name).addr if self.lab is not None else self.host
            self.broker_endpoints[name] = tuple(  # type: ignore[assignment]
                f"tcp://{host}:{free_port()}" for _ in range(3))  # (a fresh namespace: any port is free)
        if self.lab is not None and not self.keys:
            # Not loopback: without keys the brokers would refuse the address (protected mode).
            self.broker_args = [*self.broker_args, "--insecure"]
        names = list(self.broker_endpoints)
        self.frontend = ",".join(self.broker_endpoints[n][0] for n in names)
        self.backend = ",".join(self.broker_endpoints[n][1] for n in names)
        self.replication = ",".join(self.broker_endpoints[n][2] for n in names)

    def start_broker(self, name: str = "") -> Proc:  # type: ignore[override]
        """Start broker ``name`` (b1, b2, ...); without a name, every broker not running."""
        if not name:
            for n in self.broker_endpoints:
                if n not in self.procs or not self.procs[n].running:
                    last = self.start_broker(n)
            return last
        frontend, backend, replication = self.broker_endpoints[name]
        assert self.etcd is not None
        args = ["broker", "--data", str(self.root / name), "--frontend", frontend, "--backend", backend,
                "--replication", replication, "--slots", str(self.slots), "--rf", str(self.rf), "-w", str(self.w),
                "--etcd", self.etcd.endpoints, "--etcd-prefix", self.prefix, "--name", name,
                "--lease-ttl", str(self.lease_ttl),
                *self._flag("--heartbeat", self.heartbeat), *self._flag("--request-timeout", self.request_timeout),
                *(["--keys", str(self.key_dir)] if self.keys else []), *self.broker_args]
        # JSON logs: tests read each broker's terms from them (leading / leadership_given_up).
        netns = ["ip", "netns", "exec", self.lab.hosts[name].name] if self.lab is not None else []
        p = self.procs.get(name) or Proc(name, args, self.root / "logs" / f"{name}.log", self.env,
                                         command=[*netns, *self.command, "--log-json"], cwd=self.cwd)
        p.args = args
        self.procs[name] = p
        p.start()
        return p

    def leader(self) -> dict[str, Any] | None:
        """The leader key: {"value": {name, frontend, ...}, "create_revision": epoch}, or None."""
        assert self.etcd is not None
        return self.etcd.get(self.prefix + "leader")

    def leader_name(self, timeout: float = 15.0) -> str:
        found = wait_for(self.leader, timeout, 0.05, "a leader in etcd")
        return str(found["value"]["name"])

    def wait_new_leader(self, old_epoch: int, timeout: float = 15.0) -> dict[str, Any]:
        def newer() -> dict[str, Any] | None:
            cur = self.leader()
            return cur if cur is not None and cur["create_revision"] > old_epoch else None

        return wait_for(newer, timeout, 0.02, f"a leader after epoch {old_epoch}")

    def broker_procs(self) -> list[Proc]:
        return [self.procs[n] for n in self.broker_endpoints if n in self.procs]



def stop(cluster: HaCluster | None, etcd: EtcdCluster | None, request: Any) -> None:
    """Every etcd-mode fixture's cleanup (``request``: the pytest request): the logs if the test
    failed, then every process, etcd last."""
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if cluster is not None:
        if failed:
            print(cluster.logs())
        cluster.stop_all()
    if etcd is not None:
        etcd.stop()
