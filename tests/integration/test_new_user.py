"""What a new user meets first (issue 13), on real processes: a port in use, a worker started
twice on one data directory, a worker that crashes under supervision, no broker at all, a
cluster that has not formed, and the configuration the CLI shows."""

from __future__ import annotations

import socket

import pytest

from tests.support.cluster import Cluster, wait_for

pytestmark = pytest.mark.timeout(120)


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
