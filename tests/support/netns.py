"""Network namespaces for partition tests (root only).

``NetLab`` makes, per run, a private little network in 10.231.<x>.0/24 (``x`` picked among the
third octets no interface of this host uses yet):

- a *service link*: a veth pair left in the host namespace, ``zkv-<pid>-0h`` = 10.231.x.1/30,
  ``zkv-<pid>-0n`` without an address. The broker binds its backend and replication endpoints on
  10.231.x.1. The nemesis never touches this link, so the address stays reachable for everyone;
- one *host* per worker that gets a namespace: namespace ``zkv-<pid>-<n>`` (n >= 1), veth pair
  ``zkv-<pid>-<n>h`` (host side, 10.231.x.(4n+1)/30) / ``zkv-<pid>-<n>n`` (inside, 10.231.x.(4n+2)/30),
  ``lo`` up, default route via the host side. The worker inside reaches 10.231.x.1 through its own
  veth only, so ``ip link set zkv-<pid>-<n>h down`` cuts exactly that worker off (packets vanish,
  connections stall: a switch failure, not a refused connection) and ``up`` heals it.
- ``cut_tcp`` drops chosen TCP conversations inside one namespace with nftables (a broker cut
  off from etcd only, or from its workers only), ``heal_tcp`` lets them through again.

Traffic only ever goes to loopback, 10.231.x.1 (a local address of this host) and addresses
inside the namespaces made here. ``cleanup`` deletes every namespace and veth made, and is safe to
call more than once; tests call it in a finalizer.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

_probe_ids = itertools.count(1)
CUT_TABLE = "zkv_cut"  # the nftables table of NetLab.cut_tcp, inside one namespace


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def netns_unavailable() -> str | None:
    """Why network-namespace tests cannot run here (None when they can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add); CI runs as root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"zkv-{os.getpid()}-probe{next(_probe_ids)}"
    res = _ip("netns", "add", name, check=False)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    veth = f"zkv-{os.getpid()}-p"
    res = _ip("link", "add", f"{veth}h", "type", "veth", "peer", "name", f"{veth}n", check=False)
    if res.returncode != 0:
        return f"cannot create a veth pair: {res.stderr.strip()}"
    _ip("link", "del", f"{veth}h", check=False)
    return None


def nft_unavailable() -> str | None:
    """Why the tests that cut single TCP conversations (NetLab.cut_tcp) cannot run here."""
    if shutil.which("nft") is None:
        return "nftables is not installed (Debian: apt-get install nftables)"
    return None


def _used_third_octets() -> set[int]:
    out = _ip("-4", "-o", "addr", "show").stdout
    return {int(m.group(1)) for m in re.finditer(r"inet 10\.231\.(\d+)\.", out)}


@dataclass
class NetHost:
    """A process's namespace (a worker's, or a broker's) and its link to the host."""

    name: str  # the namespace
    host_if: str  # host side of the veth pair: the link the nemesis takes down
    ns_if: str
    host_addr: str
    addr: str  # the process's own address inside its namespace

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]


@dataclass
class NetLab:
    prefix: str = field(default_factory=lambda: f"zkv-{os.getpid()}")
    hosts: dict[str, NetHost] = field(default_factory=dict)
    service_addr: str = ""
    _links: list[str] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)
    _octet: int = -1

    def __post_init__(self) -> None:
        # An interface name has at most 15 characters: "zkv-<pid>-<n>h" fits for pids up to 7 digits.
        assert len(f"{self.prefix}-15h") <= 15, self.prefix

    def setup(self) -> NetLab:
        """Pick a free 10.231.x.0/24 and make the service link."""
        used = _used_third_octets()
        start = os.getpid() % 250 + 1
        free = [x for x in (*range(start, 255), *range(1, start)) if x not in used]
        if not free:
            raise RuntimeError("no free 10.231.x.0/24 on this host")
        self._octet = free[0]
        self.service_addr = f"10.231.{self._octet}.1"
        host_if, peer_if = f"{self.prefix}-0h", f"{self.prefix}-0n"
        _ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        self._links.append(host_if)
        _ip("addr", "add", f"{self.service_addr}/30", "dev", host_if)
        _ip("link", "set", peer_if, "up")
        _ip("link", "set", host_if, "up")
        return self

    def add_host(self, label: str) -> NetHost:
        """A namespace with its own address and a veth link to the host, for worker ``label``."""
        assert self.service_addr, "setup() first"
        n = len(self.hosts) + 1
        assert n < 63, "a /24 holds 63 /30 links"
        ns = f"{self.prefix}-{n}"
        h = NetHost(name=ns, host_if=f"{ns}h", ns_if=f"{ns}n", host_addr=f"10.231.{self._octet}.{4 * n + 1}",
                    addr=f"10.231.{self._octet}.{4 * n + 2}")
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("link", "add", h.host_if, "type", "veth", "peer", "name", h.ns_if)
        self._links.append(h.host_if)
        _ip("link", "set", h.ns_if, "netns", ns)
        _ip("addr", "add", f"{h.host_addr}/30", "dev", h.host_if)
        _ip("link", "set", h.host_if, "up")
        _ip("-n", ns, "addr", "add", f"{h.addr}/30", "dev", h.ns_if)
        _ip("-n", ns, "link", "set", h.ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", h.host_addr)
        self.hosts[label] = h
        return h

    def link_down(self, label: str) -> None:
        _ip("link", "set", self.hosts[label].host_if, "down")

    def link_up(self, label: str) -> None:
        _ip("link", "set", self.hosts[label].host_if, "up")

    def cut_tcp(self, label: str, local_ports: tuple[int, ...] = (), remote: tuple[tuple[str, int], ...] = ()) -> None:
        """Inside ``label``'s namespace, silently drop TCP to and from its own ``local_ports`` (the
        peers that connect to it there) and to and from each ``(address, port)`` of ``remote`` (a
        server it connects to): one conversation cut, the rest of its network untouched. nftables
        tables are per namespace, so nothing outside it changes. ``heal_tcp`` removes the cut."""
        h = self.hosts[label]
        rules_in, rules_out = [], []
        if local_ports:
            ports = ", ".join(str(p) for p in local_ports)
            rules_in.append(f"tcp dport {{ {ports} }} drop")
            rules_out.append(f"tcp sport {{ {ports} }} drop")
        for addr, port in remote:
            rules_in.append(f"ip saddr {addr} tcp sport {port} drop")
            rules_out.append(f"ip daddr {addr} tcp dport {port} drop")
        ruleset = (f"table inet {CUT_TABLE} {{\n"
                   f"  chain input {{ type filter hook input priority 0; policy accept; {'; '.join(rules_in)}; }}\n"
                   f"  chain output {{ type filter hook output priority 0; policy accept; {'; '.join(rules_out)}; }}\n"
                   "}\n")
        subprocess.run(["ip", "netns", "exec", h.name, "nft", "-f", "-"], input=ruleset, text=True,
                       capture_output=True, timeout=20, check=True)

    def heal_tcp(self, label: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.hosts[label].name, "nft", "delete", "table", "inet", CUT_TABLE],
                       capture_output=True, timeout=20, check=False)

    def link_is_up(self, label: str) -> bool:
        """Administratively up (the flag ``ip link set ... up`` sets)."""
        out = _ip("-o", "link", "show", "dev", self.hosts[label].host_if).stdout
        m = re.search(r"<([^>]*)>", out)
        return m is not None and "UP" in m.group(1).split(",")

    def cleanup(self) -> list[str]:
        """Delete every veth and namespace made here; returns the errors (normally none)."""
        errors: list[str] = []
        for link in reversed(self._links):  # deleting one end of a veth pair deletes both
            res = _ip("link", "del", link, check=False)
            if res.returncode != 0 and "Cannot find device" not in res.stderr:
                errors.append(f"ip link del {link}: {res.stderr.strip()}")
        self._links.clear()
        for ns in reversed(self._namespaces):
            res = _ip("netns", "del", ns, check=False)
            if res.returncode != 0 and "No such file" not in res.stderr:
                errors.append(f"ip netns del {ns}: {res.stderr.strip()}")
        self._namespaces.clear()
        return errors

    def leftovers(self) -> list[str]:
        """Namespaces or links with this lab's prefix that still exist (for the cleanup check)."""
        names = _ip("netns", "list").stdout.split()
        links = re.findall(r"^\d+: ([^:@]+)", _ip("-o", "link", "show").stdout, flags=re.M)
        return [n for n in (*names, *links) if n == self.prefix or n.startswith(self.prefix + "-")]
