"""``zkv worker``: the storage worker's command-line options, and its configuration built from them.

The ``zkv`` group (client/cli/) loads this module only when the command is run; the defaults
are WorkerConfig's, so there is one definition of each.
"""

from __future__ import annotations

import os
import sys

import click

from protocol.curve import WORKER, KeysError, load_credentials
from protocol.limits import DEFAULT_BACKEND, DEFAULT_REPLICATION
from protocol.metrics import host_port
from protocol.sockets import loopback
from worker.brokers import BrokerList
from worker.lock import DataDirInUse, DataLock
from worker.server import WorkerConfig, run_worker


@click.command()
@click.option("--id", "worker_id", required=True, help="Stable worker id (keep it across restarts).")
@click.option("--data", required=True, help="Data directory (LMDB).")
@click.option("--broker", default=DEFAULT_BACKEND, show_default=True,
              help="Broker backend; several brokers (etcd mode): their backends, comma-separated.")
@click.option("--replication", default=DEFAULT_REPLICATION, show_default=True,
              help="Broker replication PUB; several brokers: theirs, comma-separated, in --broker's order.")
@click.option("--credentials", default="", type=click.Path(dir_okay=False),
              help="This worker's credentials file (zkv keys add-worker) for a broker with --keys.")
@click.option("--heartbeat", default=WorkerConfig.heartbeat, show_default=True, help="Heartbeat interval, seconds.")
@click.option("--map-size", default=WorkerConfig.map_size, show_default=True, help="LMDB map size, bytes.")
@click.option("--metrics", default="", metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (default: none).")
@click.option("--reads", default="", metavar="ENDPOINT",
              help="Answer reads of the slots this worker holds read leases on at this endpoint (tcp://HOST:PORT, "
                   "bound and told to clients as given; a broker with --read-lease grants them). Default: none.")
@click.option("--insecure", is_flag=True,
              help="Serve --reads beyond loopback anyway (anyone who reaches it reads the keys it holds leases on).")
@click.option("--supervise", is_flag=True,
              help="Restart the serving process when it crashes; exit only on SIGTERM/SIGINT (for honcho).")
@click.option("--test-drop-replication", default="", hidden=True,
              help="Test hook: drop replication messages (every=N or prob=P).")
@click.option("--test-clock-skew-ms", default=0, hidden=True, help="Test hook: offset this worker's clock.")
def worker(worker_id: str, data: str, broker: str, replication: str, credentials: str, heartbeat: float,
           map_size: int, metrics: str, reads: str, insecure: bool, supervise: bool, test_drop_replication: str,
           test_clock_skew_ms: int) -> None:
    """Run a storage worker. Its data directory is locked: a second worker on it is refused."""
    try:
        BrokerList.parse(broker, replication)  # refused here, in one line, rather than in the loop
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if credentials:
        _check_credentials(credentials, worker_id)
    if reads and credentials:
        raise click.BadParameter("the reads endpoint has no CURVE yet: not with --credentials", param_hint="--reads")
    if reads and not reads.startswith(("tcp://", "ipc://")):
        raise click.BadParameter("give a tcp:// or ipc:// endpoint", param_hint="--reads")
    if reads and not loopback(reads) and not insecure:
        # It answers without authentication, as a broker without --keys does: loopback only.
        raise click.BadParameter("refusing to serve reads beyond loopback: anyone who reaches it could read "
                                 "the keys it holds leases on; give a loopback address or --insecure",
                                 param_hint="--reads")
    if metrics:
        try:
            host_port(metrics)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--metrics") from None
    cfg = WorkerConfig(worker_id=worker_id, data_dir=data, broker=broker, replication=replication,
                       heartbeat=heartbeat, map_size=map_size, credentials=credentials, metrics=metrics, reads=reads,
                       drop_replication=test_drop_replication, clock_skew_ms=test_clock_skew_ms)
    try:
        lock = DataLock(data)
    except DataDirInUse as e:
        raise click.ClickException(str(e)) from None
    if not supervise:
        lock.record(os.getpid())
        run_worker(cfg)
        return
    from worker.supervise import Supervisor

    sys.exit(Supervisor(lambda: run_worker(cfg), lock).run())


def _check_credentials(path: str, worker_id: str) -> None:
    """Refuse at once, in one line, credentials the broker would refuse (another worker's, a client's)."""
    try:
        creds = load_credentials(path)
    except KeysError as e:
        raise click.ClickException(str(e)) from None
    if creds.kind != WORKER or creds.name != worker_id:
        raise click.ClickException(f"{path} holds the credentials of {creds.kind} {creds.name!r}, not of worker "
                                   f"{worker_id!r}: the broker accepts a worker only with its own key")
