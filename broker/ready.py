"""Ready: everything one step of the broker produced, and the one function that carries it out.

As in etcd-io/raft, the decisions (broker/core.py and its parts) only fill a Ready; the caller
owns the sockets and the disk. The server loop and the simulator both call ``execute``, so the
order below is written once:

1. persist the metadata (fsynced when ``must_sync``): nothing leaves the broker before the
   metadata that explains it is written, and a slot map a worker will act on is durable first;
2. publish the replication messages;
3. send to the workers;
4. answer the clients, last: an answer never overtakes what makes it true.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.frames import MDPW
from protocol.replication import encode_replication

Frames = list[bytes]


@dataclass
class Metadata:
    """What changed in the broker's metadata during one step. Slots and workers hold the live
    objects while the step runs; ``BrokerCore.ready`` turns them into records."""

    slots: dict[int, Any] = field(default_factory=dict)
    workers: dict[str, Any] = field(default_factory=dict)
    removed_workers: list[str] = field(default_factory=list)
    # (client id, request number, parts [slot, epoch, seq], results or None)
    dedup: list[tuple[bytes, int, list[list[int]], list[Any] | None]] = field(default_factory=list)
    streams: dict[bytes, dict[str, Any] | None] = field(default_factory=dict)  # None: the stream closed
    cluster: dict[str, Any] | None = None  # written once, when the cluster forms

    def __bool__(self) -> bool:
        return bool(self.slots or self.workers or self.removed_workers or self.dedup or self.streams
                    or self.cluster is not None)


@dataclass
class Ready:
    client: list[tuple[bytes, Frames]] = field(default_factory=list)  # (identity, frames)
    workers: list[tuple[bytes, Frames]] = field(default_factory=list)  # (identity, [MDPW, ...])
    replication: dict[str, list[Frames]] = field(default_factory=dict)  # worker id -> write batches
    metadata: Metadata = field(default_factory=Metadata)
    must_sync: bool = False  # the metadata must be fsynced before anything is sent
    group: int | None = None  # the slot group whose writes these are (active brokers): the topic says it

    def reply(self, identity: bytes, frames: Frames) -> None:
        self.client.append((identity, frames))

    def to_worker(self, identity: bytes, frames: Frames) -> None:
        self.workers.append((identity, [MDPW, *frames]))

    def publish(self, wid: str, batch: Frames) -> None:
        self.replication.setdefault(wid, []).append(batch)

    def replication_messages(self) -> list[Frames]:
        """One PUB message per worker that has writes to apply: per-message costs paid once."""
        return [encode_replication(wid, batches, self.group) for wid, batches in self.replication.items()]

    def __bool__(self) -> bool:
        return bool(self.client or self.workers or self.replication or self.metadata)


class MetadataSink(Protocol):
    def apply(self, metadata: Metadata, sync: bool) -> None: ...


def execute(ready: Ready, meta: MetadataSink, publish: Callable[[Frames], None],
            send_worker: Callable[[bytes, Frames], None], send_client: Callable[[bytes, Frames], None]) -> None:
    """Carry out one Ready in the order of the module docstring."""
    if ready.metadata or ready.must_sync:
        meta.apply(ready.metadata, sync=ready.must_sync)
    for frames in ready.replication_messages():
        publish(frames)
    for identity, frames in ready.workers:
        send_worker(identity, frames)
    for identity, frames in ready.client:
        send_client(identity, frames)
