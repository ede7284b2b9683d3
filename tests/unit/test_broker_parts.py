"""The broker's shape: the commit rule as a table, the Ready's order, and the import graph
between its parts (no part imports another; nothing points back up at the entry)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from broker.quorum import committed_seq
from broker.ready import Metadata, Ready, execute

BROKER = Path(__file__).resolve().parents[2] / "broker"
# The parts: each owns one responsibility and its state, and talks to the others through events.
PARTS = {"writes", "reads", "streams", "replicas", "recovery", "membership", "moves", "scan", "watch", "expiry",
         "dumps", "leases"}
# The entry: a core; with active brokers, the cores of the groups this broker leads (active).
ENTRY = {"core", "active"}
# Sockets, disk, etcd, the command line: they may use the entry.
EDGE = {"server", "endpoints", "meta", "cli", "zap", "etcd", "group_election", "group_leading"}


@pytest.mark.parametrize(("applied", "w", "last", "expected"), [
    ([], 2, 0, None),  # no replica counts: nothing can be said
    ([5], 2, 5, None),  # fewer than W replicas
    ([5, 3], 2, 5, 3),  # the W-th highest
    ([3, 5], 2, 5, 3),  # order does not matter
    ([5, 5, 0], 2, 5, 5),
    ([7, 6, 1], 2, 9, 6),
    ([9, 9, 9], 2, 7, 7),  # never past the last seq sequenced (a replica from a lost history)
    ([4, 2, 8], 3, 8, 2),  # W = RF: the slowest
    ([4], 1, 4, 4),
    ([0, 0], 2, 3, 0),
])
def test_the_commit_rule_is_the_w_th_highest_applied_seq(applied: list[int], w: int, last: int,
                                                           expected: int | None) -> None:
    assert committed_seq(applied, w, last) == expected


def test_a_ready_is_carried_out_in_one_order_persist_publish_workers_clients() -> None:
    calls: list[str] = []

    class Sink:
        def apply(self, metadata: Metadata, sync: bool) -> None:
            calls.append(f"persist sync={sync}")

    ready = Ready(must_sync=True)
    ready.reply(b"c", [b"answer"])
    ready.to_worker(b"w", [b"assign"])
    ready.publish("w1", [b"header"])
    ready.metadata.dedup.append((b"cid", 1, [[0, 1, 1]], None))
    execute(ready, Sink(), publish=lambda f: calls.append("publish"),
            send_worker=lambda i, f: calls.append("worker"), send_client=lambda i, f: calls.append("client"))
    assert calls == ["persist sync=True", "publish", "worker", "client"]
    calls.clear()
    execute(Ready(), Sink(), publish=lambda f: calls.append("publish"),
            send_worker=lambda i, f: calls.append("worker"), send_client=lambda i, f: calls.append("client"))
    assert calls == []  # an empty step writes and sends nothing


def _broker_imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in BROKER.glob("*.py"):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("broker."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("broker.")}
        graph[path.stem] = deps
    return graph


def test_no_part_imports_another_and_nothing_points_back_up() -> None:
    graph = _broker_imports()
    assert PARTS <= set(graph), f"missing parts: {PARTS - set(graph)}"
    for part in PARTS:
        assert not graph[part] & PARTS - {part}, f"{part} imports {graph[part] & PARTS}"
        assert not graph[part] & (ENTRY | EDGE), f"{part} imports {graph[part] & (ENTRY | EDGE)}"
    shared = set(graph) - PARTS - ENTRY - EDGE - {"__init__"}
    for mod in shared:
        above = graph[mod] & (PARTS | ENTRY | EDGE)
        assert not above, f"shared module {mod} imports {above}"


def test_the_broker_import_graph_has_no_cycle() -> None:
    graph = _broker_imports()
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> None:
        assert mod not in path, f"import cycle: {' -> '.join([*path, mod])}"
        if mod in done:
            return
        for dep in graph.get(mod, ()):
            visit(dep, [*path, mod])
        done.add(mod)

    for mod in graph:
        visit(mod, [])


def test_no_part_touches_lmdb_time_or_uuid() -> None:
    for path in BROKER.glob("*.py"):
        if path.stem in EDGE:
            continue
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & {"lmdb", "time", "uuid", "zmq", "os", "random"}, f"{path.name} imports {names}"
